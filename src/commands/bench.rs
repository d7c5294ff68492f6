//! `tpserve bench`: load-tests any OpenAI-compatible server (tpserve, vLLM, llama-server...)
//! and reports vLLM `bench serve`'s metrics under the same names.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use tpserve_bench::client::{send, Prompt, Target};
use tpserve_bench::metrics::{percentile_key, summarize, Record, Slo};

use super::Loaded;
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// `/v1/completions` or `/v1/chat/completions`.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// The model id to send (default: none, the server's only model).
    #[arg(long = "served-model")]
    pub served_model: Option<String>,
    #[arg(long, env = "TPSERVE_BENCH_API_KEY")]
    pub api_key: Option<String>,
    /// Requests to send (after the warm-up); with --duration, at most this many.
    #[arg(long, default_value_t = 100)]
    pub num_requests: usize,
    /// Stop sending new requests after this many seconds (those in flight finish).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per second, Poisson arrivals (default: all at once).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Gamma shape of the gaps between arrivals (1: Poisson; < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests sent (one at a time) before measuring.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Seed of the workload and the arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `random` (prompts cut from --text), `shared-prefix` (one --prefix-len prefix shared by
    /// every prompt, then --input-len tokens of its own: measures prefix caching), a JSONL file
    /// of {"prompt", "max_tokens"?}, or a ShareGPT JSON file (first human turn as the prompt,
    /// the first reply's length as max_tokens).
    #[arg(long, default_value = "random")]
    pub dataset: String,
    /// Tokens of the prefix every shared-prefix prompt starts with.
    #[arg(long, default_value_t = 512)]
    pub prefix_len: usize,
    /// Text the random prompts are cut from.
    #[arg(long, default_value = "../shared/data/wikitext-2-raw-test.txt")]
    pub text: PathBuf,
    /// Prompt tokens of a random request.
    #[arg(long, default_value_t = 106)]
    pub input_len: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Lengths vary uniformly within ± this fraction.
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Ask the server to ignore end-of-generation tokens (exact output lengths).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Percentiles reported, comma-separated.
    #[arg(long, default_value = "90,99", value_delimiter = ',')]
    pub percentiles: Vec<f64>,
    /// SLOs for goodput, e.g. `ttft:500,tpot:50,e2el:10000` (milliseconds).
    #[arg(long)]
    pub goodput: Option<String>,
    /// Write the results (vLLM's keys) to this JSON file.
    #[arg(long)]
    pub save_result: Option<PathBuf>,
    /// Run one level per value: `max-concurrency=1,8,32` or `request-rate=1,2,4`.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Draw a chart, SVG or PNG by the extension: latency distributions, or for a sweep
    /// throughput against latency.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The tokenizer that measures prompt lengths (default: the default model's).
    #[command(flatten)]
    pub model: ModelArgs,
}

fn parse_slo(s: &str) -> Result<Slo> {
    let mut slo = Slo::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once(':').with_context(|| format!("--goodput {s}: {part:?} is not name:ms"))?;
        let v: f64 = v.parse().with_context(|| format!("--goodput {s}: {v:?} is not a number of milliseconds"))?;
        match k {
            "ttft" => slo.ttft_ms = Some(v),
            "tpot" => slo.tpot_ms = Some(v),
            "e2el" => slo.e2el_ms = Some(v),
            _ => bail!("--goodput {s}: unknown metric {k:?} (ttft, tpot, e2el)"),
        }
    }
    Ok(slo)
}

/// The workload: `n` prompts.
fn workload(a: &BenchArgs, n: usize) -> Result<Vec<Prompt>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let vary = |rng: &mut rand::rngs::StdRng, len: usize| -> usize {
        let r = a.range_ratio.clamp(0.0, 1.0);
        let (lo, hi) = (((len as f64) * (1.0 - r)).round() as usize, ((len as f64) * (1.0 + r)).round() as usize);
        rng.gen_range(lo.max(1)..=hi.max(1))
    };
    if a.dataset != "random" && a.dataset != "shared-prefix" {
        let text = std::fs::read_to_string(&a.dataset).with_context(|| format!("--dataset {}: cannot read it", a.dataset))?;
        let loaded = Loaded::open(&a.model)?;
        let count = |t: &str| loaded.tokenizer.encode(t, true, false).len();
        let mut out = Vec::new();
        if text.trim_start().starts_with('[') {
            // ShareGPT: [{"conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}, ...]
            let all: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("--dataset {}: not a ShareGPT JSON array", a.dataset))?;
            for c in &all {
                let turns = c["conversations"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                if let [q, r, ..] = turns {
                    if let (Some(q), Some(r)) = (q["value"].as_str(), r["value"].as_str()) {
                        out.push(Prompt { tokens: count(q), text: q.to_string(), max_tokens: count(r).saturating_sub(1).max(1) });
                    }
                }
            }
        } else {
            for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("--dataset {} line {}: not JSON", a.dataset, i + 1))?;
                let p = v["prompt"].as_str().with_context(|| format!("--dataset {} line {}: no \"prompt\" string", a.dataset, i + 1))?;
                let max_tokens = v["max_tokens"].as_u64().map_or(a.output_len, |m| m as usize);
                out.push(Prompt { tokens: count(p), text: p.to_string(), max_tokens });
            }
        }
        if out.is_empty() {
            bail!("--dataset {}: no prompts", a.dataset);
        }
        // Seeded order, cycling when more requests than prompts are asked for.
        let start = rng.gen_range(0..out.len());
        return Ok((0..n).map(|i| out[(start + i) % out.len()].clone()).collect());
    }
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("--text {}: cannot read it (give a text file to cut prompts from)", a.text.display()))?;
    let loaded = Loaded::open(&a.model)?;
    let ids = loaded.tokenizer.encode(&text, false, false);
    if ids.len() < a.input_len * 2 {
        bail!("--text {}: {} tokens, too short for prompts of {}", a.text.display(), ids.len(), a.input_len);
    }
    let prefix = if a.dataset == "shared-prefix" {
        if ids.len() < a.prefix_len + a.input_len * 2 {
            bail!("--text {}: {} tokens, too short for a prefix of {}", a.text.display(), ids.len(), a.prefix_len);
        }
        loaded.tokenizer.decode(&ids[..a.prefix_len])
    } else {
        String::new()
    };
    let from = if prefix.is_empty() { 0 } else { a.prefix_len };
    Ok((0..n)
        .map(|_| {
            let len = vary(&mut rng, a.input_len).min(ids.len() - from - 1);
            let at = rng.gen_range(from..ids.len() - len);
            let text = prefix.clone() + &loaded.tokenizer.decode(&ids[at..at + len]);
            Prompt { tokens: loaded.tokenizer.encode(&text, true, false).len(), text, max_tokens: vary(&mut rng, a.output_len) }
        })
        .collect())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.num_requests == 0 {
        bail!("--num-requests 0: send at least one");
    }
    if a.duration.is_some_and(|d| d.is_nan() || d <= 0.0) {
        bail!("--duration {}: must be above 0 seconds", a.duration.unwrap_or(0.0));
    }
    if a.max_concurrency == Some(0) {
        bail!("--max-concurrency 0: must be at least 1");
    }
    if !matches!(a.endpoint.as_str(), "/v1/completions" | "/v1/chat/completions") {
        bail!("--endpoint {}: /v1/completions or /v1/chat/completions", a.endpoint);
    }
    if let Some(m) = a.model.model.as_ref().filter(|m| !m.exists()) {
        // vLLM's `--model` names the served model; ours is the local tokenizer's file.
        bail!("--model {}: no such file; here --model is the GGUF whose tokenizer measures the prompts, and the model id sent to the server is --served-model", m.display());
    }
    if let Some(f) = &a.plot {
        super::bench_plot::Format::of(f).with_context(|| format!("--plot {}", f.display()))?;
    }
    let slo = a.goodput.as_deref().map(parse_slo).transpose()?.unwrap_or_default();
    let sweep = a.sweep.as_deref().map(parse_sweep).transpose()?;
    let prompts = workload(&a, a.warmup + a.num_requests)?;
    let target = Target { base_url: a.base_url.clone(), endpoint: a.endpoint.clone(), model: a.served_model.clone(), api_key: a.api_key.clone() };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build().context("cannot make an HTTP client")?;
    super::block_on(async {
        for p in &prompts[..a.warmup] {
            let r = send(&http, &target, p, a.ignore_eos, Instant::now()).await;
            if let Some(e) = r.error {
                bail!("the warm-up request failed ({e}): is a server at {}?", a.base_url);
            }
        }
        let prompts = &prompts[a.warmup..];
        let Some((param, values)) = sweep else {
            let (result, records) = level(&a, &http, &target, prompts, a.request_rate, a.max_concurrency, &slo).await?;
            print_table(&result, &a.percentiles)?;
            if let Some(f) = &a.plot {
                super::bench_plot::latencies(f, &records).with_context(|| format!("--plot {}: cannot draw it", f.display()))?;
            }
            return save(&a, &result);
        };
        let mut results = Vec::new();
        for v in &values {
            let (rate, conc) = match param {
                SweepParam::Concurrency => (a.request_rate, Some(*v as usize)),
                SweepParam::Rate => (Some(*v), a.max_concurrency),
            };
            eprintln!("sweep: {} = {v}", param.name());
            let (result, _) = level(&a, &http, &target, prompts, rate, conc, &slo).await?;
            print_table(&result, &a.percentiles)?;
            results.push(result);
        }
        if let Some(f) = &a.plot {
            super::bench_plot::sweep(f, param.name(), &values, &results).with_context(|| format!("--plot {}: cannot draw it", f.display()))?;
        }
        save(&a, &serde_json::json!({ "sweep": { "parameter": param.name(), "values": values }, "results": results }))
    })
}

/// What `--sweep` varies.
#[derive(Debug, Clone, Copy)]
enum SweepParam {
    Concurrency,
    Rate,
}

impl SweepParam {
    fn name(self) -> &'static str {
        match self {
            Self::Concurrency => "max_concurrency",
            Self::Rate => "request_rate",
        }
    }
}

/// `max-concurrency=1,8,32` or `request-rate=1,2,4`.
fn parse_sweep(s: &str) -> Result<(SweepParam, Vec<f64>)> {
    let (k, vs) = s.split_once('=').with_context(|| format!("--sweep {s}: write max-concurrency=1,8,32 or request-rate=1,2,4"))?;
    let param = match k {
        "max-concurrency" | "max_concurrency" | "concurrency" => SweepParam::Concurrency,
        "request-rate" | "request_rate" | "rate" => SweepParam::Rate,
        _ => bail!("--sweep {s}: unknown parameter {k:?} (max-concurrency or request-rate)"),
    };
    let values = vs
        .split(',')
        .map(|v| v.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x > 0.0).with_context(|| format!("--sweep {s}: {v:?} is not a positive number")))
        .collect::<Result<Vec<_>>>()?;
    if matches!(param, SweepParam::Concurrency) && values.iter().any(|v| v.fract() != 0.0) {
        bail!("--sweep {s}: concurrencies are whole numbers");
    }
    Ok((param, values))
}

fn save(a: &BenchArgs, result: &serde_json::Value) -> Result<()> {
    if let Some(f) = &a.save_result {
        std::fs::write(f, serde_json::to_string_pretty(result)?).with_context(|| format!("--save-result {}: cannot write it", f.display()))?;
    }
    Ok(())
}

/// One load level: sends `prompts` at `rate` with at most `max_concurrency` in flight, and
/// returns the results (vLLM's keys) and the records.
async fn level(
    a: &BenchArgs,
    http: &reqwest::Client,
    target: &Target,
    prompts: &[Prompt],
    rate: Option<f64>,
    max_concurrency: Option<usize>,
    slo: &Slo,
) -> Result<(serde_json::Value, Vec<Record>)> {
    let arrivals = tpserve_bench::arrivals::schedule(prompts.len(), rate, a.burstiness, a.seed).map_err(anyhow::Error::msg)?;
    let pb = ProgressBar::new(prompts.len() as u64);
    pb.set_style(ProgressStyle::with_template("bench {bar:30} {pos}/{len} requests ({elapsed}, {msg})").expect("valid template"));
    let limit = Arc::new(tokio::sync::Semaphore::new(max_concurrency.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS)));
    let start = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .cloned()
        .zip(arrivals)
        .map(|(p, at)| {
            let (http, target, limit, pb) = (http.clone(), target.clone(), limit.clone(), pb.clone());
            let (ignore_eos, duration) = (a.ignore_eos, a.duration);
            tokio::spawn(async move {
                if duration.is_some_and(|d| at > d) {
                    return None;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(start + Duration::from_secs_f64(at))).await;
                let _permit = limit.acquire_owned().await.expect("the semaphore is never closed");
                // Past --duration nothing new is sent.
                if duration.is_some_and(|d| start.elapsed().as_secs_f64() > d) {
                    pb.inc(1);
                    return None;
                }
                let r = send(&http, &target, &p, ignore_eos, start).await;
                pb.inc(1);
                if r.error.is_some() {
                    pb.set_message("some failed");
                }
                Some(r)
            })
        })
        .collect();
    let mut records: Vec<Record> = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.extend(t.await.context("a request task panicked")?);
    }
    pb.finish_and_clear();
    let duration = start.elapsed().as_secs_f64();
    let mut result = summarize(&records, duration, &a.percentiles, slo);
    result["num_prompts"] = records.len().into();
    result["request_rate"] = rate.map_or("inf".into(), serde_json::Value::from);
    result["burstiness"] = a.burstiness.into();
    result["max_concurrency"] = max_concurrency.into();
    result["input_lens"] = records.iter().map(|r| r.input_tokens).collect::<Vec<_>>().into();
    result["output_lens"] = records.iter().map(|r| r.output_tokens).collect::<Vec<_>>().into();
    result["ttfts"] = records.iter().map(|r| r.ttft).collect::<Vec<_>>().into();
    result["errors"] = records.iter().map(|r| r.error.clone().unwrap_or_default()).collect::<Vec<_>>().into();
    Ok((result, records))
}

/// vLLM's result table.
fn print_table(r: &serde_json::Value, percentiles: &[f64]) -> Result<()> {
    let mut o = std::io::stdout().lock();
    let num = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let mut w = || -> std::io::Result<()> {
        writeln!(o, "{:=^50}", " Serving Benchmark Result ")?;
        writeln!(o, "{:<40}{:<10}", "Successful requests:", r["completed"])?;
        writeln!(o, "{:<40}{:<10}", "Failed requests:", r["failed"])?;
        writeln!(o, "{:<40}{:<10.2}", "Benchmark duration (s):", num("duration"))?;
        writeln!(o, "{:<40}{:<10}", "Total input tokens:", r["total_input_tokens"])?;
        writeln!(o, "{:<40}{:<10}", "Total generated tokens:", r["total_output_tokens"])?;
        writeln!(o, "{:<40}{:<10.2}", "Request throughput (req/s):", num("request_throughput"))?;
        if r.get("request_goodput").is_some() {
            writeln!(o, "{:<40}{:<10.2}", "Request goodput (req/s):", num("request_goodput"))?;
        }
        writeln!(o, "{:<40}{:<10.2}", "Output token throughput (tok/s):", num("output_throughput"))?;
        writeln!(o, "{:<40}{:<10.2}", "Peak output token throughput (tok/s):", num("max_output_tokens_per_s"))?;
        writeln!(o, "{:<40}{:<10.2}", "Total Token throughput (tok/s):", num("total_token_throughput"))?;
        for (name, title) in [("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"), ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")] {
            writeln!(o, "{:-^50}", format!(" {title} "))?;
            writeln!(o, "{:<40}{:<10.2}", format!("Mean {} (ms):", name.to_uppercase()), num(&format!("mean_{name}_ms")))?;
            writeln!(o, "{:<40}{:<10.2}", format!("Median {} (ms):", name.to_uppercase()), num(&format!("median_{name}_ms")))?;
            for p in percentiles {
                writeln!(o, "{:<40}{:<10.2}", format!("P{p} {} (ms):", name.to_uppercase()), num(&percentile_key(*p, name)))?;
            }
        }
        if let Some(e) = r["errors_by_kind"].as_object().filter(|e| !e.is_empty()) {
            writeln!(o, "{:-^50}", " Errors ")?;
            for (k, v) in e {
                writeln!(o, "{:<40}{:<10}", format!("{k}:"), v)?;
            }
        }
        writeln!(o, "{:=^50}", "")
    };
    w().context("cannot write to standard output")
}
