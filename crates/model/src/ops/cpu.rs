//! [`Cpu`]: the operation set on host memory with this crate's kernels — the quantized
//! matmuls of `quant` (AVX-512 / AVX-VNNI / AVX2 / portable, chosen at run time), the tiled
//! attention of `attention`, and the vector primitives of `simd`, all on the caller's rayon
//! pool. These are the calls the forward pass made before it was written over [`Ops`].

use tpserve_comm::Collective;
use tpserve_types::kv::BlockId;

use super::{seq_rows, AttnDims, KvMemory, Matrix, Ops};
use crate::attention::{flash_attention_batch, AttnSeq, AttnShape, AttnSpan};
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::kv_cache::{KvBook, KvPool};
use crate::model::{ModelError, SeqChunk};
use crate::quant::QMatrix;

/// The CPU: host memory, the calling thread's rayon pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Matrix for QMatrix {
    fn rows(&self) -> usize {
        QMatrix::rows(self)
    }
    fn cols(&self) -> usize {
        QMatrix::cols(self)
    }
    fn nbytes(&self) -> usize {
        QMatrix::nbytes(self)
    }
    fn packed_bytes(&self) -> usize {
        QMatrix::packed_bytes(self)
    }
    fn prepare(&self) {
        QMatrix::prepare(self)
    }
    fn host_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Ops for Cpu {
    type Act = Vec<f32>;
    type Mat = QMatrix;
    type Norm = Vec<f32>;
    type Kv = KvPool;
    type Pass = Ropes;

    fn describe(&self) -> String {
        format!("cpu ({})", crate::quant::kernel_name())
    }

    fn matrix(&self, m: &QMatrix) -> Result<QMatrix, ModelError> {
        Ok(m.clone())
    }

    fn norm_weight(&self, w: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        Ok(w)
    }

    fn kv_memory(&self, book: KvBook) -> Result<KvPool, ModelError> {
        KvPool::with_book(book).map_err(ModelError::Kv)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Vec<f32>, ModelError> {
        Ok(vec![0f32; rows * cols])
    }

    fn upload(&self, x: Vec<f32>, _cols: usize) -> Result<Vec<f32>, ModelError> {
        Ok(x)
    }

    fn download(&self, x: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        Ok(x)
    }

    fn matmul(&self, w: &QMatrix, x: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<(), ModelError> {
        w.matmul(x, n, out);
        Ok(())
    }

    fn matmul_parts(&self, parts: &[QMatrix], x: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<(), ModelError> {
        if let [w] = parts {
            w.matmul(x, n, out);
            return Ok(());
        }
        // Gather each part's columns of x, multiply, then add the products as a tree.
        let cols: usize = parts.iter().map(|p| p.cols()).sum();
        let mut products: Vec<Vec<f32>> = Vec::with_capacity(parts.len());
        let mut c0 = 0;
        for p in parts {
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
        Ok(())
    }

    fn rms_norm(&self, w: &Vec<f32>, dim: usize, eps: f32, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<(), ModelError> {
        out.copy_from_slice(x);
        self.rms_norm_inplace(w, dim, eps, out)
    }

    fn rms_norm_inplace(&self, w: &Vec<f32>, dim: usize, eps: f32, x: &mut Vec<f32>) -> Result<(), ModelError> {
        let norm_row = |_: usize, row: &mut [f32]| {
            let ss: f32 = crate::simd::dot(row, row);
            let scale = 1.0 / (ss / dim as f32 + eps).sqrt();
            for (v, w) in row.iter_mut().zip(w) {
                *v *= scale * w;
            }
        };
        crate::simd::par_rows(x, dim, norm_row);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<(), ModelError> {
        crate::simd::scale(x, s);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<(), ModelError> {
        crate::simd::add_inplace(x, y);
        Ok(())
    }

    fn gated(&self, act: Activation, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), ModelError> {
        match act {
            Activation::GeluTanh => crate::simd::geglu(gate, up),
            Activation::Silu => gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u),
        }
        Ok(())
    }

    fn softcap(&self, x: &mut Vec<f32>, cap: f32) -> Result<(), ModelError> {
        x.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, cols: usize, rows: &[usize]) -> Result<Vec<f32>, ModelError> {
        let mut sel = vec![0f32; rows.len() * cols];
        for (dst, &r) in sel.chunks_exact_mut(cols).zip(rows) {
            dst.copy_from_slice(&x[r * cols..(r + 1) * cols]);
        }
        Ok(sel)
    }

    fn begin_pass(&self, cfg: &ModelConfig, _kv: &KvPool, batch: &[SeqChunk<'_>]) -> Result<Ropes, ModelError> {
        Ok(Ropes::new(cfg, &super::positions(batch)))
    }

    fn rope(&self, pass: &Ropes, x: &mut Vec<f32>, head_dim: usize, style: RopeStyle, local: bool) -> Result<(), ModelError> {
        pass.for_layer(local).apply(x, head_dim, style);
        Ok(())
    }

    fn kv_write(&self, _pass: &Ropes, kv: &mut KvPool, il: usize, batch: &[SeqChunk<'_>], k: &Vec<f32>, v: &Vec<f32>) -> Result<(), ModelError> {
        let kv_dim = kv.book().kv_dim();
        let group = kv.book().group(il);
        for (seq, rows) in batch.iter().zip(seq_rows(batch)) {
            let table: &[BlockId] = &seq.tables[group];
            kv.write(il, table, seq.pos, &k[rows.start * kv_dim..rows.end * kv_dim], &v[rows.start * kv_dim..rows.end * kv_dim]);
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        _pass: &Ropes,
        kv: &KvPool,
        il: usize,
        batch: &[SeqChunk<'_>],
        dims: AttnDims,
        q: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let q_dim = dims.n_heads * dims.head_dim;
        let shape = AttnShape { n_heads: dims.n_heads, n_kv_heads: dims.n_kv_heads, head_dim: dims.head_dim };
        let group = kv.book().group(il);
        let mut rest = &mut out[..];
        let mut seqs = Vec::with_capacity(batch.len());
        for (seq, rows) in batch.iter().zip(seq_rows(batch)) {
            let span = AttnSpan { q_pos0: seq.pos, window: dims.window };
            let (a, b) = (rows.start * q_dim, rows.end * q_dim);
            let (o, tail) = std::mem::take(&mut rest).split_at_mut(b - a);
            rest = tail;
            seqs.push(AttnSeq { q: &q[a..b], kv: kv.view(il, &seq.tables[group]), span, out: o });
        }
        flash_attention_batch(shape, seqs);
        Ok(())
    }

    fn all_reduce(&self, x: &mut Vec<f32>, comm: &dyn Collective) -> Result<(), ModelError> {
        Ok(comm.all_reduce_sum(x)?)
    }

    fn send(&self, x: &Vec<f32>, comm: &dyn Collective, peer: usize) -> Result<(), ModelError> {
        Ok(comm.send(x, peer)?)
    }

    fn recv(&self, rows: usize, cols: usize, comm: &dyn Collective, peer: usize) -> Result<Vec<f32>, ModelError> {
        let mut x = vec![0f32; rows * cols];
        comm.recv(&mut x, peer)?;
        Ok(x)
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The RoPE tables of one forward pass: global layers' base, and the local layers' when it
/// differs (Gemma 3).
pub struct Ropes {
    global: RopeTable,
    local: Option<RopeTable>,
}

impl Ropes {
    fn new(cfg: &ModelConfig, positions: &[usize]) -> Self {
        let global = RopeTable::new(positions, cfg.rope_dims, cfg.rope_base_global);
        let local = (cfg.rope_base_local != cfg.rope_base_global).then(|| RopeTable::new(positions, cfg.rope_dims, cfg.rope_base_local));
        Self { global, local }
    }

    fn for_layer(&self, is_local: bool) -> &RopeTable {
        match (&self.local, is_local) {
            (Some(local), true) => local,
            _ => &self.global,
        }
    }
}

/// cos/sin of every (position, frequency) of one forward pass for one RoPE base.
struct RopeTable {
    /// `[n_positions, rope_dims / 2]` each: frequency i is `base^(-2i / rope_dims)`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `rope_dims / 2`: rotated pairs per head.
    half: usize,
}

impl RopeTable {
    fn new(positions: &[usize], rope_dims: usize, base: f32) -> Self {
        let half = rope_dims / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| (base as f64).powf(-2.0 * i as f64 / rope_dims as f64)).collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates every head of `x` (`[n_positions, n_heads * head_dim]`) in place.
    fn apply(&self, x: &mut [f32], head_dim: usize, style: RopeStyle) {
        let half = self.half;
        let row_len = x.len() / (self.cos.len() / half.max(1)).max(1);
        crate::simd::par_rows(x, row_len, |t, row| {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                match style {
                    RopeStyle::Neox => {
                        let (a, b) = head[..2 * half].split_at_mut(half);
                        for i in 0..half {
                            let (x0, x1) = (a[i], b[i]);
                            a[i] = x0 * cos[i] - x1 * sin[i];
                            b[i] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                    RopeStyle::Interleaved => {
                        for i in 0..half {
                            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = x0 * cos[i] - x1 * sin[i];
                            head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                }
            }
        });
    }
}
