//! A fixed batch of requests generated to the end (the `generate` command, the JSON-lines
//! loop): the [`Engine`] with every request queued at once, and what each request cost.

use std::ops::ControlFlow;

use serde::Serialize;
use tokio::sync::mpsc;
use tpserve_scheduler::SchedulerConfig;
use tpserve_tokenizer::Tokenizer;
use tpserve_types::TokenId;

use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig, Event, FinishReason, Request, Summary};
use crate::error::ClusterError;
use crate::stats::StepStats;

/// Prefill and decode speed of one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Prompt tokens.
    pub prefill_tokens: usize,
    /// From the start until the first token was sampled.
    pub prefill_ms: f64,
    /// Prompt tokens per second of `prefill_ms`.
    pub prefill_tokens_per_s: f64,
    /// Tokens produced by decode steps (the first token comes from the prefill).
    pub decode_tokens: usize,
    /// From the first token to the last.
    pub decode_ms: f64,
    /// Decode tokens per second of `decode_ms`.
    pub decode_tokens_per_s: f64,
}

/// What one request of a batch produced.
#[derive(Debug, Clone, Serialize)]
pub struct GenOutput {
    /// The generated tokens.
    pub output_ids: Vec<TokenId>,
    /// Their text.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// How fast.
    pub timings: Timings,
}

/// How steps are formed.
#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    /// Most new tokens in one step (decode tokens first, then prefill chunks).
    pub token_budget: usize,
    /// Whether requests of the batch share the KV blocks of a common prompt prefix.
    pub prefix_caching: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self { token_budget: 512, prefix_caching: true }
    }
}

/// Generates for every request at once through an [`Engine`], calling `on_text(i, piece)`
/// with each piece of request i's text as soon as it is final. When it returns
/// `ControlFlow::Break` (the reader went away) request i stops with
/// [`FinishReason::Abort`]. A failed step fails the whole batch.
pub async fn generate_batch<B: Backend>(
    backend: &mut B,
    tok: &Tokenizer,
    reqs: &[Request],
    opts: GenOptions,
    mut on_text: impl FnMut(usize, &str) -> ControlFlow<()>,
) -> Result<(Vec<GenOutput>, StepStats), ClusterError> {
    let scheduler = SchedulerConfig {
        kv: backend.kv_layout().clone(),
        max_num_seqs: reqs.len().max(1),
        token_budget: opts.token_budget.max(1),
        max_waiting: reqs.len().max(1),
        context_len: backend.context_len(),
        prefix_caching: opts.prefix_caching,
    };
    let mut engine = Engine::new(&mut *backend, tok, EngineConfig { scheduler });
    let mut rxs = Vec::with_capacity(reqs.len());
    let mut ids = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        ids.push(engine.add(r.clone(), tx).map_err(|e| ClusterError::Rejected(format!("request {i}: {e}")))?);
        rxs.push(rx);
    }
    let mut outputs: Vec<Option<GenOutput>> = vec![None; reqs.len()];
    let mut cancelled = vec![false; reqs.len()];
    loop {
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Delta { text, .. } if !text.is_empty() && !cancelled[i] && on_text(i, &text).is_break() => {
                        cancelled[i] = true;
                        engine.abort(ids[i]);
                        outputs[i] =
                            Some(GenOutput { output_ids: Vec::new(), text: String::new(), finish_reason: FinishReason::Abort, timings: Timings::default() });
                    }
                    Event::Done(s) if !cancelled[i] => outputs[i] = Some(GenOutput::from_summary(s)),
                    Event::Error(e) => return Err(ClusterError::Unavailable(e)),
                    _ => {}
                }
            }
        }
        if !engine.has_work() {
            break;
        }
        if !engine.step().await? {
            return Err(ClusterError::Protocol("the scheduler has work but formed no step".into()));
        }
    }
    let stats = engine.stats().clone();
    let outputs = outputs.into_iter().map(|o| o.expect("every request ends with a summary")).collect();
    Ok((outputs, stats))
}

impl GenOutput {
    fn from_summary(s: Summary) -> Self {
        let per_s = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let decode_s = (s.e2e_s - s.ttft_s).max(0.0);
        let decode_tokens = s.output_ids.len().saturating_sub(1);
        GenOutput {
            timings: Timings {
                prefill_tokens: s.prompt_tokens,
                prefill_ms: s.ttft_s * 1e3,
                prefill_tokens_per_s: per_s(s.prompt_tokens, s.ttft_s),
                decode_tokens,
                decode_ms: decode_s * 1e3,
                decode_tokens_per_s: per_s(decode_tokens, decode_s),
            },
            output_ids: s.output_ids,
            finish_reason: s.finish_reason,
            text: s.text,
        }
    }
}
