//! Operations end to end: who may drive a worker (the cluster token, the model directory,
//! loopback without a token), and a cluster that heals without a restart (a worker killed,
//! stopped, restarted at its address or replaced by one that joins; the coordinator killed
//! and started again; SIGTERM draining). Real processes on loopback, tiny models unless
//! said otherwise. Time bounds are generous guards against hangs; the measured times are
//! in docs/RELIABILITY.md.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tpserve_model::testing::TinySpec;

mod common;
use common::*;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A failed run: non-zero exit, no panic, and an `error: ...` line with every one of `needles`.
fn assert_error_line(out: &Output, needles: &[&str]) {
    assert!(out.code.is_some_and(|c| c != 0), "expected a failure, got {:?}\n{}", out.code, out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stderr.lines().any(|l| l.starts_with("error:") && needles.iter().all(|n| l.contains(n))), "no error line with {needles:?}:\n{}", out.stderr);
}

/// A free loopback port (bound, then released for the process that will listen on it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `tpserve worker` on `addr` with the cluster token, allowed to load from `dir`.
fn token_worker(addr: &str, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["worker", "--listen", addr, "--threads", "1", "--model-dir", dir.to_str().unwrap()]).args(extra);
    let w = Proc::spawn(c);
    let line = w.out.recv_timeout(DEADLINE).expect("the worker says where it listens");
    let addr = line.split_once("listening on ").unwrap().1.split_whitespace().next().unwrap().to_string();
    (w, addr)
}

/// `tpserve coordinator --port 0 --model model args..` with the token, once its HTTP is up
/// (the workers may not be loaded yet).
fn start_coordinator(model: &Path, args: &[&str]) -> (Proc, Http) {
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--port", "0", "--model"]).arg(model).args(args);
    let mut p = Proc::spawn(c);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().trim_end_matches("/v1").to_string();
    (p, Http { url, agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() })
}

/// [`start_coordinator`], waited on until ready.
fn coordinator(model: &Path, args: &[&str]) -> (Proc, Http) {
    let (mut p, http) = start_coordinator(model, args);
    p.wait_stderr("ready:");
    (p, http)
}

fn greedy(prompt: &str, n: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true})
}

fn signal(sig: &str, pid: u32) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// Polls `f` every 50 ms until it holds; how long that took, or a failure after `within`.
fn within(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// A POST's status, its Retry-After header and its JSON body.
fn post_with_headers(http: &Http, body: &Value) -> (u16, Option<String>, Value) {
    let r = http.agent.post(&format!("{}/v1/completions", http.url)).send_json(body.clone());
    let resp = match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST: {e}"),
    };
    (resp.status(), resp.header("retry-after").map(str::to_string), resp.into_json().unwrap())
}

// ---- nobody else drives our workers ----

#[test]
fn a_coordinator_without_the_token_or_with_another_is_refused_and_the_cluster_serves_on_unchanged() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (_w1, a1) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let workers = format!("{a0},{a1}");
    let (_c, http) = coordinator(&m, &["--tp", "2", "--workers", &workers]);
    let want = http.text(&greedy("a b c", 12));

    for (token, needle) in [(None, "no cluster token"), (Some("fedcba9876543210fedcba9876543210"), "wrong cluster token")] {
        let mut c = bin();
        c.args(["coordinator", "--stdin", "--tp", "2", "--workers", &workers, "--model"]).arg(&m);
        if let Some(t) = token {
            c.env("TPSERVE_CLUSTER_TOKEN", t);
        }
        let out = run_to_end(c, Some(""), false);
        assert_error_line(&out, &["refused this coordinator", needle]);
    }
    // Nothing the strangers sent reached the workers: the shards are the same, and serve.
    assert_eq!(http.get("/ready").0, 200);
    assert_eq!(http.text(&greedy("a b c", 12)), want);
}

#[test]
fn a_worker_loads_only_from_its_model_directory_and_without_a_token_only_on_loopback() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &[]);
    for outside in ["/etc/passwd", "../../../../etc/passwd", "/tmp/../etc/passwd"] {
        let mut c = bin();
        c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--stdin", "--workers", &a0, "--worker-model", outside, "--model"]).arg(&m);
        let out = run_to_end(c, Some(""), false);
        assert_error_line(&out, &["outside this worker's model directory"]);
        // The file was never opened: nothing of its contents comes back.
        assert!(!out.stderr.contains("magic"), "{}", out.stderr);
    }
    // The model inside the directory, by a relative name, loads.
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--stdin", "--workers", &a0, "--worker-model", "gemma.gguf", "--model"]).arg(&m);
    let out = run_to_end(c, Some("{\"prompt\": \"a\", \"max_tokens\": 2}\n"), false);
    out.assert_success();

    // No token, listening beyond loopback: refused unless --insecure.
    let out = run_to_end(
        {
            let mut c = bin();
            c.args(["worker", "--listen", "0.0.0.0:0", "--threads", "1"]);
            c
        },
        None,
        false,
    );
    out.assert_clean_error(&["without a cluster token", "--cluster-token", "--insecure"]);
    let mut c = bin();
    c.args(["worker", "--listen", "0.0.0.0:0", "--threads", "1", "--insecure"]);
    let mut w = Proc::spawn(c);
    w.wait_stderr("--insecure without a cluster token");
}

// ---- failures, healed without a restart ----

#[test]
fn a_killed_worker_fails_requests_with_503_and_retry_after_and_once_restarted_at_its_address_the_cluster_serves_again() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let a1 = format!("127.0.0.1:{}", free_port());
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (w1, _) = token_worker(&a1, dir.path(), &[]);
    let (_c, http) = coordinator(&m, &["--tp", "2", "--workers", &format!("{a0},{a1}")]);
    let want = http.text(&greedy("a b c", 16));

    signal("-KILL", w1.child.id());
    within("/ready 503 after the kill", Duration::from_secs(10), || http.get("/ready").0 == 503);
    let t = Instant::now();
    let (code, retry, v) = post_with_headers(&http, &greedy("a", 4));
    assert!(t.elapsed() < Duration::from_secs(2), "a 503 must come at once, took {:?}", t.elapsed());
    assert_eq!(code, 503, "{v}");
    assert!(retry.is_some(), "a 503 carries Retry-After");
    assert!(v["error"]["message"].as_str().unwrap().contains("rank 1"), "{v}");
    drop(w1);

    let (_w1, _) = token_worker(&a1, dir.path(), &[]);
    within("/ready 200 after the worker came back", Duration::from_secs(60), || http.get("/ready").0 == 200);
    assert_eq!(http.text(&greedy("a b c", 16)), want);
    assert!(http.metric("tpserve_cluster_recoveries_total") >= 1.0);
}

#[test]
fn a_stopped_worker_cuts_the_stream_with_an_error_event_and_after_sigcont_the_cluster_serves_again() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (w1, a1) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (_c, http) = coordinator(&m, &["--tp", "2", "--workers", &format!("{a0},{a1}")]);
    let want = http.text(&greedy("a b c", 16));

    let url = http.url.clone();
    let (started_tx, started) = std::sync::mpsc::channel();
    let stream = std::thread::spawn(move || {
        let body = json!({"prompt": "a", "max_tokens": 500, "ignore_eos": true, "stream": true});
        let resp = ureq::post(&format!("{url}/v1/completions")).send_json(body).unwrap();
        let mut events = Vec::new();
        for line in BufReader::new(resp.into_reader()).lines().map_while(Result::ok) {
            if line.starts_with("data: ") {
                let _ = started_tx.send(());
                events.push(line);
            }
        }
        events
    });
    started.recv_timeout(DEADLINE).expect("the stream started");
    signal("-STOP", w1.child.id());
    let t = Instant::now();
    let events = stream.join().unwrap();
    let took = t.elapsed();
    let error = events.iter().find(|e| e.contains("\"error\"")).unwrap_or_else(|| panic!("no error event in {} events: {:?}", events.len(), events.last()));
    assert!(error.contains("rank 1"), "the error event names the rank: {error}");
    assert!(took < Duration::from_secs(10), "the collective deadline is 10 s; the stream ended after {took:?}");
    assert_eq!(http.get("/ready").0, 503);
    let (code, _, v) = post_with_headers(&http, &greedy("a", 4));
    assert_eq!(code, 503, "{v}");

    signal("-CONT", w1.child.id());
    within("/ready 200 after SIGCONT", Duration::from_secs(60), || http.get("/ready").0 == 200);
    assert_eq!(http.text(&greedy("a b c", 16)), want);
}

#[test]
fn a_lost_joined_worker_is_replaced_by_a_new_one_that_joins() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let join = format!("127.0.0.1:{}", free_port());
    let (mut p, http) = start_coordinator(&m, &["--tp", "2", "--join-listen", &join]);
    // HTTP answers while the workers have not joined yet.
    let (code, body) = http.get("/ready");
    assert_eq!(code, 503, "{body}");
    let (_j0, _) = token_worker("127.0.0.1:0", dir.path(), &["--join", &join]);
    let (j1, _) = token_worker("127.0.0.1:0", dir.path(), &["--join", &join]);
    p.wait_stderr("ready:");
    let want = http.text(&greedy("a b c", 16));

    signal("-KILL", j1.child.id());
    within("/ready 503", Duration::from_secs(10), || http.get("/ready").0 == 503);
    let (_j2, _) = token_worker("127.0.0.1:0", dir.path(), &["--join", &join]);
    within("/ready 200 with the replacement", Duration::from_secs(60), || http.get("/ready").0 == 200);
    assert_eq!(http.text(&greedy("a b c", 16)), want);
}

#[test]
fn workers_advertising_one_address_are_refused_saying_so() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let join = format!("127.0.0.1:{}", free_port());
    let (mut p, _http) = start_coordinator(&m, &["--tp", "2", "--join-listen", &join]);
    let (_j0, a0) = token_worker("127.0.0.1:0", dir.path(), &["--join", &join]);
    p.wait_stderr("worker 0 joined");
    let (mut j1, _) = token_worker("127.0.0.1:0", dir.path(), &["--join", &join, "--advertise", &a0]);
    let line = j1.wait_stderr("error:");
    assert!(line.contains("already joined") && line.contains("--advertise"), "{line}");
    assert_ne!(j1.wait_exit(DEADLINE, "its join was refused"), Some(0));
}

#[test]
fn a_killed_coordinator_started_again_serves_with_the_same_workers_named_or_joined() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let quick = ["--coordinator-timeout-secs", "2"];
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &quick);
    let (_w1, a1) = token_worker("127.0.0.1:0", dir.path(), &quick);
    let args = ["--tp", "2", "--workers", &format!("{a0},{a1}")];
    let (c, http) = coordinator(&m, &args);
    let want = http.text(&greedy("a b c", 16));
    signal("-KILL", c.child.id());
    drop(c);
    let (_c, http) = coordinator(&m, &args);
    assert_eq!(http.text(&greedy("a b c", 16)), want);

    // Joined workers register again with the restarted coordinator.
    let join = format!("127.0.0.1:{}", free_port());
    let args = ["--tp", "2", "--join-listen", &join];
    let (mut p, _http) = start_coordinator(&m, &args);
    let mut quick_join = quick.to_vec();
    quick_join.extend(["--join", &join]);
    let (_j0, _) = token_worker("127.0.0.1:0", dir.path(), &quick_join);
    let (_j1, _) = token_worker("127.0.0.1:0", dir.path(), &quick_join);
    p.wait_stderr("ready:");
    signal("-KILL", p.child.id());
    drop(p);
    let (_c, http) = coordinator(&m, &args);
    assert_eq!(http.text(&greedy("a b c", 16)), want);
}

#[test]
fn sigterm_drains_with_ready_503_then_exits_0_leaving_named_workers_running() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let (w0, a0) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (w1, a1) = token_worker("127.0.0.1:0", dir.path(), &[]);
    let (mut c, http) = coordinator(&m, &["--tp", "2", "--workers", &format!("{a0},{a1}")]);
    let url = http.url.clone();
    let inflight =
        std::thread::spawn(move || ureq::post(&format!("{url}/v1/completions")).send_json(greedy("a b", 400)).map(|r| r.status()).map_err(|e| e.to_string()));
    within("the request running", DEADLINE, || http.metric("tpserve_num_requests_running") == 1.0);
    signal("-TERM", c.child.id());
    // Draining: the port still answers, /ready and new requests say why.
    within("/ready 503 while draining", Duration::from_secs(10), || http.get("/ready").0 == 503);
    let (code, body) = http.get("/ready");
    assert!(code == 503 && body.contains("shutting down"), "{code} {body}");
    let (code, _, v) = post_with_headers(&http, &greedy("a", 2));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("shutting down"), "{v}");
    assert_eq!(inflight.join().unwrap().expect("the in-flight request finished"), 200);
    assert_eq!(c.wait_exit(DEADLINE, "SIGTERM"), Some(0));
    assert!(pid_alive(w0.child.id()) && pid_alive(w1.child.id()), "workers named by --workers outlive the coordinator");
}

/// A process's resident memory now, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

#[test]
fn a_workers_memory_after_its_tenth_load_is_what_it_was_after_its_first() {
    let Some(m) = default_model() else { return };
    let (w, a) = token_worker("127.0.0.1:0", m.parent().unwrap(), &[]);
    let mut after = Vec::new();
    for _ in 0..10 {
        let mut c = bin();
        c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--stdin", "--workers", &a, "--max-num-seqs", "4", "--model"]).arg(&m);
        let mut p = Proc::spawn(c);
        p.wait_stderr("ready:");
        let v = p.ask(&greedy("The capital of France is", 8));
        assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
        let (code, log) = p.finish();
        assert_eq!(code, Some(0), "{log}");
        after.push(rss_mib(w.child.id()));
    }
    eprintln!("worker RSS after each load, MiB: {after:.1?}");
    // The next load drops the previous shard first: its KV pages go back to the system, its
    // heap is reused (4 MiB allowed for the allocator's bookkeeping and the file's pages).
    assert!(after[9] - after[0] < 4.0, "the worker grew from {:.1} MiB after its first load to {:.1} MiB after its tenth: {after:.1?}", after[0], after[9]);
}

// ---- soak ----

/// `tpserve up --tp 2` on the default model under `tpserve bench` at a fixed request rate for
/// about a minute: no request fails, and no process's resident memory grows beyond what a
/// warmed-up server's allocator may still settle into (16 MiB per process). The KV cache is
/// small (2,048 positions, 128 blocks) so that the warm-up has touched every one of its
/// lazily mapped pages; with a larger one, RSS would grow until every block was first used.
#[test]
fn a_minute_of_load_fails_no_request_and_leaves_memory_flat() {
    let Some(m) = default_model() else { return };
    let mut cmd = bin();
    cmd.args(["up", "--tp", "2", "--threads", "1", "--port", "0", "--max-num-seqs", "8", "--kv-cache-tokens", "2048", "--model"]).arg(&m);
    let mut p = Proc::spawn(cmd);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().trim_end_matches("/v1").to_string();
    p.wait_stderr("ready:");
    let pids: Vec<u32> = std::iter::once(p.child.id()).chain(p.pids.iter().copied()).collect();
    assert_eq!(pids.len(), 3, "{}", p.log());
    let dir = TempDir::new().unwrap();
    let bench = |secs: &str, out: &Path| {
        let o = bin()
            .args([
                "bench",
                "--base-url",
                &url,
                "--request-rate",
                "3",
                "--duration",
                secs,
                "--num-requests",
                "1000",
                "--input-len",
                "48",
                "--output-len",
                "24",
                "--seed",
                "7",
            ])
            .arg("--save-result")
            .arg(out)
            .arg("--model")
            .arg(&m)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
        v
    };
    // Warm-up: every buffer size the load needs is allocated once.
    let warm = bench("15", &dir.path().join("warm.json"));
    assert_eq!(warm["failed"], 0, "{warm}");
    let before: Vec<f64> = pids.iter().map(|&pid| rss_mib(pid)).collect();
    let soak = bench("45", &dir.path().join("soak.json"));
    let after: Vec<f64> = pids.iter().map(|&pid| rss_mib(pid)).collect();
    eprintln!(
        "soak: {} requests completed, {} failed; RSS MiB (coordinator, rank 0, rank 1) before {before:.1?} after {after:.1?}",
        soak["completed"], soak["failed"]
    );
    assert_eq!(soak["failed"], 0, "{soak}");
    assert!(soak["completed"].as_u64().unwrap() >= 60, "{soak}");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a - b < 16.0, "process {i} grew from {b:.1} to {a:.1} MiB under a steady load");
    }
}

// ---- TLS ----

/// A CA, and a certificate it signs for 127.0.0.1, written as PEM files `name.pem` and
/// `name.key` (the CA as `name-ca.pem`) in `dir`.
fn make_certs(dir: &Path, name: &str, leaves: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).unwrap();
    for leaf in leaves {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{leaf}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn mutual_tls_serves_with_the_clusters_ca_and_refuses_another_ca_or_plain_text() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let d = dir.path();
    make_certs(d, "cluster", &["worker", "coord"]);
    make_certs(d, "stranger", &["intruder"]);
    let f = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (_w, a) = token_worker("127.0.0.1:0", d, &["--tls-cert", &f("worker.pem"), "--tls-key", &f("worker.key"), "--tls-ca", &f("cluster-ca.pem")]);
    let (_c, http) = coordinator(&m, &["--workers", &a, "--tls-cert", &f("coord.pem"), "--tls-key", &f("coord.key"), "--tls-ca", &f("cluster-ca.pem")]);
    assert!(!http.text(&greedy("a b", 4)).is_empty());
    // Trusting another CA (and holding its certificate), or no TLS at all: refused.
    let stranger = vec!["--tls-cert", "intruder.pem", "--tls-key", "intruder.key", "--tls-ca", "stranger-ca.pem"];
    for (tls, why) in [(stranger, "invalid peer certificate"), (vec![], "TLS settings")] {
        let mut c = bin();
        c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--stdin", "--workers", &a, "--connect-timeout-secs", "3", "--model"]).arg(&m);
        for (i, v) in tls.iter().enumerate() {
            c.arg(if i % 2 == 0 { v.to_string() } else { f(v) });
        }
        let out = run_to_end(c, Some(""), false);
        assert_error_line(&out, &["cannot reach worker", &a, why]);
    }
    // The cluster's own coordinator still serves.
    assert!(!http.text(&greedy("a b", 4)).is_empty());
}

#[test]
fn https_serves_clients_that_trust_its_ca_and_nobody_over_plain_http() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let d = dir.path();
    make_certs(d, "web", &["server"]);
    let mut cmd = bin();
    cmd.args(["up", "--threads", "1", "--port", "0", "--ssl-certfile"])
        .arg(d.join("server.pem"))
        .arg("--ssl-keyfile")
        .arg(d.join("server.key"))
        .arg("--model")
        .arg(&m);
    let mut p = Proc::spawn(cmd);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("https://")).unwrap_or_else(|| panic!("an https URL: {line}")).trim_end_matches("/v1").to_string();
    p.wait_stderr("ready:");
    let curl = |extra: &[&str]| {
        let body = greedy("a b", 4).to_string();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-H", "Content-Type: application/json", "-d", &body])
            .args(extra)
            .arg(format!("{url}/v1/completions"))
            .output()
            .expect("curl runs");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, body, err) = curl(&["--cacert", d.join("web-ca.pem").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    // Without the CA the client refuses the server; plain HTTP gets no answer.
    let (code, _, err) = curl(&[]);
    assert_ne!(code, Some(0), "a client that does not trust the CA must refuse: {err}");
    let plain = url.replacen("https://", "http://", 1);
    let r = ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).build().post(&format!("{plain}/v1/completions")).send_json(greedy("a", 2));
    assert!(r.is_err(), "plain HTTP to the HTTPS port must not be served");
}

#[test]
fn random_bytes_and_huge_length_headers_on_a_workers_ports_neither_crash_it_nor_grow_it() {
    use std::io::Write;
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["worker", "--listen", "127.0.0.1:0", "--threads", "1", "--model-dir", dir.path().to_str().unwrap()]);
    let w = Proc::spawn(c);
    let line = w.out.recv_timeout(DEADLINE).expect("the worker says where it listens");
    let grpc = line.split_once("listening on ").unwrap().1.split_whitespace().next().unwrap().to_string();
    let comm = line.split_once("collective on ").unwrap().1.trim_end_matches(')').to_string();
    let before = rss_mib(w.child.id());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect()
    };
    // An HTTP/2 preface then a frame header claiming 16 MiB, a u64::MAX length, and noise.
    let huge_h2 = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0xff, 0xff, 0xff, 0x00, 0, 0, 0, 0, 1]].concat();
    for addr in [&grpc, &comm] {
        for payload in [huge_h2.clone(), u64::MAX.to_le_bytes().to_vec(), noise(64 << 10), noise(48)] {
            if let Ok(mut s) = std::net::TcpStream::connect(addr.as_str()) {
                let _ = s.write_all(&payload);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert!(pid_alive(w.child.id()), "the worker died");
    let after = rss_mib(w.child.id());
    assert!(after - before < 16.0, "the worker grew from {before:.1} to {after:.1} MiB on garbage");
    // It still serves a real coordinator.
    let (_c, http) = coordinator(&m, &["--workers", &grpc]);
    assert!(!http.text(&greedy("a b", 4)).is_empty());
}

#[test]
fn an_idle_stdin_coordinator_keeps_its_workers_loaded() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let quick = ["--coordinator-timeout-secs", "1"];
    let (_w0, a0) = token_worker("127.0.0.1:0", dir.path(), &quick);
    let (_w1, a1) = token_worker("127.0.0.1:0", dir.path(), &quick);
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--stdin", "--tp", "2", "--workers", &format!("{a0},{a1}"), "--model"]).arg(&m);
    let mut p = Proc::spawn(c);
    p.wait_stderr("ready:");
    let req = json!({"prompt": "a b c", "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let first = p.ask(&req);
    // Three times the workers' patience without a request: the keep-alive steps hold them.
    std::thread::sleep(Duration::from_secs(3));
    let again = p.ask(&req);
    assert!(again["error"].is_null(), "{again}");
    assert_eq!(again["output_ids"], first["output_ids"]);
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
}
