//! `tpserve eval`: the accuracy of what a cluster serves. `perplexity` runs through the
//! cluster (exact distributed log-likelihoods, llama.cpp's chunking); `kl` compares two
//! models' next-token distributions in this process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tpserve_coordinator::eval::{kl_and_top1, llama_cpp_windows, scored_positions, window_logprobs, Nll};
use tpserve_coordinator::{Engine, EngineConfig};
use tpserve_model::model::{LogitsWanted, Model};
use tpserve_scheduler::SchedulerConfig;
use tpserve_types::kv::KvSizing;

use super::cluster::{DeviceArgs, LocalBackend, ParallelArgs};
use super::Loaded;
use crate::ModelArgs;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text file through the cluster, chunked as llama.cpp's perplexity tool.
    Perplexity(PerplexityArgs),
    /// KL divergence and top-1 agreement of --model's next-token distributions against
    /// --reference's (how much a quantized or distilled model departs from its teacher).
    Kl(KlArgs),
}

/// The text and how to cut it.
#[derive(Args, Debug)]
pub struct TextArgs {
    /// The text to score (e.g. tests/data/wikitext-2-raw-test.txt, WikiText-2's test split).
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per window; the second half of each is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows (default: the whole text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub text: TextArgs,
    /// Windows in flight at once (batched into the same steps).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct KlArgs {
    #[command(flatten)]
    pub text: TextArgs,
    /// The reference model (the teacher).
    #[arg(long)]
    pub reference: PathBuf,
    /// The model compared with it (default: the default model).
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Perplexity(a) => perplexity(a),
        EvalCommand::Kl(a) => kl(a),
    }
}

/// The file's windows, tokenized with `loaded`'s tokenizer as llama.cpp does (BOS added,
/// special tokens not parsed).
fn windows(loaded: &Loaded, t: &TextArgs) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(&t.file).with_context(|| format!("--file {}: cannot read it", t.file.display()))?;
    let ctx_max = loaded.config()?.context_len;
    if t.ctx > ctx_max {
        bail!("--ctx {}: the model's context is {ctx_max}", t.ctx);
    }
    if t.chunks == Some(0) {
        bail!("--chunks 0: score at least one window");
    }
    let tokens = loaded.tokenizer.encode(&text, true, false);
    llama_cpp_windows(&tokens, t.ctx, loaded.tokenizer.bos_id(), t.chunks).map_err(|e| anyhow::anyhow!("--file {} --ctx {}: {e}", t.file.display(), t.ctx))
}

fn bar(n: usize) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} windows {msg} ({eta})").expect("valid template"));
    pb
}

/// Prints the result: one JSON object, or a line.
fn report(json: bool, value: serde_json::Value, line: String) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json { writeln!(out, "{value}") } else { writeln!(out, "{line}") }.context("cannot write to standard output")
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    let loaded = Loaded::open(&a.model)?;
    let plan = a.parallel.plan(&loaded)?;
    let windows = windows(&loaded, &a.text)?;
    let ctx = a.text.ctx;
    let cfg = loaded.config()?;
    let budget = ctx.max(512);
    let kv = cfg.kv_layout(KvSizing { block_size: 16, tokens: a.batch * (ctx + 32), max_seqs: a.batch, max_chunk: budget });
    let scheduler = SchedulerConfig {
        kv: kv.clone(),
        max_num_seqs: a.batch,
        token_budget: budget,
        max_waiting: a.batch,
        context_len: cfg.context_len,
        prefix_caching: false,
    };
    let pb = bar(windows.len());
    pb.set_prefix("perplexity");
    let nll = super::block_on(async {
        let mut backend = LocalBackend::start(&loaded, plan, a.model.threads, &a.parallel, &a.devices, kv).await?;
        let mut stats = Nll::default();
        let mut missing = None;
        let r = {
            let mut engine = Engine::new(&mut backend, &loaded.tokenizer, EngineConfig { scheduler });
            window_logprobs(&mut engine, &windows, scored_positions(ctx).start, a.batch, |i, lps| {
                for t in scored_positions(ctx) {
                    match lps.get(t).copied().flatten() {
                        Some(lp) => stats.push(-(lp as f64)),
                        None => missing = Some((i, t)),
                    }
                }
                pb.inc(1);
                pb.set_message(format!("ppl {:.4}", stats.ppl()));
            })
            .await
        };
        backend.stop().await;
        r?;
        if let Some((i, t)) = missing {
            bail!("window {i} has no log-probability at position {t}");
        }
        Ok(stats)
    })?;
    pb.finish_and_clear();
    report(
        a.text.json,
        serde_json::json!({ "ppl": nll.ppl(), "ppl_stderr": nll.ppl_stderr(), "tokens": nll.n, "chunks": windows.len() }),
        format!("perplexity {:.4} ± {:.4} over {} tokens in {} windows of {ctx}", nll.ppl(), nll.ppl_stderr(), nll.n, windows.len()),
    )
}

fn kl(a: KlArgs) -> Result<()> {
    let reference = Loaded::open(&ModelArgs { model: Some(a.reference.clone()), threads: a.model.threads })?;
    let model = Loaded::open(&a.model)?;
    let (rc, mc) = (reference.config()?, model.config()?);
    if rc.vocab != mc.vocab || reference.tokenizer.vocab_size() != model.tokenizer.vocab_size() {
        bail!("--reference has a vocabulary of {} tokens, --model {}: KL needs the same vocabulary", rc.vocab, mc.vocab);
    }
    let windows = windows(&reference, &a.text)?;
    if a.text.ctx > mc.context_len {
        bail!("--ctx {}: --model's context is {}", a.text.ctx, mc.context_len);
    }
    let pool = super::thread_pool(a.model.threads)?;
    let (mr, mm) = pool.install(|| -> Result<(Model, Model)> {
        Ok((Model::load(&reference.gguf).context("cannot load --reference")?, Model::load(&model.gguf).context("cannot load --model")?))
    })?;
    let pb = bar(windows.len());
    pb.set_prefix("kl");
    let v = rc.vocab;
    let (mut kl, mut agree, mut n) = (Nll::default(), 0usize, 0usize);
    let scored = scored_positions(a.text.ctx);
    // Logits only for the rows that predict scored tokens: positions scored.start - 1 on.
    let from = scored.start - 1;
    for w in &windows {
        let logits = |m: &Model| -> Result<Vec<f32>> {
            let mut seqs = tpserve_model::testing::Seqs::new(m, 1, w.len());
            pool.install(|| seqs.forward(m, &[(0, &w[..from], LogitsWanted::None)]))?;
            Ok(pool.install(|| seqs.forward(m, &[(0, &w[from..], LogitsWanted::All)]))?.remove(0))
        };
        let (lr, lm) = (logits(&mr)?, logits(&mm)?);
        // Row r predicts token from + r + 1.
        for t in scored.clone() {
            let row = t - 1 - from;
            let (k, top1) = kl_and_top1(&lr[row * v..(row + 1) * v], &lm[row * v..(row + 1) * v]);
            kl.push(k);
            agree += usize::from(top1);
            n += 1;
        }
        pb.inc(1);
        pb.set_message(format!("KL {:.5}", kl.mean()));
    }
    pb.finish_and_clear();
    let top1 = agree as f64 / n.max(1) as f64;
    report(
        a.text.json,
        serde_json::json!({ "kl_mean": kl.mean(), "kl_stderr": kl.stderr(), "top1_agreement": top1, "tokens": n, "chunks": windows.len() }),
        format!("KL {:.6} ± {:.6} nats, top-1 agreement {:.2}% over {n} tokens in {} windows", kl.mean(), kl.stderr(), 100.0 * top1, windows.len()),
    )
}
