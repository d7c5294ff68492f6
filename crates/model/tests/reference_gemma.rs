//! The default model (Gemma 3 270M Q4_K_M) against llama.cpp's outputs in
//! `tests/data/reference`: greedy tokens and top-5 log-probabilities.

mod common;

use tpserve_gguf::Gguf;
use tpserve_model::model::{LogitsWanted, Model};
use tpserve_model::testing::Seqs;
use tpserve_types::sampling::{argmax, logsumexp};

/// How far our log-probabilities may stray from llama.cpp's, for each of its top-5 tokens at
/// every teacher-forced position. Measured, not wished for: a forward pass of the same file
/// with every weight dequantized to f32 and no activation quantization (exact arithmetic, equal
/// to an independent float64 NumPy forward to 1e-4) differs from llama.cpp by a mean of 0.103
/// nats and at most 0.85, because this model amplifies rounding (f16 KV cache, f16 GELU table,
/// 8-bit activations) by that much. Our quantized path: mean 0.11, 90th percentile 0.26, and a
/// worst single value that moves between 0.64 and 1.06 with any change of rounding (the
/// model is that sensitive). A wrong kernel, norm or RoPE moves the mean by whole nats.
const MEAN_TOLERANCE: f32 = 0.15;
const P90_TOLERANCE: f32 = 0.35;
const MAX_TOLERANCE: f32 = 1.5;

/// Below this top-2 margin (in llama.cpp's own logits) two tokens are a near-tie that the
/// rounding noise above may rightly flip; greedy decoding must agree up to the first one.
/// 0.25 nats is the 90th percentile of the difference between llama.cpp and the exact-
/// arithmetic forward pass (0.238) and of ours (0.25-0.27); the exact forward itself diverges
/// from llama.cpp on the haiku prompt at position 8, where llama.cpp's margin is 0.20.
const NEAR_TIE: f64 = 0.25;

/// Where we first pick another token than llama.cpp, its token must be a close second for us.
/// The widest seen: 0.72 nats on the translation prompt, where llama.cpp's own margin is 0.08
/// and the exact forward puts the other token first by 0.12.
const DIVERGENCE_GAP: f32 = 1.0;

fn load() -> Option<Model> {
    let path = common::default_model()?;
    let g = Gguf::open(path).unwrap();
    Some(Model::load(&g).unwrap())
}

#[test]
fn greedy_tokens_match_llama_cpp_up_to_the_first_near_tie() {
    let Some(model) = load() else { return };
    let pool = common::pool(2);
    let mut total_match = 0;
    let mut total = 0;
    for case in common::read_jsonl("greedy.jsonl") {
        let prompt = common::ids(&case["prompt_ids"]);
        let want = common::ids(&case["output_ids"]);
        let margins: Vec<f64> = case["top2_margin"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        // Our greedy tokens, and at each step how far the reference's token is below our pick.
        let (got, gaps) = pool.install(|| {
            let mut seqs = Seqs::new(&model, 1, prompt.len() + want.len());
            let mut logits = seqs.forward(&model, &[(0, &prompt, LogitsWanted::Last)]).unwrap().remove(0);
            let (mut out, mut gaps) = (Vec::new(), Vec::new());
            for w in &want {
                let id = argmax(&logits);
                out.push(id);
                gaps.push(logits[id as usize] - logits[*w as usize]);
                logits = seqs.forward(&model, &[(0, &[id], LogitsWanted::Last)]).unwrap().remove(0);
            }
            (out, gaps)
        });
        let must = margins.iter().position(|&m| m < NEAR_TIE).unwrap_or(want.len()).min(16);
        let matched = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        println!("{:?}: {matched}/{} tokens match (required {must})", case["prompt"].as_str().unwrap(), want.len());
        assert!(matched >= must, "prompt {:?}: only {matched} tokens match, {must} required\n got {got:?}\nwant {want:?}", case["prompt"]);
        if matched < want.len() {
            let gap = gaps[matched];
            println!("  first divergence at {matched}: llama.cpp's token is {gap:.3} nats below ours (its margin there: {:.3})", margins[matched]);
            assert!(gap < DIVERGENCE_GAP, "prompt {:?}: at position {matched} llama.cpp's token is {gap} nats below ours", case["prompt"]);
        }
        total_match += matched;
        total += want.len();
    }
    println!("greedy: {total_match}/{total} reference tokens match in all");
}

#[test]
fn top5_logprobs_match_llama_cpp_within_tolerance() {
    let Some(model) = load() else { return };
    let pool = common::pool(2);
    let mut worst = 0f32;
    let mut diffs = Vec::new();
    for case in common::read_jsonl("top5-logprobs.jsonl") {
        let prompt = common::ids(&case["prompt_ids"]);
        let output = common::ids(&case["output_ids"]);
        let top5 = case["top5"].as_array().or_else(|| case["top5_logprobs"].as_array()).expect("a top5 field");
        // Teacher forcing: prompt + reference output in one pass, logits at every position.
        let mut all = prompt.clone();
        all.extend(&output[..output.len() - 1]);
        let logits = pool.install(|| {
            let mut seqs = Seqs::new(&model, 1, all.len());
            seqs.forward(&model, &[(0, &all, LogitsWanted::All)]).unwrap().remove(0)
        });
        let v = model.config().vocab;
        for (i, entries) in top5.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
            let lse = logsumexp(row.iter().copied());
            for e in entries.as_array().unwrap() {
                let id = e[0].as_u64().unwrap() as usize;
                let want = e[1].as_f64().unwrap() as f32;
                let got = row[id] - lse;
                let d = (got - want).abs();
                worst = worst.max(d);
                diffs.push(d);
                assert!(d < MAX_TOLERANCE, "prompt {:?} position {i} token {id}: ours {got:.4} vs llama.cpp {want:.4}", case["prompt"]);
            }
        }
    }
    diffs.sort_by(f32::total_cmp);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    println!(
        "top-5 logprobs vs llama.cpp over {} values: mean |diff| {mean:.4}, median {:.4}, p90 {:.4}",
        diffs.len(),
        diffs[diffs.len() / 2],
        diffs[diffs.len() * 9 / 10]
    );
    println!("top-5 logprobs: worst difference from llama.cpp {worst:.4} nats (tolerance {MAX_TOLERANCE})");
    assert!(mean < MEAN_TOLERANCE, "mean difference {mean:.4} nats exceeds {MEAN_TOLERANCE}");
    let p90 = diffs[diffs.len() * 9 / 10];
    assert!(p90 < P90_TOLERANCE, "90th percentile difference {p90:.4} nats exceeds {P90_TOLERANCE}");
}
