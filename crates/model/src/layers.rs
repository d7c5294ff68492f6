//! Tensor-parallel layer types. A model file is written once with these; at tp = 1 each
//! holds the whole weight, at tp = N each holds its rank's slice and the row-parallel and
//! vocab-parallel layers finish with an all-reduce (Megatron-LM's scheme). Each holds its
//! weights where the device ([`Ops`]) computes, and computes through it.

use std::ops::Range;

use tpserve_comm::Collective;

use crate::model::ModelError;
use crate::ops::{Matrix, Ops};
use crate::quant::QMatrix;

pub use tpserve_types::plan::TpRank;

/// A sharding error on tensor `name`.
fn shard_err(name: &str) -> impl FnOnce(crate::quant::QuantError) -> ModelError + '_ {
    move |source| ModelError::Shard { name: name.to_owned(), source }
}

/// y = x Wᵀ with W split by output rows: each rank computes its own slice of y.
pub struct ColumnParallel<O: Ops> {
    w: O::Mat,
}

impl<O: Ops> ColumnParallel<O> {
    /// Keeps rows `rows` of the full weight `name`, on the device of `ops`.
    pub fn new(ops: &O, name: &str, full: &QMatrix, rows: Range<usize>) -> Result<Self, ModelError> {
        let slice = full.slice_rows(rows.start, rows.end).map_err(shard_err(name))?;
        Ok(Self { w: ops.matrix(&slice)? })
    }

    /// Output features on this rank.
    pub fn out_features(&self) -> usize {
        self.w.rows()
    }

    /// `out = x Wᵀ` for this rank's rows: `x` is `[n, W's cols]` (the full input, the same on
    /// every rank), `out` is `[n, out_features()]`. No communication.
    pub fn forward(&self, ops: &O, x: &O::Act, n: usize, out: &mut O::Act) -> Result<(), ModelError> {
        ops.matmul(&self.w, x, n, out)
    }

    /// This rank's rows of the weight, `[out_features(), cols]`.
    pub fn weight(&self) -> &O::Mat {
        &self.w
    }
}

/// y = x Wᵀ with W split by input columns: each rank multiplies its slice of x and the
/// partial sums are all-reduced.
///
/// The slice is itself cut into `parts` equal column ranges whose products are summed as a
/// balanced tree, and the all-reduce continues that tree over the ranks, so the sum has the
/// same shape (and the same floats) for every tp that divides the total number of parts
/// (`tpserve_types::plan` explains the scheme).
pub struct RowParallel<O: Ops> {
    parts: Vec<O::Mat>,
}

impl<O: Ops> RowParallel<O> {
    /// Keeps columns `cols` of the full weight `name` in `parts` pieces (every cut must fall
    /// on a quant-block boundary), on the device of `ops`.
    pub fn new(ops: &O, name: &str, full: &QMatrix, cols: Range<usize>, parts: usize) -> Result<Self, ModelError> {
        let parts = parts.max(1);
        let width = cols.len() / parts;
        if parts == 1 && cols.start == 0 && cols.end == full.cols() {
            return Ok(Self { parts: vec![ops.matrix(full)?] });
        }
        let parts = (0..parts)
            .map(|i| {
                let a = cols.start + i * width;
                let b = if i + 1 == parts { cols.end } else { a + width };
                ops.matrix(&full.slice_cols(a, b).map_err(shard_err(name))?)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { parts })
    }

    /// Input features on this rank.
    pub fn in_features(&self) -> usize {
        self.parts.iter().map(|p| p.cols()).sum()
    }

    /// `out = x Wᵀ` summed over the stage: `x` is `[n, in_features()]` (this rank's slice of
    /// the input, e.g. its heads' attention output), `out` is `[n, W's rows]` (`hidden`),
    /// complete on every rank after the all-reduce. A `Comm` error means a peer failed
    /// mid-collective.
    pub fn forward(&self, ops: &O, x: &O::Act, n: usize, out: &mut O::Act, comm: &dyn Collective) -> Result<(), ModelError> {
        ops.matmul_parts(&self.parts, x, n, out)?;
        ops.all_reduce(out, comm)
    }

    /// The first part's weight (all of it when there is one part).
    pub fn weight(&self) -> &O::Mat {
        &self.parts[0]
    }

    /// Every part's weight.
    pub fn parts(&self) -> &[O::Mat] {
        &self.parts
    }
}

/// Token embedding and output projection split by vocabulary rows. The embedding is read a
/// row per token, so it stays in host memory (`M` = [`QMatrix`]) whatever the device; the
/// output projection is a matrix of the device (`M` = `O::Mat`).
pub struct VocabParallel<M = QMatrix> {
    w: M,
    /// First vocabulary id held by this rank.
    start: usize,
}

impl VocabParallel<QMatrix> {
    /// Keeps vocabulary rows `rows` of the full `[vocab, hidden]` matrix `name` (the
    /// embedding, or the output projection, which is the same tensor when the embeddings are
    /// tied).
    pub fn new(name: &str, full: &QMatrix, rows: Range<usize>) -> Result<Self, ModelError> {
        Ok(Self { w: full.slice_rows(rows.start, rows.end).map_err(shard_err(name))?, start: rows.start })
    }

    /// The same rows on the device of `ops` (the output projection).
    pub fn to_device<O: Ops>(&self, ops: &O) -> Result<VocabParallel<O::Mat>, ModelError> {
        Ok(VocabParallel { w: ops.matrix(&self.w)?, start: self.start })
    }

    /// Embedding rows for `ids` into `out` (`[ids.len(), hidden]`, host memory): rows of ids
    /// this rank does not hold are zero before the all-reduce fills them in.
    pub fn embed(&self, ids: &[u32], out: &mut [f32], comm: &dyn Collective) -> Result<(), ModelError> {
        let hidden = self.w.cols();
        let range = self.vocab_range();
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            if range.contains(&(id as usize)) {
                self.w.dequantize_row(id as usize - self.start, row);
            } else {
                row.fill(0.0);
            }
        }
        Ok(comm.all_reduce_sum(out)?)
    }
}

impl<M: Matrix> VocabParallel<M> {
    /// This rank's rows, `[vocab_range().len(), hidden]`.
    pub fn weight(&self) -> &M {
        &self.w
    }

    /// The vocabulary ids whose logits this rank computes.
    pub fn vocab_range(&self) -> Range<usize> {
        self.start..self.start + self.w.rows()
    }
}

impl<M> VocabParallel<M> {
    /// Logits of this rank's vocabulary slice: `out` is `[n, vocab_range().len()]`.
    pub fn logits<O: Ops<Mat = M>>(&self, ops: &O, x: &O::Act, n: usize, out: &mut O::Act) -> Result<(), ModelError> {
        ops.matmul(&self.w, x, n, out)
    }
}

/// RMSNorm with the weight multiplied in directly (GGUF files of Gemma already hold the "+1").
pub struct RmsNorm<O: Ops> {
    weight: O::Norm,
    dim: usize,
    eps: f32,
}

impl<O: Ops> RmsNorm<O> {
    /// `y = x / sqrt(mean(x²) + eps) · weight`, normalising rows as long as `weight`.
    pub fn new(ops: &O, weight: Vec<f32>, eps: f32) -> Result<Self, ModelError> {
        Ok(Self { dim: weight.len(), weight: ops.norm_weight(weight)?, eps })
    }

    /// The row length it normalises: `hidden`, or `head_dim` for Gemma's q/k norms (which
    /// thus normalise each head separately).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Normalises every `dim()`-long row of `x` in place.
    pub fn forward_inplace(&self, ops: &O, x: &mut O::Act) -> Result<(), ModelError> {
        ops.rms_norm_inplace(&self.weight, self.dim, self.eps, x)
    }

    /// out = norm(x), leaving x untouched.
    pub fn forward(&self, ops: &O, x: &O::Act, out: &mut O::Act) -> Result<(), ModelError> {
        ops.rms_norm(&self.weight, self.dim, self.eps, x, out)
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
    fn rms_norm_matches_the_formula() {
        let n = RmsNorm::new(&crate::ops::Cpu, vec![1.0, 2.0], 0.0).unwrap();
        let mut x = vec![3.0, 4.0];
        n.forward_inplace(&crate::ops::Cpu, &mut x).unwrap();
        let rms = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 8.0 / rms).abs() < 1e-6);
    }
}
