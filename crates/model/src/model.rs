//! The transformer forward pass for Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025)
//! and Llama (Touvron et al. 2023), written once over tensor-parallel layer types.
//!
//! Gemma 3, per layer: x += PostNorm(Attn(Norm(x))); x += PostNorm(FFN(Norm(x))), with
//! RMSNorm on each query and key head before RoPE, RoPE base 10k on sliding-window layers
//! and 1M on global ones, and a GELU-tanh gated FFN. Llama drops the post-norms and q/k
//! norms and gates with SiLU.

use std::sync::Arc;

use tpserve_comm::{CommError, Collective};

use crate::attention::{flash_attention, AttnShape, AttnSpan};
use crate::config::{Activation, ConfigError, ModelConfig, RopeStyle};
use crate::gguf::{Gguf, GgufError};
use crate::kv_cache::KvCache;
use crate::layers::{ColumnParallel, RmsNorm, RowParallel, TpRank, VocabParallel};
use crate::quant::QuantError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot shard tensor {name:?}: {source}")]
    Shard { name: String, source: QuantError },
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error("sequence would reach position {pos}, beyond the context length {max}")]
    ContextOverflow { pos: usize, max: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("cannot shard the model: {0}")]
    Plan(String),
    #[error("a sequence with no new tokens asked for logits")]
    EmptySequence,
}

/// Which logits a sequence wants back from a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last position only (generation).
    Last,
    /// Every position of the chunk (perplexity, prompt log-probabilities).
    All,
}

/// One sequence's part of a batched forward pass.
pub struct SeqChunk<'a> {
    /// New tokens, at positions `cache.len()..cache.len() + tokens.len()`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsWanted,
}

struct Layer {
    attn_norm: RmsNorm,
    q: ColumnParallel,
    k: ColumnParallel,
    v: ColumnParallel,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    o: RowParallel,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: ColumnParallel,
    up: ColumnParallel,
    down: RowParallel,
    post_ffn_norm: Option<RmsNorm>,
}

/// A loaded model shard, ready to run forward passes.
pub struct Model {
    cfg: ModelConfig,
    tp: TpRank,
    comm: Arc<dyn Collective>,
    embed: VocabParallel,
    head: VocabParallel,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    /// Query and KV heads on this rank.
    n_heads: usize,
    n_kv_heads: usize,
    /// Per-layer sliding window, for the cache to forget.
    windows: Vec<Option<usize>>,
}

impl Model {
    /// Loads this rank's shard of every tensor (only the bytes it needs are touched).
    pub fn load(g: &Gguf, tp: TpRank, comm: Arc<dyn Collective>) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(g)?;
        tp.check_heads(cfg.n_heads, cfg.n_kv_heads).map_err(ModelError::Plan)?;
        let (hd, hidden, ffn) = (cfg.head_dim, cfg.hidden, cfg.ffn);
        let heads = tp.heads(cfg.n_heads);
        let kv = tp.kv_heads(cfg.n_heads, cfg.n_kv_heads);
        let ffn_cols = tp.split(ffn);
        let shard = |name: &str| {
            let name = name.to_owned();
            move |source| ModelError::Shard { name, source }
        };
        let norm = |name: &str, n: usize| -> Result<RmsNorm, ModelError> { Ok(RmsNorm::new(g.vector(name, n)?, cfg.rms_eps)) };
        let opt_norm = |name: &str, n: usize| -> Result<Option<RmsNorm>, ModelError> {
            if g.tensors.contains_key(name) {
                norm(name, n).map(Some)
            } else {
                Ok(None)
            }
        };

        let embd = g.matrix("token_embd.weight", cfg.vocab, hidden)?;
        let vocab_rows = tp.split(cfg.vocab);
        let embed = VocabParallel::new(&embd, vocab_rows.clone()).map_err(shard("token_embd.weight"))?;
        let head = if g.tensors.contains_key("output.weight") {
            let out = g.matrix("output.weight", cfg.vocab, hidden)?;
            VocabParallel::new(&out, vocab_rows).map_err(shard("output.weight"))?
        } else {
            VocabParallel::new(&embd, vocab_rows).map_err(shard("token_embd.weight"))?
        };

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for il in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{il}.{s}.weight");
            let col = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<ColumnParallel, ModelError> {
                let name = n(s);
                let m = g.matrix(&name, rows, cols)?;
                ColumnParallel::new(&m, keep).map_err(shard(&name))
            };
            let row = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<RowParallel, ModelError> {
                let name = n(s);
                let m = g.matrix(&name, rows, cols)?;
                RowParallel::new(&m, keep).map_err(shard(&name))
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (Some(norm(&n("attn_q_norm"), hd)?), Some(norm(&n("attn_k_norm"), hd)?))
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: norm(&n("attn_norm"), hidden)?,
                q: col("attn_q", cfg.n_heads * hd, hidden, heads.start * hd..heads.end * hd)?,
                k: col("attn_k", cfg.n_kv_heads * hd, hidden, kv.start * hd..kv.end * hd)?,
                v: col("attn_v", cfg.n_kv_heads * hd, hidden, kv.start * hd..kv.end * hd)?,
                q_norm,
                k_norm,
                o: row("attn_output", hidden, cfg.n_heads * hd, heads.start * hd..heads.end * hd)?,
                post_attn_norm: if cfg.post_norms { Some(norm(&n("post_attention_norm"), hidden)?) } else { opt_norm(&n("post_attention_norm"), hidden)? },
                ffn_norm: norm(&n("ffn_norm"), hidden)?,
                gate: col("ffn_gate", ffn, hidden, ffn_cols.clone())?,
                up: col("ffn_up", ffn, hidden, ffn_cols.clone())?,
                down: row("ffn_down", hidden, ffn, ffn_cols.clone())?,
                post_ffn_norm: if cfg.post_norms { Some(norm(&n("post_ffw_norm"), hidden)?) } else { None },
            });
        }
        let final_norm = norm("output_norm.weight", hidden)?;
        let windows = (0..cfg.n_layers).map(|il| cfg.window(il)).collect();
        Ok(Self { n_heads: heads.len(), n_kv_heads: kv.len(), cfg, tp, comm, embed, head, layers, final_norm, windows })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// The vocabulary ids whose logits this rank returns.
    pub fn vocab_range(&self) -> std::ops::Range<usize> {
        self.head.vocab_range()
    }

    /// A new, empty KV cache for one sequence on this rank.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layers, self.n_kv_heads * self.cfg.head_dim)
    }

    /// Runs every sequence's new tokens through the model, appending to their caches, and
    /// returns per sequence the logits it asked for: `[rows, vocab_range().len()]`.
    pub fn forward(&self, batch: &mut [SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.cfg;
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let q_dim = self.n_heads * hd;
        let kv_dim = self.n_kv_heads * hd;
        let ffn_local = self.layers.first().map_or(0, |l| l.gate.out_features());

        // Validate before touching any cache, so a bad request changes nothing.
        for s in batch.iter() {
            let end = s.cache.len() + s.tokens.len();
            if end > cfg.context_len {
                return Err(ModelError::ContextOverflow { pos: end, max: cfg.context_len });
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(ModelError::BadToken { id, vocab: cfg.vocab });
            }
            if s.tokens.is_empty() && s.logits != LogitsWanted::None {
                return Err(ModelError::EmptySequence);
            }
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<usize> = batch.iter().flat_map(|s| s.cache.len()..s.cache.len() + s.tokens.len()).collect();
        let n = tokens.len();
        if n == 0 {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }

        let mut x = vec![0f32; n * hidden];
        self.embed.embed(&tokens, &mut x, self.comm.as_ref())?;
        if cfg.embed_scale != 1.0 {
            crate::simd::scale(&mut x, cfg.embed_scale);
        }

        let rope_global = RopeTable::new(&positions, cfg.rope_dims, cfg.rope_base_global);
        let rope_local = (cfg.rope_base_local != cfg.rope_base_global).then(|| RopeTable::new(&positions, cfg.rope_dims, cfg.rope_base_local));

        let mut h = vec![0f32; n * hidden];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut gate = vec![0f32; n * ffn_local];
        let mut up = vec![0f32; n * ffn_local];
        let shape = AttnShape { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: hd };

        for (il, layer) in self.layers.iter().enumerate() {
            // --- attention ---
            layer.attn_norm.forward(&x, &mut h);
            layer.q.forward(&h, n, &mut q);
            layer.k.forward(&h, n, &mut k);
            layer.v.forward(&h, n, &mut v);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                qn.forward_inplace(&mut q);
                kn.forward_inplace(&mut k);
            }
            let rope = match (&rope_local, cfg.layer_is_local[il]) {
                (Some(local), true) => local,
                _ => &rope_global,
            };
            rope.apply(&mut q, hd, cfg.rope_style);
            rope.apply(&mut k, hd, cfg.rope_style);
            crate::simd::scale(&mut q, cfg.query_scale);

            let mut off = 0;
            for s in batch.iter_mut() {
                let t = s.tokens.len();
                s.cache.append(il, &k[off * kv_dim..(off + t) * kv_dim], &v[off * kv_dim..(off + t) * kv_dim]);
                let lkv = &s.cache.layers[il];
                let span = AttnSpan { q_pos0: s.cache.len(), k_pos0: lkv.pos0, window: self.windows[il] };
                flash_attention(
                    &q[off * q_dim..(off + t) * q_dim],
                    &lkv.k,
                    &lkv.v,
                    shape,
                    span,
                    &mut attn[off * q_dim..(off + t) * q_dim],
                );
                off += t;
            }
            layer.o.forward(&attn, n, &mut h, self.comm.as_ref())?;
            if let Some(pn) = &layer.post_attn_norm {
                pn.forward_inplace(&mut h);
            }
            crate::simd::add_inplace(&mut x, &h);

            // --- feed-forward ---
            layer.ffn_norm.forward(&x, &mut h);
            layer.gate.forward(&h, n, &mut gate);
            layer.up.forward(&h, n, &mut up);
            match cfg.activation {
                Activation::GeluTanh => crate::simd::geglu(&mut gate, &up),
                Activation::Silu => gate.iter_mut().zip(&up).for_each(|(g, u)| *g = silu(*g) * u),
            }
            layer.down.forward(&gate, n, &mut h, self.comm.as_ref())?;
            if let Some(pn) = &layer.post_ffn_norm {
                pn.forward_inplace(&mut h);
            }
            crate::simd::add_inplace(&mut x, &h);
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len(), &self.windows);
        }

        // --- logits, only for the rows asked for ---
        let mut rows: Vec<usize> = Vec::new();
        let mut off = 0;
        for s in batch.iter() {
            let t = s.tokens.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(off + t - 1),
                LogitsWanted::All => rows.extend(off..off + t),
            }
            off += t;
        }
        let mut sel = vec![0f32; rows.len() * hidden];
        for (dst, &r) in sel.chunks_exact_mut(hidden).zip(&rows) {
            dst.copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        self.final_norm.forward_inplace(&mut sel);
        let vocab_local = self.head.vocab_range().len();
        let mut logits = vec![0f32; rows.len() * vocab_local];
        if !rows.is_empty() {
            self.head.logits(&sel, rows.len(), &mut logits);
        }
        if let Some(cap) = cfg.final_logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0;
        for s in batch.iter() {
            let r = match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => s.tokens.len(),
            };
            out.push(logits[next * vocab_local..(next + r) * vocab_local].to_vec());
            next += r;
        }
        Ok(out)
    }
}


fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// cos/sin of every (position, frequency) of one forward pass for one RoPE base.
struct RopeTable {
    /// `[n_positions, rope_dims / 2]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
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
