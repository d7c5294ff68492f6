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

use crate::config::{ConfigError, ModelConfig};
use crate::kv_cache::KvBook;
use crate::layers::{ColumnParallel, RmsNorm, RowParallel, VocabParallel};
use crate::ops::{AttnDims, Cpu, KvMemory, Matrix, Ops};
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
    /// The device failed (out of memory, a kernel that did not launch, a copy that failed),
    /// or cannot be used (a CUDA device asked of a binary built without CUDA). Mid-pass, the
    /// shard is unusable: load again.
    #[error("device {device}: {message}")]
    Device {
        /// The device, e.g. `cuda:0`.
        device: String,
        /// What failed, as the device's library said it.
        message: String,
    },
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
struct Layer<O: Ops> {
    attn_norm: RmsNorm<O>,
    q: ColumnParallel<O>,
    k: ColumnParallel<O>,
    v: ColumnParallel<O>,
    q_norm: Option<RmsNorm<O>>,
    k_norm: Option<RmsNorm<O>>,
    o: RowParallel<O>,
    post_attn_norm: Option<RmsNorm<O>>,
    ffn_norm: RmsNorm<O>,
    gate: ColumnParallel<O>,
    up: ColumnParallel<O>,
    down: RowParallel<O>,
    post_ffn_norm: Option<RmsNorm<O>>,
}

/// A loaded model shard on the device of `O` (the CPU by default), ready to run forward
/// passes.
pub struct Model<O: Ops = Cpu> {
    /// The device's operations.
    ops: O,
    cfg: ModelConfig,
    shard: RankShard,
    /// The tensor-parallel group of this rank's stage.
    tp_comm: Arc<dyn Collective>,
    /// The ranks with this tensor-parallel rank in every stage (rank = stage), when pp > 1.
    pp_comm: Option<Arc<dyn Collective>>,
    /// First stage only (host memory: read a row per token).
    embed: Option<VocabParallel>,
    /// Last stage only: the norm before the output projection.
    final_norm: Option<RmsNorm<O>>,
    /// This rank's rows of the output projection (`shard.vocab`): on the last stage's ranks,
    /// and with pp > 1 on every stage's (see `tpserve_types::plan`).
    head: Option<VocabParallel<O::Mat>>,
    /// This stage's layers.
    layers: Vec<Layer<O>>,
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

impl Model<Cpu> {
    /// Loads the whole model into this process (tp = 1, pp = 1), on the CPU.
    pub fn load(g: &Gguf) -> Result<Self, ModelError> {
        let plan = Plan::new(model_shape(g)?, 1, 1).map_err(|e| ModelError::Plan(e.to_string()))?;
        Self::load_shard(g, &plan.shard(0), Arc::new(Local), None)
    }

    /// [`Model::load_on`] the CPU.
    pub fn load_shard(g: &Gguf, shard: &RankShard, tp_comm: Arc<dyn Collective>, pp_comm: Option<Arc<dyn Collective>>) -> Result<Self, ModelError> {
        Self::load_on(Cpu, g, shard, tp_comm, pp_comm)
    }
}

impl<O: Ops> Model<O> {
    /// Loads one rank's shard onto the device of `ops`: its stage's layers, its heads, FFN
    /// columns and vocabulary rows (only those bytes of the file are read). `tp_comm`
    /// connects the stage's tensor-parallel ranks; `pp_comm` the stages (rank = stage), when
    /// there are several.
    pub fn load_on(ops: O, g: &Gguf, shard: &RankShard, tp_comm: Arc<dyn Collective>, pp_comm: Option<Arc<dyn Collective>>) -> Result<Self, ModelError> {
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
        let norm = |name: &str, n: usize| -> Result<RmsNorm<O>, ModelError> { RmsNorm::new(&ops, crate::weights::vector(g, name, n)?, cfg.rms_eps) };
        let opt_norm = |name: &str, n: usize| -> Result<Option<RmsNorm<O>>, ModelError> {
            if g.tensors.contains_key(name) {
                norm(name, n).map(Some)
            } else {
                Ok(None)
            }
        };

        let embed = if shard.first_stage {
            let embd = crate::weights::matrix(g, "token_embd.weight", cfg.vocab, hidden)?;
            Some(VocabParallel::new("token_embd.weight", &embd, tp.split(cfg.vocab))?)
        } else {
            None
        };
        if shard.vocab.end > cfg.vocab {
            return Err(ModelError::Plan(format!("vocabulary rows {:?} of a {}-row vocabulary", shard.vocab, cfg.vocab)));
        }
        let head = if shard.vocab.is_empty() {
            None
        } else {
            let name = if g.tensors.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
            let out = crate::weights::matrix(g, name, cfg.vocab, hidden)?;
            Some(VocabParallel::new(name, &out, shard.vocab.clone())?.to_device(&ops)?)
        };
        let final_norm = if shard.last_stage { Some(norm("output_norm.weight", hidden)?) } else { None };

        let mut layers = Vec::with_capacity(shard.layers.len());
        for il in shard.layers.clone() {
            let n = |s: &str| format!("blk.{il}.{s}.weight");
            let col = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<ColumnParallel<O>, ModelError> {
                let name = n(s);
                let m = crate::weights::matrix(g, &name, rows, cols)?;
                ColumnParallel::new(&ops, &name, &m, keep)
            };
            let row = |s: &str, rows: usize, cols: usize, keep: std::ops::Range<usize>| -> Result<RowParallel<O>, ModelError> {
                let name = n(s);
                let m = crate::weights::matrix(g, &name, rows, cols)?;
                RowParallel::new(&ops, &name, &m, keep, parts)
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
            ops,
            n_heads: heads.len(),
            n_kv_heads: kv.len(),
            cfg,
            shard: shard.clone(),
            tp_comm,
            pp_comm: if single_stage { None } else { pp_comm },
            embed,
            final_norm,
            head,
            layers,
            windows,
        })
    }

    /// The hyper-parameters of the whole model (not divided by tp).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The vocabulary ids whose logits this rank returns (empty on a rank without rows of
    /// the output projection).
    pub fn vocab_range(&self) -> std::ops::Range<usize> {
        self.head.as_ref().map_or(0..0, |h| h.vocab_range())
    }

    /// The device this shard computes on, in words.
    pub fn device(&self) -> String {
        self.ops.describe()
    }

    /// Every weight matrix this rank holds.
    fn matrices(&self) -> Vec<&dyn Matrix> {
        let mut m: Vec<&dyn Matrix> = Vec::new();
        let embed = self.embed.as_ref().map(|e| e.weight());
        m.extend(embed.map(|e| e as &dyn Matrix));
        // A tied head is the embedding's own rows (when both are in host memory): count them once.
        let same = |h: &dyn Matrix| embed.is_some_and(|e| !h.host_bytes().is_empty() && e.as_bytes().as_ptr() == h.host_bytes().as_ptr());
        m.extend(self.matmul_matrices().into_iter().filter(|h| !same(*h)));
        m
    }

    /// The matrices the forward pass multiplies with: the head and every layer's, not the
    /// embedding (read a row per token). A tied head is its own matrix over the
    /// embedding's bytes, with its own repacked copy.
    fn matmul_matrices(&self) -> Vec<&dyn Matrix> {
        let mut m: Vec<&dyn Matrix> = Vec::new();
        m.extend(self.head.as_ref().map(|h| h.weight() as &dyn Matrix));
        for l in &self.layers {
            m.extend([l.q.weight(), l.k.weight(), l.v.weight(), l.gate.weight(), l.up.weight()].map(|w| w as &dyn Matrix));
            m.extend(l.o.parts().iter().map(|w| w as &dyn Matrix));
            m.extend(l.down.parts().iter().map(|w| w as &dyn Matrix));
        }
        m
    }

    /// Bytes of repacked weights this rank holds now: each matrix's repacked copy, or its
    /// copy on huge pages for the row kernels (see `QMatrix::prepare`); 0 before `prefault`.
    pub fn repacked_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map(|e| e.weight() as &dyn Matrix);
        embed.into_iter().chain(self.matmul_matrices()).map(|m| m.packed_bytes()).sum()
    }

    /// Weight bytes this rank holds.
    pub fn weight_bytes(&self) -> u64 {
        self.matrices().iter().map(|m| m.nbytes() as u64).sum()
    }

    /// Reads every page of this rank's weights in host memory once, so that the first
    /// request does not pay for page faults of the mapped file, calling `progress(bytes_done,
    /// bytes_total)` as it goes, then repacks what the kernels multiply on a repacked layout
    /// (and copies the rest onto huge pages: `QMatrix::prepare`).
    /// Only this shard's bytes are touched. Returns the bytes repacking added
    /// ([`Self::repacked_bytes`]).
    pub fn prefault(&self, mut progress: impl FnMut(u64, u64)) -> usize {
        const PAGE: usize = 4096;
        const REPORT_EVERY: u64 = 8 << 20;
        let total = self.weight_bytes();
        let (mut done, mut reported) = (0u64, 0u64);
        let mut sink = 0u8;
        for m in self.matrices() {
            let bytes = m.host_bytes();
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

    /// The memory for `layout`'s blocks on this rank (this stage's layers), on its device.
    pub fn kv_pool(&self, layout: &KvLayout) -> Result<O::Kv, ModelError> {
        let book = KvBook::new(layout, self.shard.layers.clone(), self.kv_dim()).map_err(ModelError::Kv)?;
        self.ops.kv_memory(book)
    }

    /// Runs every sequence's new tokens through this stage, writing their keys and values
    /// into `kv`, and returns per sequence the logits it asked for: `[rows,
    /// vocab_range().len()]` on the last stage, nothing on the others (which hand their hidden
    /// states to the next stage). Every rank of every stage is called with the same batch.
    /// A batch that is refused (bad token, block table too short) changes nothing.
    pub fn forward(&self, kv: &mut O::Kv, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_stage(kv, batch, false).map(|mut o| o.logits_per_seq().into_iter().map(|l| l.to_vec()).collect())
    }

    /// [`Model::forward`], and on the first tensor-parallel rank of the last of several
    /// stages also the final hidden states of the wanted rows, which the other stages' slices
    /// of the output projection need ([`Model::head_logits`]). With `slice_later` the last of
    /// several stages leaves its own slice to [`Model::head_logits`] too (no logits now).
    pub fn forward_stage(&self, kv: &mut O::Kv, batch: &[SeqChunk<'_>], slice_later: bool) -> Result<StageOutput, ModelError> {
        // Validate before touching any cache, so a bad request changes nothing.
        self.check(kv.book(), batch)?;
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if tokens.is_empty() {
            return Ok(StageOutput::nothing(batch.len()));
        }
        let _span = trace_span!("forward", stage = self.shard.stage, tokens = tokens.len(), seqs = batch.len()).entered();
        let mut x = self.input(&tokens)?;
        let pass = self.ops.begin_pass(&self.cfg, kv, batch)?;
        let mut s = Scratch::new(self, tokens.len())?;
        for (il, layer) in self.layers.iter().enumerate() {
            let _span = trace_span!("layer", layer = self.shard.layers.start + il).entered();
            self.attention(il, layer, &mut x, kv, batch, &pass, &mut s)?;
            self.feed_forward(layer, &mut x, &mut s)?;
        }
        let out = self.output(&x, batch, slice_later)?;
        self.ops.end_pass()?;
        Ok(out)
    }

    /// Why `batch` cannot run against the cache `book` describes, if it cannot.
    fn check(&self, book: &KvBook, batch: &[SeqChunk<'_>]) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        for s in batch {
            let end = s.pos + s.tokens.len();
            book.check(s.tables, s.pos, end).map_err(ModelError::Kv)?;
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
    fn input(&self, tokens: &[u32]) -> Result<O::Act, ModelError> {
        let _span = trace_span!("input").entered();
        let hidden = self.cfg.hidden;
        match (&self.embed, &self.pp_comm) {
            (Some(embed), _) => {
                let mut x = vec![0f32; tokens.len() * hidden];
                embed.embed(tokens, &mut x, self.tp_comm.as_ref())?;
                let mut x = self.ops.upload(x, hidden)?;
                if self.cfg.embed_scale != 1.0 {
                    self.ops.scale(&mut x, self.cfg.embed_scale)?;
                }
                Ok(x)
            }
            (None, Some(pp)) => self.ops.recv(tokens.len(), hidden, pp.as_ref(), self.shard.stage - 1),
            (None, None) => unreachable!("load_on gives a later stage its pipeline collective"),
        }
    }

    /// `x += PostNorm(Attn(Norm(x)))` for local layer `il`: q/k/v projections of this
    /// rank's heads, q/k norms and RoPE, each sequence's keys and values written into its
    /// blocks and attended over through its block table, and the row-parallel output
    /// projection all-reduced over the stage.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        il: usize,
        layer: &Layer<O>,
        x: &mut O::Act,
        kv: &mut O::Kv,
        batch: &[SeqChunk<'_>],
        pass: &O::Pass,
        s: &mut Scratch<O>,
    ) -> Result<(), ModelError> {
        let _span = trace_span!("attention").entered();
        let (ops, cfg) = (&self.ops, &self.cfg);
        let hd = cfg.head_dim;
        let n = s.n;
        layer.attn_norm.forward(ops, x, &mut s.h)?;
        layer.q.forward(ops, &s.h, n, &mut s.q)?;
        layer.k.forward(ops, &s.h, n, &mut s.k)?;
        layer.v.forward(ops, &s.h, n, &mut s.v)?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            qn.forward_inplace(ops, &mut s.q)?;
            kn.forward_inplace(ops, &mut s.k)?;
        }
        let local = cfg.layer_is_local[self.shard.layers.start + il];
        ops.rope(pass, &mut s.q, hd, cfg.rope_style, local)?;
        ops.rope(pass, &mut s.k, hd, cfg.rope_style, local)?;
        ops.scale(&mut s.q, cfg.query_scale)?;

        let dims = AttnDims { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: hd, window: self.windows[il] };
        ops.kv_write(pass, kv, il, batch, &s.k, &s.v)?;
        ops.paged_attention(pass, kv, il, batch, dims, &s.q, &mut s.attn)?;
        layer.o.forward(ops, &s.attn, n, &mut s.h, self.tp_comm.as_ref())?;
        if let Some(pn) = &layer.post_attn_norm {
            pn.forward_inplace(ops, &mut s.h)?;
        }
        ops.add(x, &s.h)
    }

    /// `x += PostNorm(FFN(Norm(x)))`: the gated FFN over this rank's columns, the down
    /// projection all-reduced over the stage.
    fn feed_forward(&self, layer: &Layer<O>, x: &mut O::Act, s: &mut Scratch<O>) -> Result<(), ModelError> {
        let _span = trace_span!("ffn").entered();
        let ops = &self.ops;
        let n = s.n;
        layer.ffn_norm.forward(ops, x, &mut s.h)?;
        layer.gate.forward(ops, &s.h, n, &mut s.gate)?;
        layer.up.forward(ops, &s.h, n, &mut s.up)?;
        ops.gated(self.cfg.activation, &mut s.gate, &s.up)?;
        layer.down.forward(ops, &s.gate, n, &mut s.h, self.tp_comm.as_ref())?;
        if let Some(pn) = &layer.post_ffn_norm {
            pn.forward_inplace(ops, &mut s.h)?;
        }
        ops.add(x, &s.h)
    }

    /// What leaves this stage: the hidden states to the next stage, or on the last stage
    /// the logits of the rows each sequence asked for (final norm, then this rank's slice
    /// of the output projection) and, with several stages, those rows' normed hidden states.
    fn output(&self, x: &O::Act, batch: &[SeqChunk<'_>], slice_later: bool) -> Result<StageOutput, ModelError> {
        let ops = &self.ops;
        let nothing = || StageOutput::nothing(batch.len());
        let Some(final_norm) = &self.final_norm else {
            let pp = self.pp_comm.as_ref().expect("a stage before the last has a next stage");
            ops.send(x, pp.as_ref(), self.shard.stage + 1)?;
            return Ok(nothing());
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
        for (s, r) in batch.iter().zip(crate::ops::seq_rows(batch)) {
            rows.extend(r.end - rows_of(s)..r.end);
        }
        if rows.is_empty() {
            return Ok(nothing());
        }
        let mut sel = ops.gather_rows(x, hidden, &rows)?;
        final_norm.forward_inplace(ops, &mut sel)?;
        // The other stages' slices of the head need the rows too: one rank of the stage
        // reports them (all hold the same after the all-reduce).
        let mut hidden_out = Vec::new();
        if !self.shard.first_stage && self.shard.tp.rank == 0 {
            hidden_out = ops.download(sel)?;
            if slice_later {
                return Ok(StageOutput { hidden: hidden_out, ..nothing() });
            }
            sel = ops.upload(hidden_out.clone(), hidden)?;
        } else if !self.shard.first_stage && slice_later {
            return Ok(nothing());
        }
        let logits = match &self.head {
            Some(head) => self.project(head, &sel, rows.len())?,
            None => Vec::new(),
        };
        Ok(StageOutput { logits, rows: batch.iter().map(rows_of).collect(), hidden: hidden_out })
    }

    /// This rank's logits (`[rows, vocab_range().len()]`) for final hidden states another
    /// stage computed (`[rows, hidden]`, after the final norm, as [`StageOutput::hidden`]
    /// reported them): with pp > 1, every stage's slice of the output projection.
    pub fn head_logits(&self, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        let width = self.cfg.hidden;
        let head = self.head.as_ref().ok_or_else(|| ModelError::Plan(format!("rank {} holds no rows of the output projection", self.shard.rank)))?;
        if hidden.is_empty() || !hidden.len().is_multiple_of(width) {
            return Err(ModelError::Plan(format!("{} hidden values are not whole rows of {width}", hidden.len())));
        }
        let _span = trace_span!("head", rows = hidden.len() / width).entered();
        let x = self.ops.upload(hidden.to_vec(), width)?;
        self.project(head, &x, hidden.len() / width)
    }

    /// `rows` normed hidden states through this rank's slice of the output projection (and
    /// the model's final soft-cap), downloaded.
    fn project(&self, head: &VocabParallel<O::Mat>, x: &O::Act, rows: usize) -> Result<Vec<f32>, ModelError> {
        let ops = &self.ops;
        let mut logits = ops.zeros(rows, head.vocab_range().len())?;
        head.logits(ops, x, rows, &mut logits)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            ops.softcap(&mut logits, cap)?;
        }
        ops.download(logits)
    }
}

/// What one stage's forward pass gives back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageOutput {
    /// The wanted rows' logits over this rank's vocabulary slice, sequence after sequence in
    /// batch order (`[Σ rows, vocab_range().len()]`; empty before the last stage and on a rank
    /// without a slice). One buffer, as the projection wrote it: cut into a vector per
    /// sequence, a step of 32 sequences copied 16 MB a rank (`memmove` was 2.8% of a
    /// 32-client profile on AVX2).
    pub logits: Vec<f32>,
    /// Per sequence, how many rows of `logits` are its own (0 where it wants none).
    pub rows: Vec<usize>,
    /// On the first tensor-parallel rank of the last of several stages: the wanted rows'
    /// final hidden states (`[rows, hidden]`, after the final norm), in batch order; else empty.
    pub hidden: Vec<f32>,
}

impl StageOutput {
    /// No logits (nor hidden states) for a batch of `seqs` sequences.
    fn nothing(seqs: usize) -> Self {
        Self { logits: Vec::new(), rows: vec![0; seqs], hidden: Vec::new() }
    }

    /// Per sequence, its rows of [`StageOutput::logits`] (`[rows, width]`, empty where
    /// there are none).
    pub fn logits_per_seq(&mut self) -> Vec<&mut [f32]> {
        let total: usize = self.rows.iter().sum();
        let width = self.logits.len().checked_div(total).unwrap_or(0);
        debug_assert_eq!(self.logits.len(), total * width, "logits are not whole rows");
        let mut rest = &mut self.logits[..];
        self.rows
            .iter()
            .map(|&r| {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(r * width);
                rest = tail;
                mine
            })
            .collect()
    }
}

/// The activations of one forward pass, allocated once and reused by every layer.
struct Scratch<O: Ops> {
    /// Tokens in the batch.
    n: usize,
    /// The normed input of a sublayer, then its output: `[n, hidden]`.
    h: O::Act,
    /// This rank's queries, `[n, n_heads * head_dim]`.
    q: O::Act,
    /// This rank's keys and values, `[n, n_kv_heads * head_dim]` each.
    k: O::Act,
    v: O::Act,
    /// Attention output of this rank's heads, `[n, n_heads * head_dim]`.
    attn: O::Act,
    /// FFN gate (then the activated product) and up projections, `[n, this rank's FFN columns]`.
    gate: O::Act,
    up: O::Act,
}

impl<O: Ops> Scratch<O> {
    fn new(m: &Model<O>, n: usize) -> Result<Self, ModelError> {
        let hd = m.cfg.head_dim;
        let ffn_local = m.layers.first().map_or(0, |l| l.gate.out_features());
        let (q_dim, kv_dim) = (m.n_heads * hd, m.n_kv_heads * hd);
        let z = |cols: usize| m.ops.zeros(n, cols);
        Ok(Self { n, h: z(m.cfg.hidden)?, q: z(q_dim)?, k: z(kv_dim)?, v: z(kv_dim)?, attn: z(q_dim)?, gate: z(ffn_local)?, up: z(ffn_local)? })
    }
}
