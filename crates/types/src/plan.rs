//! The parallelism plan: a pure function of the model's shape and (tp, pp) that says which
//! layers, heads, FFN columns and vocabulary rows every rank holds, or why no such split
//! exists. World rank `r` is pipeline stage `r / tp`, tensor-parallel rank `r % tp`.
//!
//! Row-parallel layers (attention output, FFN down) sum partial products over their input
//! columns. To make every plan produce the very same floats, the input columns are always
//! cut into [`ModelShape::reduce_parts`] fixed parts whose partial sums are added in a
//! fixed tree order; a rank holds `reduce_parts / tp` consecutive parts and the all-reduce
//! continues the same tree. So tp = 1, 2 and 4 give bit-identical logits.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// What the plan needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Transformer blocks; pipeline stages split them into contiguous ranges.
    pub n_layers: usize,
    /// Query heads per layer; tp must divide them.
    pub n_heads: usize,
    /// KV heads per layer (fewer than `n_heads` with grouped-query attention); split over
    /// the ranks, or replicated when there are fewer than tp.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the residual stream (the embedding dimension).
    pub hidden: usize,
    /// FFN intermediate width; tensor parallelism splits it into column ranges.
    pub ffn: usize,
    /// Vocabulary rows; tensor parallelism splits them, so each last-stage rank computes the
    /// logits of its slice only.
    pub vocab: usize,
    /// Weight bytes of each layer (for balancing stages).
    pub layer_bytes: Vec<u64>,
    /// Weight bytes of the token embedding (held by the first stage).
    pub embed_bytes: u64,
    /// Weight bytes of the output projection (held by the last stage; the same tensor as
    /// the embedding when they are tied, and then each end stage holds its own copy).
    pub head_bytes: u64,
    /// The output projection is the token embedding (Gemma): a rank that both embeds and
    /// computes logits holds those rows once.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Quant block size (columns) of the attention output weight, the largest over the
    /// layers: a row-parallel split of it must fall on a block boundary (1: unquantized;
    /// 0 is taken as 1).
    pub attn_out_block: usize,
    /// The same for the FFN down weight.
    pub ffn_down_block: usize,
}

/// This rank's place in its tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpRank {
    /// Position in the group, `0..world` (world rank `% tp`).
    pub rank: usize,
    /// Ranks in the group: the tensor-parallel degree tp.
    pub world: usize,
}

impl TpRank {
    /// No tensor parallelism: one rank holds every head, column and vocabulary row.
    pub const SINGLE: TpRank = TpRank { rank: 0, world: 1 };

    /// The contiguous part of `0..n` this rank owns when `n` is split as evenly as possible.
    pub fn split(&self, n: usize) -> Range<usize> {
        (self.rank * n / self.world)..((self.rank + 1) * n / self.world)
    }

    /// Why this rank cannot hold its share of `n_heads` query and `n_kv_heads` KV heads, if
    /// it cannot: the query heads must split evenly, and each rank's query heads must read
    /// KV heads that it holds (its own slice, or one replicated KV head).
    pub fn check_heads(&self, n_heads: usize, n_kv_heads: usize) -> Result<(), String> {
        if self.world == 0 || self.rank >= self.world {
            return Err(format!("rank {} is outside a world of {}", self.rank, self.world));
        }
        if !n_heads.is_multiple_of(self.world) {
            return Err(format!("{n_heads} attention heads cannot be split over tp = {}", self.world));
        }
        let ok = if n_kv_heads >= self.world { n_kv_heads.is_multiple_of(self.world) } else { self.world.is_multiple_of(n_kv_heads) };
        if !ok {
            return Err(format!("{n_kv_heads} KV heads cannot be split or replicated over tp = {}", self.world));
        }
        Ok(())
    }

    /// Query heads of this rank (n_heads must be divisible by world: [`Self::check_heads`]).
    pub fn heads(&self, n_heads: usize) -> Range<usize> {
        self.split(n_heads)
    }

    /// KV heads this rank needs: its own slice when there are at least as many KV heads as
    /// ranks, otherwise the one KV head its query heads read (replicated across ranks).
    pub fn kv_heads(&self, n_heads: usize, n_kv_heads: usize) -> Range<usize> {
        if n_kv_heads >= self.world {
            self.split(n_kv_heads)
        } else {
            let first_q = self.heads(n_heads).start;
            let g = first_q / (n_heads / n_kv_heads);
            g..g + 1
        }
    }
}

/// Why a plan is impossible; the message says what would work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot run this model with tp = {tp}, pp = {pp}: {reason}")]
pub struct PlanError {
    /// The tensor-parallel degree asked for.
    pub tp: usize,
    /// The pipeline degree asked for.
    pub pp: usize,
    /// What does not fit, and the values that would (`tp can be one of 1, 2, 4`).
    pub reason: String,
}

/// What one rank holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankShard {
    /// World rank.
    pub rank: usize,
    /// Pipeline stage, `rank / tp`.
    pub stage: usize,
    /// Place in the stage's tensor-parallel group.
    pub tp: TpRank,
    /// Layers of this rank's stage.
    pub layers: Range<usize>,
    /// Query heads of every layer it holds.
    pub heads: Range<usize>,
    /// KV heads it holds: its own slice, or the one replicated head its query heads read.
    pub kv_heads: Range<usize>,
    /// FFN intermediate columns it holds.
    pub ffn: Range<usize>,
    /// Vocabulary rows of the output projection this rank computes logits for: its stage's
    /// range (every stage has one when pp > 1; see the module doc), split by tp. May be
    /// empty. (The first stage's embedding is always split by tp over the whole vocabulary.)
    pub vocab: Range<usize>,
    /// It embeds the tokens (stage 0).
    pub first_stage: bool,
    /// It ends the forward pass: the final norm, and with pp > 1 the final hidden states
    /// of the wanted rows for the other stages' slices of the output projection.
    pub last_stage: bool,
    /// Fixed parts of each row-parallel input this rank computes separately (see the module doc).
    pub reduce_parts: usize,
    /// Weight bytes this rank holds (approximately: its share of each tensor).
    pub bytes: u64,
}

/// A checked (tp, pp) split of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Tensor-parallel degree: ranks per stage.
    pub tp: usize,
    /// Pipeline degree: stages.
    pub pp: usize,
    /// Layer range of each stage: contiguous, non-empty, covering every layer in order.
    pub stages: Vec<Range<usize>>,
    /// Vocabulary rows of the output projection of each stage: contiguous, in stage order,
    /// covering the vocabulary (the whole of it on the one stage when pp = 1).
    pub stage_vocab: Vec<Range<usize>>,
    /// The model the plan was checked against.
    pub shape: ModelShape,
}

impl ModelShape {
    /// Why tensor-parallel degree `tp` cannot split this model, if it cannot.
    fn check_tp(&self, tp: usize) -> Result<(), String> {
        if tp == 0 {
            return Err("tp must be at least 1".into());
        }
        TpRank { rank: 0, world: tp }.check_heads(self.n_heads, self.n_kv_heads)?;
        let attn_in = self.n_heads / tp * self.head_dim;
        if !attn_in.is_multiple_of(self.attn_out_block.max(1)) {
            return Err(format!("each rank's {attn_in} attention-output columns would split a quant block of {} columns", self.attn_out_block));
        }
        let block = self.ffn_down_block.max(1);
        if !self.ffn.is_multiple_of(tp) || !(self.ffn / tp).is_multiple_of(block) {
            return Err(format!("the FFN width {} over tp = {tp} would split a quant block of {block} columns", self.ffn));
        }
        if self.vocab < tp {
            return Err(format!("a vocabulary of {} rows cannot be split {tp} ways", self.vocab));
        }
        Ok(())
    }

    /// Tensor-parallel degrees (up to 64) that split this model.
    pub fn valid_tps(&self) -> Vec<usize> {
        (1..=64.min(self.n_heads.max(1))).filter(|&tp| self.check_tp(tp).is_ok()).collect()
    }

    /// Parts every row-parallel input is cut into (see the module doc): the largest of 4, 2,
    /// 1 that is itself a valid tp, so that every tp dividing it gives the same floats.
    pub fn reduce_parts(&self) -> usize {
        [4, 2, 1].into_iter().find(|&v| self.check_tp(v).is_ok()).unwrap_or(1)
    }
}

impl Plan {
    /// Checks (tp, pp) against the model and balances the stages by the work a token costs
    /// them: the layers split by their bytes ([`balance`]), the output projection's rows
    /// then given where they even the stages out ([`spread_head`]).
    pub fn new(shape: ModelShape, tp: usize, pp: usize) -> Result<Plan, PlanError> {
        let err = |reason: String| PlanError { tp, pp, reason };
        if let Err(why) = shape.check_tp(tp) {
            let valid: Vec<String> = shape.valid_tps().iter().map(|t| t.to_string()).collect();
            return Err(err(format!("{why}; tp can be one of {}", valid.join(", "))));
        }
        if pp == 0 {
            return Err(err("pp must be at least 1".into()));
        }
        if pp > shape.n_layers {
            return Err(err(format!(
                "{pp} pipeline stages for {} layers: every stage needs at least one layer, so pp can be at most {}",
                shape.n_layers, shape.n_layers
            )));
        }
        if shape.layer_bytes.len() != shape.n_layers {
            return Err(err(format!("{} layer sizes for {} layers", shape.layer_bytes.len(), shape.n_layers)));
        }
        // A token's embedding is one row looked up: no work. The output projection is a
        // matmul like the layers' (in a small model with a large vocabulary, most of the
        // work: Gemma 3 270M's is 63% of a token's multiply-adds), spread over the stages.
        let stages = balance(&shape.layer_bytes, pp, 0, 0);
        let stage_bytes: Vec<u64> = stages.iter().map(|r| shape.layer_bytes[r.clone()].iter().sum()).collect();
        let stage_vocab = spread_head(&stage_bytes, shape.head_bytes, shape.vocab);
        Ok(Plan { tp, pp, stages, stage_vocab, shape })
    }

    /// Ranks in the plan: tp × pp.
    pub fn world(&self) -> usize {
        self.tp * self.pp
    }

    /// What world rank `rank` holds.
    pub fn shard(&self, rank: usize) -> RankShard {
        let s = &self.shape;
        let (stage, t) = (rank / self.tp, rank % self.tp);
        let tp = TpRank { rank: t, world: self.tp };
        let layers = self.stages[stage].clone();
        let (first_stage, last_stage) = (stage == 0, stage + 1 == self.pp);
        let parts = s.reduce_parts();
        let reduce_parts = if parts.is_multiple_of(self.tp) { parts / self.tp } else { 1 };
        let mut bytes: u64 = s.layer_bytes[layers.clone()].iter().sum::<u64>() / self.tp as u64;
        if first_stage {
            bytes += s.embed_bytes / self.tp as u64;
        }
        let (base, mine) = (self.stage_vocab[stage].start, tp.split(self.stage_vocab[stage].len()));
        let vocab = base + mine.start..base + mine.end;
        if !(first_stage && s.tied_embeddings) {
            bytes += (s.head_bytes as u128 * vocab.len() as u128 / s.vocab.max(1) as u128) as u64;
        }
        RankShard {
            rank,
            stage,
            tp,
            layers,
            heads: tp.heads(s.n_heads),
            kv_heads: tp.kv_heads(s.n_heads, s.n_kv_heads),
            ffn: tp.split(s.ffn),
            vocab,
            first_stage,
            last_stage,
            reduce_parts,
            bytes,
        }
    }

    /// What every rank holds, in world-rank order.
    pub fn shards(&self) -> Vec<RankShard> {
        (0..self.world()).map(|r| self.shard(r)).collect()
    }
}

/// Cuts `layer_bytes` into `pp` contiguous non-empty ranges minimising the largest stage,
/// counting `first_extra` on the first stage and `last_extra` on the last. Weight bytes
/// stand for a token's work (every weight byte is read once per step; the multiply-adds per
/// byte differ by quant type, by less than 2x): with the stages' steps overlapping, the
/// slowest stage sets the pace.
fn balance(layer_bytes: &[u64], pp: usize, first_extra: u64, last_extra: u64) -> Vec<Range<usize>> {
    let n = layer_bytes.len();
    let cost = |stage: usize, r: &Range<usize>| -> u64 {
        let mut c: u64 = layer_bytes[r.clone()].iter().sum();
        if stage == 0 {
            c += first_extra;
        }
        if stage + 1 == pp {
            c += last_extra;
        }
        c
    };
    // Binary search the smallest cap for which a greedy left-to-right cut fits in pp stages.
    let fits = |cap: u64| -> Option<Vec<Range<usize>>> {
        let mut stages = Vec::with_capacity(pp);
        let mut start = 0;
        for stage in 0..pp {
            let left_stages = pp - stage - 1;
            // Leave at least one layer for each later stage.
            let max_end = n - left_stages;
            let mut end = start + 1;
            if cost(stage, &(start..end)) > cap {
                return None;
            }
            while end < max_end && cost(stage, &(start..end + 1)) <= cap {
                end += 1;
            }
            if stage + 1 == pp {
                end = n;
                if cost(stage, &(start..end)) > cap {
                    return None;
                }
            }
            stages.push(start..end);
            start = end;
        }
        Some(stages)
    };
    let (mut lo, mut hi) = (0u64, layer_bytes.iter().sum::<u64>() + first_extra + last_extra);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    fits(lo).expect("the total always fits")
}

/// Splits `vocab` output-projection rows (`head_bytes` in all) into one contiguous range per
/// stage, so that each stage's layers (`stage_bytes`) and head rows weigh as evenly as they
/// can: water-filling, the lightest stages topped up first. Ranges are cut at multiples of
/// 64 rows (the kernels' row groups stay whole); the last stage takes what rounding leaves.
fn spread_head(stage_bytes: &[u64], head_bytes: u64, vocab: usize) -> Vec<Range<usize>> {
    let pp = stage_bytes.len();
    if pp == 1 {
        return std::iter::once(0..vocab).collect();
    }
    // The level every stage is filled to: the largest `level` with Σ max(0, level - s) ≤ head.
    let fill = |level: u64| -> u64 { stage_bytes.iter().map(|&s| level.saturating_sub(s)).sum() };
    let (mut lo, mut hi) = (0u64, stage_bytes.iter().max().copied().unwrap_or(0) + head_bytes);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fill(mid) <= head_bytes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let total = fill(lo).max(1);
    let mut ranges = Vec::with_capacity(pp);
    let mut start = 0;
    for (stage, &s) in stage_bytes.iter().enumerate() {
        let end = if stage + 1 == pp {
            vocab
        } else {
            let share = vocab as u128 * lo.saturating_sub(s) as u128 / total as u128;
            (start + (share as usize / 64) * 64).min(vocab)
        };
        ranges.push(start..end);
        start = end;
    }
    ranges
}

impl fmt::Display for RankShard {
    /// What the rank holds: `stage 0 layers 0..18, tp rank 1: heads 2..4 (kv 0..1), ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage {} layers {}..{}, tp rank {}: heads {}..{} (kv {}..{}), ffn {}..{}, vocab {}..{}{}{}",
            self.stage,
            self.layers.start,
            self.layers.end,
            self.tp.rank,
            self.heads.start,
            self.heads.end,
            self.kv_heads.start,
            self.kv_heads.end,
            self.ffn.start,
            self.ffn.end,
            self.vocab.start,
            self.vocab.end,
            if self.first_stage { " +embed" } else { "" },
            if self.vocab.is_empty() { "" } else { " +lm_head" },
        )
    }
}

impl fmt::Display for Plan {
    /// One line per rank: what it holds and its weight bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan: tp = {}, pp = {} ({} ranks)", self.tp, self.pp, self.world())?;
        for s in self.shards() {
            writeln!(f, "  rank {}: {s}, {:.1} MiB", s.rank, s.bytes as f64 / (1 << 20) as f64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3 270M's shape (byte counts rounded).
    fn gemma() -> ModelShape {
        ModelShape {
            n_layers: 18,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 256,
            hidden: 640,
            ffn: 2048,
            vocab: 262144,
            layer_bytes: vec![4_000_000; 18],
            embed_bytes: 178_000_000,
            head_bytes: 178_000_000,
            tied_embeddings: true,
            attn_out_block: 256,
            ffn_down_block: 256,
        }
    }

    #[test]
    fn shards_cover_every_layer_head_column_and_row_once() {
        for (tp, pp) in [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 18), (4, 3)] {
            let plan = Plan::new(gemma(), tp, pp).unwrap();
            let shards = plan.shards();
            assert_eq!(shards.len(), tp * pp);
            let (mut next_layer, mut next_row) = (0, 0);
            for stage in 0..pp {
                let group: Vec<_> = shards.iter().filter(|s| s.stage == stage).collect();
                assert_eq!(group.len(), tp);
                assert!(group.iter().all(|s| s.layers == group[0].layers));
                assert_eq!(group[0].layers.start, next_layer);
                assert!(!group[0].layers.is_empty());
                next_layer = group[0].layers.end;
                let mut f = 0;
                for s in &group {
                    assert_eq!(s.vocab.start, next_row);
                    assert_eq!(s.ffn.start, f);
                    next_row = s.vocab.end;
                    f = s.ffn.end;
                }
                assert_eq!(f, 2048);
            }
            assert_eq!((next_layer, next_row), (18, 262144));
        }
    }

    #[test]
    fn a_tied_embedding_is_counted_once_on_a_rank_that_embeds_and_projects() {
        let one = Plan::new(gemma(), 1, 1).unwrap().shard(0).bytes;
        assert_eq!(one, 18 * 4_000_000 + 178_000_000);
        let two = Plan::new(gemma(), 2, 1).unwrap().shard(1).bytes;
        assert_eq!(two, one / 2);
        let pp = Plan::new(gemma(), 1, 2).unwrap();
        let (first, last) = (pp.shard(0), pp.shard(1));
        let last_head = 178_000_000 * last.vocab.len() as u64 / 262144;
        assert_eq!(first.bytes + last.bytes, one + last_head, "the last stage holds its head rows, the first its whole table");
    }

    #[test]
    fn stages_balance_work_the_output_projection_spread_over_every_stage() {
        // Equal layers split evenly, and so does the head: each stage computes half the logits.
        let plan = Plan::new(gemma(), 1, 2).unwrap();
        assert_eq!(plan.stages, vec![0..9, 9..18]);
        assert_eq!(plan.stage_vocab, vec![0..131072, 131072..262144]);
        // Layers that cannot split evenly: the lighter stage takes more of the head, so
        // the stages weigh the same (in 64-row steps).
        let plan = Plan::new(gemma(), 1, 4).unwrap();
        assert_eq!(plan.stages.iter().map(|r| r.len()).max(), Some(5), "{:?}", plan.stages);
        let work: Vec<f64> = (0..4).map(|s| plan.stages[s].len() as f64 * 4e6 + 178e6 * plan.stage_vocab[s].len() as f64 / 262144.0).collect();
        assert!(work.iter().all(|w| (w - work[0]).abs() < 0.01 * work[0]), "{work:?}");
        assert!(plan.stage_vocab[0].len() < plan.stage_vocab[3].len() && plan.stage_vocab.iter().all(|r| r.start % 64 == 0), "{:?}", plan.stage_vocab);
        // A head lighter than the layers' imbalance goes to the light stages only.
        let shape = ModelShape { layer_bytes: [vec![10_000_000; 9], vec![1_000_000; 9]].concat(), head_bytes: 9_000_000, ..gemma() };
        let plan = Plan::new(shape, 1, 2).unwrap();
        assert!(plan.stage_vocab[1].len() > plan.stage_vocab[0].len(), "{:?} {:?}", plan.stages, plan.stage_vocab);
        // Within a stage, tp splits the stage's rows.
        let plan = Plan::new(gemma(), 2, 2).unwrap();
        let rows: Vec<_> = plan.shards().iter().map(|s| s.vocab.clone()).collect();
        assert_eq!(rows, [0..65536, 65536..131072, 131072..196608, 196608..262144]);
        assert_eq!(Plan::new(gemma(), 2, 1).unwrap().shard(1).vocab, 131072..262144);
    }

    #[test]
    fn impossible_plans_say_why_and_what_would_work() {
        let e = Plan::new(gemma(), 3, 1).unwrap_err().to_string();
        assert!(e.contains("4 attention heads cannot be split over tp = 3") && e.contains("tp can be one of 1, 2, 4"), "{e}");
        let e = Plan::new(gemma(), 2, 19).unwrap_err().to_string();
        assert!(e.contains("19 pipeline stages for 18 layers") && e.contains("at most 18"), "{e}");
        let e = Plan::new(gemma(), 0, 1).unwrap_err().to_string();
        assert!(e.contains("tp must be at least 1"), "{e}");
        let e = Plan::new(gemma(), 1, 0).unwrap_err().to_string();
        assert!(e.contains("pp must be at least 1"), "{e}");
        // 8 heads of 128 columns: at tp = 8 each rank's 128 columns split a 256-column block.
        let shape = ModelShape { n_heads: 8, n_kv_heads: 8, head_dim: 128, ffn: 4096, ..gemma() };
        let e = Plan::new(shape.clone(), 8, 1).unwrap_err().to_string();
        assert!(e.contains("split a quant block of 256 columns") && e.contains("tp can be one of 1, 2, 4"), "{e}");
        let shape = ModelShape { ffn: 768, ..gemma() };
        let e = Plan::new(shape, 2, 1).unwrap_err().to_string();
        assert!(e.contains("FFN width 768 over tp = 2 would split a quant block"), "{e}");
    }

    #[test]
    fn reduce_parts_let_every_valid_tp_share_one_summation_tree() {
        let plan = Plan::new(gemma(), 2, 1).unwrap();
        assert_eq!(gemma().reduce_parts(), 4);
        assert!(plan.shards().iter().all(|s| s.reduce_parts == 2));
        let shape = ModelShape { n_heads: 2, ..gemma() };
        assert_eq!(shape.reduce_parts(), 2);
    }

    #[test]
    fn kv_heads_are_replicated_when_ranks_outnumber_them() {
        for rank in 0..4 {
            assert_eq!(TpRank { rank, world: 4 }.kv_heads(4, 1), 0..1);
        }
        let kv: Vec<_> = (0..4).map(|rank| TpRank { rank, world: 4 }.kv_heads(8, 2)).collect();
        assert_eq!(kv, [0..1, 0..1, 1..2, 1..2]);
        assert_eq!(TpRank { rank: 1, world: 2 }.kv_heads(8, 4), 2..4);
        assert!(TpRank { rank: 1, world: 3 }.check_heads(6, 4).unwrap_err().contains("KV heads"));
    }
}
