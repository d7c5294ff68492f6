//! `tpserve bench` against a fake OpenAI server whose timings the test sets, and against a
//! real `tpserve up` on a tiny model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tpserve_model::testing::TinySpec;

mod common;
use common::*;

/// A server that answers every streamed completion with `chunks` text chunks, the first
/// after `first_ms` and the others `gap_ms` apart, then usage and `[DONE]`; every third
/// request gets a 429 instead. Returns its base URL.
fn fake_server(first_ms: u64, gap_ms: u64, chunks: usize) -> String {
    fake_server_with(first_ms, gap_ms, Some(chunks), true)
}

/// [`fake_server`] with a choice: `chunks` None streams one chunk per token of the request's
/// `max_tokens`; `refuse_thirds` false answers every request.
fn fake_server_with(first_ms: u64, gap_ms: u64, chunks: Option<usize>, refuse_thirds: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().enumerate() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                // Read the head, then the body by Content-Length.
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let chunks = chunks.unwrap_or_else(|| serde_json::from_slice::<Value>(&body).unwrap()["max_tokens"].as_u64().unwrap() as usize);
                if refuse_thirds && i % 3 == 2 {
                    let _ =
                        s.write_all(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                std::thread::sleep(Duration::from_millis(first_ms));
                for c in 0..chunks {
                    if c > 0 {
                        std::thread::sleep(Duration::from_millis(gap_ms));
                    }
                    let _ = s.write_all(format!("data: {{\"choices\": [{{\"index\": 0, \"text\": \"t{c}\"}}]}}\n\n").as_bytes());
                    let _ = s.flush();
                }
                let _ = s.write_all(format!("data: {{\"choices\": [], \"usage\": {{\"completion_tokens\": {chunks}}}}}\n\ndata: [DONE]\n\n").as_bytes());
            });
        }
    });
    url
}

fn bench(args: &[&str], model: &std::path::Path, dir: &TempDir) -> Value {
    let out_file = dir.path().join("result.json");
    let out = bin().arg("bench").args(args).arg("--save-result").arg(&out_file).arg("--model").arg(model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Serving Benchmark Result") && table.contains("Successful requests:"), "{table}");
    serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap()
}

fn text(dir: &TempDir) -> String {
    let p = dir.path().join("text.txt");
    std::fs::write(&p, "a b c hello world x y ".repeat(200)).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn metrics_from_a_server_with_known_timings() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3());
    let url = fake_server(200, 40, 6);
    let t = text(&dir);
    let r = bench(&["--base-url", &url, "--num-requests", "9", "--max-concurrency", "3", "--input-len", "8", "--text", &t, "--goodput", "ttft:5000"], &m, &dir);
    // Every third request is refused: 6 complete, 3 fail as "http 429".
    assert_eq!(r["completed"], 6, "{r}");
    assert_eq!(r["failed"], 3);
    assert_eq!(r["errors_by_kind"]["http 429"], 3);
    assert_eq!(r["total_output_tokens"], 36);
    // 8 tokens cut from the text, plus BOS.
    assert_eq!(r["total_input_tokens"], 6 * 9);
    let f = |k: &str| r[k].as_f64().unwrap();
    // The server's own timings, plus what loopback and a busy machine add (generous bounds:
    // this checks what is measured, not how fast anything is).
    assert!((200.0..800.0).contains(&f("mean_ttft_ms")), "{r}");
    assert!((40.0..200.0).contains(&f("median_itl_ms")), "{r}");
    assert!((40.0..200.0).contains(&f("mean_tpot_ms")), "{r}");
    assert!((400.0..1600.0).contains(&f("mean_e2el_ms")), "{r}");
    // TTFT excludes the gaps, E2EL includes them: e2el = ttft + 5 gaps for every request.
    assert!((f("mean_e2el_ms") - f("mean_ttft_ms") - 5.0 * f("mean_itl_ms")).abs() < 1e-6, "{r}");
    assert!(f("p99_ttft_ms") >= f("median_ttft_ms"));
    // Throughput is what completed over the duration; goodput counts the 6 (all within 5 s).
    assert!((f("output_throughput") - 36.0 / f("duration")).abs() < 1e-9);
    assert!((f("request_goodput") - 6.0 / f("duration")).abs() < 1e-9);
}

#[test]
fn a_vllm_bench_serve_command_line_runs_unchanged_and_reports_only_what_it_asks_for() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3());
    let url = fake_server_with(20, 5, None, false);
    let port = url.rsplit(':').next().unwrap();
    let out_dir = dir.path().join("results");
    // vLLM's flags throughout; no --text: the prompts come from the built-in text.
    let args = [
        "bench",
        "--backend",
        "openai",
        // vLLM's --model is the served model's name: not a file here, so taken that way.
        "--model",
        "google/gemma-3-270m",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--endpoint",
        "/v1/completions",
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "8",
        "--random-range-ratio",
        "0.0",
        "--num-prompts",
        "6",
        "--request-rate",
        "inf",
        "--max-concurrency",
        "3",
        "--num-warmups",
        "1",
        "--ignore-eos",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot",
        "--metric-percentiles",
        "50,99",
        "--goodput",
        "ttft:60000",
        "tpot:60000",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        out_dir.to_str().unwrap(),
        "--result-filename",
        "vllm.json",
    ];
    let out = bin().args(args).arg("--tokenizer").arg(&m).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(out_dir.join("vllm.json")).unwrap()).unwrap();
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(6), Some(0)), "{r}");
    let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).filter(|k| k.ends_with("_ms")).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "mean_tpot_ms",
            "mean_ttft_ms",
            "median_tpot_ms",
            "median_ttft_ms",
            "p50_tpot_ms",
            "p50_ttft_ms",
            "p99_tpot_ms",
            "p99_ttft_ms",
            "std_tpot_ms",
            "std_ttft_ms"
        ],
        "{r}"
    );
    // vLLM's --random-input-len counts the BOS token: the server sees exactly 16.
    assert_eq!(r["input_lens"], serde_json::json!([16, 16, 16, 16, 16, 16]), "{r}");
    assert_eq!(r["output_lens"], serde_json::json!([8, 8, 8, 8, 8, 8]), "{r}");
    assert!((r["request_goodput"].as_f64().unwrap() - r["request_throughput"].as_f64().unwrap()).abs() < 1e-9, "{r}");
    assert_eq!(r["request_rate"], "inf");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("P50 TTFT (ms):") && table.contains("P99 TPOT (ms):"), "{table}");
    assert!(!table.contains("ITL") && !table.contains("E2EL") && !table.contains("P90"), "{table}");
    // vLLM's default result name carries the served model's name from --model.
    let named = dir.path().join("named");
    let out = bin()
        .args([
            "bench",
            "--port",
            port,
            "--model",
            "google/gemma-3-270m",
            "--num-prompts",
            "1",
            "--save-result",
            "--result-dir",
            named.to_str().unwrap(),
            "--tokenizer",
        ])
        .arg(&m)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<String> = std::fs::read_dir(&named).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(files.len() == 1 && files[0].contains("-gemma-3-270m-"), "{files:?}");
    // A percentile beyond 100 and a range ratio of 1 are refused, naming the flag.
    for (flag, value, said) in [("--metric-percentiles", "101", "percentiles 101"), ("--random-range-ratio", "1", "range-ratio 1")] {
        let out = bin().args(["bench", "--port", port, flag, value, "--tokenizer"]).arg(&m).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(said), "{flag} {value}: {err}");
    }
}

#[test]
fn a_sweep_runs_one_level_per_value_and_both_kinds_of_chart_are_drawn() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3());
    let url = fake_server(20, 10, 4);
    let t = text(&dir);
    let svg = dir.path().join("sweep.svg");
    let r = bench(
        &["--base-url", &url, "--num-requests", "6", "--input-len", "4", "--text", &t, "--sweep", "max-concurrency=1,3", "--plot", svg.to_str().unwrap()],
        &m,
        &dir,
    );
    assert_eq!(r["sweep"]["parameter"], "max_concurrency");
    let levels = r["results"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    assert_eq!((levels[0]["max_concurrency"].as_u64(), levels[1]["max_concurrency"].as_u64()), (Some(1), Some(3)));
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("throughput vs latency, max_concurrency = 1, 3"), "{}", &chart[..chart.len().min(200)]);
    let cdf = dir.path().join("latency.svg");
    bench(&["--base-url", &url, "--num-requests", "4", "--input-len", "4", "--text", &t, "--plot", cdf.to_str().unwrap()], &m, &dir);
    assert!(std::fs::read_to_string(&cdf).unwrap().contains("latency distributions"));
    // A PNG of the same chart, its caption drawn with the embedded font: dark pixels in the
    // top rows, where nothing but the caption is.
    let png = dir.path().join("latency.PNG");
    bench(&["--base-url", &url, "--num-requests", "4", "--input-len", "4", "--text", &t, "--plot", png.to_str().unwrap()], &m, &dir);
    let mut reader = png::Decoder::new(std::fs::File::open(&png).unwrap()).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (900, 540, png::ColorType::Rgb));
    let dark =
        |rows: std::ops::Range<usize>| pixels[rows.start * info.line_size..rows.end * info.line_size].chunks(3).filter(|p| p.iter().all(|&c| c < 128)).count();
    assert!(dark(0..44) > 200, "no caption drawn: {} dark pixels", dark(0..44));
    let out = bin().args(["bench", "--base-url", &url, "--num-requests", "1", "--text", &t, "--plot", "chart.pdf", "--model"]).arg(&m).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--plot chart.pdf"), "{}", String::from_utf8_lossy(&out.stderr));
    // A served model's name given as --model (vLLM's meaning) with another --served-model is
    // a contradiction, named.
    let out = bin().args(["bench", "--base-url", &url, "--model", "gemma-3-270m", "--served-model", "other"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--served-model other"), "{}", String::from_utf8_lossy(&out.stderr));
    // Bad sweeps are named.
    let out = bin().args(["bench", "--base-url", &url, "--sweep", "threads=1,2", "--model"]).arg(&m).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sweep threads=1,2"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sharegpt_and_jsonl_datasets_and_a_duration_limit() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3());
    let url = fake_server(10, 10, 3);
    let share = dir.path().join("sharegpt.json");
    std::fs::write(&share, r#"[{"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "hello world x"}]}, {"conversations": [{"from": "human", "value": "x y"}]}]"#).unwrap();
    let r = bench(&["--base-url", &url, "--num-requests", "2", "--max-concurrency", "1", "--dataset", share.to_str().unwrap()], &m, &dir);
    // The one complete conversation, twice: "a b c" is 5 tokens with BOS.
    assert_eq!(r["input_lens"], serde_json::json!([6, 6]), "{r}");
    let jsonl = dir.path().join("prompts.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"a b\", \"max_tokens\": 3}\n{\"prompt\": \"x\"}\n").unwrap();
    let r = bench(&["--base-url", &url, "--num-requests", "2", "--max-concurrency", "1", "--dataset", jsonl.to_str().unwrap()], &m, &dir);
    assert_eq!(r["num_prompts"], 2);
    // The same files by vLLM's names; its custom JSONL spells the length "output_tokens".
    let r = bench(
        &["--base-url", &url, "--num-prompts", "2", "--max-concurrency", "1", "--dataset-name", "sharegpt", "--dataset-path", share.to_str().unwrap()],
        &m,
        &dir,
    );
    assert_eq!(r["input_lens"], serde_json::json!([6, 6]), "{r}");
    std::fs::write(&jsonl, "{\"prompt\": \"a b\", \"output_tokens\": 3}\n").unwrap();
    let echo = fake_server_with(5, 5, None, false);
    let r = bench(
        &["--base-url", &echo, "--num-prompts", "1", "--dataset-name", "custom", "--dataset-path", jsonl.to_str().unwrap(), "--percentile-metrics", "e2el"],
        &m,
        &dir,
    );
    assert_eq!((r["completed"].as_u64(), r["output_lens"][0].as_u64()), (Some(1), Some(3)), "{r}");
    assert!(r.get("mean_ttft_ms").is_none() && r["p99_e2el_ms"].is_number(), "{r}");
    // 10 requests/s for at most 1 s: about 10 are sent, never the 1000 asked for.
    let t = text(&dir);
    let r = bench(&["--base-url", &url, "--num-requests", "1000", "--request-rate", "10", "--duration", "1", "--input-len", "4", "--text", &t], &m, &dir);
    let n = r["num_prompts"].as_u64().unwrap();
    assert!((3..=25).contains(&n), "{n} requests in 1 s at 10/s");
}

#[test]
fn a_run_against_tpserve_up_produces_a_result_file() {
    let dir = TempDir::new().unwrap();
    let m = tiny(&dir, "gemma.gguf", &TinySpec::gemma3_shardable());
    let mut c = bin();
    c.args(["up", "--tp", "2", "--threads", "1", "--port", "0", "--model"]).arg(&m);
    let mut p = Proc::spawn(c);
    let line = p.wait_stderr("serving ");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().trim_end_matches("/v1").to_string();
    p.wait_stderr("ready:");
    let t = text(&dir);
    let svg = dir.path().join("run.svg");
    for endpoint in ["/v1/completions", "/v1/chat/completions"] {
        let r = bench(
            &[
                "--base-url",
                &url,
                "--endpoint",
                endpoint,
                "--num-requests",
                "6",
                "--request-rate",
                "20",
                "--seed",
                "1",
                "--input-len",
                "12",
                "--output-len",
                "10",
                "--ignore-eos",
                "--text",
                &t,
                "--plot",
                svg.to_str().unwrap(),
            ],
            &m,
            &dir,
        );
        assert!(std::fs::read_to_string(&svg).unwrap().contains("latency distributions"));
        assert!(r["p90_ttft_ms"].as_f64().is_some() && r["p99_e2el_ms"].as_f64().is_some(), "{r}");
        assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(6), Some(0)), "{endpoint}: {r}");
        assert_eq!(r["total_output_tokens"], 60, "{endpoint}: {r}");
        for k in ["request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms"] {
            assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{endpoint}: {k} in {r}");
        }
    }
    // The shared-prefix workload shows up as prefix-cache hits on the server.
    let r = bench(
        &[
            "--base-url",
            &url,
            "--dataset",
            "shared-prefix",
            "--prefix-len",
            "64",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-requests",
            "6",
            "--max-concurrency",
            "1",
            "--text",
            &t,
        ],
        &m,
        &dir,
    );
    assert_eq!(r["completed"], 6, "{r}");
    let metrics = ureq::get(&format!("{url}/metrics")).call().unwrap().into_string().unwrap();
    let hits: f64 = metrics.lines().find_map(|l| l.strip_prefix("tpserve_prefix_cache_hits_total ")).unwrap().trim().parse().unwrap();
    assert!(hits >= 5.0 * 48.0, "{hits} prefix-cache hits for 5 repeats of a 64-token prefix");
}
