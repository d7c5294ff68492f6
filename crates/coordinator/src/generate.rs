//! A fixed batch of requests generated to the end (the `generate` command, the JSON-lines
//! loop): the [`Engine`] with every request queued at once.

use std::ops::ControlFlow;

use serde::Serialize;
use tokio::sync::mpsc;
use tpserve_model::tokenizer::Tokenizer;
use tpserve_scheduler::SchedulerConfig;
use tpserve_types::{SamplingParams, TokenId};

use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig, Event, Request, Summary};
use crate::ClusterError;

/// What to generate for one prompt.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Prompt token ids, BOS included when wanted.
    pub prompt_ids: Vec<TokenId>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The consumer of the text went away (closed pipe, disconnected client).
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_tokens: usize,
    /// From the start until the first token was sampled.
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens produced by decode steps (the first token comes from the prefill).
    pub decode_tokens: usize,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenOutput {
    pub output_ids: Vec<TokenId>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// One rank's share of the steps' time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RankTime {
    pub rank: usize,
    pub compute_ms: f64,
    /// Part of `compute_ms` spent in collectives (waiting for peers included).
    pub comm_ms: f64,
}

/// What the steps of a generation cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub steps: usize,
    /// Wall time of the steps as the coordinator saw them (network included).
    pub step_ms: f64,
    pub ranks: Vec<RankTime>,
    /// Encoded step messages: requests to all ranks, answers from all ranks.
    pub request_bytes: usize,
    pub response_bytes: usize,
}

/// How steps are formed.
#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    /// Most new tokens in one step (decode tokens first, then prefill chunks).
    pub token_budget: usize,
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
/// [`FinishReason::Cancelled`]. A failed step fails the whole batch.
pub async fn generate_batch<B: Backend>(
    backend: &mut B,
    tok: &Tokenizer,
    reqs: &[GenRequest],
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
    let backend_ctx = scheduler.context_len;
    let mut engine = Engine::new(&mut *backend, tok, EngineConfig { scheduler });
    let mut rxs = Vec::with_capacity(reqs.len());
    let mut ids = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        if r.prompt_ids.len() >= backend_ctx {
            return Err(ClusterError::Rejected(format!("request {i}: the prompt is {} tokens, the context is {backend_ctx}", r.prompt_ids.len())));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // Generation stops at the end of the context ("length"), as with a long max_tokens.
        let room = backend_ctx.saturating_sub(r.prompt_ids.len());
        let req = Request {
            prompt_ids: r.prompt_ids.clone(),
            max_tokens: r.max_tokens.min(room),
            sampling: r.sampling,
            stop: r.stop.clone(),
            ignore_eos: r.ignore_eos,
            ..Request::default()
        };
        ids.push(engine.add(req, tx).map_err(|e| ClusterError::Rejected(format!("request {i}: {e}")))?);
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
                        outputs[i] = Some(GenOutput { output_ids: Vec::new(), text: String::new(), finish_reason: FinishReason::Cancelled, timings: Timings::default() });
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
