//! End-to-end tests of distributed execution: real `tpserve up`, `coordinator` and `worker`
//! processes on loopback, tiny random-weight models written by the tests and the real
//! default model. Every process is bounded by a deadline and killed on drop, so a hang fails
//! a test instead of blocking the suite (deadlines guard; they never assert speed).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tpserve_model::testing::TinySpec;

mod common;
use common::*;

/// `tpserve up --tp tp --pp pp --threads 1 --model model`, waited on until it serves.
fn up(model: &Path, tp: usize, pp: usize, extra: &[&str]) -> Proc {
    let mut cmd = bin();
    cmd.args(["up", "--stdin", "--tp", &tp.to_string(), "--pp", &pp.to_string(), "--threads", "1", "--model"]).arg(model).args(extra);
    let mut p = Proc::spawn(cmd);
    p.wait_stderr("ready:");
    p
}

fn ids(v: &Value) -> Vec<u64> {
    v["output_ids"].as_array().unwrap_or_else(|| panic!("no output_ids in {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Answers of `reqs` from a cluster of `tp` x `pp` workers.
fn answers(model: &Path, tp: usize, pp: usize, reqs: &[Value]) -> Vec<Vec<u64>> {
    let mut p = up(model, tp, pp, &[]);
    let out = reqs.iter().map(|r| ids(&p.ask(r))).collect();
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "tpserve up failed:\n{log}");
    out
}

fn check_every_split_matches_tp1(model: &Path, reqs: &[Value], splits: &[(usize, usize)]) {
    let want = answers(model, 1, 1, reqs);
    for w in &want {
        assert!(w.len() >= 32, "each request should produce at least 32 tokens, got {}", w.len());
    }
    for &(tp, pp) in splits {
        let got = answers(model, tp, pp, reqs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "request {i} ({}) at tp = {tp}, pp = {pp} differs from tp = 1", reqs[i]);
        }
    }
}

/// Greedy requests, and hot seeded sampling that turns any difference in the logits into
/// different tokens (the tiny models' greedy output just repeats the last prompt token;
/// the models are made `for_sampling` so temperature 2 varies).
fn tiny_requests() -> Vec<Value> {
    let mut reqs = Vec::new();
    for prompt in ["a b c", "hello world", "x"] {
        reqs.push(json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": true}));
        reqs.push(json!({"prompt": prompt, "max_tokens": 32, "temperature": 2, "seed": 7, "ignore_eos": true}));
    }
    reqs.push(json!({"prompt": "a b", "max_tokens": 32, "temperature": 2, "top_k": 20, "top_p": 0.9, "seed": 11, "ignore_eos": true}));
    reqs
}

#[test]
fn tiny_gemma_gives_tp1_tokens_at_tp2_tp4_pp2_and_tp2_by_pp2() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable().for_sampling());
    check_every_split_matches_tp1(&m, &tiny_requests(), &[(2, 1), (4, 1), (1, 2), (2, 2)]);
}

#[test]
fn tiny_llama_with_split_kv_heads_gives_tp1_tokens_at_tp2_tp4_and_pp2() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "llama.gguf", &TinySpec::llama_shardable().for_sampling());
    check_every_split_matches_tp1(&m, &tiny_requests(), &[(2, 1), (4, 1), (1, 3), (2, 2)]);
}

#[test]
fn generate_through_workers_prints_the_same_json_fields_and_tokens_as_in_process() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable().for_sampling());
    let run = |extra: &[&str]| -> Value {
        let out = bin()
            .args([
                "generate",
                "--prompt",
                "a b c",
                "--max-tokens",
                "40",
                "--temperature",
                "2",
                "--seed",
                "5",
                "--top-k",
                "0",
                "--top-p",
                "1",
                "--ignore-eos",
                "--json",
                "--threads",
                "1",
                "--model",
            ])
            .arg(&m)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let local = run(&[]);
    let dist = run(&["--tp", "2", "--pp", "2"]);
    for key in ["prompt_ids", "output_ids", "text", "finish_reason"] {
        assert_eq!(local[key], dist[key], "{key} differs");
    }
    assert_eq!(ids(&dist).len(), 40);
    // The distributed run reports its four ranks' time and the control-plane bytes.
    let steps = &dist["steps"];
    assert_eq!(steps["ranks"].as_array().unwrap().len(), 4, "{steps}");
    assert!(steps["request_bytes"].as_u64().unwrap() > 0 && steps["response_bytes"].as_u64().unwrap() > 0, "{steps}");
    assert!(dist["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `tpserve generate --batch 6` at temperature 2 (copy i seeded 5 + i) with `extra` flags:
/// every copy's tokens and the number of steps.
fn batch_of_six(model: &Path, extra: &[&str]) -> (Value, u64) {
    let out = bin()
        .args(["generate", "--prompt", "a b c", "--max-tokens", "24", "--temperature", "2", "--seed", "5", "--ignore-eos", "--json", "--batch", "6"])
        .args(["--prefill-chunk", "4", "--threads", "1", "--model"])
        .arg(model)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["batch"]["output_ids"].clone(), v["steps"]["steps"].as_u64().unwrap_or_else(|| panic!("no step count in {v}")))
}

#[test]
fn pipeline_stages_overlap_on_batches_of_their_own_and_every_copy_keeps_its_tokens() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable().for_sampling());
    let (local, local_steps) = batch_of_six(&m, &[]);
    assert_eq!(local.as_array().map(Vec::len), Some(6), "{local}");
    for extra in [&["--pp", "2"][..], &["--tp", "2", "--pp", "2"]] {
        let (piped, steps) = batch_of_six(&m, extra);
        assert_eq!(piped, local, "{extra:?} changed some copy's tokens");
        // Two batches of three in flight at a time: about twice the steps of one batch of six.
        assert!(steps >= local_steps * 3 / 2, "{extra:?}: {steps} steps against {local_steps} in one process: the stages did not take turns");
    }
}

#[test]
fn impossible_plans_are_refused_at_start_up_saying_what_would_work() {
    let dir = TempDir::new().unwrap();
    let shardable = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    // 64-wide heads: at tp = 2 each rank's 128 attention-output columns split a 256-column k-quant block.
    let narrow = tiny(&dir, "narrow.gguf", &TinySpec::gemma3());
    let cases: [(&Path, &[&str], &[&str]); 4] = [
        (&shardable, &["--tp", "3"], &["4 attention heads cannot be split over tp = 3", "tp can be one of 1, 2, 4"]),
        (&shardable, &["--pp", "7"], &["7 pipeline stages for 6 layers", "at most 6"]),
        (&narrow, &["--tp", "2"], &["would split a quant block", "tp can be one of 1"]),
        (&shardable, &["--tp", "0"], &["tp must be at least 1"]),
    ];
    for (model, flags, needles) in cases {
        for cmd in ["generate", "up"] {
            let mut c = bin();
            c.arg(cmd).args(flags).arg("--model").arg(model);
            if cmd == "generate" {
                c.args(["--prompt", "a"]);
            }
            let start = Instant::now();
            let out = c.stdin(Stdio::null()).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {flags:?}: {err}");
            for n in needles {
                assert!(err.contains(n), "{cmd} {flags:?}: {err:?} lacks {n:?}");
            }
            assert!(!err.contains("worker 0: pid"), "{cmd} {flags:?} started workers before refusing: {err}");
            assert!(start.elapsed() < DEADLINE);
        }
    }
}

#[test]
fn a_worker_killed_with_sigkill_fails_the_request_clearly_and_the_coordinator_stays_up() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut p = up(&m, 2, 1, &["--comm-timeout-ms", "3000"]);
    let ok = p.ask(&json!({"prompt": "a b", "max_tokens": 4, "temperature": 0}));
    assert_eq!(ids(&ok).len(), 4, "{ok}");
    assert_eq!(p.pids.len(), 2, "{}", p.log());
    let (victim, survivor) = (p.pids[1], p.pids[0]);
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let t = Instant::now();
    let failed = p.ask(&json!({"prompt": "a b c", "max_tokens": 400, "temperature": 2, "seed": 1, "ignore_eos": true}));
    let took = t.elapsed();
    let msg = failed["error"]["message"].as_str().unwrap_or_else(|| panic!("expected an error, got {failed}"));
    assert!(msg.contains("worker rank 1") && msg.contains("reloads once every rank answers again"), "{msg}");
    assert!(took < Duration::from_secs(10), "the error took {took:?}");
    // The coordinator is still there and answers the next request at once: it waits for rank 1.
    let again = p.ask(&json!({"prompt": "a", "max_tokens": 2}));
    assert!(again["error"]["message"].as_str().unwrap().contains("waiting for rank 1"), "{again}");
    assert_eq!(again["error"]["type"], "cluster_error");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
    wait_gone(survivor, Duration::from_secs(15));
}

#[test]
fn a_stopped_worker_is_an_error_within_the_collective_deadline_not_a_hang() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut p = up(&m, 2, 1, &["--comm-timeout-ms", "2000"]);
    assert_eq!(ids(&p.ask(&json!({"prompt": "a b", "max_tokens": 3, "temperature": 0, "ignore_eos": true}))).len(), 3);
    // SIGSTOP: the process and its sockets stay, it just never answers (a partitioned peer).
    let frozen = p.pids[1];
    assert!(Command::new("kill").args(["-STOP", &frozen.to_string()]).status().unwrap().success());
    let t = Instant::now();
    let e = p.ask(&json!({"prompt": "a b c", "max_tokens": 50, "temperature": 0, "ignore_eos": true}));
    let took = t.elapsed();
    let _ = Command::new("kill").args(["-CONT", &frozen.to_string()]).status();
    let msg = e["error"]["message"].as_str().unwrap_or_else(|| panic!("expected an error, got {e}"));
    assert!(msg.contains("worker rank 1") && msg.contains("stopped answering health checks"), "{msg}");
    assert!(took < Duration::from_secs(15), "the error took {took:?} with a 2 s collective deadline");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn ctrl_c_stops_up_and_every_worker_it_started() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut p = up(&m, 2, 2, &[]);
    assert_eq!(p.pids.len(), 4, "{}", p.log());
    assert_eq!(ids(&p.ask(&json!({"prompt": "a", "max_tokens": 3, "temperature": 0, "ignore_eos": true}))).len(), 3);
    // What a terminal's Ctrl-C does: SIGINT to every process of the group.
    let mut targets = p.pids.clone();
    targets.push(p.child.id());
    for pid in targets {
        assert!(Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap().success());
    }
    let code = p.wait_exit(Duration::from_secs(20), "SIGINT");
    assert_eq!(code, Some(0), "{}", p.log());
    for &pid in &p.pids {
        wait_gone(pid, Duration::from_secs(20));
    }
}

#[test]
fn bad_request_lines_get_error_lines_and_the_next_request_is_served() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut p = up(&m, 2, 1, &[]);
    let stdin = p.stdin.as_mut().unwrap();
    writeln!(stdin, "not json").unwrap();
    stdin.flush().unwrap();
    let e = p.answer(DEADLINE);
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    for (bad, needle) in [
        (json!({"prompt": "", "max_tokens": 3}), "prompt is empty"),
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "a", "temperature": -1}), "temperature"),
        (json!({"prompt": "a", "top_p": 0}), "top_p"),
        (json!({"prompt": "a", "bogus": 1}), "bogus"),
        (json!({"prompt": "a ".repeat(600), "max_tokens": 3}), "context"),
    ] {
        let e = p.ask(&bad);
        let msg = e["error"]["message"].as_str().unwrap_or_else(|| panic!("{bad} gave {e}"));
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    let ok = p.ask(&json!({"prompt": "a b", "max_tokens": 5, "temperature": 0, "ignore_eos": true}));
    assert_eq!(ids(&ok).len(), 5, "{ok}");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn a_coordinator_drives_workers_named_on_its_command_line_or_that_join_it() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable().for_sampling());
    let req = json!({"prompt": "a b c", "max_tokens": 32, "temperature": 2, "seed": 2, "ignore_eos": true});
    let want = answers(&m, 1, 1, std::slice::from_ref(&req)).pop().unwrap();

    let (_w0, a0) = worker(&["--model-dir", dir.path().to_str().unwrap()]);
    let (_w1, a1) = worker(&["--model-dir", dir.path().to_str().unwrap()]);
    let mut c = bin();
    c.args(["coordinator", "--stdin", "--tp", "2", "--workers", &format!("{a0},{a1}"), "--model"]).arg(&m);
    let mut coord = Proc::spawn(c);
    let plan = coord.wait_stderr("plan: tp = 2");
    assert!(plan.contains("2 workers, collective tcp"), "{plan}");
    let rank1 = coord.wait_stderr("rank 1 @");
    assert!(rank1.contains(" on cpu (") && rank1.contains("vocab") && rank1.contains("peak RSS"), "{rank1}");
    coord.wait_stderr("ready:");
    assert_eq!(ids(&coord.ask(&req)), want);
    let (code, log) = coord.finish();
    assert_eq!(code, Some(0), "{log}");

    // The same through --join: the coordinator listens, the workers register themselves.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let join_addr = format!("127.0.0.1:{port}");
    let mut c = bin();
    c.args(["coordinator", "--stdin", "--tp", "2", "--join-listen", &join_addr, "--model"]).arg(&m);
    let mut coord = Proc::spawn(c);
    coord.wait_stderr("waiting for 2 workers");
    let (_j0, _) = worker(&["--join", &join_addr, "--model-dir", dir.path().to_str().unwrap()]);
    let (_j1, _) = worker(&["--join", &join_addr, "--model-dir", dir.path().to_str().unwrap()]);
    coord.wait_stderr("ready:");
    assert_eq!(ids(&coord.ask(&req)), want);
    let (code, log) = coord.finish();
    assert_eq!(code, Some(0), "{log}");
}

// ---- the default model ----

#[test]
fn the_default_model_gives_tp1_greedy_and_seeded_tokens_at_tp2_tp4_pp2_and_tp2_by_pp2() {
    let Some(m) = default_model() else { return };
    let mut reqs: Vec<Value> = shared_prompts(3).into_iter().map(|p| json!({"prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": true})).collect();
    reqs.push(json!({"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 42, "ignore_eos": true}));
    reqs.push(json!({"prompt": "Once upon a time", "max_tokens": 32, "temperature": 1.0, "seed": 43, "ignore_eos": true}));
    check_every_split_matches_tp1(&m, &reqs, &[(2, 1), (4, 1), (1, 2), (2, 2)]);
}

#[test]
fn a_worker_killed_mid_generation_on_the_default_model_fails_that_request_within_seconds() {
    let Some(m) = default_model() else { return };
    let mut p = up(&m, 2, 1, &["--comm-timeout-ms", "3000"]);
    let stdin = p.stdin.as_mut().unwrap();
    writeln!(stdin, "{}", json!({"prompt": "The history of Rome", "max_tokens": 3000, "temperature": 0, "ignore_eos": true})).unwrap();
    stdin.flush().unwrap();
    // Let it generate for a while, then kill rank 0 in the middle of it.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-9", &p.pids[0].to_string()]).status().unwrap().success());
    let t = Instant::now();
    let e = p.answer(Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(10), "the error took {:?}", t.elapsed());
    let msg = e["error"]["message"].as_str().unwrap_or_else(|| panic!("expected an error, got {e}"));
    assert!(msg.contains("worker rank 0"), "{msg}");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
}
