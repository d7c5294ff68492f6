//! Generation through a [`Backend`]: prompts are prefilled in chunks under a per-step token
//! budget, then every live sequence decodes one token per step, all in the same batch.
//! Tokens are sampled here from the ranks' merged candidates (DESIGN.md, "Combining partial
//! logits"), so tp = 1 and tp = N run the very same sampler on the very same numbers.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use serde::Serialize;
use tpserve_model::tokenizer::Tokenizer;
use tpserve_types::sampling::candidates_needed;
use tpserve_types::step::{merge_outputs, LogitsWanted, SeqId, SeqWork, StepPlan};
use tpserve_types::{SamplingParams, TokenId};

use crate::backend::Backend;
use crate::text::TextOut;
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
}

impl Default for GenOptions {
    fn default() -> Self {
        Self { token_budget: 512 }
    }
}

struct Live<'t> {
    id: SeqId,
    req: &'t GenRequest,
    /// Prompt tokens sent so far.
    prefilled: usize,
    /// Token sampled last step, to be fed next step.
    pending: Option<TokenId>,
    out_ids: Vec<TokenId>,
    text: TextOut<'t>,
    finish: Option<FinishReason>,
    first_token: Option<Instant>,
    done_at: Option<Instant>,
    /// A stop string ended the text.
    cut: bool,
}

impl Live<'_> {
    /// Whether the workers hold state for it (it must be freed): a prompt chunk was sent.
    fn started(&self) -> bool {
        self.prefilled > 0
    }

    /// Tokens the workers hold for this sequence.
    fn pos(&self) -> usize {
        self.prefilled + self.out_ids.len().saturating_sub(usize::from(self.pending.is_some()))
    }
}

/// Generates for every request at once, calling `on_text(i, piece)` with each piece of
/// request i's text as soon as it is final. When it returns `ControlFlow::Break` (the reader
/// went away) request i stops with [`FinishReason::Cancelled`]. A failed step fails the
/// whole batch; a finished request's state is freed on the workers.
pub async fn generate_batch<B: Backend>(
    backend: &mut B,
    tok: &Tokenizer,
    reqs: &[GenRequest],
    opts: GenOptions,
    mut on_text: impl FnMut(usize, &str) -> ControlFlow<()>,
) -> Result<(Vec<GenOutput>, StepStats), ClusterError> {
    let ctx = backend.context_len();
    for (i, r) in reqs.iter().enumerate() {
        if r.prompt_ids.is_empty() {
            return Err(ClusterError::Rejected(format!("request {i}: the prompt has no tokens")));
        }
        if r.prompt_ids.len() >= ctx {
            return Err(ClusterError::Rejected(format!("request {i}: the prompt is {} tokens, the context is {ctx}", r.prompt_ids.len())));
        }
    }
    let budget = opts.token_budget.max(1);
    let t0 = Instant::now();
    let mut live: Vec<Live> = reqs
        .iter()
        .enumerate()
        .map(|(i, req)| Live {
            id: i as SeqId,
            req,
            prefilled: 0,
            pending: None,
            out_ids: Vec::new(),
            text: TextOut::new(tok, &req.stop),
            finish: if req.max_tokens == 0 { Some(FinishReason::Length) } else { None },
            first_token: None,
            done_at: None,
            cut: false,
        })
        .collect();
    let mut stats = StepStats::default();
    let mut step_no = 0u64;
    let mut free: Vec<SeqId> = Vec::new();

    while live.iter().any(|s| s.finish.is_none()) {
        let mut seqs = Vec::new();
        let mut left = budget;
        for s in live.iter().filter(|s| s.finish.is_none()) {
            if let Some(t) = s.pending {
                seqs.push(SeqWork {
                    seq_id: s.id,
                    tokens: vec![t],
                    start_pos: s.pos(),
                    logits: LogitsWanted::Last,
                    sampling: None,
                    sample_step: s.out_ids.len() as u64,
                    logprobs: 0,
                });
                left = left.saturating_sub(1);
            }
        }
        for s in live.iter_mut().filter(|s| s.finish.is_none() && s.pending.is_none()) {
            if left == 0 {
                break;
            }
            let n = s.req.prompt_ids.len();
            let take = left.min(n - s.prefilled);
            let last = s.prefilled + take == n;
            seqs.push(SeqWork {
                seq_id: s.id,
                tokens: s.req.prompt_ids[s.prefilled..s.prefilled + take].to_vec(),
                start_pos: s.prefilled,
                logits: if last { LogitsWanted::Last } else { LogitsWanted::None },
                sampling: (s.prefilled == 0).then_some(s.req.sampling),
                sample_step: 0,
                logprobs: 0,
            });
            s.prefilled += take;
            left -= take;
        }
        let plan = StepPlan { step: step_no, seqs, free: std::mem::take(&mut free) };
        step_no += 1;
        let ts = Instant::now();
        let reply = match backend.step(&plan).await {
            Ok(r) => r,
            Err(e) => {
                // A refused step leaves the cluster healthy: let the workers forget this
                // batch's sequences so their ids can be used again. (A lost worker ends the
                // cluster, and there is nobody left to tell.)
                if matches!(e, ClusterError::Rejected(_) | ClusterError::Protocol(_)) {
                    let started: Vec<SeqId> = live.iter().filter(|s| s.started()).map(|s| s.id).collect();
                    let _ = backend.step(&StepPlan { step: step_no, seqs: Vec::new(), free: started }).await;
                }
                return Err(e);
            }
        };
        stats.steps += 1;
        stats.step_ms += ts.elapsed().as_secs_f64() * 1e3;
        stats.request_bytes += reply.request_bytes;
        stats.response_bytes += reply.response_bytes;
        if reply.outputs.iter().any(|o| o.rank >= reply.outputs.len()) {
            return Err(ClusterError::Protocol("a rank answered with a rank number outside the world".into()));
        }
        for o in &reply.outputs {
            if stats.ranks.len() <= o.rank {
                stats.ranks.resize_with(o.rank + 1, RankTime::default);
            }
            let r = &mut stats.ranks[o.rank];
            r.rank = o.rank;
            r.compute_ms += o.compute_us as f64 / 1e3;
            r.comm_ms += o.comm_us as f64 / 1e3;
        }
        let merged = merge_outputs(&reply.outputs, |id| reqs.get(id as usize).map_or(1, |r| candidates_needed(&r.sampling, 0)))
            .map_err(ClusterError::Protocol)?;
        let now = Instant::now();
        for m in merged {
            let s = live.get_mut(m.seq_id as usize).ok_or_else(|| ClusterError::Protocol(format!("an answer for unknown sequence {}", m.seq_id)))?;
            let cands = m.rows.last().ok_or_else(|| ClusterError::Protocol(format!("no candidates for sequence {}", m.seq_id)))?;
            let id = cands.pick(&s.req.sampling, s.out_ids.len() as u64);
            s.first_token.get_or_insert(now);
            s.pending = None;
            if !s.req.ignore_eos && tok.is_eog(id) {
                s.finish = Some(FinishReason::Stop);
            } else {
                s.out_ids.push(id);
                let pushed = s.text.push(id);
                let i = s.id as usize;
                let cancelled = !pushed.new_text.is_empty() && on_text(i, pushed.new_text).is_break();
                if pushed.stopped {
                    s.finish = Some(FinishReason::Stop);
                    s.cut = true;
                } else if cancelled {
                    s.finish = Some(FinishReason::Cancelled);
                } else if s.out_ids.len() >= s.req.max_tokens || s.prefilled + s.out_ids.len() > ctx {
                    s.finish = Some(FinishReason::Length);
                } else {
                    s.pending = Some(id);
                }
            }
            if s.finish.is_some() {
                s.done_at = Some(now);
                // The text is final when a stop string cut it or the reader left; otherwise
                // flush what was held back (the bytes of an unfinished character included).
                if s.finish != Some(FinishReason::Cancelled) && !s.cut {
                    let i = s.id as usize;
                    let (rest, stopped) = s.text.finish();
                    if !rest.is_empty() {
                        let _ = on_text(i, rest);
                    }
                    if stopped {
                        s.finish = Some(FinishReason::Stop);
                    }
                }
                free.push(s.id);
            }
        }
    }
    // Let the workers forget the last sequences.
    let leftover: Vec<SeqId> = free.into_iter().filter(|id| live[*id as usize].started()).collect();
    if !leftover.is_empty() {
        let plan = StepPlan { step: step_no, seqs: Vec::new(), free: leftover };
        backend.step(&plan).await?;
    }

    let per_s = |n: usize, d: Duration| if d.as_secs_f64() > 0.0 { n as f64 / d.as_secs_f64() } else { 0.0 };
    let outputs = live
        .into_iter()
        .map(|s| {
            let first = s.first_token.unwrap_or(t0);
            let end = s.done_at.unwrap_or(first);
            let prefill = first - t0;
            let decode = end.saturating_duration_since(first);
            let decode_tokens = s.out_ids.len().saturating_sub(1);
            GenOutput {
                timings: Timings {
                    prefill_tokens: s.req.prompt_ids.len(),
                    prefill_ms: prefill.as_secs_f64() * 1e3,
                    prefill_tokens_per_s: per_s(s.req.prompt_ids.len(), prefill),
                    decode_tokens,
                    decode_ms: decode.as_secs_f64() * 1e3,
                    decode_tokens_per_s: per_s(decode_tokens, decode),
                },
                output_ids: s.out_ids,
                finish_reason: s.finish.unwrap_or(FinishReason::Length),
                text: s.text.into_text(),
            }
        })
        .collect();
    Ok((outputs, stats))
}
