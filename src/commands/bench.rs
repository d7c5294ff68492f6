//! `tpserve bench`: load-tests any OpenAI-compatible server (tpserve, vLLM, llama-server...)
//! and reports vLLM `bench serve`'s metrics under the same names.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use tpserve_bench::client::{send, Prompt, Target};
use tpserve_bench::metrics::{percentile_key, summarize, Latency, Record, Slo};

use super::Loaded;
use crate::ModelArgs;

/// The text random and shared-prefix prompts are cut from when `--text` is not given: the
/// first seven articles (156,896 bytes) of the WikiText-2 (raw) test split, Merity et al.
/// 2016, text from Wikipedia under CC BY-SA 3.0 (see tests/data/README.md).
const BUILT_IN_TEXT: &str = include_str!("bench_text.txt");

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The server (default: http://--host:--port).
    #[arg(long)]
    pub base_url: Option<String>,
    /// The server's host when --base-url is not given (vLLM's --host).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The server's port when --base-url is not given (vLLM's --port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// `/v1/completions` or `/v1/chat/completions` (default: the one --backend speaks).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// vLLM's --backend, for its command lines: `openai` or `vllm` speak /v1/completions,
    /// `openai-chat` /v1/chat/completions. It picks the default --endpoint and must agree
    /// with a given one (vLLM refuses a mismatch too); both stream the OpenAI format.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// The model id to send (default: none, the server's only model). vLLM's --model means
    /// this: a --model that is not a file is taken as the served model's name too.
    #[arg(long = "served-model")]
    pub served_model: Option<String>,
    /// Sent as a Bearer token.
    #[arg(long, env = "TPSERVE_BENCH_API_KEY")]
    pub api_key: Option<String>,
    /// Requests to send (after the warm-up); with --duration, at most this many.
    /// vLLM's --num-prompts (whose default is 1000).
    #[arg(long, visible_alias = "num-prompts", default_value_t = 100)]
    pub num_requests: usize,
    /// Stop sending new requests after this many seconds (those in flight finish).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per second, Poisson arrivals (default, or `inf`: all at once).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Gamma shape of the gaps between arrivals (1: Poisson; < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests sent one at a time before measuring, the workload's first ones. vLLM's
    /// --num-warmups sends copies of its first prompt, up to --max-concurrency at once.
    #[arg(long, visible_alias = "num-warmups", default_value_t = 0)]
    pub warmup: usize,
    /// Seed of the workload and the arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `random` (prompts cut from --text), `shared-prefix` (one --prefix-len prefix shared by
    /// every prompt, then --input-len tokens of its own: measures prefix caching), a JSONL file
    /// of {"prompt", "max_tokens"?}, or a ShareGPT JSON file (first human turn as the prompt,
    /// the first reply's length as max_tokens).
    #[arg(long, default_value = "random", conflicts_with_all = ["dataset_name", "dataset_path"])]
    pub dataset: String,
    /// vLLM's --dataset-name: `random` (here cut from real text, --text, where vLLM strings
    /// random token ids together), `sharegpt` (the ShareGPT JSON file --dataset-path; vLLM
    /// also drops conversations whose prompt or reply is under 4 tokens, whose prompt is over
    /// 1024 or both over 2048; this keeps them all), `custom` (the JSONL file --dataset-path
    /// of {"prompt", "output_tokens"?}), or our `shared-prefix`.
    #[arg(long, value_enum)]
    pub dataset_name: Option<DatasetName>,
    /// vLLM's --dataset-path: the file of a sharegpt or custom --dataset-name; without a
    /// name, read like --dataset FILE.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Tokens of the prefix every shared-prefix prompt starts with.
    #[arg(long, default_value_t = 512)]
    pub prefix_len: usize,
    /// Text the random prompts are cut from (default: a built-in excerpt of WikiText-2).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Prompt tokens of a random request, not counting the BOS token the tokenizer adds.
    #[arg(long, default_value_t = 106)]
    pub input_len: usize,
    /// vLLM's --random-input-len: like --input-len but counting the tokens the tokenizer
    /// adds (BOS), so the server sees exactly this many.
    #[arg(long, conflicts_with = "input_len")]
    pub random_input_len: Option<usize>,
    /// Tokens to generate per request (vLLM's --random-output-len).
    #[arg(long, visible_alias = "random-output-len", default_value_t = 128)]
    pub output_len: usize,
    /// Lengths are drawn uniformly from [floor(len (1 - r)), ceil(len (1 + r))], r in [0, 1)
    /// (vLLM's --random-range-ratio, the same rule).
    #[arg(long, visible_alias = "random-range-ratio", default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Ask the server to ignore end-of-generation tokens (exact output lengths).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Percentiles reported, comma-separated (vLLM's --metric-percentiles, whose default
    /// is 99).
    #[arg(long, visible_alias = "metric-percentiles", default_value = "90,99", value_delimiter = ',')]
    pub percentiles: Vec<f64>,
    /// The latencies reported, comma-separated from ttft, tpot, itl, e2el (vLLM's
    /// --percentile-metrics, whose default leaves out e2el). As in vLLM, one left out loses
    /// its mean, median and standard deviation too, in the table and the saved result.
    #[arg(long, default_value = "ttft,tpot,itl,e2el", value_delimiter = ',')]
    pub percentile_metrics: Vec<Latency>,
    /// SLOs for goodput in milliseconds, `ttft:500,tpot:50,e2el:10000` or, as vLLM takes
    /// them, `ttft:500 tpot:50`.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub goodput: Vec<String>,
    /// Write the results (vLLM's keys) to this JSON file. Bare, as vLLM takes it: to
    /// --result-dir / --result-filename, by default vLLM's name
    /// `BACKEND-RATEqps[-concurrencyN]-SERVED_MODEL-yyyymmdd-HHMMSS.json` (UTC here, local
    /// time in vLLM).
    #[arg(long, num_args = 0..=1, value_name = "FILE")]
    pub save_result: Option<Option<PathBuf>>,
    /// The folder --save-result writes in (made if missing; vLLM's --result-dir).
    #[arg(long, requires = "save_result")]
    pub result_dir: Option<PathBuf>,
    /// The file name a bare --save-result writes (vLLM's --result-filename).
    #[arg(long, requires = "save_result")]
    pub result_filename: Option<PathBuf>,
    /// No progress bar (vLLM's --disable-tqdm).
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Run one level per value: `max-concurrency=1,8,32` or `request-rate=1,2,4`.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Draw a chart, SVG or PNG by the extension: latency distributions, or for a sweep
    /// throughput against latency.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The GGUF file whose tokenizer measures the prompts (before --model). vLLM's
    /// --tokenizer names a Hugging Face tokenizer: a value that is not a file is taken so,
    /// and the default model's tokenizer measures the prompts.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The tokenizer that measures prompt lengths (default: the default model's).
    #[command(flatten)]
    pub model: ModelArgs,
}

/// vLLM's `--backend` values that speak the OpenAI API.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Openai,
    Vllm,
    OpenaiChat,
}

impl Backend {
    fn endpoint(self) -> &'static str {
        match self {
            Self::Openai | Self::Vllm => "/v1/completions",
            Self::OpenaiChat => "/v1/chat/completions",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Vllm => "vllm",
            Self::OpenaiChat => "openai-chat",
        }
    }
}

/// vLLM's `--dataset-name` values this bench knows.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetName {
    Random,
    Sharegpt,
    Custom,
    SharedPrefix,
}

/// Where the prompts come from, from --dataset or --dataset-name and --dataset-path.
#[derive(Debug, Clone, PartialEq)]
enum Dataset {
    Random,
    SharedPrefix,
    ShareGpt(PathBuf),
    Jsonl(PathBuf),
    /// A file whose content says which of the two it is.
    File(PathBuf),
}

impl Dataset {
    fn of(a: &BenchArgs) -> Result<Self> {
        Ok(match (a.dataset_name, &a.dataset_path) {
            (None, None) => match a.dataset.as_str() {
                "random" => Self::Random,
                "shared-prefix" => Self::SharedPrefix,
                f => Self::File(f.into()),
            },
            (None, Some(p)) => Self::File(p.clone()),
            (Some(DatasetName::Random), None) => Self::Random,
            (Some(DatasetName::SharedPrefix), None) => Self::SharedPrefix,
            (Some(n @ (DatasetName::Random | DatasetName::SharedPrefix)), Some(p)) => {
                bail!(
                    "--dataset-path {}: --dataset-name {} cuts its prompts from --text, not from a dataset file",
                    p.display(),
                    n.to_possible_value().expect("no skipped variants").get_name()
                )
            }
            (Some(DatasetName::Sharegpt), Some(p)) => Self::ShareGpt(p.clone()),
            (Some(DatasetName::Custom), Some(p)) => Self::Jsonl(p.clone()),
            (Some(n @ (DatasetName::Sharegpt | DatasetName::Custom)), None) => {
                bail!("--dataset-name {}: give the file with --dataset-path", n.to_possible_value().expect("no skipped variants").get_name())
            }
        })
    }

    fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::ShareGpt(p) | Self::Jsonl(p) | Self::File(p) => Some(p),
            Self::Random | Self::SharedPrefix => None,
        }
    }
}

/// The base URL, endpoint and the name for vLLM's default result file that the flags
/// name together.
fn target_of(a: &BenchArgs) -> Result<(String, String, &'static str)> {
    let base_url = a.base_url.clone().unwrap_or_else(|| format!("http://{}:{}", a.host, a.port));
    let endpoint = match (a.backend, &a.endpoint) {
        (Some(b), Some(e)) if e != b.endpoint() => bail!("--backend {} speaks {}, not --endpoint {e}", b.name(), b.endpoint()),
        (_, Some(e)) => e.clone(),
        (Some(b), None) => b.endpoint().to_string(),
        (None, None) => "/v1/completions".to_string(),
    };
    if !matches!(endpoint.as_str(), "/v1/completions" | "/v1/chat/completions") {
        bail!("--endpoint {endpoint}: /v1/completions or /v1/chat/completions");
    }
    let label = a.backend.map_or(if endpoint.contains("chat") { "openai-chat" } else { "openai" }, Backend::name);
    Ok((base_url, endpoint, label))
}

/// Where the results go: --save-result FILE, or for a bare --save-result vLLM's
/// --result-filename or default name; in --result-dir if given.
fn result_path(a: &BenchArgs, label: &str, now: std::time::SystemTime) -> Option<PathBuf> {
    let file = a.save_result.as_ref()?.clone().or_else(|| a.result_filename.clone()).unwrap_or_else(|| {
        let rate = a.request_rate.filter(|r| r.is_finite()).map_or("inf".to_string(), |r| format!("{r:?}"));
        let conc = a.max_concurrency.map_or(String::new(), |c| format!("-concurrency{c}"));
        let model = a.served_model.as_deref().map_or("default", |m| m.rsplit('/').next().unwrap_or(m));
        format!("{label}-{rate}qps{conc}-{model}-{}.json", utc_stamp(now)).into()
    });
    Some(a.result_dir.as_ref().map_or(file.clone(), |d| d.join(&file)))
}

/// `yyyymmdd-HHMMSS` of `t` in UTC (vLLM's result names use local time).
fn utc_stamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

fn parse_slo(parts: &[String]) -> Result<Slo> {
    let mut slo = Slo::default();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once(':').with_context(|| format!("--goodput {part}: not name:ms"))?;
        let v: f64 = v.parse().ok().filter(|v: &f64| *v >= 0.0).with_context(|| format!("--goodput {part}: {v:?} is not a number of milliseconds"))?;
        match k {
            "ttft" => slo.ttft_ms = Some(v),
            "tpot" => slo.tpot_ms = Some(v),
            "e2el" => slo.e2el_ms = Some(v),
            _ => bail!("--goodput {part}: unknown metric {k:?} (ttft, tpot, e2el)"),
        }
    }
    Ok(slo)
}

/// The workload: `n` prompts.
fn workload(a: &BenchArgs, dataset: &Dataset, n: usize) -> Result<Vec<Prompt>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let r = a.range_ratio;
    let vary = |rng: &mut rand::rngs::StdRng, len: usize| -> usize {
        let (lo, hi) = (((len as f64) * (1.0 - r)).floor() as usize, ((len as f64) * (1.0 + r)).ceil() as usize);
        rng.gen_range(lo.max(1)..=hi.max(1))
    };
    let loaded = Loaded::open(&ModelArgs { model: a.tokenizer.clone().or_else(|| a.model.model.clone()), threads: a.model.threads })?;
    if let Some(path) = dataset.path() {
        let name = path.display();
        let text = std::fs::read_to_string(path).with_context(|| format!("dataset {name}: cannot read it"))?;
        let count = |t: &str| loaded.tokenizer.encode(t, true, false).len();
        let sharegpt = match dataset {
            Dataset::ShareGpt(_) => true,
            Dataset::Jsonl(_) => false,
            _ => text.trim_start().starts_with('['),
        };
        let mut out = Vec::new();
        if sharegpt {
            // ShareGPT: [{"conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}, ...]
            let all: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("dataset {name}: not a ShareGPT JSON array"))?;
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
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("dataset {name} line {}: not JSON", i + 1))?;
                let p = v["prompt"].as_str().with_context(|| format!("dataset {name} line {}: no \"prompt\" string", i + 1))?;
                // Ours is "max_tokens", vLLM's custom dataset's "output_tokens".
                let max_tokens = v["max_tokens"].as_u64().or_else(|| v["output_tokens"].as_u64()).map_or(a.output_len, |m| m as usize);
                out.push(Prompt { tokens: count(p), text: p.to_string(), max_tokens });
            }
        }
        if out.is_empty() {
            bail!("dataset {name}: no prompts");
        }
        // Seeded order, cycling when more requests than prompts are asked for.
        let start = rng.gen_range(0..out.len());
        return Ok((0..n).map(|i| out[(start + i) % out.len()].clone()).collect());
    }
    let (text, text_name) = match &a.text {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("--text {}: cannot read it (give a text file to cut prompts from)", p.display()))?,
            format!("--text {}", p.display()),
        ),
        None => (BUILT_IN_TEXT.to_string(), "the built-in text (give a longer one with --text)".to_string()),
    };
    let ids = loaded.tokenizer.encode(&text, false, false);
    // vLLM's --random-input-len counts the tokens the tokenizer adds; --input-len does not.
    let input_len = a.random_input_len.map_or(a.input_len, |n| n.saturating_sub(loaded.tokenizer.encode("", true, false).len()).max(1));
    if ids.len() < input_len * 2 {
        bail!("{text_name}: {} tokens, too short for prompts of {input_len}", ids.len());
    }
    let shared = *dataset == Dataset::SharedPrefix;
    let prefix = if shared {
        if ids.len() < a.prefix_len + input_len * 2 {
            bail!("{text_name}: {} tokens, too short for a prefix of {}", ids.len(), a.prefix_len);
        }
        loaded.tokenizer.decode(&ids[..a.prefix_len])
    } else {
        String::new()
    };
    let from = if shared { a.prefix_len } else { 0 };
    Ok((0..n)
        .map(|_| {
            let len = vary(&mut rng, input_len).min(ids.len() - from - 1);
            let at = rng.gen_range(from..ids.len() - len);
            let text = prefix.clone() + &loaded.tokenizer.decode(&ids[at..at + len]);
            Prompt { tokens: loaded.tokenizer.encode(&text, true, false).len(), text, max_tokens: vary(&mut rng, a.output_len) }
        })
        .collect())
}

/// `--model` and `--tokenizer` as vLLM means them, when they are not files: vLLM's
/// `--model` is the served model's name (ours: `--served-model`), its `--tokenizer` a
/// Hugging Face tokenizer. Here either may also be the GGUF file whose tokenizer measures
/// the prompts; a name that is not a file takes vLLM's meaning, so a vLLM command line runs
/// unchanged, and the prompts are then measured with the default model's tokenizer.
fn vllm_model_flags(a: &mut BenchArgs) -> Result<()> {
    if let Some(m) = a.model.model.take_if(|m| !m.exists()) {
        let name = m.to_string_lossy().into_owned();
        match &a.served_model {
            Some(s) if *s != name => bail!("--model {name}: not a file, so it names the served model as in vLLM, but --served-model {s} names another"),
            _ => a.served_model = Some(name),
        }
    }
    let hf_tokenizer = a.tokenizer.take_if(|t| !t.exists());
    if a.model.model.is_none() && a.tokenizer.is_none() {
        let named = hf_tokenizer.as_ref().map_or_else(String::new, |t| format!(" (--tokenizer {} is not a GGUF file)", t.display()));
        eprintln!("note: prompt lengths are measured with the default model's tokenizer{named}; give --tokenizer FILE.gguf for another");
    }
    Ok(())
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
    if !(0.0..1.0).contains(&a.range_ratio) {
        bail!("--range-ratio {}: must be at least 0 and below 1", a.range_ratio);
    }
    if let Some(p) = a.percentiles.iter().find(|p| !(0.0..=100.0).contains(*p)) {
        bail!("--percentiles {p}: a percentile is between 0 and 100");
    }
    let (base_url, endpoint, label) = target_of(&a)?;
    let mut a = a;
    vllm_model_flags(&mut a)?;
    if let Some(f) = &a.plot {
        super::bench_plot::Format::of(f).with_context(|| format!("--plot {}", f.display()))?;
        if a.sweep.is_some() && !(a.percentile_metrics.contains(&Latency::Ttft) && a.percentile_metrics.contains(&Latency::Tpot)) {
            bail!("--plot {} draws a sweep's TTFT and TPOT: keep both in --percentile-metrics", f.display());
        }
    }
    let slo = parse_slo(&a.goodput)?;
    let sweep = a.sweep.as_deref().map(parse_sweep).transpose()?;
    let dataset = Dataset::of(&a)?;
    let out_file = result_path(&a, label, std::time::SystemTime::now());
    let prompts = workload(&a, &dataset, a.warmup + a.num_requests)?;
    let target = Target { base_url: base_url.clone(), endpoint, model: a.served_model.clone(), api_key: a.api_key.clone() };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build().context("cannot make an HTTP client")?;
    // `--request-rate inf` is vLLM's way of saying all at once.
    let rate = a.request_rate.filter(|r| r.is_finite());
    super::block_on(async {
        for p in &prompts[..a.warmup] {
            let r = send(&http, &target, p, a.ignore_eos, Instant::now()).await;
            if let Some(e) = r.error {
                bail!("the warm-up request failed ({e}): is a server at {base_url}?");
            }
        }
        let prompts = &prompts[a.warmup..];
        let Some((param, values)) = sweep else {
            let (result, records) = level(&a, &http, &target, prompts, rate, a.max_concurrency, &slo).await?;
            print_table(&result, &a.percentiles, &a.percentile_metrics)?;
            if let Some(f) = &a.plot {
                super::bench_plot::latencies(f, &records).with_context(|| format!("--plot {}: cannot draw it", f.display()))?;
            }
            return save(out_file.as_deref(), &result);
        };
        let mut results = Vec::new();
        for v in &values {
            let (rate, conc) = match param {
                SweepParam::Concurrency => (rate, Some(*v as usize)),
                SweepParam::Rate => (Some(*v), a.max_concurrency),
            };
            eprintln!("sweep: {} = {v}", param.name());
            let (result, _) = level(&a, &http, &target, prompts, rate, conc, &slo).await?;
            print_table(&result, &a.percentiles, &a.percentile_metrics)?;
            results.push(result);
        }
        if let Some(f) = &a.plot {
            super::bench_plot::sweep(f, param.name(), &values, &results).with_context(|| format!("--plot {}: cannot draw it", f.display()))?;
        }
        save(out_file.as_deref(), &serde_json::json!({ "sweep": { "parameter": param.name(), "values": values }, "results": results }))
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

fn save(file: Option<&std::path::Path>, result: &serde_json::Value) -> Result<()> {
    let Some(f) = file else { return Ok(()) };
    if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--save-result: cannot make the folder {}", dir.display()))?;
    }
    std::fs::write(f, serde_json::to_string_pretty(result)?).with_context(|| format!("--save-result {}: cannot write it", f.display()))?;
    eprintln!("results written to {}", f.display());
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
    if a.disable_tqdm {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
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
    let mut result = summarize(&records, duration, &a.percentiles, &a.percentile_metrics, slo);
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

/// vLLM's result table, with the latencies asked for.
fn print_table(r: &serde_json::Value, percentiles: &[f64], latencies: &[Latency]) -> Result<()> {
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
        for l in Latency::ALL.into_iter().filter(|l| latencies.contains(l)) {
            let title = match l {
                Latency::Ttft => "Time to First Token",
                Latency::Tpot => "Time per Output Token (excl. 1st token)",
                Latency::Itl => "Inter-token Latency",
                Latency::E2el => "End-to-end Latency",
            };
            let name = l.name();
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).unwrap_or_else(|e| panic!("{args:?}: {e}")).a
    }

    #[test]
    fn vllm_flag_names_set_the_same_fields_as_ours() {
        let a = parse(&[
            "--num-prompts",
            "6",
            "--random-output-len",
            "8",
            "--random-range-ratio",
            "0.5",
            "--metric-percentiles",
            "50,99",
            "--num-warmups",
            "2",
            "--percentile-metrics",
            "ttft,e2el",
        ]);
        assert_eq!((a.num_requests, a.output_len, a.range_ratio, a.warmup), (6, 8, 0.5, 2));
        assert_eq!(a.percentiles, [50.0, 99.0]);
        assert_eq!(a.percentile_metrics, [Latency::Ttft, Latency::E2el]);
        // The default reports all four.
        assert_eq!(parse(&[]).percentile_metrics, Latency::ALL);
        assert!(Cli::try_parse_from(["bench", "--percentile-metrics", "ttft,ttfb"]).is_err());
        // Our name and vLLM's for the same length cannot both be given.
        assert!(Cli::try_parse_from(["bench", "--input-len", "8", "--random-input-len", "9"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--dataset", "x.jsonl", "--dataset-name", "random"]).is_err());
    }

    #[test]
    fn dataset_names_and_paths_resolve_like_vllm() {
        let of = |args: &[&str]| Dataset::of(&parse(args)).map_err(|e| e.to_string());
        assert_eq!(of(&[]), Ok(Dataset::Random));
        assert_eq!(of(&["--dataset-name", "random"]), Ok(Dataset::Random));
        assert_eq!(of(&["--dataset", "shared-prefix"]), Ok(Dataset::SharedPrefix));
        assert_eq!(of(&["--dataset-name", "shared-prefix"]), Ok(Dataset::SharedPrefix));
        assert_eq!(of(&["--dataset-name", "sharegpt", "--dataset-path", "s.json"]), Ok(Dataset::ShareGpt("s.json".into())));
        assert_eq!(of(&["--dataset-name", "custom", "--dataset-path", "c.jsonl"]), Ok(Dataset::Jsonl("c.jsonl".into())));
        assert_eq!(of(&["--dataset-path", "c.jsonl"]), Ok(Dataset::File("c.jsonl".into())));
        assert_eq!(of(&["--dataset", "c.jsonl"]), Ok(Dataset::File("c.jsonl".into())));
        assert!(of(&["--dataset-name", "sharegpt"]).unwrap_err().contains("--dataset-path"));
        assert!(of(&["--dataset-name", "random", "--dataset-path", "x"]).unwrap_err().contains("--text"));
        assert!(Cli::try_parse_from(["bench", "--dataset-name", "sonnet"]).is_err());
    }

    #[test]
    fn host_port_and_backend_make_the_target_and_a_mismatch_is_refused() {
        let t = |args: &[&str]| target_of(&parse(args)).map(|(u, e, l)| (u, e, l.to_string())).map_err(|e| e.to_string());
        assert_eq!(t(&[]), Ok(("http://127.0.0.1:8000".into(), "/v1/completions".into(), "openai".into())));
        assert_eq!(t(&["--host", "10.0.0.2", "--port", "9000"]).unwrap().0, "http://10.0.0.2:9000");
        // --base-url wins over --host/--port, as in vLLM.
        assert_eq!(t(&["--base-url", "http://h:1", "--port", "9000"]).unwrap().0, "http://h:1");
        assert_eq!(t(&["--backend", "openai-chat"]).unwrap().1, "/v1/chat/completions");
        assert_eq!(t(&["--backend", "vllm", "--endpoint", "/v1/completions"]).unwrap().2, "vllm");
        assert_eq!(t(&["--endpoint", "/v1/chat/completions"]).unwrap().2, "openai-chat");
        assert!(t(&["--backend", "openai-chat", "--endpoint", "/v1/completions"]).unwrap_err().contains("--backend openai-chat"));
        assert!(t(&["--endpoint", "/generate"]).unwrap_err().contains("--endpoint /generate"));
    }

    #[test]
    fn a_bare_save_result_writes_vllms_default_name_in_the_result_dir() {
        // 2026-03-04 05:06:07 UTC.
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_772_600_767);
        assert_eq!(utc_stamp(t), "20260304-050607");
        assert_eq!(utc_stamp(std::time::UNIX_EPOCH), "19700101-000000");
        let p = |args: &[&str]| result_path(&parse(args), "openai", t);
        assert_eq!(p(&[]), None);
        assert_eq!(p(&["--save-result", "r.json"]), Some("r.json".into()));
        assert_eq!(p(&["--save-result", "--result-dir", "out", "--result-filename", "x.json"]), Some("out/x.json".into()));
        assert_eq!(
            p(&["--save-result", "--request-rate", "4", "--max-concurrency", "8", "--served-model", "google/gemma-3-270m"]),
            Some("openai-4.0qps-concurrency8-gemma-3-270m-20260304-050607.json".into())
        );
        assert_eq!(p(&["--save-result", "--result-dir", "out"]), Some("out/openai-infqps-default-20260304-050607.json".into()));
        assert!(Cli::try_parse_from(["bench", "--result-dir", "out"]).is_err(), "--result-dir without --save-result does nothing");
    }

    #[test]
    fn goodput_takes_commas_or_vllms_separate_words() {
        let a = parse(&["--goodput", "ttft:500", "tpot:50", "--num-prompts", "3"]);
        assert_eq!(parse_slo(&a.goodput).unwrap(), Slo { ttft_ms: Some(500.0), tpot_ms: Some(50.0), e2el_ms: None });
        assert_eq!(a.num_requests, 3);
        let a = parse(&["--goodput", "ttft:500,e2el:9000"]);
        assert_eq!(parse_slo(&a.goodput).unwrap(), Slo { ttft_ms: Some(500.0), tpot_ms: None, e2el_ms: Some(9000.0) });
        assert!(parse_slo(&["ttfb:5".into()]).unwrap_err().to_string().contains("ttfb"));
        assert!(parse_slo(&[]).unwrap().is_empty());
    }

    #[test]
    fn the_built_in_text_is_the_start_of_the_wikitext_test_split() {
        let full = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/wikitext-2-raw-test.txt")).unwrap();
        assert!(full.starts_with(BUILT_IN_TEXT) && BUILT_IN_TEXT.len() == 156_896);
        // It ends where the eighth article begins.
        assert!(full[BUILT_IN_TEXT.len()..].starts_with(" = Hed PE = "), "{:?}", &full[BUILT_IN_TEXT.len()..][..40]);
    }
}
