//! The operation set the forward pass is written over, once, for every device.
//!
//! `model.rs` describes Gemma 3 and Llama as a sequence of these operations on activations
//! (`[rows, cols]` f32 matrices) and never touches a float itself; an implementation of
//! [`Ops`] decides where the numbers live and which kernels compute them:
//!
//! - [`Cpu`]: host memory and this crate's kernels (`quant`, `attention`, `simd`), exactly
//!   the calls the forward pass made before it was written over this trait (a test holds the
//!   logits bit for bit: `tests/golden_logits.rs`).
//! - `Cuda` (feature `cuda`): GPU memory, candle-core's GGUF quantized matmuls and our own
//!   kernels (`cuda/kernels.cu`: RMSNorm, RoPE, the gated FFN, KV writes and paged attention).
//!
//! What is not an operation stays on the host for every device: the embedding rows (a lookup
//! of a few rows per token in the mapped file), the block tables' checks, and the
//! candidates a last-stage rank reports (from the logits it downloads).

use std::ops::Range;

use tpserve_comm::Collective;
use tpserve_types::kv::KvLayout;

use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::kv_cache::KvBook;
use crate::model::{ModelError, SeqChunk};
use crate::quant::QMatrix;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::Cpu;

/// A weight matrix `[rows = out features, cols = in features]` where a device computes with it.
pub trait Matrix: Send + Sync {
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// Bytes of its block encoding (what the file holds for it).
    fn nbytes(&self) -> usize;
    /// Bytes of a copy the kernels made of it: repacked, or the rows as they are on huge
    /// pages (host kernels only; 0 elsewhere).
    fn packed_bytes(&self) -> usize {
        0
    }
    /// Readies the weights for the kernels: a repacked copy (which the first use would
    /// otherwise make), or a copy of the rows on huge pages (which only this makes).
    fn prepare(&self) {}
    /// The encoded bytes where they are in host memory (the mapped file), to read their
    /// pages ahead of the first request; empty for a copy in device memory.
    fn host_bytes(&self) -> &[u8] {
        &[]
    }
}

/// One rank's KV cache memory: where the keys and values of every layer of the stage live,
/// and the bookkeeping ([`KvBook`]) that checks block tables against it.
pub trait KvMemory: Send + Sync {
    /// The layout, block counts and layer groups.
    fn book(&self) -> &KvBook;
    /// The same, to grow block tables (callers without a scheduler).
    fn book_mut(&mut self) -> &mut KvBook;
    /// Bytes the pool reserves (keys and values).
    fn bytes(&self) -> u64;
    /// The layout the pool was sized by.
    fn layout(&self) -> &KvLayout {
        self.book().layout()
    }
}

/// Where one attention call's keys and values go and what they attend over.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Query heads on this rank.
    pub n_heads: usize,
    /// KV heads on this rank.
    pub n_kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// The layer's sliding window (None: every earlier key).
    pub window: Option<usize>,
}

/// The operations of a forward pass on one device. Every method works on whole batches
/// (`n` rows: the tokens of every sequence of the step, in order); an error is the device's
/// (out of memory, a failed kernel launch) or a collective's, and leaves the pass unusable.
pub trait Ops: Send + Sync + Sized + 'static {
    /// Activations `[rows, cols]`, f32, row-major.
    type Act: Send;
    /// A weight matrix in its GGUF block encoding.
    type Mat: Matrix;
    /// A norm's weight vector.
    type Norm: Send + Sync;
    /// This rank's KV cache memory.
    type Kv: KvMemory;
    /// What one forward pass computes once for all its layers (RoPE angles; on a GPU, the
    /// positions and block tables uploaded once).
    type Pass;

    /// The device in words, for logs and the plan ("cpu (avx512-vnni)", "cuda:0 (NVIDIA H200)").
    fn describe(&self) -> String;

    /// The device's copy of `m` (on the CPU, `m` itself: the mapped file).
    fn matrix(&self, m: &QMatrix) -> Result<Self::Mat, ModelError>;
    /// A norm weight.
    fn norm_weight(&self, w: Vec<f32>) -> Result<Self::Norm, ModelError>;
    /// KV memory for `book`'s layers, `book.kv_dim()` floats per position.
    fn kv_memory(&self, book: KvBook) -> Result<Self::Kv, ModelError>;

    /// `[rows, cols]` zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Act, ModelError>;
    /// Host values (`[x.len() / cols, cols]`) as activations.
    fn upload(&self, x: Vec<f32>, cols: usize) -> Result<Self::Act, ModelError>;
    /// Activations as host values (taken: on the CPU they are the host values).
    fn download(&self, x: Self::Act) -> Result<Vec<f32>, ModelError>;

    /// `out = x Wᵀ`: `x` is `[n, w.cols()]`, `out` `[n, w.rows()]`.
    fn matmul(&self, w: &Self::Mat, x: &Self::Act, n: usize, out: &mut Self::Act) -> Result<(), ModelError>;
    /// `out = x Wᵀ` for W cut by input columns into `parts` (in order): each part multiplies
    /// its columns of `x`, and the products are added as a balanced tree
    /// ([`tpserve_comm::tree_sum`]), so the sum has the same floats for every split.
    fn matmul_parts(&self, parts: &[Self::Mat], x: &Self::Act, n: usize, out: &mut Self::Act) -> Result<(), ModelError>;
    /// Normalises every `dim`-long row of `x` into `out`: `x / sqrt(mean(x²) + eps) · w`.
    fn rms_norm(&self, w: &Self::Norm, dim: usize, eps: f32, x: &Self::Act, out: &mut Self::Act) -> Result<(), ModelError>;
    /// The same, in place.
    fn rms_norm_inplace(&self, w: &Self::Norm, dim: usize, eps: f32, x: &mut Self::Act) -> Result<(), ModelError>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Act, s: f32) -> Result<(), ModelError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<(), ModelError>;
    /// `gate = act(gate) · up` (the gated FFN's middle).
    fn gated(&self, act: Activation, gate: &mut Self::Act, up: &Self::Act) -> Result<(), ModelError>;
    /// `x = cap · tanh(x / cap)` (Gemma's final logit soft-capping).
    fn softcap(&self, x: &mut Self::Act, cap: f32) -> Result<(), ModelError>;
    /// Rows `rows` of `x` (`cols` wide), in that order.
    fn gather_rows(&self, x: &Self::Act, cols: usize, rows: &[usize]) -> Result<Self::Act, ModelError>;

    /// Prepares a forward pass over `batch`: the RoPE angles of every token's position, and
    /// whatever the device's attention reads per token.
    fn begin_pass(&self, cfg: &ModelConfig, kv: &Self::Kv, batch: &[SeqChunk<'_>]) -> Result<Self::Pass, ModelError>;
    /// Waits until the device has finished the pass, so a failure is the step's that caused
    /// it and the next step starts after this one's writes (the KV cache) on every device.
    fn end_pass(&self) -> Result<(), ModelError> {
        Ok(())
    }
    /// Rotates every `head_dim`-long head of `x` (`[n, heads * head_dim]`) by its token's
    /// position, with the local layers' base when `local` (Gemma 3) and the global one else.
    fn rope(&self, pass: &Self::Pass, x: &mut Self::Act, head_dim: usize, style: RopeStyle, local: bool) -> Result<(), ModelError>;
    /// Writes the keys and values of every token of the batch (`[n, n_kv_heads * head_dim]`
    /// each) into local layer `il`'s blocks, rounded to the cache's precision (f16).
    fn kv_write(&self, pass: &Self::Pass, kv: &mut Self::Kv, il: usize, batch: &[SeqChunk<'_>], k: &Self::Act, v: &Self::Act) -> Result<(), ModelError>;
    /// Causal attention of every token's (already scaled) queries over its sequence's keys
    /// and values in layer `il`'s blocks, grouped-query and sliding-window aware; `out` is
    /// `[n, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        pass: &Self::Pass,
        kv: &Self::Kv,
        il: usize,
        batch: &[SeqChunk<'_>],
        dims: AttnDims,
        q: &Self::Act,
        out: &mut Self::Act,
    ) -> Result<(), ModelError>;

    /// Element-wise sum over the ranks of `comm`, written back into every rank's `x`.
    fn all_reduce(&self, x: &mut Self::Act, comm: &dyn Collective) -> Result<(), ModelError>;
    /// Sends `x` to `peer` of `comm` (the next pipeline stage).
    fn send(&self, x: &Self::Act, comm: &dyn Collective, peer: usize) -> Result<(), ModelError>;
    /// Receives `[rows, cols]` from `peer` of `comm` (the previous pipeline stage).
    fn recv(&self, rows: usize, cols: usize, comm: &dyn Collective, peer: usize) -> Result<Self::Act, ModelError>;
}

/// The token positions of a batch, in order.
pub fn positions(batch: &[SeqChunk<'_>]) -> Vec<usize> {
    batch.iter().flat_map(|s| s.pos..s.pos + s.tokens.len()).collect()
}

/// Per sequence of `batch`, the range of its rows among the batch's tokens.
pub fn seq_rows<'a>(batch: &'a [SeqChunk<'_>]) -> impl Iterator<Item = Range<usize>> + 'a {
    batch.iter().scan(0, |off, s| {
        let r = *off..*off + s.tokens.len();
        *off = r.end;
        Some(r)
    })
}
