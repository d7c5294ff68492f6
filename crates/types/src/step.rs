//! The step protocol as plain data (DESIGN.md, "Step protocol"): what the coordinator asks
//! every worker to do in one scheduler iteration, and what the last stage answers. The wire
//! form lives in `tpserve-proto`; these are what the scheduler, worker and sampler use.

use serde::{Deserialize, Serialize};

use crate::kv::BlockId;
use crate::sampling::{Candidates, Penalties};
use crate::{SamplingParams, TokenId};

/// The coordinator's id for one sequence (unique among live sequences).
pub type SeqId = u64;

/// Which logits a sequence wants back from a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last position only (generation).
    Last,
    /// Every position of the chunk (perplexity, prompt log-probabilities).
    All,
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqWork {
    /// The sequence; workers key its block tables and penalty counts by it.
    pub seq_id: SeqId,
    /// New tokens: a prefill chunk, or the token sampled last step.
    pub tokens: Vec<TokenId>,
    /// Position of `tokens[0]`: 0 starts the sequence, otherwise the count already held.
    pub start_pos: usize,
    /// Which rows of `tokens` the last stage reports candidates for.
    pub logits: LogitsWanted,
    /// Given exactly on the step that starts the sequence; workers keep it.
    pub start: Option<SeqStart>,
    /// Index among the generated tokens of the token the last row predicts (seeds the
    /// sampling noise of every row; only the last row of a chunk is ever sampled from).
    pub sample_step: u64,
    /// Alternatives wanted per row for log-probabilities: the last stage reports at least
    /// this many candidates, and any value above 0 makes it compute the log-sum-exp that
    /// log-probabilities need (0: no log-probabilities).
    pub logprobs: usize,
    /// Per KV group, the blocks appended to the sequence's block table before the step
    /// (enough to hold every new token). A starting sequence's table may begin with blocks
    /// another sequence computed (a prefix-cache hit: `start_pos` > 0) and with
    /// [`crate::kv::NO_BLOCK`] for blocks a windowed group no longer needs.
    pub blocks: Vec<Vec<BlockId>>,
    /// For `All` rows: the token each row's logit is reported for (the next prompt token),
    /// one per row, or empty.
    pub targets: Vec<TokenId>,
}

/// What a worker keeps about a sequence, sent once on the step that starts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqStart {
    /// How its tokens are sampled (the noise of every rank's candidates).
    pub sampling: SamplingParams,
    /// Presence and frequency penalties, applied on the workers to their vocabulary slice.
    pub penalties: Penalties,
    /// Prompt tokens: later tokens count for the penalties.
    pub prompt_len: usize,
    /// OpenAI's `logit_bias`, added on the workers to their vocabulary slice after the
    /// penalties.
    pub logit_bias: crate::sampling::LogitBias,
}

impl SeqWork {
    /// Whether the sequence starts with this step (it carries its [`SeqStart`]).
    pub fn starts(&self) -> bool {
        self.start.is_some()
    }
}

/// One scheduler iteration, sent to every worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// The coordinator's step counter (probes count too): names the step in logs and
    /// errors; it seeds nothing.
    pub step: u64,
    /// The sequences that compute in this step, each at most once.
    pub seqs: Vec<SeqWork>,
    /// Sequences to forget before the step runs (their blocks go back to the scheduler).
    pub free: Vec<SeqId>,
    /// Set (with no sequences and nothing to free) on the second half of a step when pp > 1,
    /// sent only to the ranks with a slice of the output projection before the last stage
    /// (and the last stage's too after a step with `slice_later`): their slices
    /// for the rows that step wanted (see [`HeadRows`]).
    pub head: Option<HeadRows>,
    /// With pp > 1: the last stage leaves its own slice of the output projection to the
    /// step's second half as well, so that every stage's slice projects the rows at once.
    /// The engine sets it on a step it sends alone, with no other in flight and none after
    /// it (a single client's: nothing else would keep the stages busy meanwhile); under load
    /// the last stage projects its slice inside the step, which spares each step one call
    /// (measured faster, docs/PERFORMANCE.md).
    pub slice_later: bool,
}

/// The final hidden states (after the final norm) of the rows step `of_step` wanted logits
/// for, in the order the step's answers list them, as the last stage reported them in
/// [`StepOutput::hidden`]. With pp > 1 every stage holds a slice of the output projection
/// (`tpserve_types::plan`): a rank before the last stage (or after [`StepPlan::slice_later`],
/// any) answers `of_step`'s rows from these,
/// with what it kept from `of_step` itself (the sequences' sampling and penalty state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadRows {
    /// The step whose rows these are.
    pub of_step: u64,
    /// `[rows, hidden]`, row-major.
    pub hidden: Vec<f32>,
}

/// One sequence's answer from one last-stage rank: a report per wanted row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqOutput {
    /// The [`SeqWork::seq_id`] answered.
    pub seq_id: SeqId,
    /// One report per wanted row, in order: one for [`LogitsWanted::Last`], one per token
    /// for [`LogitsWanted::All`] (a sequence that wants none is not answered).
    pub rows: Vec<Candidates>,
}

/// One rank's answer to a step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The answering rank's world rank.
    pub rank: usize,
    /// Empty on ranks without a slice of the output projection, and on ranks before the last
    /// stage except in their answer to a [`HeadRows`] step.
    pub seqs: Vec<SeqOutput>,
    /// Microseconds the step took on the rank, collectives included.
    pub compute_us: u64,
    /// Microseconds of `compute_us` spent in collectives (waiting for peers included).
    pub comm_us: u64,
    /// With pp > 1, on the last stage's first tensor-parallel rank: the final hidden states
    /// of the wanted rows (`[rows, hidden]`), for the other stages' slices of the output
    /// projection ([`HeadRows`]); empty otherwise.
    pub hidden: Vec<f32>,
}

/// Merges the answers of every rank holding a slice of the output projection (each slice
/// disjoint: the last stage's ranks, and with pp > 1 every other stage's answering the step's
/// [`HeadRows`])
/// into one report per sequence and row, as one rank holding the whole vocabulary would
/// give. `k_for(seq_id)` is how many candidates to keep for each sequence. Fails when the
/// ranks disagree about which sequences or rows they answered, which would mean they ran
/// different steps.
pub fn merge_outputs(outputs: &[StepOutput], k_for: impl Fn(SeqId) -> usize) -> Result<Vec<SeqOutput>, String> {
    let answering: Vec<&StepOutput> = outputs.iter().filter(|o| !o.seqs.is_empty()).collect();
    let Some(first) = answering.first() else { return Ok(Vec::new()) };
    let mut merged = Vec::with_capacity(first.seqs.len());
    for (i, s) in first.seqs.iter().enumerate() {
        let mut rows = Vec::with_capacity(s.rows.len());
        for r in 0..s.rows.len() {
            let mut parts = Vec::with_capacity(answering.len());
            for o in &answering {
                let other = o
                    .seqs
                    .get(i)
                    .filter(|x| x.seq_id == s.seq_id && x.rows.len() == s.rows.len())
                    .ok_or_else(|| format!("rank {} and rank {} answered different sequences at position {i}", first.rank, o.rank))?;
                parts.push(other.rows[r].clone());
            }
            rows.push(Candidates::merge(parts, k_for(s.seq_id)));
        }
        merged.push(SeqOutput { seq_id: s.seq_id, rows });
    }
    if let Some(o) = answering.iter().find(|o| o.seqs.len() != first.seqs.len()) {
        return Err(format!("rank {} answered {} sequences, rank {} answered {}", first.rank, first.seqs.len(), o.rank, o.seqs.len()));
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Candidates;

    fn out(rank: usize, seqs: Vec<(SeqId, Vec<f32>, u32)>) -> StepOutput {
        let p = SamplingParams::default();
        StepOutput {
            rank,
            seqs: seqs.into_iter().map(|(id, logits, off)| SeqOutput { seq_id: id, rows: vec![Candidates::from_logits(&logits, off, &p, 0, 2)] }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn merging_two_vocabulary_halves_gives_the_whole_vocabularys_report() {
        let full = [0.5, 3.0, -1.0, 2.5];
        let whole = Candidates::from_logits(&full, 0, &SamplingParams::default(), 0, 2);
        let merged = merge_outputs(&[out(0, vec![(7, full[..2].to_vec(), 0)]), out(1, vec![(7, full[2..].to_vec(), 2)])], |_| 2).unwrap();
        assert_eq!(merged.len(), 1);
        let m = &merged[0].rows[0];
        assert_eq!(m.top.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
        assert!((m.lse - whole.lse).abs() < 1e-6);
        assert_eq!(m.pick(&SamplingParams::default(), 0), 1);
    }

    #[test]
    fn ranks_that_answer_different_sequences_are_an_error() {
        let e = merge_outputs(&[out(0, vec![(1, vec![1.0], 0)]), out(1, vec![(2, vec![1.0], 1)])], |_| 1).unwrap_err();
        assert!(e.contains("different sequences"), "{e}");
        // Ranks before the last stage answer nothing and are skipped.
        assert_eq!(merge_outputs(&[StepOutput::default(), out(1, vec![(2, vec![1.0], 1)])], |_| 1).unwrap().len(), 1);
    }
}
