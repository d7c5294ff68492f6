//! `tpserve generate`: one prompt in, streamed text out (or one JSON object).

use std::io::Write;
use std::path::PathBuf;

use std::ops::ControlFlow;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tpserve_coordinator::{generate_batch, Backend, GenOptions, GenOutput, Limits, OverContext, Request, RequestParams, StepStats};
use tpserve_tokenizer::chat::{ChatTemplate, Message};
use tpserve_types::kv::KvSizing;
use tpserve_types::SamplingParams;

use super::cluster::{DeviceArgs, LocalBackend, ParallelArgs};
use super::Loaded;
use crate::ModelArgs;

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
    /// Sampling temperature, 0 to 2; 0 picks the most likely token every time (greedy).
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
    /// "batch": {"n", "output_tokens", "output_ids" (per copy), "decode_tokens_per_s"} over
    /// all copies.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With --tp or --pp above 1, generation runs on that many real worker processes on
    /// loopback (`--threads` each, default: the cores shared out); at 1 x 1 it runs here.
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = read_prompt(&args)?;
    let params = request_params(&args);
    // Refuse a bad flag before anything is loaded.
    params.validate().map_err(|e| anyhow!(e.as_flag_message()))?;
    if args.batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    if args.prefill_chunk == 0 {
        bail!("--prefill-chunk 0: must be at least 1");
    }

    let loaded = Loaded::open(&args.model)?;
    let plan = args.parallel.plan(&loaded)?;
    let cfg = loaded.config()?;
    let prompt_ids = prompt_ids(&args, &loaded, prompt)?;
    let limits = Limits { context_len: cfg.context_len, kv_tokens: usize::MAX, vocab: cfg.vocab };
    let req = params.build(prompt_ids.clone(), limits).map_err(|e| match e.param {
        "prompt" => anyhow!("the prompt is {} tokens, but the model's context is {}: shorten it", prompt_ids.len(), cfg.context_len),
        _ => anyhow!(e.as_flag_message()),
    })?;
    // Copy i samples with seed + i.
    let reqs: Vec<Request> = (0..args.batch as u64)
        .map(|i| Request { sampling: SamplingParams { seed: req.sampling.seed.wrapping_add(i), ..req.sampling }, ..req.clone() })
        .collect();
    // Decode steps carry one token per sequence: the budget must leave room for prefill.
    let opts = GenOptions { token_budget: args.prefill_chunk.max(args.batch + 1), prefix_caching: false };
    // Room for exactly this batch.
    let per_seq = prompt_ids.len() + req.max_tokens;
    let kv = cfg.kv_layout(KvSizing { block_size: 16, tokens: args.batch * (per_seq + 16), max_seqs: args.batch, max_chunk: opts.token_budget });
    let json = args.json;
    let (outs, stats) = super::block_on(async {
        let mut backend = LocalBackend::start(&loaded, plan, args.model.threads, &args.parallel, &args.devices, kv).await?;
        let out = stream(&mut backend, &loaded, &reqs, opts, json).await;
        backend.stop().await;
        out
    })?;
    report(&args, &prompt_ids, &outs, &stats)
}

/// The prompt text from --prompt or --prompt-file.
fn read_prompt(args: &GenerateArgs) -> Result<String> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}: cannot read it", f.display()))?,
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give some text with --prompt or --prompt-file");
    }
    Ok(prompt)
}

/// The flags as the request builder's values. A long --max-tokens stops at the end of the
/// context ("length"), as a script asking for "as much as fits" expects.
fn request_params(args: &GenerateArgs) -> RequestParams {
    RequestParams {
        max_tokens: Some(i64::try_from(args.max_tokens).unwrap_or(i64::MAX)),
        over_context: OverContext::Clamp,
        temperature: Some(args.temperature),
        top_p: Some(args.top_p),
        top_k: Some(i64::try_from(args.top_k).unwrap_or(i64::MAX)),
        seed: args.seed,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..RequestParams::default()
    }
}

/// The prompt's token ids: the text as it is (BOS first), or with --chat wrapped in the
/// model's chat template as a user turn (after a --system turn).
fn prompt_ids(args: &GenerateArgs, loaded: &Loaded, prompt: String) -> Result<Vec<u32>> {
    let tok = &loaded.tokenizer;
    if !args.chat {
        return Ok(tok.encode(&prompt, true, true));
    }
    let template = ChatTemplate::for_model(&loaded.gguf, tok).context("cannot read the model's chat template")?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message { role: "system".into(), content: s.clone() });
    }
    messages.push(Message { role: "user".into(), content: prompt });
    // As the server does: special tokens only from the template, the prompt as plain text.
    Ok(template.encode(tok, &messages, true)?)
}

/// Prints the result: the JSON object with --json, else the timings line (the text was
/// streamed already).
fn report(args: &GenerateArgs, prompt_ids: &[u32], outs: &[GenOutput], stats: &StepStats) -> Result<()> {
    let out = &outs[0];
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    if !args.json {
        writeln!(o).context("cannot write the generated text to standard output")?;
        let t = &out.timings;
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?}",
            t.prefill_tokens, t.prefill_tokens_per_s, t.decode_tokens, t.decode_tokens_per_s, out.finish_reason
        );
        return Ok(());
    }
    let mut json = serde_json::json!({
        "prompt_ids": prompt_ids,
        "output_ids": out.output_ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "timings": out.timings,
        "steps": stats,
    });
    if outs.len() > 1 {
        // Aggregate decode speed: every copy's decode tokens over the longest decode time.
        let tokens: usize = outs.iter().map(|o| o.timings.decode_tokens).sum();
        let ms = outs.iter().map(|o| o.timings.decode_ms).fold(0.0, f64::max);
        json["batch"] = serde_json::json!({
            "n": outs.len(),
            "output_tokens": outs.iter().map(|o| o.output_ids.len()).sum::<usize>(),
            "output_ids": outs.iter().map(|o| &o.output_ids).collect::<Vec<_>>(),
            "decode_tokens_per_s": if ms > 0.0 { tokens as f64 / (ms / 1e3) } else { 0.0 },
        });
    }
    writeln!(o, "{json}").context("cannot write the result to standard output")
}

/// Runs `reqs` as one batch on `backend`, streaming the first one's text to stdout unless `json`.
async fn stream<B: Backend>(backend: &mut B, loaded: &Loaded, reqs: &[Request], opts: GenOptions, json: bool) -> Result<(Vec<GenOutput>, StepStats)> {
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
