//! A cluster across hosts: the coordinator and every worker in its own network namespace
//! (its own veth, its own address in 198.18.0.0/15, one bridge between them), formed both
//! ways (`--workers` and `--join`) on the default model, at tp 2 and at tp 2 x pp 2; the
//! tokens must be the single-process ones. Needs root (CI runs it with
//! `TPSERVE_REQUIRE_NETNS=1`, so it cannot skip there); namespaces are deleted even when a
//! test fails. `link_latency` (ignored: a benchmark) puts a delaying relay in front of the
//! workers' gRPC and collective ports and measures decode speed and TTFT against the delay
//! (docs/PERFORMANCE.md, "Across hosts").

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::netns::{in_ns, should_run, Link, Net, Relay};
use common::*;

const TOKEN: &str = "netns-test-token-0123456789abcdef";
const GRPC_PORT: u16 = 50051;
const COMM_PORT: u16 = 50061;
const JOIN_PORT: u16 = 50050;
const HTTP_PORT: u16 = 8000;

/// What `tpserve generate` (one process, no workers) answers: output ids and text.
fn single_process(model: &Path, prompt: &str, n: usize) -> (Vec<u64>, String) {
    let mut c = bin();
    c.args(["generate", "--prompt", prompt, "--max-tokens", &n.to_string(), "--temperature", "0", "--ignore-eos", "--json", "--threads", "1", "--model"])
        .arg(model);
    let out = run_to_end(c, None, false);
    out.assert_success();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    (v["output_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect(), v["text"].as_str().unwrap().to_string())
}

/// `tpserve worker` in namespace `ns`, on every interface of that host, with the token.
fn worker_in(ns: &str, model_dir: &Path, extra: &[String]) -> Proc {
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN)
        .args(["worker", "--listen", &format!("0.0.0.0:{GRPC_PORT}"), "--comm-listen", &format!("0.0.0.0:{COMM_PORT}"), "--threads", "1", "--model-dir"])
        .arg(model_dir)
        .args(extra);
    let w = Proc::spawn(in_ns(ns, c));
    let line = w.out.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("the worker in {ns} never said where it listens:\n{}", w.log()));
    assert!(line.contains("listening on"), "{line}");
    w
}

/// The coordinator in namespace `ns`, serving HTTP on `host:8000`; returned once ready.
fn coordinator_in(ns: &str, host: std::net::Ipv4Addr, model: &Path, args: &[String]) -> (Proc, Http) {
    let mut c = bin();
    c.env("TPSERVE_CLUSTER_TOKEN", TOKEN).args(["coordinator", "--host", &host.to_string(), "--port", &HTTP_PORT.to_string(), "--model"]).arg(model).args(args);
    let mut p = Proc::spawn(in_ns(ns, c));
    p.wait_stderr("ready:");
    (p, Http { url: format!("http://{host}:{HTTP_PORT}"), agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() })
}

fn split_args(tp: usize, pp: usize) -> Vec<String> {
    vec!["--tp".into(), tp.to_string(), "--pp".into(), pp.to_string()]
}

#[test]
fn a_coordinator_and_workers_on_separate_hosts_serve_the_single_process_tokens_named_or_joined() {
    if !should_run("netns") {
        return;
    }
    let Some(model) = default_model() else { return };
    let dir = model.parent().unwrap().to_path_buf();
    let prompts = shared_prompts(2);
    let want: Vec<(Vec<u64>, String)> = prompts.iter().map(|p| single_process(&model, p, 24)).collect();

    for (tp, pp) in [(2, 1), (2, 2)] {
        let world = tp * pp;
        // --workers: the coordinator names each host's address, rank by rank; requests on stdin.
        {
            let mut net = Net::new();
            let coord_ns = net.host(2);
            let workers: Vec<Proc> = (0..world).map(|r| worker_in(&net.host(10 + r as u8), &dir, &[])).collect();
            let addrs: Vec<String> = (0..world).map(|r| format!("{}:{GRPC_PORT}", net.addr(10 + r as u8))).collect();
            let mut c = bin();
            c.env("TPSERVE_CLUSTER_TOKEN", TOKEN)
                .args(["coordinator", "--stdin", "--workers", &addrs.join(","), "--model"])
                .arg(&model)
                .args(split_args(tp, pp));
            let mut coord = Proc::spawn(in_ns(&coord_ns, c));
            let plan = coord.wait_stderr("plan:");
            assert!(plan.contains(&format!("tp = {tp}")), "{plan}");
            coord.wait_stderr("ready:");
            for (p, (ids, _)) in prompts.iter().zip(&want) {
                let got = coord.ask(&json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true}));
                let got: Vec<u64> = got["output_ids"].as_array().unwrap_or_else(|| panic!("{got}")).iter().map(|x| x.as_u64().unwrap()).collect();
                assert_eq!(&got, ids, "tp {tp} x pp {pp}, workers named on other hosts: {p:?}");
            }
            let (code, log) = coord.finish();
            assert_eq!(code, Some(0), "{log}");
            drop(workers);
        }
        // --join: the workers register with the coordinator's host; a client on the bridge asks over HTTP.
        {
            let mut net = Net::new();
            let coord_ns = net.host(2);
            let join = format!("{}:{JOIN_PORT}", net.addr(2));
            let mut args = split_args(tp, pp);
            args.extend(["--join-listen".into(), join.clone()]);
            let mut c = bin();
            c.env("TPSERVE_CLUSTER_TOKEN", TOKEN)
                .args(["coordinator", "--host", &net.addr(2).to_string(), "--port", &HTTP_PORT.to_string(), "--model"])
                .arg(&model)
                .args(&args);
            let mut coord = Proc::spawn(in_ns(&coord_ns, c));
            coord.wait_stderr(&format!("waiting for {world} workers"));
            let mut workers = Vec::new();
            for r in 0..world {
                let host = 10 + r as u8;
                let ns = net.host(host);
                let advertise = format!("{}:{GRPC_PORT}", net.addr(host));
                workers.push(worker_in(&ns, &dir, &["--join".into(), join.clone(), "--advertise".into(), advertise]));
            }
            coord.wait_stderr("ready:");
            let http = Http { url: format!("http://{}:{HTTP_PORT}", net.addr(2)), agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() };
            assert_eq!(http.get("/ready").0, 200);
            for (p, (ids, text)) in prompts.iter().zip(&want) {
                let (code, v) = http.post("/v1/completions", &json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true}));
                assert_eq!(code, 200, "{v}");
                assert_eq!(v["choices"][0]["text"].as_str(), Some(text.as_str()), "tp {tp} x pp {pp}, workers joined from other hosts: {p:?}");
                assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(ids.len() as u64));
            }
            drop(coord);
            drop(workers);
        }
    }
}

#[test]
fn the_relay_delays_each_direction_and_paces_to_its_rate_without_changing_a_byte() {
    use std::io::{Read, Write};
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay = Relay::start(any, target, Link { delay: Duration::from_millis(30), bytes_per_s: 0 });
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    for i in 0..5u8 {
        let t = Instant::now();
        s.write_all(&[i; 100]).unwrap();
        let mut back = [0u8; 100];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, [i; 100]);
        rtts.push(t.elapsed());
    }
    rtts.sort();
    // 30 ms each way: at least 60 ms, and not much more on an idle loopback.
    assert!(rtts[0] >= Duration::from_millis(60), "{rtts:?}");
    assert!(rtts[2] < Duration::from_millis(200), "{rtts:?}");
    drop(s);

    // 1 MB at 4 MB/s takes at least 250 ms more than the delay, and arrives intact.
    let relay = Relay::start(any, target, Link { delay: Duration::ZERO, bytes_per_s: 4_000_000 });
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let t = Instant::now();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    // Both directions are paced: the echo comes back through the same rate limit, pipelined.
    assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
    assert!(back == data, "the relay changed bytes");
}

// ---- the benchmark: step time against link latency and bandwidth ----

/// One streamed greedy request: (TTFT, seconds between tokens after the first, tokens).
fn timed(http: &Http, prompt: &str, n: usize) -> (f64, f64, usize) {
    use std::io::BufRead;
    let t = Instant::now();
    let resp = http
        .agent
        .post(&format!("{}/v1/completions", http.url))
        .send_json(json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true, "stream": true}))
        .expect("a stream");
    let mut stamps = Vec::new();
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v["choices"][0]["text"].as_str().is_some_and(|s| !s.is_empty()) {
            stamps.push(t.elapsed().as_secs_f64());
        }
    }
    let ttft = stamps[0];
    let tpot = (stamps[stamps.len() - 1] - ttft) / (stamps.len() - 1).max(1) as f64;
    (ttft, tpot, stamps.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decode step time and TTFT at tp 2 and at pp 2 (two workers on two hosts, each behind a
/// relay with the given one-way delay and rate), for docs/PERFORMANCE.md. Run with
/// `cargo test --release --test netns -- --ignored --nocapture link_latency`; JSON lines to
/// `$TPSERVE_LATENCY_OUT` when set.
#[test]
#[ignore]
fn link_latency() {
    assert!(should_run("link_latency"), "link_latency needs network namespaces (root)");
    let model = default_model().expect("the default model");
    let dir = model.parent().unwrap().to_path_buf();
    // A short prompt for decode (its all-reduces are small: one round each) and a long one for
    // the time to first token (its prefill all-reduces take the two-round split path).
    let short = shared_prompts(1).pop().unwrap();
    let long: String = tpserve_fetch::testing::wikitext().chars().skip(2000).take(250).collect();
    let reps: usize = std::env::var("TPSERVE_LATENCY_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    // `TPSERVE_LATENCY_LINKS=delay_ms:bytes_per_s,...` replaces the default set.
    let links: Vec<(f64, u64)> = match std::env::var("TPSERVE_LATENCY_LINKS") {
        Ok(spec) => spec
            .split(',')
            .map(|l| {
                let (d, r) = l.split_once(':').unwrap_or((l, "0"));
                (d.parse().expect("a delay in ms"), r.parse().expect("a rate in bytes/s"))
            })
            .collect(),
        // No delay twice: the compute baseline is the mean of the two.
        Err(_) => vec![(0.0, 0), (0.5, 0), (2.0, 0), (10.0, 0), (0.5, 12_500_000), (0.0, 0)],
    };
    let splits: Vec<(usize, usize)> = match std::env::var("TPSERVE_LATENCY_SPLITS").as_deref() {
        Ok("tp2") => vec![(2, 1)],
        Ok("pp2") => vec![(1, 2)],
        _ => vec![(2, 1), (1, 2)],
    };
    let mut out = std::env::var_os("TPSERVE_LATENCY_OUT").map(|p| std::fs::File::create(p).unwrap());
    println!("{:>6} {:>8} {:>6} {:>10} {:>10} {:>12}", "split", "delay_ms", "MB/s", "tpot_ms", "ttft_ms", "ttft_long_ms");
    for (tp, pp) in splits {
        let mut net = Net::new();
        let coord_ns = net.host(2);
        let workers: Vec<Proc> = (0..2).map(|r| worker_in(&net.host(10 + r as u8), &dir, &[])).collect();
        let shaping = std::sync::Arc::new(std::sync::Mutex::new(Link { delay: Duration::ZERO, bytes_per_s: 0 }));
        let mut relays = Vec::new();
        let mut addrs = Vec::new();
        for r in 0..2u8 {
            let front = net.local_addr(110 + r);
            for port in [GRPC_PORT, COMM_PORT] {
                relays.push(Relay::start_shared(SocketAddr::new(front.into(), port), SocketAddr::new(net.addr(10 + r).into(), port), shaping.clone()));
            }
            addrs.push(format!("{front}:{GRPC_PORT}"));
        }
        let mut args = split_args(tp, pp);
        // Every request computes its whole prompt (the same prompts repeat).
        args.extend(["--workers".into(), addrs.join(","), "--no-prefix-caching".into()]);
        let (coord, http) = coordinator_in(&coord_ns, net.addr(2), &model, &args);
        let prompt_tokens = |p: &str| http.post("/v1/completions", &json!({"prompt": p, "max_tokens": 1})).1["usage"]["prompt_tokens"].as_u64().unwrap();
        let (short_tokens, long_tokens) = (prompt_tokens(&short), prompt_tokens(&long));
        println!("prompts: {short_tokens} and {long_tokens} tokens");
        // Rounds over every link setting, so a drift of the machine's speed touches them all alike.
        let mut runs = vec![Vec::new(); links.len()];
        let mut long_runs = vec![Vec::new(); links.len()];
        for _ in 0..reps {
            for (i, &(delay_ms, rate)) in links.iter().enumerate() {
                *shaping.lock().unwrap() = Link { delay: Duration::from_secs_f64(delay_ms / 1000.0), bytes_per_s: rate };
                timed(&http, &short, 2); // not measured: the first request after the link changed
                runs[i].push(timed(&http, &short, 32));
                long_runs[i].push(timed(&http, &long, 2));
            }
        }
        let split = if tp == 2 { "tp2" } else { "pp2" };
        for (i, &(delay_ms, rate)) in links.iter().enumerate() {
            let ttft = median(runs[i].iter().map(|r| r.0).collect()) * 1e3;
            let tpot = median(runs[i].iter().map(|r| r.1).collect()) * 1e3;
            let ttft_long = median(long_runs[i].iter().map(|r| r.0).collect()) * 1e3;
            let mbs = if rate == 0 { "-".to_string() } else { format!("{}", rate as f64 / 1e6) };
            println!("{split:>6} {delay_ms:>8} {mbs:>6} {tpot:>10.2} {ttft:>10.1} {ttft_long:>12.1}");
            if let Some(f) = out.as_mut() {
                use std::io::Write;
                let row = json!({"split": split, "delay_ms": delay_ms, "bytes_per_s": rate, "tpot_ms": tpot, "ttft_ms": ttft, "ttft_long_ms": ttft_long,
                    "short_prompt_tokens": short_tokens, "long_prompt_tokens": long_tokens, "runs": runs[i], "long_runs": long_runs[i]});
                writeln!(f, "{row}").unwrap();
            }
        }
        drop(coord);
        drop(relays);
        drop(workers);
        drop(net);
    }
}
