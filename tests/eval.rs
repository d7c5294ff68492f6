//! `tpserve eval`: perplexity through real worker processes equals the single-process one,
//! and KL divergence of a model against itself and against another.

use std::path::Path;

use serde_json::Value;
use tempfile::TempDir;
use tpserve_model::testing::TinySpec;

mod common;
use common::*;

fn eval(args: &[&str], model: &Path) -> Value {
    let out = bin().arg("eval").args(args).args(["--json", "--model"]).arg(model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Relative difference.
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn text(dir: &TempDir) -> std::path::PathBuf {
    // Letters and spaces the tiny vocabulary has tokens for, in a pseudo-random order.
    let words = ["a b c", "hello world", "x y", "abc", "the cat", "b a"];
    let t: Vec<&str> = (0..400).map(|i: usize| words[(i * 7 + i / 3) % words.len()]).collect();
    let p = dir.path().join("text.txt");
    std::fs::write(&p, t.join(" ")).unwrap();
    p
}

#[test]
fn perplexity_at_tp2_pp2_and_tp2_by_pp2_equals_tp1_on_a_tiny_model() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let f = text(&dir);
    let f = f.to_str().unwrap();
    let one = eval(&["perplexity", "--file", f, "--ctx", "64", "--chunks", "6", "--threads", "1"], &m);
    let two = eval(&["perplexity", "--file", f, "--ctx", "64", "--chunks", "6", "--tp", "2", "--threads", "1"], &m);
    assert_eq!(one["chunks"], 6);
    // 31 scored positions per 64-token window.
    assert_eq!(one["tokens"], 6 * 31);
    let (p1, p2) = (one["ppl"].as_f64().unwrap(), two["ppl"].as_f64().unwrap());
    assert!(p1 > 1.0 && p1.is_finite() && one["ppl_stderr"].as_f64().unwrap() > 0.0, "{one}");
    assert!(rel(p1, p2) < 5e-5, "tp = 1 {p1} vs tp = 2 {p2}");
    // With pp > 1 every stage projects its slice of the vocabulary from the last stage's
    // hidden states: every position's log-likelihood takes that path.
    for split in [&["--pp", "2"][..], &["--tp", "2", "--pp", "2"]] {
        let args = [&["perplexity", "--file", f, "--ctx", "64", "--chunks", "6", "--threads", "1"][..], split].concat();
        let p = eval(&args, &m)["ppl"].as_f64().unwrap();
        assert!(rel(p1, p) < 5e-5, "tp = 1 {p1} vs {split:?} {p}");
    }
}

#[test]
fn perplexity_at_tp2_and_pp2_equals_tp1_on_the_default_model() {
    let Some(m) = default_model() else { return };
    let f = tpserve_fetch::testing::data_dir().join("wikitext-2-raw-test.txt");
    let f = f.to_str().unwrap();
    let one = eval(&["perplexity", "--file", f, "--chunks", "2"], &m);
    let two = eval(&["perplexity", "--file", f, "--chunks", "2", "--tp", "2"], &m);
    let pp = eval(&["perplexity", "--file", f, "--chunks", "2", "--pp", "2"], &m)["ppl"].as_f64().unwrap();
    let (p1, p2) = (one["ppl"].as_f64().unwrap(), two["ppl"].as_f64().unwrap());
    println!("WikiText-2, 2 windows of 512: ppl tp=1 {p1}, tp=2 {p2}, pp=2 {pp}");
    assert!(rel(p1, pp) < 5e-5, "tp = 1 {p1} vs pp = 2 {pp}");
    assert_eq!(one["tokens"], 2 * 255);
    // A small, sane perplexity for a real model on real text, the same at tp = 2.
    assert!((5.0..60.0).contains(&p1), "{one}");
    assert!(rel(p1, p2) < 5e-5, "tp = 1 {p1} vs tp = 2 {p2}");
}

#[test]
fn kl_of_a_model_against_itself_is_zero_and_against_another_is_finite() {
    let dir = TempDir::new().unwrap();
    let a = tiny(&dir, "a.gguf", &TinySpec::gemma3());
    let b = tiny(&dir, "b.gguf", &TinySpec::llama());
    let f = text(&dir);
    let f = f.to_str().unwrap();
    let args = |r: &Path| {
        vec![
            "kl".to_string(),
            "--reference".into(),
            r.to_str().unwrap().into(),
            "--file".into(),
            f.into(),
            "--ctx".into(),
            "32".into(),
            "--chunks".into(),
            "3".into(),
        ]
    };
    let same = eval(&args(&a).iter().map(String::as_str).collect::<Vec<_>>(), &a);
    assert_eq!(same["tokens"], 3 * 15);
    assert!(same["kl_mean"].as_f64().unwrap() < 1e-9, "{same}");
    assert_eq!(same["top1_agreement"], 1.0);
    // Tiny random models put nearly all mass on one token, so their KL is tiny but real;
    // `kl_and_top1`'s own tests check the value on soft distributions.
    let other = eval(&args(&a).iter().map(String::as_str).collect::<Vec<_>>(), &b);
    let k = other["kl_mean"].as_f64().unwrap();
    assert!(k.is_finite() && k >= 0.0 && k > same["kl_mean"].as_f64().unwrap(), "{other}");
    // Different vocabularies cannot be compared.
    if let Some(d) = default_model() {
        let out = bin().args(["eval", "kl", "--reference"]).arg(&a).args(["--file", f, "--model"]).arg(&d).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code() == Some(1) && err.contains("same vocabulary"), "{err}");
    }
}

#[test]
fn eval_refuses_bad_input_naming_it() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3());
    let f = text(&dir);
    for (args, needle) in [
        (vec!["perplexity", "--file", "/nonexistent.txt"], "--file /nonexistent.txt"),
        (vec!["perplexity", "--file", f.to_str().unwrap(), "--ctx", "100000"], "--ctx 100000"),
        (vec!["perplexity", "--file", f.to_str().unwrap(), "--ctx", "4096"], "--ctx 4096"),
        (vec!["perplexity", "--file", f.to_str().unwrap(), "--chunks", "0"], "--chunks 0"),
    ] {
        let out = bin().arg("eval").args(&args).arg("--model").arg(&m).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
