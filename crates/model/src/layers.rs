//! Tensor-parallel layer types. A model file is written once with these; at tp = 1 each
//! holds the whole weight, at tp = N each holds its rank's slice and the row-parallel and
//! vocab-parallel layers finish with an all-reduce (Megatron-LM's scheme).

use std::ops::Range;

use tpserve_comm::{CommError, Collective};

use crate::quant::{QMatrix, QuantError};

/// This rank's place in its tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    pub rank: usize,
    pub world: usize,
}

impl TpRank {
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
            return Err(format!("{n_heads} attention heads cannot be split over tp = {}; use a tp that divides {n_heads}", self.world));
        }
        let ok = if n_kv_heads >= self.world { n_kv_heads.is_multiple_of(self.world) } else { self.world.is_multiple_of(n_kv_heads) };
        if !ok {
            return Err(format!("{n_kv_heads} KV heads cannot be split or replicated over tp = {}; use a tp that divides or is a multiple of {n_kv_heads}", self.world));
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

/// y = x Wᵀ with W split by output rows: each rank computes its own slice of y.
pub struct ColumnParallel {
    w: QMatrix,
}

impl ColumnParallel {
    /// Keeps rows `rows` of the full weight.
    pub fn new(full: &QMatrix, rows: Range<usize>) -> Result<Self, QuantError> {
        Ok(Self { w: full.slice_rows(rows.start, rows.end)? })
    }

    /// Output features on this rank.
    pub fn out_features(&self) -> usize {
        self.w.rows()
    }

    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.w.matmul(x, n, out);
    }

    pub fn weight(&self) -> &QMatrix {
        &self.w
    }
}

/// y = x Wᵀ with W split by input columns: each rank multiplies its slice of x and the
/// partial sums are all-reduced.
pub struct RowParallel {
    w: QMatrix,
}

impl RowParallel {
    /// Keeps columns `cols` of the full weight (must fall on quant-block boundaries).
    pub fn new(full: &QMatrix, cols: Range<usize>) -> Result<Self, QuantError> {
        let w = if cols.start == 0 && cols.end == full.cols() { full.clone() } else { full.slice_cols(cols.start, cols.end)? };
        Ok(Self { w })
    }

    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], comm: &dyn Collective) -> Result<(), CommError> {
        self.w.matmul(x, n, out);
        comm.all_reduce_sum(out)
    }

    pub fn weight(&self) -> &QMatrix {
        &self.w
    }
}

/// Token embedding and output projection split by vocabulary rows.
pub struct VocabParallel {
    w: QMatrix,
    /// First vocabulary id held by this rank.
    start: usize,
}

impl VocabParallel {
    pub fn new(full: &QMatrix, rows: Range<usize>) -> Result<Self, QuantError> {
        Ok(Self { w: full.slice_rows(rows.start, rows.end)?, start: rows.start })
    }

    /// The vocabulary ids whose logits this rank computes.
    pub fn vocab_range(&self) -> Range<usize> {
        self.start..self.start + self.w.rows()
    }

    /// Embedding rows for `ids` into `out` (`[ids.len(), hidden]`): rows of ids this rank does
    /// not hold are zero before the all-reduce fills them in.
    pub fn embed(&self, ids: &[u32], out: &mut [f32], comm: &dyn Collective) -> Result<(), CommError> {
        let hidden = self.w.cols();
        let range = self.vocab_range();
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            if range.contains(&(id as usize)) {
                self.w.dequantize_row(id as usize - self.start, row);
            } else {
                row.fill(0.0);
            }
        }
        comm.all_reduce_sum(out)
    }

    /// Logits of this rank's vocabulary slice: `out` is `[n, vocab_range().len()]`.
    pub fn logits(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.w.matmul(x, n, out);
    }
}

/// RMSNorm with the weight multiplied in directly (GGUF files of Gemma already hold the "+1").
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        Self { weight, eps }
    }

    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// Normalises every `dim()`-long row of `x` in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        let d = self.weight.len();
        let norm_row = |_: usize, row: &mut [f32]| {
            let ss: f32 = crate::simd::dot(row, row);
            let scale = 1.0 / (ss / d as f32 + self.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&self.weight) {
                *v *= scale * w;
            }
        };
        crate::simd::par_rows(x, d, norm_row);
    }

    /// out = norm(x), leaving x untouched.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        out.copy_from_slice(x);
        self.forward_inplace(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything_once() {
        for world in 1..=5 {
            let mut next = 0;
            for rank in 0..world {
                let r = TpRank { rank, world }.split(13);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 13);
        }
    }

    #[test]
    fn kv_heads_are_replicated_when_ranks_outnumber_them() {
        // Gemma 3 270M: 4 query heads, 1 KV head.
        for rank in 0..4 {
            assert_eq!(TpRank { rank, world: 4 }.kv_heads(4, 1), 0..1);
        }
        // 8 query heads over 2 KV heads at tp = 4: ranks 0,1 read KV head 0; ranks 2,3 head 1.
        let kv: Vec<_> = (0..4).map(|rank| TpRank { rank, world: 4 }.kv_heads(8, 2)).collect();
        assert_eq!(kv, [0..1, 0..1, 1..2, 1..2]);
        assert_eq!(TpRank { rank: 1, world: 2 }.kv_heads(8, 4), 2..4);
    }

    #[test]
    fn head_splits_that_would_mix_kv_groups_are_refused() {
        assert!(TpRank { rank: 0, world: 2 }.check_heads(4, 1).is_ok());
        assert!(TpRank { rank: 3, world: 4 }.check_heads(8, 2).is_ok());
        assert!(TpRank { rank: 1, world: 3 }.check_heads(8, 4).unwrap_err().contains("cannot be split over tp = 3"));
        assert!(TpRank { rank: 1, world: 3 }.check_heads(6, 4).unwrap_err().contains("KV heads"));
        assert!(TpRank { rank: 2, world: 2 }.check_heads(4, 1).is_err());
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let n = RmsNorm::new(vec![1.0, 2.0], 0.0);
        let mut x = vec![3.0, 4.0];
        n.forward_inplace(&mut x);
        let rms = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 8.0 / rms).abs() < 1e-6);
    }
}
