//! `tpserve generate`: one prompt in, streamed text out (or one JSON object).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::ops::ControlFlow;

use tpserve_coordinator::{generate_batch, Backend, GenOptions, GenOutput, GenRequest, StepStats};
use tpserve_model::chat::{self, Message};
use tpserve_types::{SamplingError, SamplingParams};

use super::cluster::{LocalBackend, ParallelArgs};
use super::Loaded;
use crate::ModelArgs;

/// A seed that differs from run to run.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt text (special tokens such as `<start_of_turn>` written in it are recognised).
    #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file instead.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, env = "TPSERVE_MAX_TOKENS")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    // Negative numbers are read as values so that `--temperature -1` reaches `validate` and
    // gets its real message, not clap's "unexpected argument '-1'".
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to p (1 = no limit).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed (default: a fresh one each run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// A system prompt for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Print one JSON object {"prompt_ids", "output_ids", "text", "finish_reason", "timings", "steps"} instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Prompt tokens per forward pass while prefilling.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Run this many copies of the request in one batch (request i samples with seed + i),
    /// to measure batched decoding; only the first copy's text is printed, and --json adds
    /// "batch": {"n", "output_tokens", "decode_tokens_per_s"} over all copies.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With --tp or --pp above 1, generation runs on that many real worker processes on
    /// loopback (`--threads` each, default: the cores shared out); at 1 x 1 it runs here.
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}: cannot read it", f.display()))?,
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give some text with --prompt or --prompt-file");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens 0: ask for at least one token");
    }
    if args.batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    if args.prefill_chunk == 0 {
        bail!("--prefill-chunk 0: must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed.unwrap_or_else(fresh_seed),
    };
    // Name the flags as the user typed them (`--top-p`, not the field name `top_p`).
    sampling.validate().map_err(|e| match e {
        SamplingError::Temperature(t) => anyhow!("--temperature {t}: must be a finite number >= 0 (0 = greedy)"),
        SamplingError::TopP(p) => anyhow!("--top-p {p}: must be greater than 0 and at most 1 (1 = no limit)"),
    })?;

    let loaded = Loaded::open(&args.model)?;
    let plan = args.parallel.plan(&loaded)?;
    let tok = &loaded.tokenizer;
    let prompt_ids = if args.chat {
        let cfg = loaded.config()?;
        let file_template = loaded.gguf.get("tokenizer.chat_template").and_then(|v| v.as_str());
        let template = chat::template_for(file_template, cfg.arch, tok.token_id("<|start_header_id|>").is_some());
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message { role: "system".into(), content: s.clone() });
        }
        messages.push(Message { role: "user".into(), content: prompt });
        let piece = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or("").to_owned();
        let text = chat::render(&template, &messages, &piece(tok.bos_id()), &piece(tok.eos_id()), true)?;
        tok.encode(&text, false, true)
    } else {
        tok.encode(&prompt, true, true)
    };
    let ctx = loaded.config()?.context_len;
    if prompt_ids.len() >= ctx {
        bail!("the prompt is {} tokens, but the model's context is {ctx}: shorten it", prompt_ids.len());
    }
    let req = GenRequest {
        prompt_ids: prompt_ids.clone(),
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let reqs: Vec<GenRequest> =
        (0..args.batch as u64).map(|i| GenRequest { sampling: SamplingParams { seed: sampling.seed.wrapping_add(i), ..sampling }, ..req.clone() }).collect();
    // Decode steps carry one token per sequence: the budget must leave room for prefill.
    let opts = GenOptions { token_budget: args.prefill_chunk.max(args.batch + 1), prefix_caching: false };
    // Room for exactly this batch.
    let per_seq = (prompt_ids.len() + args.max_tokens).min(ctx);
    let kv = super::cluster::kv_layout(&loaded.config()?, tpserve_types::kv::KvSizing { block_size: 16, tokens: args.batch * (per_seq + 16), max_seqs: args.batch, max_chunk: opts.token_budget });
    let json = args.json;
    let (outs, stats) = super::block_on(async {
        let mut backend = LocalBackend::start(&loaded, plan, args.model.threads, &args.parallel, kv).await?;
        let out = stream(&mut backend, &loaded, &reqs, opts, json).await;
        backend.stop().await;
        out
    })?;
    let out = &outs[0];
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    if args.json {
        let json = serde_json::json!({
            "prompt_ids": prompt_ids,
            "output_ids": out.output_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "timings": out.timings,
            "steps": stats,
        });
        let mut json = json;
        if outs.len() > 1 {
            // Aggregate decode speed: every copy's decode tokens over the longest decode time.
            let tokens: usize = outs.iter().map(|o| o.timings.decode_tokens).sum();
            let ms = outs.iter().map(|o| o.timings.decode_ms).fold(0.0, f64::max);
            json["batch"] = serde_json::json!({
                "n": outs.len(),
                "output_tokens": outs.iter().map(|o| o.output_ids.len()).sum::<usize>(),
                "decode_tokens_per_s": if ms > 0.0 { tokens as f64 / (ms / 1e3) } else { 0.0 },
            });
        }
        writeln!(o, "{json}").context("cannot write the result to standard output")?;
    } else {
        writeln!(o).context("cannot write the generated text to standard output")?;
        let t = &out.timings;
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?}",
            t.prefill_tokens, t.prefill_tokens_per_s, t.decode_tokens, t.decode_tokens_per_s, out.finish_reason
        );
    }
    Ok(())
}

/// Runs `reqs` as one batch on `backend`, streaming the first one's text to stdout unless `json`.
async fn stream<B: Backend>(backend: &mut B, loaded: &Loaded, reqs: &[GenRequest], opts: GenOptions, json: bool) -> Result<(Vec<GenOutput>, StepStats)> {
    let stdout = std::io::stdout();
    // The failed write (e.g. the reader of a pipe went away) that stopped generation.
    let mut write_error: Option<std::io::Error> = None;
    let (outs, stats) = generate_batch(backend, &loaded.tokenizer, reqs, opts, |i, piece| {
        if !json && i == 0 {
            let mut o = stdout.lock();
            if let Err(e) = o.write_all(piece.as_bytes()).and_then(|()| o.flush()) {
                // Nobody is reading any more: stop generating.
                write_error = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })
    .await?;
    if let Some(e) = write_error {
        return Err(e).context("cannot write the generated text to standard output");
    }
    Ok((outs, stats))
}
