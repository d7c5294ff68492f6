//! The HTTP server end to end: real `tpserve up` processes (tp = 2 unless said otherwise) on
//! tiny models and the default model, driven over HTTP. Deadlines guard against hangs; no
//! test asserts an absolute speed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};
use tempfile::TempDir;
use tpserve_model::testing::TinySpec;

mod common;
use common::*;

struct Server {
    p: Proc,
    http: Http,
    /// The `ready:` line it printed.
    ready: String,
}

impl std::ops::Deref for Server {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.http
    }
}

/// `tpserve up --tp tp --threads 1 --port 0 --model model extra..`, waited on until ready.
fn serve(model: &Path, tp: usize, extra: &[&str]) -> Server {
    let mut cmd = bin();
    cmd.args(["up", "--tp", &tp.to_string(), "--threads", "1", "--port", "0", "--model"]).arg(model).args(extra);
    let mut p = Proc::spawn(cmd);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL").trim_end_matches("/v1").to_string();
    let ready = p.wait_stderr("ready:");
    Server { p, http: Http { url, agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() }, ready }
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[test]
fn invalid_requests_get_the_right_status_and_an_openai_error_body_and_disturb_nobody() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &[]);
    let hot = json!({"prompt": "a b c", "max_tokens": 64, "temperature": 2, "seed": 3, "ignore_eos": true});
    let alone = s.text(&hot);
    // A long request runs while the bad ones come in.
    let url = s.url.clone();
    let background = std::thread::spawn(move || {
        let r = ureq::post(&format!("{url}/v1/completions"))
            .send_json(json!({"prompt": "a b c", "max_tokens": 64, "temperature": 2, "seed": 3, "ignore_eos": true}))
            .unwrap();
        r.into_json::<Value>().unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
    });
    let long = "abc".repeat(200);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{\"prompt\": ".into(), 400, None),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": "many"}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": 5}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "a", "model": "gpt-9"}).to_string(), 404, Some("model")),
        ("/v1/completions", json!({"prompt": ""}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": long}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": -3}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 100000}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": "a", "temperature": 2.5}).to_string(), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": "a", "temperature": -1}).to_string(), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": "a", "top_p": 0}).to_string(), 400, Some("top_p")),
        ("/v1/completions", json!({"prompt": "a", "top_p": 1.5}).to_string(), 400, Some("top_p")),
        ("/v1/completions", json!({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}).to_string(), 400, Some("stop")),
        ("/v1/completions", json!({"prompt": "a", "n": 2}).to_string(), 400, Some("n")),
        ("/v1/completions", json!({"prompt": "a", "logprobs": 50}).to_string(), 400, Some("logprobs")),
        ("/v1/completions", json!({"prompt": "a", "presence_penalty": 3}).to_string(), 400, Some("presence_penalty")),
        ("/v1/completions", json!({"prompt": [7, 99999999]}).to_string(), 400, Some("prompt[1]")),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": [{"role": "robot", "content": "hi"}]}).to_string(), 400, Some("messages[0].role")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}).to_string(),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 30}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        ("/v1/nothing", "{}".into(), 404, None),
    ];
    for (path, body, status, param) in &cases {
        let (code, v) = s.post_raw(path, body, None);
        assert_eq!(code, *status, "{path} {body}: {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{path} {body}: no message in {v}");
        assert!(e["type"].is_string(), "{path} {body}: no type in {v}");
        assert!(e.get("code").is_some() && e.get("param").is_some(), "{path} {body}: {v}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{path} {body}: {v}");
        }
    }
    assert_eq!(background.join().unwrap(), alone, "a request running beside the bad ones changed");
    assert_eq!(s.text(&hot), alone);
    let (code, v) = s.post("/v1/completions", &json!({"prompt": "a", "model": "gpt-9"}));
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("model_not_found")));
}

/// Every metric family `/metrics` serves, each described (HELP text) where it is recorded.
const METRIC_FAMILIES: [&str; 19] = [
    "tpserve_prompt_tokens_total",
    "tpserve_generation_tokens_total",
    "tpserve_request_success_total",
    "tpserve_num_preemptions_total",
    "tpserve_prefix_cache_queries_total",
    "tpserve_prefix_cache_hits_total",
    "tpserve_num_requests_running",
    "tpserve_num_requests_waiting",
    "tpserve_kv_cache_usage_perc",
    "tpserve_kv_cache_blocks_free",
    "tpserve_time_to_first_token_seconds",
    "tpserve_inter_token_latency_seconds",
    "tpserve_e2e_request_latency_seconds",
    "tpserve_request_queue_time_seconds",
    "tpserve_step_duration_seconds",
    "tpserve_step_tokens",
    "tpserve_rank_comm_seconds",
    "tpserve_rank_compute_seconds",
    "tpserve_ready",
];

/// Prometheus's own linter on the live `/metrics` text: it exits 0 and says nothing (every
/// family has HELP text, counters end in `_total`, units are base units...). `promtool`
/// comes with Debian's `prometheus` package, which CI installs; without it this fails unless
/// `TPSERVE_SKIP_PROMTOOL=1`.
#[test]
fn metrics_pass_promtool_check_metrics_without_a_warning() {
    if std::env::var("TPSERVE_SKIP_PROMTOOL").as_deref() == Ok("1") {
        eprintln!("skipping: TPSERVE_SKIP_PROMTOOL=1");
        return;
    }
    if let Err(e) = Command::new("promtool").arg("--version").output() {
        panic!("cannot run promtool ({e}): install the `prometheus` package (apt-get install prometheus; CI does), or set TPSERVE_SKIP_PROMTOOL=1 to skip this test");
    }
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &[]);
    // Prefill and decode steps on both ranks, every request latency, a finished request.
    s.text(&completion("a b c", 4));
    let (code, v) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "ignore_eos": true}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.get("/ready").0, 200);
    let text = s.get("/metrics").1;
    let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(types, METRIC_FAMILIES.len(), "families other than these: {METRIC_FAMILIES:?}\n{text}");
    for family in METRIC_FAMILIES {
        assert!(text.contains(&format!("# HELP {family} ")), "{family} has no HELP text:\n{text}");
    }
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(&mut lint.stdin.take().expect("a pipe"), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {}\n{said}\n/metrics:\n{text}", out.status);
}

#[test]
fn health_ready_models_metrics_and_the_api_key() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &["--api-key", "sesame", "--served-model-name", "tiny"]);
    // The start-up hint shows how to send the key, and never the key itself.
    assert!(s.ready.contains("Authorization: Bearer $TPSERVE_API_KEY") && !s.ready.contains("sesame"), "{}", s.ready);
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/ready").0, 200);
    let (code, v) = s.post_raw("/v1/completions", &completion("a", 4).to_string(), None);
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{v}");
    let (code, _) = s.post_raw("/v1/completions", &completion("a", 4).to_string(), Some("wrong"));
    assert_eq!(code, 401);
    let (code, v) = s.post_raw("/v1/completions", &json!({"prompt": "a b", "max_tokens": 4, "model": "tiny"}).to_string(), Some("sesame"));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["model"], "tiny");
    // Token ids, also as a batch of one prompt.
    for prompt in [json!([2, 7, 9]), json!([[2, 7, 9]])] {
        let (code, v) = s.post_raw("/v1/completions", &json!({"prompt": prompt, "max_tokens": 2}).to_string(), Some("sesame"));
        assert_eq!((code, v["usage"]["prompt_tokens"].as_u64()), (200, Some(3)), "{v}");
    }
    let models = s.agent.get(&format!("{}/v1/models", s.url)).set("Authorization", "Bearer sesame").call().unwrap().into_json::<Value>().unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let text = s.get("/metrics").1;
    for name in [
        "tpserve_time_to_first_token_seconds_bucket",
        "tpserve_inter_token_latency_seconds_bucket",
        "tpserve_e2e_request_latency_seconds_bucket",
        "tpserve_request_queue_time_seconds_bucket",
        "tpserve_num_requests_running",
        "tpserve_num_requests_waiting",
        "tpserve_kv_cache_usage_perc",
        "tpserve_prefix_cache_queries_total",
        "tpserve_prefix_cache_hits_total",
        "tpserve_prompt_tokens_total",
        "tpserve_generation_tokens_total",
        "tpserve_step_tokens_bucket{phase=\"prefill\"",
        "tpserve_step_duration_seconds_bucket{phase=\"decode\"",
        "tpserve_rank_comm_seconds_sum{rank=\"1\"}",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    // 4 tokens, then 2 + 2 for the token-id prompts.
    assert_eq!(metric(&text, "tpserve_generation_tokens_total"), 8.0);

    // Sampled tokens have log-probabilities too, also when they are not the most likely.
    let (code, v) = s.post_raw(
        "/v1/completions",
        &json!({"prompt": "a b", "max_tokens": 16, "temperature": 2, "seed": 9, "logprobs": 1, "ignore_eos": true}).to_string(),
        Some("sesame"),
    );
    assert_eq!(code, 200, "{v}");
    let lps = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(lps.len() == 16 && lps.iter().all(|l| l.as_f64().is_some_and(|x| x <= 0.0)), "{v}");
    // Chat reports each token's log-probability and alternatives.
    let post = |body: Value, path: &str| {
        let (code, v) = s.post_raw(path, &body.to_string(), Some("sesame"));
        assert_eq!(code, 200, "{v}");
        v
    };
    let chat = post(
        json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0, "ignore_eos": true}),
        "/v1/chat/completions",
    );
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3, "{chat}");
    for c in content {
        let lp = c["logprob"].as_f64().unwrap();
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6 && lp <= 0.0, "{c}");
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_gives_its_blocks_back() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &[]);
    let free = |s: &Http, g: usize| s.metric(&format!("tpserve_kv_cache_blocks_free{{group=\"{g}\"}}"));
    // Any request sets the gauges; note the free blocks when idle.
    s.text(&completion("a", 1));
    let idle = (free(&s, 0), free(&s, 1));
    assert!(idle.0 > 0.0 && idle.1 > 0.0, "{idle:?}");
    let got = s.stream("/v1/completions", &json!({"prompt": "a b c", "max_tokens": 400, "ignore_eos": true, "stream": true}), 3);
    assert_eq!(got.len(), 3);
    // The connection is gone: the request is cancelled and every block is free again.
    s.eventually("the cancelled request's blocks coming back", |s| s.metric("tpserve_num_requests_running") == 0.0 && (free(s, 0), free(s, 1)) == idle);
    assert!(s.metric("tpserve_request_success_total{finished_reason=\"abort\"}") >= 1.0);
    assert!(s.metric("tpserve_generation_tokens_total") < 400.0, "the request ran to the end");
    // And the server goes on serving.
    assert!(!s.text(&completion("a b", 3)).is_empty());
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_admitted_requests_finish() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 1, &["--max-num-seqs", "1", "--max-waiting", "1"]);
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                match ureq::post(&format!("{url}/v1/completions")).send_json(json!({"prompt": format!("a {i}"), "max_tokens": 100, "ignore_eos": true})) {
                    Ok(r) => (200, None, r.into_json::<Value>().unwrap()),
                    Err(ureq::Error::Status(c, r)) => (c, r.header("retry-after").map(str::to_string), r.into_json::<Value>().unwrap()),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1 && !refused.is_empty() && ok + refused.len() == 6, "{results:?}");
    for r in &refused {
        assert_eq!(r.1.as_deref(), Some("1"));
        assert_eq!(r.2["error"]["code"], "rate_limit_exceeded");
    }
    for r in results.iter().filter(|r| r.0 == 200) {
        assert_eq!(r.2["choices"][0]["finish_reason"], "length");
        assert_eq!(r.2["usage"]["completion_tokens"], 100);
    }
}

#[test]
fn running_out_of_kv_blocks_preempts_and_recomputes_without_changing_a_token() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    // 24 blocks of 4 positions: each request needs 13 of them by its end.
    let s = serve(&m, 2, &["--kv-cache-tokens", "96", "--block-size", "4", "--max-num-batched-tokens", "16"]);
    let reqs: Vec<Value> =
        (0..6).map(|i| json!({"prompt": format!("a b c {i} d"), "max_tokens": 40, "temperature": 2, "seed": i, "ignore_eos": true})).collect();
    let alone: Vec<String> = reqs.iter().map(|r| s.text(r)).collect();
    assert_eq!(s.metric("tpserve_num_preemptions_total"), 0.0);
    let together: Vec<String> = std::thread::scope(|sc| {
        let h = &s.http;
        let hs: Vec<_> = reqs.iter().map(|r| sc.spawn(move || h.text(r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(s.metric("tpserve_num_preemptions_total") > 0.0, "nothing was preempted: the test tests nothing");
    assert_eq!(together, alone);
}

#[test]
fn ready_turns_false_when_a_worker_is_lost_and_requests_get_503() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &[]);
    assert_eq!(s.get("/ready").0, 200);
    assert!(Command::new("kill").args(["-9", &s.p.pids[1].to_string()]).status().unwrap().success());
    s.eventually("/ready answering 503", |s| s.get("/ready").0 == 503);
    let (code, v) = s.post("/v1/completions", &completion("a", 4));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("rank 1"), "{v}");
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn http_answers_while_the_workers_load_and_ready_turns_true_only_after() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let (_w0, a0) = worker(&["--model-dir", dir.path().to_str().unwrap()]);
    let (w1, a1) = worker(&["--model-dir", dir.path().to_str().unwrap()]);
    // A frozen worker holds the load up.
    assert!(Command::new("kill").args(["-STOP", &w1.child.id().to_string()]).status().unwrap().success());
    let mut c = bin();
    c.args(["coordinator", "--tp", "2", "--port", "0", "--workers", &format!("{a0},{a1}"), "--model"]).arg(&m);
    let mut p = Proc::spawn(c);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().trim_end_matches("/v1").to_string();
    let http = Http { url, agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() };
    assert_eq!(http.get("/health").0, 200);
    let (code, body) = http.get("/ready");
    assert_eq!(code, 503);
    assert!(body.contains("loading"), "{body}");
    let (code, v) = http.post("/v1/completions", &completion("a", 2));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("loading"), "{v}");
    assert!(Command::new("kill").args(["-CONT", &w1.child.id().to_string()]).status().unwrap().success());
    p.wait_stderr("ready:");
    assert_eq!(http.get("/ready").0, 200);
    assert!(!http.text(&completion("a b", 3)).is_empty());
}

#[test]
fn ctrl_c_lets_in_flight_requests_finish_then_stops_everything() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut s = serve(&m, 2, &[]);
    let url = s.url.clone();
    let inflight = std::thread::spawn(move || {
        ureq::post(&format!("{url}/v1/completions"))
            .send_json(json!({"prompt": "a b", "max_tokens": 300, "ignore_eos": true}))
            .map(|r| r.into_json::<Value>().unwrap())
            .map_err(|e| e.to_string())
    });
    s.eventually("the request starting", |s| s.metric("tpserve_num_requests_running") == 1.0);
    let pid = s.p.child.id();
    assert!(Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap().success());
    let v = inflight.join().unwrap().expect("the in-flight request finished");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 300);
    let code = s.p.wait_exit(DEADLINE, "Ctrl-C");
    assert_eq!(code, Some(0), "{}", s.p.log());
    for &w in &s.p.pids {
        wait_gone(w, DEADLINE);
    }
}

// ---- the default model ----

/// Generates greedily in process (tp = 1, no server) for comparison.
fn generate_alone(m: &Path, args: &[&str]) -> String {
    let out = bin().args(["generate", "--temperature", "0", "--json", "--model"]).arg(m).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["text"].as_str().unwrap().to_string()
}

#[test]
fn thirty_two_concurrent_greedy_requests_return_what_each_returns_alone() {
    let Some(m) = default_model() else { return };
    let s = serve(&m, 2, &[]);
    let mut prompts = shared_prompts(8);
    for w in ["Paris", "the ocean", "a small robot", "winter", "the history of Rome", "bread", "a river", "music"] {
        for form in ["Tell me about {}.", "{} is", "A poem about {}:"] {
            prompts.push(form.replace("{}", w));
        }
    }
    prompts.truncate(32);
    let reqs: Vec<Value> = prompts.iter().map(|p| completion(p, 12)).collect();
    let alone: Vec<String> = reqs.iter().map(|r| s.text(r)).collect();
    let together: Vec<String> = std::thread::scope(|sc| {
        let h = &s.http;
        let hs: Vec<_> = reqs.iter().map(|r| sc.spawn(move || h.text(r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "prompt {:?} changed in a batch of 32", prompts[i]);
    }
    // And the same as one process without any server.
    assert_eq!(alone[0], generate_alone(&m, &["--prompt", &prompts[0], "--max-tokens", "12", "--ignore-eos"]));
}

#[test]
fn presence_and_frequency_penalties_break_greedy_repetition() {
    let Some(m) = default_model() else { return };
    let s = serve(&m, 2, &[]);
    let body = |pen: f64| json!({"prompt": "The the the the", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "frequency_penalty": pen, "presence_penalty": pen});
    let plain = s.text(&body(0.0));
    assert_eq!(plain, " the".repeat(8), "the unpenalised text should repeat");
    let penalised = s.text(&body(2.0));
    assert!(penalised.matches(" the").count() <= 1, "{penalised:?}");
}

#[test]
fn a_repeated_long_system_prompt_hits_the_prefix_cache_and_starts_sooner() {
    let Some(m) = default_model() else { return };
    let s = serve(&m, 2, &[]);
    let wiki = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wikitext-2-raw-test.txt")).unwrap();
    let system: String = wiki.chars().skip(200).take(3000).collect();
    let chat = |q: &str| json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    // Time to the first content chunk, the text, and the usage.
    let run = |q: &str| {
        let t0 = Instant::now();
        let resp = s.agent.post(&format!("{}/v1/chat/completions", s.url)).send_json(chat(q)).unwrap();
        let mut ttft = None;
        let (mut text, mut usage) = (String::new(), Value::Null);
        let mut body = String::new();
        let mut reader = BufReader::new(resp.into_reader());
        loop {
            body.clear();
            if reader.read_line(&mut body).unwrap() == 0 {
                break;
            }
            let Some(data) = body.trim_end().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str().filter(|c| !c.is_empty()) {
                ttft.get_or_insert(t0.elapsed());
                text.push_str(c);
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        (ttft.expect("some content"), text, usage)
    };
    let (cold_ttft, cold_text, cold_usage) = run("What is this text about?");
    assert_eq!(cold_usage["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = cold_usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 600, "the system prompt should be long: {prompt_tokens} tokens");
    let (_, _, other) = run("Summarise it in one line.");
    assert!(other["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 512, "{other}");
    // The first question again: all its full blocks are cached, and its answer is the same.
    let (warm_ttft, warm_text, warm_usage) = run("What is this text about?");
    let cached = warm_usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached + 16 >= prompt_tokens, "{cached} of {prompt_tokens} cached");
    assert_eq!(warm_text, cold_text);
    let metrics = s.get("/metrics").1;
    let hits = metric(&metrics, "tpserve_prefix_cache_hits_total");
    assert!(hits >= cached as f64 + 512.0 && hits < metric(&metrics, "tpserve_prefix_cache_queries_total"), "{metrics}");
    println!("TTFT cold {cold_ttft:?}, warm {warm_ttft:?} ({cached} of {prompt_tokens} prompt tokens cached)");
    assert!(warm_ttft < cold_ttft, "a cached prefix did not start sooner: cold {cold_ttft:?}, warm {warm_ttft:?}");
}

/// A Python with the official `openai` client: $TPSERVE_TEST_PYTHON, or a virtualenv made
/// (once) under the tpserve cache with `pip install openai`.
fn python_with_openai() -> String {
    if let Ok(p) = std::env::var("TPSERVE_TEST_PYTHON") {
        return p;
    }
    let home =
        std::env::var("TPSERVE_HOME").map(std::path::PathBuf::from).unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap()).join(".cache/tpserve"));
    let venv = home.join("openai-venv");
    let py = venv.join("bin/python");
    let has = |py: &Path| Command::new(py).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has(&py) {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success())
            && Command::new(&py).args(["-m", "pip", "install", "-q", "openai"]).status().is_ok_and(|s| s.success());
        assert!(ok && has(&py), "cannot set up a Python with the openai package in {} (python3 -m venv, pip install openai)", venv.display());
    }
    py.to_string_lossy().into_owned()
}

#[test]
fn the_official_openai_client_gets_the_exact_greedy_text_streaming_and_not() {
    let Some(m) = default_model() else { return };
    let py = python_with_openai();
    let s = serve(&m, 2, &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&py).arg(&script).arg(format!("{}/v1", s.url)).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let prompt = v["prompt"].as_str().unwrap();
    let want = generate_alone(&m, &["--prompt", prompt, "--max-tokens", "16", "--ignore-eos"]);
    assert_eq!(v["completion"], want.as_str());
    assert_eq!(v["completion_stream"], want.as_str());
    let question = v["question"].as_str().unwrap();
    let want_chat = generate_alone(&m, &["--chat", "--prompt", question, "--max-tokens", "16"]);
    assert_eq!(v["chat"], want_chat.as_str());
    assert_eq!(v["chat_stream"], want_chat.as_str());
    // The echoed prompt with its log-probabilities (what evaluation tools read).
    assert!(v["echo_text"].as_str().unwrap().starts_with(prompt));
    let lps = v["echo_token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null() && lps[1..].iter().all(|l| l.as_f64().is_some_and(|x| x <= 0.0)), "{lps:?}");
}

// ---- OpenAI's published schemas ----

/// The schemas of OpenAI's OpenAPI spec that tpserve's answers must match
/// (`tests/data/openai/schemas.json`, see its README): one document whose `$defs` every
/// `$ref` resolves in.
#[derive(Clone)]
struct Schemas(Value);

impl Schemas {
    fn load() -> Schemas {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openai/schemas.json");
        Schemas(serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap())
    }

    /// A draft 2020-12 validator for the schema `$defs/name`.
    fn validator(&self, name: &str) -> jsonschema::Validator {
        let root = json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": self.0["$defs"], "$ref": format!("#/$defs/{name}")});
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("the schema {name} does not compile: {e}"))
    }

    /// These schemas with the one at `pointer` (under `$defs`) replaced by `f` of it.
    fn patch(mut self, pointer: &str, f: impl FnOnce(Value) -> Value) -> Schemas {
        let at = self.0.pointer_mut(&format!("/$defs{pointer}")).unwrap_or_else(|| panic!("the spec has no {pointer}: move or drop the patch"));
        *at = f(at.take());
        self
    }
}

/// `schema`, or null.
fn or_null(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

/// Every way `instance` breaks `v`'s schema, one line each; none when it is valid.
fn violations(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| format!("at {:?} (schema {}): {e}", e.instance_path().to_string(), e.schema_path())).collect()
}

/// `base` with the keys of `extra` added.
fn with(base: &Value, extra: Value) -> Value {
    let mut b = base.clone();
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[test]
fn every_answer_matches_the_schemas_of_openais_openapi_spec() {
    let spec = Schemas::load();
    // Where OpenAI's API itself answers otherwise than its spec says, the schema is patched
    // here, narrowly; the end of the test shows each patch is needed.
    let choice = "/CreateCompletionResponse/properties/choices/items/properties";
    // With `echo` and `logprobs` the prompt's first token has no log-probability: OpenAI
    // answers null in `token_logprobs` and `top_logprobs` there (lm-eval skips it), which
    // the spec's items do not allow. Only the first entry may be null.
    let first_may_be_null = |mut s: Value| {
        s["prefixItems"] = json!([or_null(s["items"].clone())]);
        s
    };
    let completion_spec = spec
        .clone()
        .patch(&format!("{choice}/logprobs/anyOf/0/properties/token_logprobs"), first_may_be_null)
        .patch(&format!("{choice}/logprobs/anyOf/0/properties/top_logprobs"), first_may_be_null);
    // The spec has no stream schema for legacy completions: a chunk is a
    // CreateCompletionResponse ("the streamed and non-streamed response objects share the
    // same shape"), yet every chunk before the last has `"finish_reason": null`, as OpenAI
    // sends, and with `stream_options.include_usage` every chunk but the usage one has
    // `"usage": null`, as the spec's own ChatCompletionStreamOptions (which the completions
    // request uses) says.
    let completion_chunk_spec =
        completion_spec.clone().patch(&format!("{choice}/finish_reason"), or_null).patch("/CreateCompletionResponse/properties/usage", or_null);
    let validators = [
        ("completion", completion_spec.validator("CreateCompletionResponse")),
        ("completion chunk", completion_chunk_spec.validator("CreateCompletionResponse")),
        ("chat", spec.validator("CreateChatCompletionResponse")),
        ("chat chunk", spec.validator("CreateChatCompletionStreamResponse")),
        ("model list", spec.validator("ListModelsResponse")),
        ("model", spec.validator("Model")),
        ("error", spec.validator("ErrorResponse")),
    ];
    let validator = |name: &str| &validators.iter().find(|v| v.0 == name).unwrap().1;

    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let s = serve(&m, 2, &[]);
    // A JSON answer, checked for its status and Content-Type.
    let ask = |what: &str, path: &str, body: Option<&str>, status: u16| {
        let (code, content_type, v) = s.exchange(path, body);
        assert_eq!(code, status, "{what}: {v}");
        assert_eq!(content_type.as_deref(), Some("application/json"), "the Content-Type of {what}: {v}");
        v
    };
    // (what was asked, the schema its answer must match, the answer)
    let mut answers: Vec<(String, &str, Value)> = Vec::new();
    let comp = completion("a b c", 4);
    for body in [comp.clone(), with(&comp, json!({"logprobs": 2})), with(&comp, json!({"echo": true, "logprobs": 1}))] {
        let what = format!("POST /v1/completions {body}");
        answers.push((what.clone(), "completion", ask(&what, "/v1/completions", Some(&body.to_string()), 200)));
    }
    let chat = json!({"messages": [{"role": "user", "content": "a b"}], "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    for body in [chat.clone(), with(&chat, json!({"logprobs": true, "top_logprobs": 2}))] {
        let what = format!("POST /v1/chat/completions {body}");
        answers.push((what.clone(), "chat", ask(&what, "/v1/chat/completions", Some(&body.to_string()), 200)));
    }
    let usage = json!({"stream": true, "stream_options": {"include_usage": true}});
    let streams = [
        ("/v1/chat/completions", with(&chat, json!({"stream": true})), "chat chunk"),
        ("/v1/chat/completions", with(&with(&chat, usage.clone()), json!({"logprobs": true, "top_logprobs": 1})), "chat chunk"),
        ("/v1/completions", with(&comp, json!({"stream": true})), "completion chunk"),
        ("/v1/completions", with(&with(&comp, usage), json!({"echo": true, "logprobs": 1})), "completion chunk"),
    ];
    for (path, body, schema) in streams {
        let chunks = s.stream(path, &body, usize::MAX);
        // Besides one chunk per token (4): a first or echo chunk, the finish, the usage.
        let with_usage = body["stream_options"]["include_usage"] == true;
        assert!(chunks.len() > 4 + usize::from(with_usage), "POST {path} {body}: {chunks:?}");
        let last = chunks.last().unwrap();
        assert!(!with_usage || (last["choices"] == json!([]) && last["usage"]["completion_tokens"] == 4), "POST {path} {body}: the last chunk {last}");
        answers.extend(chunks.into_iter().enumerate().map(|(i, c)| (format!("chunk {i} of POST {path} {body}"), schema, c)));
    }
    let list = ask("GET /v1/models", "/v1/models", None, 200);
    let id = list["data"][0]["id"].as_str().expect("a model id").to_string();
    answers.push(("GET /v1/models".into(), "model list", list.clone()));
    let what = format!("GET /v1/models/{id}");
    answers.push((what.clone(), "model", ask(&what, &format!("/v1/models/{id}"), None, 200)));
    let unknown = ask("GET /v1/models/gpt-9", "/v1/models/gpt-9", None, 404);
    assert_eq!(unknown["error"]["code"], "model_not_found", "{unknown}");
    answers.push(("GET /v1/models/gpt-9".into(), "error", unknown));
    let bad: [(&str, Option<String>, u16); 7] = [
        ("/v1/completions", Some("{\"prompt\": ".into()), 400),
        ("/v1/completions", Some(json!({"prompt": "a", "temperature": 5}).to_string()), 400),
        ("/v1/completions", Some(json!({"prompt": "a", "model": "gpt-9"}).to_string()), 404),
        ("/v1/chat/completions", Some(json!({"messages": []}).to_string()), 400),
        ("/v1/nothing", Some("{}".into()), 404),
        // The wrong method: OpenAI answers 405 with its error body.
        ("/v1/chat/completions", None, 405),
        // One byte over the server's limit (2 MiB); just one, so that the server reads it
        // all and the answer is not lost to a reset connection.
        ("/v1/completions", Some(format!("{{\"prompt\": \"{}\"}}", "a".repeat((2 << 20) + 1 - 14))), 413),
    ];
    for (path, body, status) in bad {
        let what = match &body {
            Some(b) => format!("POST {path} {}", b.chars().take(60).collect::<String>()),
            None => format!("GET {path}"),
        };
        answers.push((what.clone(), "error", ask(&what, path, body.as_deref(), status)));
    }

    let failures: Vec<String> = answers
        .iter()
        .filter_map(|(what, schema, v)| {
            let broken = violations(validator(schema), v);
            (!broken.is_empty()).then(|| format!("{what}\n  answered {v}\n  breaks {schema}:\n    {}", broken.join("\n    ")))
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} answers break OpenAI's schemas:\n{}", failures.len(), answers.len(), failures.join("\n"));

    // The validator validates: a chat answer without the `refusal` OpenAI requires, or with
    // a number for its text, is rejected.
    let chat_answer = &answers.iter().find(|a| a.1 == "chat").unwrap().2;
    let mut no_refusal = chat_answer.clone();
    no_refusal["choices"][0]["message"].as_object_mut().unwrap().remove("refusal");
    let mut numeric = chat_answer.clone();
    numeric["choices"][0]["message"]["content"] = json!(7);
    for broken in [no_refusal, numeric] {
        assert!(!violations(validator("chat"), &broken).is_empty(), "a broken chat answer passed: {broken}");
    }
    // Each patch is needed: without it, a real answer is rejected.
    let find = |f: &dyn Fn(&(String, &str, Value)) -> bool| &answers.iter().find(|a| f(a)).expect("such an answer").2;
    let echoed = find(&|a| a.1 == "completion" && a.0.contains("\"echo\":true"));
    let before_last = find(&|a| a.1 == "completion chunk" && a.2["choices"][0]["finish_reason"].is_null() && a.2.get("usage").is_none());
    let finish_with_null_usage =
        find(&|a| a.1 == "completion chunk" && a.2["choices"][0]["finish_reason"].is_string() && a.2.get("usage") == Some(&Value::Null));
    for (what, v, without) in [
        ("an echoed prompt's null first log-probability", echoed, spec.validator("CreateCompletionResponse")),
        ("a chunk's null finish_reason", before_last, completion_spec.validator("CreateCompletionResponse")),
        ("a chunk's null usage", finish_with_null_usage, completion_spec.validator("CreateCompletionResponse")),
    ] {
        assert!(!violations(&without, v).is_empty(), "the spec accepts {what} as it is: drop its patch; {v}");
    }
}
