//! The transformer forward pass for Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025)
//! and Llama (Touvron et al. 2023), written once over tensor-parallel layer types.
//!
//! Gemma 3, per layer: x += PostNorm(Attn(Norm(x))); x += PostNorm(FFN(Norm(x))), with
//! RMSNorm on each query and key head before RoPE, RoPE base 10k on sliding-window layers
//! and 1M on global ones, and a GELU-tanh gated FFN. Llama drops the post-norms and q/k
//! norms and gates with SiLU.

use std::sync::Arc;

use rayon::prelude::*;

use tpserve_comm::{Collective, CommError, Local};
use tpserve_types::plan::{ModelShape, Plan, RankShard};

use tpserve_types::kv::{BlockId, KvLayout, KvSizing};

use tracing::trace_span;

use crate::attention::{flash_attention, AttnShape, AttnSpan};
use crate::config::{Activation, ConfigError, ModelConfig, RopeStyle};
use crate::kv_cache::KvPool;
use crate::layers::{ColumnParallel, RmsNorm, RowParallel, VocabParallel};
use crate::quant::QuantError;
use tpserve_gguf::{GgmlDType, Gguf, GgufError};

/// Why a model could not be loaded or a forward pass could not run.
///
/// Loading fails with `Gguf`, `Config`, `UnsupportedType`, `Tensor`, `Shard`, `Plan` or `Kv`
/// (a bad file or plan: nothing was loaded). A forward pass refuses a batch with
/// `ContextOverflow`, `BadToken`, `EmptySequence` or `Kv` before touching the cache (the
/// request is wrong; the model is still usable), and fails with `Comm` part-way (the caches
/// of the stage no longer agree: load again).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor is missing, has the wrong shape or lies outside the file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The metadata does not describe a model tpserve runs.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weight is stored in a ggml type the kernels cannot multiply (e.g. Q2_K); use a file
    /// quantized to one of [`crate::quant::SUPPORTED`].
    #[error("tensor {name:?} has type {dtype}, which tpserve cannot compute with (supported: {list})", list = crate::quant::supported_list())]
    UnsupportedType {
        /// The GGUF tensor name, e.g. `blk.3.ffn_down.weight`.
        name: String,
        /// Its stored type.
        dtype: GgmlDType,
    },
    /// A weight's bytes do not match its declared shape and type (a corrupt file).
    #[error("tensor {name:?}: {source}")]
    Tensor {
        /// The GGUF tensor name.
        name: String,
        /// What does not fit, with the sizes.
        source: QuantError,
    },
    /// This rank's slice of a weight cannot be cut out, usually because the split falls
    /// inside a quant block: choose a tp whose split lands on block boundaries.
    #[error("cannot shard tensor {name:?}: {source}")]
    Shard {
        /// The GGUF tensor name.
        name: String,
        /// The range or block boundary that failed.
        source: QuantError,
    },
    /// An all-reduce or a pipeline send/receive failed (a peer died or timed out) in the
    /// middle of a forward pass.
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    /// A sequence's new tokens would run past the context the model was trained for.
    #[error("sequence would reach position {pos}, beyond the context length {max}")]
    ContextOverflow {
        /// The position after the chunk's last token (`pos + tokens.len()`).
        pos: usize,
        /// [`ModelConfig::context_len`].
        max: usize,
    },
    /// An input token id has no embedding row (a tokenizer from another model?).
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken {
        /// The first offending id of the chunk.
        id: u32,
        /// Rows of the embedding; valid ids are `0..vocab`.
        vocab: usize,
    },
    /// The rank's shard does not fit the model or its collectives (heads not divisible by
    /// tp, wrong collective rank, layers out of range); the message says which.
    #[error("cannot shard the model: {0}")]
    Plan(String),
    /// A chunk with no tokens asked for logits: there is no row to return them for.
    #[error("a sequence with no new tokens asked for logits")]
    EmptySequence,
    /// The KV cache layout does not fit the model, or a chunk's block tables cannot hold its
    /// positions (too few tables or blocks, or a block outside the pool).
    #[error("KV cache: {0}")]
    Kv(String),
}

pub use tpserve_types::step::LogitsWanted;

/// One sequence's part of a batched forward pass.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// New tokens, at positions `pos..pos + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the cache (the position of `tokens[0]`).
    pub pos: usize,
    /// The sequence's block table per KV group, holding at least `pos + tokens.len()`
    /// positions (see `tpserve_types::kv`).
    pub tables: &'a [Vec<BlockId>],
    /// Which of the chunk's rows come back as logits (on the last stage): none, the last, or
    /// all of them (`[rows, vocab_range().len()]` in [`Model::forward`]'s result).
    pub logits: LogitsWanted,
}

/// One transformer block's weights on this rank (GGUF names `blk.{il}.*`): q/k/v and
/// gate/up hold this rank's heads and FFN columns, o and down the matching input columns.
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
    shard: RankShard,
    /// The tensor-parallel group of this rank's stage.
    tp_comm: Arc<dyn Collective>,
    /// The ranks with this tensor-parallel rank in every stage (rank = stage), when pp > 1.
    pp_comm: Option<Arc<dyn Collective>>,
    /// First stage only.
    embed: Option<VocabParallel>,
    /// Last stage only.
    head: Option<(RmsNorm, VocabParallel)>,
    /// This stage's layers.
    layers: Vec<Layer>,
    /// Query heads on this rank.
    n_heads: usize,
    /// KV heads on this rank: its slice, or the one head its query heads share when the
    /// model has fewer KV heads than tp (then replicated across ranks).
    n_kv_heads: usize,
    /// Per local layer: its sliding window.
    windows: Vec<Option<usize>>,
}

/// What a parallelism plan needs to know about the model in `g`.
pub fn model_shape(g: &Gguf) -> Result<ModelShape, ModelError> {
    let cfg = ModelConfig::from_gguf(g)?;
    let bytes = |name: &str| g.tensors.get(name).map_or(0, |t| t.nbytes);
    let layer_bytes = (0..cfg.n_layers)
        .map(|il| {
            let prefix = format!("blk.{il}.");
            g.tensors.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(_, t)| t.nbytes).sum()
        })
        .collect();
    let block =
        |suffix: &str| (0..cfg.n_layers).filter_map(|il| g.tensors.get(&format!("blk.{il}.{suffix}.weight"))).map(|t| t.dtype.block_size()).max().unwrap_or(1);
    let embed_bytes = bytes("token_embd.weight");
    let head_bytes = if g.tensors.contains_key("output.weight") { bytes("output.weight") } else { embed_bytes };
    Ok(ModelShape {
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        hidden: cfg.hidden,
        ffn: cfg.ffn,
        vocab: cfg.vocab,
        layer_bytes,
        embed_bytes,
        head_bytes,
        tied_embeddings: !g.tensors.contains_key("output.weight"),
        attn_out_block: block("attn_output"),
        ffn_down_block: block("ffn_down"),
    })
}

impl Model {
    /// Loads the whole model into this process (tp = 1, pp = 1).
    pub fn load(g: &Gguf) -> Result<Self, ModelError> {
        let plan = Plan::new(model_shape(g)?, 1, 1).map_err(|e| ModelError::Plan(e.to_string()))?;
        Self::load_shard(g, &plan.shard(0), Arc::new(Local), None)
    }

    /// Loads one rank's shard: its stage's layers, its heads, FFN columns and vocabulary rows
    /// (only those bytes of the file are read). `tp_comm` connects the stage's
    /// tensor-parallel ranks; `pp_comm` the stages (rank = stage), when there are several.
    pub fn load_shard(g: &Gguf, shard: &RankShard, tp_comm: Arc<dyn Collective>, pp_comm: Option<Arc<dyn Collective>>) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(g)?;
        let tp = shard.tp;
        tp.check_heads(cfg.n_heads, cfg.n_kv_heads).map_err(ModelError::Plan)?;
        if tp_comm.world_size() != tp.world || tp_comm.rank() != tp.rank {
            return Err(ModelError::Plan(format!(
                "the tensor-parallel collective is rank {} of {}, the shard says rank {} of {}",
                tp_comm.rank(),
                tp_comm.world_size(),
                tp.rank,
                tp.world
            )));
        }
        let single_stage = shard.first_stage && shard.last_stage;
        if !single_stage && pp_comm.as_ref().is_none_or(|c| c.rank() != shard.stage) {
            return Err(ModelError::Plan(format!("stage {} needs a pipeline collective in which it is rank {}", shard.stage, shard.stage)));
        }
        if shard.layers.end > cfg.n_layers || shard.layers.is_empty() {
            return Err(ModelError::Plan(format!("layers {:?} of a {}-layer model", shard.layers, cfg.n_layers)));
        }
        let (hd, hidden, ffn) = (cfg.head_dim, cfg.hidden, cfg.ffn);
        let heads = tp.heads(cfg.n_heads);
        let kv = tp.kv_heads(cfg.n_heads, cfg.n_kv_heads);
        let ffn_cols = tp.split(ffn);
        let parts = shard.reduce_parts;
        let shard_err = |name: &str| {
            let name = name.to_owned();
            move |source| ModelError::Shard { name, source }
        };
        let norm = |name: &str, n: usize| -> Result<RmsNorm, ModelError> { Ok(RmsNorm::new(crate::weights::vector(g, name, n)?, cfg.rms_eps)) };
        let opt_norm = |name: &str, n: usize| -> Result<Option<RmsNorm>, ModelError> {
            if g.tensors.contains_key(name) {
                norm(name, n).map(Some)
            } else {
                Ok(None)
            }
        };

        let vocab_rows = tp.split(cfg.vocab);
        let embed = if shard.first_stage {
            let embd = crate::weights::matrix(g, "token_embd.weight", cfg.vocab, hidden)?;
            Some(VocabParallel::new(&embd, vocab_rows.clone()).map_err(shard_err("token_embd.weight"))?)
        } else {
            None
        };
        let head = if shard.last_stage {
            let name = if g.tensors.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
            let out = crate::weights::matrix(g, name, cfg.vocab, hidden)?;
            let head = VocabParallel::new(&out, vocab_rows).map_err(shard_err(name))?;
            Some((norm("output_norm.weight", hidden)?, head))
        } else {
            None
        };

        let mut layers = Vec::with_capacity(shard.layers.len());
        for il in shard.layers.clone() {
            let n = |s: &str| format!("blk.{il}.{s}.weight");
            let col = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<ColumnParallel, ModelError> {
                let name = n(s);
                let m = crate::weights::matrix(g, &name, rows, cols)?;
                ColumnParallel::new(&m, keep).map_err(shard_err(&name))
            };
            let row = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<RowParallel, ModelError> {
                let name = n(s);
                let m = crate::weights::matrix(g, &name, rows, cols)?;
                RowParallel::new(&m, keep, parts).map_err(shard_err(&name))
            };
            let (q_norm, k_norm) = if cfg.qk_norm { (Some(norm(&n("attn_q_norm"), hd)?), Some(norm(&n("attn_k_norm"), hd)?)) } else { (None, None) };
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
        let windows = shard.layers.clone().map(|il| cfg.window(il)).collect();
        Ok(Self {
            n_heads: heads.len(),
            n_kv_heads: kv.len(),
            cfg,
            shard: shard.clone(),
            tp_comm,
            pp_comm: if single_stage { None } else { pp_comm },
            embed,
            head,
            layers,
            windows,
        })
    }

    /// The hyper-parameters of the whole model (not divided by tp).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The vocabulary ids whose logits this rank returns (empty before the last stage).
    pub fn vocab_range(&self) -> std::ops::Range<usize> {
        self.head.as_ref().map_or(0..0, |(_, h)| h.vocab_range())
    }

    /// Every weight matrix this rank holds.
    fn matrices(&self) -> Vec<&crate::quant::QMatrix> {
        let mut m = Vec::new();
        let embed = self.embed.as_ref().map(|e| e.weight());
        m.extend(embed);
        // A tied head is the embedding's own rows: count them once.
        m.extend(self.matmul_matrices().into_iter().filter(|h| embed.is_none_or(|e| e.as_bytes().as_ptr() != h.as_bytes().as_ptr())));
        m
    }

    /// The matrices the forward pass multiplies with: the head and every layer's, not the
    /// embedding (read a row per token). A tied head is its own `QMatrix` over the
    /// embedding's bytes, with its own repacked copy.
    fn matmul_matrices(&self) -> Vec<&crate::quant::QMatrix> {
        let mut m = Vec::new();
        m.extend(self.head.as_ref().map(|(_, h)| h.weight()));
        for l in &self.layers {
            m.extend([l.q.weight(), l.k.weight(), l.v.weight(), l.gate.weight(), l.up.weight()]);
            m.extend(l.o.parts());
            m.extend(l.down.parts());
        }
        m
    }

    /// Bytes of repacked weights this rank holds now (each repacked matrix's copy; 0 where
    /// the kernels multiply the file's blocks as they are).
    pub fn repacked_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map(|e| e.weight());
        embed.into_iter().chain(self.matmul_matrices()).map(|m| m.packed_bytes()).sum()
    }

    /// Weight bytes this rank holds.
    pub fn weight_bytes(&self) -> u64 {
        self.matrices().iter().map(|m| m.nbytes() as u64).sum()
    }

    /// Reads every page of this rank's weights once, so that the first request does not pay
    /// for page faults of the mapped file, calling `progress(bytes_done, bytes_total)` as it
    /// goes, then repacks what the kernels multiply on a repacked layout. Only this shard's
    /// bytes are touched. Returns the bytes repacking added ([`Self::repacked_bytes`]).
    pub fn prefault(&self, mut progress: impl FnMut(u64, u64)) -> usize {
        const PAGE: usize = 4096;
        const REPORT_EVERY: u64 = 8 << 20;
        let total = self.weight_bytes();
        let (mut done, mut reported) = (0u64, 0u64);
        let mut sink = 0u8;
        for m in self.matrices() {
            let bytes = m.as_bytes();
            for i in (0..bytes.len()).step_by(PAGE) {
                sink ^= bytes[i];
                done += PAGE.min(bytes.len() - i) as u64;
                if done - reported >= REPORT_EVERY {
                    progress(done, total);
                    reported = done;
                }
            }
        }
        std::hint::black_box(sink);
        // Repack now what the kernels repack, so the first request does not pay for it; on
        // the caller's pool, whose threads will read the copies.
        self.matmul_matrices().par_iter().for_each(|m| m.prepare());
        progress(total, total);
        self.repacked_bytes()
    }

    /// Floats of keys (or values) per position on this rank.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.cfg.head_dim
    }

    /// The KV cache layout for this model (all its layers) sized by `sizing`.
    pub fn kv_layout(&self, sizing: KvSizing) -> KvLayout {
        self.cfg.kv_layout(sizing)
    }

    /// The memory for `layout`'s blocks on this rank (this stage's layers).
    pub fn kv_pool(&self, layout: &KvLayout) -> Result<KvPool, ModelError> {
        KvPool::new(layout, self.shard.layers.clone(), self.kv_dim()).map_err(ModelError::Kv)
    }

    /// Runs every sequence's new tokens through this stage, writing their keys and values
    /// into `kv`, and returns per sequence the logits it asked for: `[rows,
    /// vocab_range().len()]` on the last stage, nothing on the others (which hand their hidden
    /// states to the next stage). Every rank of every stage is called with the same batch.
    /// A batch that is refused (bad token, block table too short) changes nothing.
    pub fn forward(&self, kv: &mut KvPool, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        // Validate before touching any cache, so a bad request changes nothing.
        self.check(kv, batch)?;
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if tokens.is_empty() {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        let positions: Vec<usize> = batch.iter().flat_map(|s| s.pos..s.pos + s.tokens.len()).collect();
        let _span = trace_span!("forward", stage = self.shard.stage, tokens = tokens.len(), seqs = batch.len()).entered();
        let mut x = self.input(&tokens)?;
        let ropes = Ropes::new(&self.cfg, &positions);
        let mut s = Scratch::new(self, tokens.len());
        for (il, layer) in self.layers.iter().enumerate() {
            let _span = trace_span!("layer", layer = self.shard.layers.start + il).entered();
            self.attention(il, layer, &mut x, kv, batch, &ropes, &mut s)?;
            self.feed_forward(layer, &mut x, &mut s)?;
        }
        self.output(&x, batch)
    }

    /// Why `batch` cannot run against `kv`, if it cannot.
    fn check(&self, kv: &KvPool, batch: &[SeqChunk<'_>]) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        for s in batch {
            let end = s.pos + s.tokens.len();
            kv.check(s.tables, s.pos, end).map_err(ModelError::Kv)?;
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
        Ok(())
    }

    /// The residual stream entering this stage: the scaled embeddings on the first stage,
    /// the previous stage's hidden states on the others.
    fn input(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let _span = trace_span!("input").entered();
        let mut x = vec![0f32; tokens.len() * self.cfg.hidden];
        match (&self.embed, &self.pp_comm) {
            (Some(embed), _) => {
                embed.embed(tokens, &mut x, self.tp_comm.as_ref())?;
                if self.cfg.embed_scale != 1.0 {
                    crate::simd::scale(&mut x, self.cfg.embed_scale);
                }
            }
            (None, Some(pp)) => pp.recv(&mut x, self.shard.stage - 1)?,
            (None, None) => unreachable!("load_shard gives a later stage its pipeline collective"),
        }
        Ok(x)
    }

    /// `x += PostNorm(Attn(Norm(x)))` for local layer `il`: q/k/v projections of this
    /// rank's heads, q/k norms and RoPE, each sequence's keys and values written into its
    /// blocks and attended over through its block table, and the row-parallel output
    /// projection all-reduced over the stage.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        il: usize,
        layer: &Layer,
        x: &mut [f32],
        kv: &mut KvPool,
        batch: &[SeqChunk<'_>],
        ropes: &Ropes,
        s: &mut Scratch,
    ) -> Result<(), ModelError> {
        let _span = trace_span!("attention").entered();
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let (n, q_dim, kv_dim) = (s.n, self.n_heads * hd, self.n_kv_heads * hd);
        layer.attn_norm.forward(x, &mut s.h);
        layer.q.forward(&s.h, n, &mut s.q);
        layer.k.forward(&s.h, n, &mut s.k);
        layer.v.forward(&s.h, n, &mut s.v);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            qn.forward_inplace(&mut s.q);
            kn.forward_inplace(&mut s.k);
        }
        let rope = ropes.for_layer(cfg.layer_is_local[self.shard.layers.start + il]);
        rope.apply(&mut s.q, hd, cfg.rope_style);
        rope.apply(&mut s.k, hd, cfg.rope_style);
        crate::simd::scale(&mut s.q, cfg.query_scale);

        let shape = AttnShape { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: hd };
        let group = kv.group(il);
        let mut off = 0;
        for seq in batch {
            let t = seq.tokens.len();
            let table = &seq.tables[group];
            kv.write(il, table, seq.pos, &s.k[off * kv_dim..(off + t) * kv_dim], &s.v[off * kv_dim..(off + t) * kv_dim]);
            let span = AttnSpan { q_pos0: seq.pos, window: self.windows[il] };
            flash_attention(&s.q[off * q_dim..(off + t) * q_dim], kv.view(il, table), shape, span, &mut s.attn[off * q_dim..(off + t) * q_dim]);
            off += t;
        }
        layer.o.forward(&s.attn, n, &mut s.h, self.tp_comm.as_ref())?;
        if let Some(pn) = &layer.post_attn_norm {
            pn.forward_inplace(&mut s.h);
        }
        crate::simd::add_inplace(x, &s.h);
        Ok(())
    }

    /// `x += PostNorm(FFN(Norm(x)))`: the gated FFN over this rank's columns, the down
    /// projection all-reduced over the stage.
    fn feed_forward(&self, layer: &Layer, x: &mut [f32], s: &mut Scratch) -> Result<(), ModelError> {
        let _span = trace_span!("ffn").entered();
        let n = s.n;
        layer.ffn_norm.forward(x, &mut s.h);
        layer.gate.forward(&s.h, n, &mut s.gate);
        layer.up.forward(&s.h, n, &mut s.up);
        match self.cfg.activation {
            Activation::GeluTanh => crate::simd::geglu(&mut s.gate, &s.up),
            Activation::Silu => s.gate.iter_mut().zip(&s.up).for_each(|(g, u)| *g = silu(*g) * u),
        }
        layer.down.forward(&s.gate, n, &mut s.h, self.tp_comm.as_ref())?;
        if let Some(pn) = &layer.post_ffn_norm {
            pn.forward_inplace(&mut s.h);
        }
        crate::simd::add_inplace(x, &s.h);
        Ok(())
    }

    /// What leaves this stage: the hidden states to the next stage, or on the last stage
    /// the logits of the rows each sequence asked for (final norm, then this rank's slice
    /// of the output projection).
    fn output(&self, x: &[f32], batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some((final_norm, head)) = &self.head else {
            let pp = self.pp_comm.as_ref().expect("a stage without the head has a next stage");
            pp.send(x, self.shard.stage + 1)?;
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        };
        let _span = trace_span!("head").entered();
        let hidden = self.cfg.hidden;
        let rows_of = |s: &SeqChunk<'_>| match s.logits {
            LogitsWanted::None => 0,
            LogitsWanted::Last => 1,
            LogitsWanted::All => s.tokens.len(),
        };
        // Only the rows asked for go through the (vocabulary-wide) projection.
        let mut rows: Vec<usize> = Vec::new();
        let mut off = 0;
        for s in batch {
            let t = s.tokens.len();
            rows.extend(off + t - rows_of(s)..off + t);
            off += t;
        }
        let mut sel = vec![0f32; rows.len() * hidden];
        for (dst, &r) in sel.chunks_exact_mut(hidden).zip(&rows) {
            dst.copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        final_norm.forward_inplace(&mut sel);
        let vocab_local = head.vocab_range().len();
        let mut logits = vec![0f32; rows.len() * vocab_local];
        if !rows.is_empty() {
            head.logits(&sel, rows.len(), &mut logits);
        }
        if let Some(cap) = self.cfg.final_logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0;
        for s in batch {
            let r = rows_of(s);
            out.push(logits[next * vocab_local..(next + r) * vocab_local].to_vec());
            next += r;
        }
        Ok(out)
    }
}

/// The activations of one forward pass, allocated once and reused by every layer.
struct Scratch {
    /// Tokens in the batch.
    n: usize,
    /// The normed input of a sublayer, then its output: `[n, hidden]`.
    h: Vec<f32>,
    /// This rank's queries, `[n, n_heads * head_dim]`.
    q: Vec<f32>,
    /// This rank's keys and values, `[n, n_kv_heads * head_dim]` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output of this rank's heads, `[n, n_heads * head_dim]`.
    attn: Vec<f32>,
    /// FFN gate (then the activated product) and up projections, `[n, this rank's FFN columns]`.
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Scratch {
    fn new(m: &Model, n: usize) -> Self {
        let hd = m.cfg.head_dim;
        let ffn_local = m.layers.first().map_or(0, |l| l.gate.out_features());
        let (q_dim, kv_dim) = (m.n_heads * hd, m.n_kv_heads * hd);
        Self {
            n,
            h: vec![0f32; n * m.cfg.hidden],
            q: vec![0f32; n * q_dim],
            k: vec![0f32; n * kv_dim],
            v: vec![0f32; n * kv_dim],
            attn: vec![0f32; n * q_dim],
            gate: vec![0f32; n * ffn_local],
            up: vec![0f32; n * ffn_local],
        }
    }
}

/// The RoPE tables of one forward pass: global layers' base, and the local layers' when it
/// differs (Gemma 3).
struct Ropes {
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

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
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
