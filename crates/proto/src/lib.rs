//! The wire types of tpserve's control plane, generated from `proto/tpserve/v1/worker.proto`,
//! and their conversions to and from the plain types of `tpserve-types`. Only this crate and
//! the two servers (worker, coordinator) see wire types; conversions from the wire check
//! every value and say which field was wrong.

use tpserve_types::kv::{KvGroup, KvLayout};
use tpserve_types::plan::{RankShard, TpRank};
use tpserve_types::sampling::{Candidates, LogitBias, Penalties, MAX_LOGIT_BIAS};
use tpserve_types::step::{HeadRows, LogitsWanted, SeqOutput, SeqStart, SeqWork, StepOutput, StepPlan};
use tpserve_types::SamplingParams;

pub mod auth;
pub mod tls;

/// Generated messages and services of package `tpserve.v1`.
pub mod v1 {
    tonic::include_proto!("tpserve.v1");
}

/// The largest gRPC message the coordinator and the workers decode. Step answers and head
/// rows carry the final hidden states of a step's wanted rows when pp > 1: with every
/// position wanting logits (perplexity, prompt log-probabilities) that is the step's tokens ×
/// hidden × 4 bytes, 128 MiB for 8192 tokens of a 4096-wide model. A worker decodes a
/// request only after its cluster token was checked.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

pub use v1::coordinator_client::CoordinatorClient;
pub use v1::coordinator_server::{Coordinator, CoordinatorServer};
pub use v1::worker_client::WorkerClient;
pub use v1::worker_server::{Worker, WorkerServer};

/// A wire message that does not make sense: a bug or a version skew in the sender, never
/// something to retry. It becomes `INVALID_ARGUMENT` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct WireError {
    /// The offending field as `Message.field` (`"SeqWork.logits"`), as in the `.proto`.
    pub field: &'static str,
    /// What is wrong with it, with the value received.
    pub reason: String,
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn wire(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError { field, reason: reason.into() }
}

impl From<&StepPlan> for v1::StepRequest {
    fn from(p: &StepPlan) -> Self {
        v1::StepRequest {
            step: p.step,
            seqs: p.seqs.iter().map(Into::into).collect(),
            free: p.free.clone(),
            head: p.head.as_ref().map(|h| v1::HeadRows { of_step: h.of_step, hidden: h.hidden.clone() }),
            slice_later: p.slice_later,
        }
    }
}

impl From<&SeqWork> for v1::SeqWork {
    fn from(s: &SeqWork) -> Self {
        v1::SeqWork {
            seq_id: s.seq_id,
            tokens: s.tokens.clone(),
            start_pos: s.start_pos as u32,
            logits: match s.logits {
                LogitsWanted::None => v1::Logits::None,
                LogitsWanted::Last => v1::Logits::Last,
                LogitsWanted::All => v1::Logits::All,
            } as i32,
            start: s.start.as_ref().map(v1::SeqStart::from),
            sample_step: s.sample_step,
            logprobs: s.logprobs as u32,
            blocks: s.blocks.iter().map(|b| v1::BlockList { ids: b.clone() }).collect(),
            targets: s.targets.clone(),
        }
    }
}

impl TryFrom<v1::StepRequest> for StepPlan {
    type Error = WireError;
    fn try_from(r: v1::StepRequest) -> Result<Self, WireError> {
        let seqs = r.seqs.into_iter().map(SeqWork::try_from).collect::<Result<Vec<_>, _>>()?;
        if r.head.is_some() && !(seqs.is_empty() && r.free.is_empty()) {
            return Err(wire("StepRequest.head", "a step with head rows has no sequences and frees none"));
        }
        let head = r.head.map(|h| HeadRows { of_step: h.of_step, hidden: h.hidden });
        Ok(StepPlan { step: r.step, seqs, free: r.free, head, slice_later: r.slice_later })
    }
}

impl TryFrom<v1::SeqWork> for SeqWork {
    type Error = WireError;
    fn try_from(s: v1::SeqWork) -> Result<Self, WireError> {
        let logits = match v1::Logits::try_from(s.logits) {
            Ok(v1::Logits::None) => LogitsWanted::None,
            Ok(v1::Logits::Last) => LogitsWanted::Last,
            Ok(v1::Logits::All) => LogitsWanted::All,
            Err(_) => return Err(wire("SeqWork.logits", format!("unknown value {}", s.logits))),
        };
        let start = s.start.map(SeqStart::try_from).transpose()?;
        if !s.targets.is_empty() && (logits != LogitsWanted::All || s.targets.len() != s.tokens.len()) {
            return Err(wire("SeqWork.targets", format!("{} targets for {} tokens", s.targets.len(), s.tokens.len())));
        }
        Ok(SeqWork {
            seq_id: s.seq_id,
            tokens: s.tokens,
            start_pos: s.start_pos as usize,
            logits,
            start,
            sample_step: s.sample_step,
            logprobs: s.logprobs as usize,
            blocks: s.blocks.into_iter().map(|b| b.ids).collect(),
            targets: s.targets,
        })
    }
}

impl From<&SeqStart> for v1::SeqStart {
    fn from(s: &SeqStart) -> Self {
        let p = s.sampling;
        v1::SeqStart {
            sampling: Some(v1::Sampling { temperature: p.temperature, top_k: p.top_k as u32, top_p: p.top_p, seed: p.seed }),
            prompt_len: s.prompt_len as u32,
            presence_penalty: s.penalties.presence,
            frequency_penalty: s.penalties.frequency,
            logit_bias: s.logit_bias.entries().iter().map(|&(token, bias)| v1::TokenBias { token, bias }).collect(),
        }
    }
}

impl TryFrom<v1::SeqStart> for SeqStart {
    type Error = WireError;
    fn try_from(s: v1::SeqStart) -> Result<Self, WireError> {
        let p = s.sampling.ok_or_else(|| wire("SeqStart.sampling", "a starting sequence needs sampling parameters"))?;
        let sampling = SamplingParams { temperature: p.temperature, top_k: p.top_k as usize, top_p: p.top_p, seed: p.seed };
        sampling.validate().map_err(|e| wire("SeqStart.sampling", e.to_string()))?;
        let penalties = Penalties { presence: s.presence_penalty, frequency: s.frequency_penalty };
        if !(penalties.presence.is_finite() && penalties.frequency.is_finite()) {
            return Err(wire("SeqStart.presence_penalty", "penalties must be finite numbers"));
        }
        if let Some(b) = s.logit_bias.iter().find(|b| !(b.bias.is_finite() && (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b.bias))) {
            return Err(wire("SeqStart.logit_bias", format!("token {}: bias {} is not a number from -100 to 100", b.token, b.bias)));
        }
        let logit_bias = LogitBias::new(s.logit_bias.iter().map(|b| (b.token, b.bias)));
        Ok(SeqStart { sampling, penalties, prompt_len: s.prompt_len as usize, logit_bias })
    }
}

impl From<&Candidates> for v1::Candidates {
    fn from(c: &Candidates) -> Self {
        v1::Candidates {
            ids: c.top.iter().map(|t| t.0).collect(),
            logits: c.top.iter().map(|t| t.1).collect(),
            lse: c.lse,
            lse_t: c.lse_t,
            gumbel_id: c.gumbel.map(|g| g.0),
            gumbel_value: c.gumbel.map_or(0.0, |g| g.1),
            gumbel_logit: c.gumbel_logit,
            target_id: c.target.map(|t| t.0),
            target_logit: c.target.map_or(0.0, |t| t.1),
        }
    }
}

impl TryFrom<v1::Candidates> for Candidates {
    type Error = WireError;
    fn try_from(c: v1::Candidates) -> Result<Self, WireError> {
        if c.ids.len() != c.logits.len() {
            return Err(wire("Candidates.logits", format!("{} logits for {} ids", c.logits.len(), c.ids.len())));
        }
        Ok(Candidates {
            top: c.ids.into_iter().zip(c.logits).collect(),
            lse: c.lse,
            lse_t: c.lse_t,
            gumbel: c.gumbel_id.map(|id| (id, c.gumbel_value)),
            gumbel_logit: c.gumbel_logit,
            target: c.target_id.map(|id| (id, c.target_logit)),
        })
    }
}

impl From<&StepOutput> for v1::StepResponse {
    fn from(o: &StepOutput) -> Self {
        v1::StepResponse {
            rank: o.rank as u32,
            seqs: o.seqs.iter().map(|s| v1::SeqCandidates { seq_id: s.seq_id, rows: s.rows.iter().map(Into::into).collect() }).collect(),
            compute_us: o.compute_us,
            comm_us: o.comm_us,
            hidden: o.hidden.clone(),
        }
    }
}

impl TryFrom<v1::StepResponse> for StepOutput {
    type Error = WireError;
    fn try_from(r: v1::StepResponse) -> Result<Self, WireError> {
        let seqs = r
            .seqs
            .into_iter()
            .map(|s| Ok(SeqOutput { seq_id: s.seq_id, rows: s.rows.into_iter().map(Candidates::try_from).collect::<Result<_, _>>()? }))
            .collect::<Result<_, WireError>>()?;
        Ok(StepOutput { rank: r.rank as usize, seqs, compute_us: r.compute_us, comm_us: r.comm_us, hidden: r.hidden })
    }
}

impl From<&RankShard> for v1::Shard {
    fn from(s: &RankShard) -> Self {
        let u = |v: usize| v as u32;
        v1::Shard {
            rank: u(s.rank),
            stage: u(s.stage),
            tp_rank: u(s.tp.rank),
            tp: u(s.tp.world),
            layer_start: u(s.layers.start),
            layer_end: u(s.layers.end),
            head_start: u(s.heads.start),
            head_end: u(s.heads.end),
            kv_head_start: u(s.kv_heads.start),
            kv_head_end: u(s.kv_heads.end),
            ffn_start: u(s.ffn.start),
            ffn_end: u(s.ffn.end),
            vocab_start: u(s.vocab.start),
            vocab_end: u(s.vocab.end),
            first_stage: s.first_stage,
            last_stage: s.last_stage,
            weight_bytes: s.bytes,
        }
    }
}

impl v1::Shard {
    /// The shard as the plan describes it (`reduce_parts` is the plan's business, not the
    /// wire's: it is left at 0).
    pub fn to_rank_shard(&self) -> RankShard {
        let z = |v: u32| v as usize;
        RankShard {
            rank: z(self.rank),
            stage: z(self.stage),
            tp: TpRank { rank: z(self.tp_rank), world: z(self.tp) },
            layers: z(self.layer_start)..z(self.layer_end),
            heads: z(self.head_start)..z(self.head_end),
            kv_heads: z(self.kv_head_start)..z(self.kv_head_end),
            ffn: z(self.ffn_start)..z(self.ffn_end),
            vocab: z(self.vocab_start)..z(self.vocab_end),
            first_stage: self.first_stage,
            last_stage: self.last_stage,
            reduce_parts: 0,
            bytes: self.weight_bytes,
        }
    }
}

impl From<&KvLayout> for v1::KvLayout {
    fn from(k: &KvLayout) -> Self {
        v1::KvLayout {
            block_size: k.block_size as u32,
            groups: k
                .groups
                .iter()
                .map(|g| v1::KvGroup { window: g.window.map(|w| w as u32), layers: g.layers.iter().map(|&l| l as u32).collect(), blocks: g.blocks as u32 })
                .collect(),
        }
    }
}

impl TryFrom<v1::KvLayout> for KvLayout {
    type Error = WireError;
    fn try_from(k: v1::KvLayout) -> Result<Self, WireError> {
        if k.block_size == 0 {
            return Err(wire("KvLayout.block_size", "must be at least 1"));
        }
        let groups: Vec<KvGroup> = k
            .groups
            .into_iter()
            .map(|g| KvGroup { window: g.window.map(|w| w as usize), layers: g.layers.into_iter().map(|l| l as usize).collect(), blocks: g.blocks as usize })
            .collect();
        let mut layers: Vec<usize> = groups.iter().flat_map(|g| g.layers.iter().copied()).collect();
        let n = layers.len();
        layers.sort_unstable();
        layers.dedup();
        if layers.len() != n {
            return Err(wire("KvLayout.groups", "a layer is in two groups"));
        }
        Ok(KvLayout { block_size: k.block_size as usize, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_survives_the_round_trip_through_the_wire() {
        let plan = StepPlan {
            step: 9,
            seqs: vec![
                SeqWork {
                    seq_id: 1,
                    tokens: vec![2, 5, 7],
                    start_pos: 0,
                    logits: LogitsWanted::Last,
                    start: Some(SeqStart {
                        sampling: SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, seed: 3 },
                        penalties: Penalties { presence: 0.5, frequency: -0.25 },
                        prompt_len: 3,
                        logit_bias: LogitBias::new([(7, -100.0), (2, 12.5)]),
                    }),
                    sample_step: 0,
                    logprobs: 2,
                    blocks: vec![vec![3, 4], vec![tpserve_types::kv::NO_BLOCK, 9]],
                    targets: vec![],
                },
                SeqWork {
                    seq_id: 4,
                    tokens: vec![11],
                    start_pos: 17,
                    logits: LogitsWanted::All,
                    start: None,
                    sample_step: 5,
                    logprobs: 0,
                    blocks: vec![],
                    targets: vec![12],
                },
            ],
            free: vec![3],
            head: None,
            slice_later: true,
        };
        assert_eq!(StepPlan::try_from(v1::StepRequest::from(&plan)).unwrap(), plan);
        let head = StepPlan { step: 8, head: Some(HeadRows { of_step: 7, hidden: vec![0.25, -1.5] }), ..Default::default() };
        assert_eq!(StepPlan::try_from(v1::StepRequest::from(&head)).unwrap(), head);
        let out = StepOutput {
            rank: 1,
            seqs: vec![SeqOutput {
                seq_id: 1,
                rows: vec![Candidates {
                    top: vec![(5, 1.5), (2, 0.5)],
                    lse: 2.0,
                    lse_t: 2.5,
                    gumbel: Some((5, 3.25)),
                    gumbel_logit: 1.25,
                    target: Some((8, -1.0)),
                }],
            }],
            compute_us: 10,
            comm_us: 3,
            hidden: vec![1.0, f32::MIN_POSITIVE],
        };
        assert_eq!(StepOutput::try_from(v1::StepResponse::from(&out)).unwrap(), out);
    }

    #[test]
    fn nonsense_on_the_wire_is_refused_naming_the_field() {
        let bad = v1::SeqWork { logits: 9, ..Default::default() };
        assert_eq!(SeqWork::try_from(bad).unwrap_err().field, "SeqWork.logits");
        let start = v1::SeqStart { sampling: Some(v1::Sampling { temperature: -1.0, top_k: 0, top_p: 1.0, seed: 0 }), ..Default::default() };
        let bad = v1::SeqWork { start: Some(start), ..Default::default() };
        let e = SeqWork::try_from(bad).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let sampling = Some(v1::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 });
        let start = v1::SeqStart { sampling, logit_bias: vec![v1::TokenBias { token: 3, bias: f32::NAN }], ..Default::default() };
        assert_eq!(SeqStart::try_from(start).unwrap_err().field, "SeqStart.logit_bias");
        let bad = v1::Candidates { ids: vec![1, 2], logits: vec![0.5], ..Default::default() };
        assert_eq!(Candidates::try_from(bad).unwrap_err().field, "Candidates.logits");
        let bad = v1::StepRequest { free: vec![1], head: Some(v1::HeadRows { of_step: 1, hidden: vec![0.0] }), ..Default::default() };
        assert_eq!(StepPlan::try_from(bad).unwrap_err().field, "StepRequest.head");
    }
}
