//! Tensor-parallel layer types. A model file is written once with these; at tp = 1 each
//! holds the whole weight, at tp = N each holds its rank's slice and the row-parallel and
//! vocab-parallel layers finish with an all-reduce (Megatron-LM's scheme).

use std::ops::Range;

use tpserve_comm::{Collective, CommError};

use crate::quant::{QMatrix, QuantError};

pub use tpserve_types::plan::TpRank;

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

    /// `out = x Wᵀ` for this rank's rows: `x` is `[n, W's cols]` (the full input, the same on
    /// every rank), `out` is `[n, out_features()]`. No communication.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.w.matmul(x, n, out);
    }

    /// This rank's rows of the weight, `[out_features(), cols]`.
    pub fn weight(&self) -> &QMatrix {
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
pub struct RowParallel {
    parts: Vec<QMatrix>,
}

impl RowParallel {
    /// Keeps columns `cols` of the full weight in `parts` pieces (every cut must fall on a
    /// quant-block boundary).
    pub fn new(full: &QMatrix, cols: Range<usize>, parts: usize) -> Result<Self, QuantError> {
        let parts = parts.max(1);
        let width = cols.len() / parts;
        if parts == 1 && cols.start == 0 && cols.end == full.cols() {
            return Ok(Self { parts: vec![full.clone()] });
        }
        let parts = (0..parts)
            .map(|i| {
                let a = cols.start + i * width;
                let b = if i + 1 == parts { cols.end } else { a + width };
                full.slice_cols(a, b)
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
    /// complete on every rank after the all-reduce. An error means a peer failed mid-collective.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], comm: &dyn Collective) -> Result<(), CommError> {
        if self.parts.len() == 1 {
            self.parts[0].matmul(x, n, out);
        } else {
            // Gather each part's columns of x, multiply, then add the products as a tree.
            let cols = self.in_features();
            let mut products: Vec<Vec<f32>> = Vec::with_capacity(self.parts.len());
            let mut c0 = 0;
            for p in &self.parts {
                let w = p.cols();
                let mut xs = Vec::with_capacity(n * w);
                for row in x.chunks_exact(cols) {
                    xs.extend_from_slice(&row[c0..c0 + w]);
                }
                let mut y = vec![0f32; out.len()];
                p.matmul(&xs, n, &mut y);
                products.push(y);
                c0 += w;
            }
            tpserve_comm::tree_sum(&mut products);
            out.copy_from_slice(&products[0]);
        }
        comm.all_reduce_sum(out)
    }

    /// The first part's weight (all of it when there is one part).
    pub fn weight(&self) -> &QMatrix {
        &self.parts[0]
    }

    /// Every part's weight.
    pub fn parts(&self) -> &[QMatrix] {
        &self.parts
    }
}

/// Token embedding and output projection split by vocabulary rows.
pub struct VocabParallel {
    w: QMatrix,
    /// First vocabulary id held by this rank.
    start: usize,
}

impl VocabParallel {
    /// Keeps vocabulary rows `rows` of the full `[vocab, hidden]` matrix (the embedding, or
    /// the output projection, which is the same tensor when the embeddings are tied).
    pub fn new(full: &QMatrix, rows: Range<usize>) -> Result<Self, QuantError> {
        Ok(Self { w: full.slice_rows(rows.start, rows.end)?, start: rows.start })
    }

    /// This rank's rows, `[vocab_range().len(), hidden]`.
    pub fn weight(&self) -> &QMatrix {
        &self.w
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
    /// `y = x / sqrt(mean(x²) + eps) · weight`, normalising rows as long as `weight`.
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        Self { weight, eps }
    }

    /// The row length it normalises: `hidden`, or `head_dim` for Gemma's q/k norms (which
    /// thus normalise each head separately).
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
    fn rms_norm_matches_the_formula() {
        let n = RmsNorm::new(vec![1.0, 2.0], 0.0);
        let mut x = vec![3.0, 4.0];
        n.forward_inplace(&mut x);
        let rms = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 8.0 / rms).abs() < 1e-6);
    }
}
