//! Serving requests as JSON lines on standard input, one result line each on standard
//! output: what `tpserve up` and `tpserve coordinator` do until the HTTP API arrives
//! (issue: serving). Requests run one at a time; a bad line or a failed request gets an
//! error line and the loop goes on.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tpserve_coordinator::{generate_batch, Backend, ClusterError, GenOptions, GenRequest};
use tpserve_model::tokenizer::Tokenizer;
use tpserve_types::SamplingParams;

/// One request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "one")]
    temperature: f32,
    #[serde(default)]
    top_k: usize,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    ignore_eos: bool,
}

fn default_max_tokens() -> usize {
    128
}
fn one() -> f32 {
    1.0
}

/// Reads request lines until standard input ends or Ctrl-C, answering each.
pub async fn serve_lines<B: Backend>(backend: &mut B, tok: &Tokenizer) -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // One Ctrl-C future for the whole loop, so an interrupt during a request is seen too.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    eprintln!("ready: send one JSON request per line on standard input, e.g. {{\"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}}");
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l.context("cannot read standard input")?,
            _ = &mut interrupted => { eprintln!("interrupted: stopping"); return Ok(()) }
        };
        let Some(line) = line else { return Ok(()) };
        if line.trim().is_empty() {
            continue;
        }
        let result = tokio::select! {
            r = answer(backend, tok, &line) => r,
            _ = &mut interrupted => { eprintln!("interrupted during a request: stopping"); return Ok(()) }
        };
        let answer = match result {
            Ok(v) => v,
            Err(e) => json!({ "error": { "message": format!("{e:#}"), "type": kind(&e) } }),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{answer}").and_then(|()| out.flush()).context("cannot write to standard output")?;
    }
}

fn kind(e: &anyhow::Error) -> &'static str {
    match e.downcast_ref::<ClusterError>() {
        Some(ClusterError::WorkerLost(_) | ClusterError::Unavailable(_)) => "cluster_error",
        Some(ClusterError::Rejected(_)) | None => "invalid_request_error",
        Some(_) => "internal_error",
    }
}

async fn answer<B: Backend>(backend: &mut B, tok: &Tokenizer, line: &str) -> Result<serde_json::Value> {
    let r: LineRequest = serde_json::from_str(line).context("the request line is not a valid request")?;
    if r.prompt.is_empty() {
        anyhow::bail!("prompt is empty");
    }
    if r.max_tokens == 0 {
        anyhow::bail!("max_tokens must be at least 1");
    }
    let sampling = SamplingParams { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p, seed: r.seed.unwrap_or_else(super::generate::fresh_seed) };
    sampling.validate()?;
    let prompt_ids = tok.encode(&r.prompt, true, true);
    let req = GenRequest { prompt_ids: prompt_ids.clone(), max_tokens: r.max_tokens, sampling, stop: r.stop, ignore_eos: r.ignore_eos };
    let (mut outs, stats) = generate_batch(backend, tok, &[req], GenOptions::default(), |_, _| ControlFlow::Continue(())).await?;
    let out = outs.pop().expect("one output per request");
    Ok(json!({
        "text": out.text,
        "prompt_ids": prompt_ids,
        "output_ids": out.output_ids,
        "finish_reason": out.finish_reason,
        "timings": out.timings,
        "steps": stats,
    }))
}
