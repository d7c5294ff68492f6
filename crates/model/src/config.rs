//! Architecture hyper-parameters read from GGUF metadata, for the `gemma3` and `llama`
//! architectures, with the facts the metadata leaves implicit written down in one place.

use tpserve_gguf::{Gguf, GgufError};
use tpserve_types::kv::{KvLayout, KvSizing};

/// The model families tpserve runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Gemma 3: GELU-tanh gated FFN, q/k RMSNorm, post-norms, interleaved sliding-window
    /// and global layers with different RoPE bases, embeddings scaled by sqrt(hidden).
    Gemma3,
    /// Llama (2/3, Mistral and friends): SiLU gated FFN, grouped-query attention.
    Llama,
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i rotates with i + d/2 (GPT-NeoX, Gemma).
    Neox,
    /// Dimension 2i rotates with 2i+1 (the original Llama layout of llama.cpp's converter).
    Interleaved,
}

/// The nonlinearity of the gated FFN: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation, through an f16 lookup table as llama.cpp does
    /// (Gemma's GeGLU).
    GeluTanh,
    /// `x · sigmoid(x)` (Llama's SwiGLU).
    Silu,
}

/// Why a GGUF file's metadata does not describe a model tpserve can run. All three mean the
/// file is the problem, not the request: fix or replace the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `general.architecture` names a family tpserve has no forward pass for (the value is
    /// in the message); convert or download a `gemma3` or `llama` GGUF instead.
    #[error("unsupported model architecture {0:?} (tpserve runs \"gemma3\" and \"llama\")")]
    UnknownArch(String),
    /// A required key (e.g. `gemma3.block_count`) or the `token_embd.weight` tensor is
    /// missing or has the wrong type: the file is truncated or was not written for this
    /// architecture.
    #[error(transparent)]
    Metadata(#[from] GgufError),
    /// The hyper-parameters are present but contradict each other or are out of range (zero
    /// layers, heads that cannot be grouped over the KV heads, an odd RoPE dimension count);
    /// the message names the offending values.
    #[error("inconsistent model config: {0}")]
    Invalid(String),
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The family, from `general.architecture`; picks the defaults below.
    pub arch: Arch,
    /// Transformer blocks in the whole model (18 for Gemma 3 270M), not just this stage's.
    pub n_layers: usize,
    /// Width of the residual stream, `embedding_length` (640 for Gemma 3 270M).
    pub hidden: usize,
    /// Inner width of the gated FFN, `feed_forward_length` (2048 for Gemma 3 270M).
    pub ffn: usize,
    /// Query heads of the whole model (before the tensor-parallel split).
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); divides `n_heads`. Defaults to `n_heads`.
    pub n_kv_heads: usize,
    /// Floats per head, `attention.key_length`, else `hidden / n_heads` (256 for Gemma 3
    /// 270M, where it is not `hidden / n_heads`).
    pub head_dim: usize,
    /// Vocabulary size: the rows of `token_embd.weight` (ggml dims `[hidden, vocab]`).
    pub vocab: usize,
    /// RMSNorm epsilon (1e-6 for Gemma 3, and the default when the file has none).
    pub rms_eps: f32,
    /// Longest context the model was trained for (2048 when the file does not say); no
    /// sequence may reach a position beyond it.
    pub context_len: usize,
    /// Which dimensions RoPE pairs up: NeoX for Gemma 3, interleaved for Llama.
    pub rope_style: RopeStyle,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub rope_dims: usize,
    /// RoPE base on global (full-attention) layers.
    pub rope_base_global: f32,
    /// RoPE base on sliding-window layers.
    pub rope_base_local: f32,
    /// Keys a sliding-window layer sees: a query at p sees k when p - k < window.
    pub sliding_window: Option<usize>,
    /// Per layer: does it use the sliding window?
    pub layer_is_local: Vec<bool>,
    /// Multiply embeddings by this (Gemma: sqrt(hidden)).
    pub embed_scale: f32,
    /// Multiply queries by this after RoPE: 1/sqrt(head_dim) for both families (no metadata
    /// key is read for it), so the attention kernel need not scale scores.
    pub query_scale: f32,
    /// Gemma 3's per-head RMSNorm on q and k before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Gemma 3's RMSNorm on each sublayer's output before the residual add
    /// (`post_attention_norm`, `post_ffw_norm`), required when set. Without it a
    /// `post_attention_norm` the file happens to carry is still applied.
    pub post_norms: bool,
    /// The gated FFN's nonlinearity.
    pub activation: Activation,
    /// Gemma 2-style tanh soft-capping of the final logits, when present.
    pub final_logit_softcap: Option<f32>,
}

impl ModelConfig {
    /// Reads the `{arch}.*` keys of `g`, fills in what the metadata leaves implicit (Gemma 3:
    /// every 6th layer global, RoPE base 10,000 on local layers and `rope.freq_base`, default
    /// 1,000,000, on global ones) and checks the numbers are consistent before anything is
    /// sized by them.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ConfigError> {
        let arch_name = g.get_str("general.architecture")?.to_owned();
        let arch = match arch_name.as_str() {
            "gemma3" => Arch::Gemma3,
            "llama" => Arch::Llama,
            other => return Err(ConfigError::UnknownArch(other.to_owned())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_layers = g.get_u64(&key("block_count"))? as usize;
        let hidden = g.get_u64(&key("embedding_length"))? as usize;
        let ffn = g.get_u64(&key("feed_forward_length"))? as usize;
        let n_heads = g.get_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = g.get_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(n_heads);
        let head_dim = match g.get_u64(&key("attention.key_length")) {
            Ok(v) => v as usize,
            Err(_) if n_heads > 0 => hidden / n_heads,
            Err(e) => return Err(e.into()),
        };
        let rms_eps = g.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6) as f32;
        let context_len = g.get_u64(&key("context_length")).unwrap_or(2048) as usize;
        let rope_dims = g.get_u64(&key("rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim);
        let vocab = match g.tensors.get("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => return Err(GgufError::MissingTensor("token_embd.weight".into()).into()),
        };
        // Refuse absurd numbers before anything is sized by them: each layer has tensors.
        if n_layers == 0 || n_layers > g.tensors.len() {
            return Err(ConfigError::Invalid(format!("{n_layers} layers, but the file has {} tensors", g.tensors.len())));
        }
        const MAX_DIM: usize = 1 << 20;
        for (what, v) in [("hidden size", hidden), ("FFN size", ffn), ("head count", n_heads), ("KV head count", n_kv_heads), ("head dim", head_dim)] {
            if v == 0 || v > MAX_DIM {
                return Err(ConfigError::Invalid(format!("{what} {v} is out of range (1..={MAX_DIM})")));
            }
        }
        // What the two families share; Llama's choices where they differ.
        let base = ModelConfig {
            arch,
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rms_eps,
            context_len,
            rope_style: RopeStyle::Interleaved,
            rope_dims,
            rope_base_global: 10_000.0,
            rope_base_local: 10_000.0,
            sliding_window: None,
            layer_is_local: vec![false; n_layers],
            embed_scale: 1.0,
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            qk_norm: false,
            post_norms: false,
            activation: Activation::Silu,
            final_logit_softcap: None,
        };
        let cfg = match arch {
            Arch::Gemma3 => {
                let window = g.get_u64(&key("attention.sliding_window")).map(|v| v as usize).ok();
                if window == Some(0) {
                    return Err(ConfigError::Invalid("sliding window 0: a query must see at least itself".into()));
                }
                // llama.cpp (and the reference implementation) fix these for Gemma 3: every
                // 6th layer is global, local layers use RoPE base 10,000.
                ModelConfig {
                    rope_style: RopeStyle::Neox,
                    rope_base_global: g.get_f64(&key("rope.freq_base")).unwrap_or(1_000_000.0) as f32,
                    sliding_window: window,
                    layer_is_local: (0..n_layers).map(|il| window.is_some() && il % 6 != 5).collect(),
                    embed_scale: (hidden as f32).sqrt(),
                    qk_norm: true,
                    post_norms: true,
                    activation: Activation::GeluTanh,
                    final_logit_softcap: g.get_f64(&key("final_logit_softcapping")).ok().map(|v| v as f32).filter(|v| *v > 0.0),
                    ..base
                }
            }
            Arch::Llama => {
                let rope_base = g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32;
                ModelConfig { rope_base_global: rope_base, rope_base_local: rope_base, ..base }
            }
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.n_layers == 0 || self.hidden == 0 || self.n_heads == 0 || self.head_dim == 0 || self.ffn == 0 {
            return bad(format!(
                "layers {}, hidden {}, heads {}, head dim {}, ffn {} must all be positive",
                self.n_layers, self.hidden, self.n_heads, self.head_dim, self.ffn
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads cannot be grouped over {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return bad(format!("RoPE dimensions {} must be even and at most the head dim {}", self.rope_dims, self.head_dim));
        }
        if self.vocab == 0 {
            return bad("the vocabulary is empty".into());
        }
        Ok(())
    }

    /// RoPE base of layer `il`.
    pub fn rope_base(&self, il: usize) -> f32 {
        if self.layer_is_local[il] {
            self.rope_base_local
        } else {
            self.rope_base_global
        }
    }

    /// The paged KV cache for this model's layers, grouped by attention window and sized by
    /// `sizing`.
    pub fn kv_layout(&self, sizing: KvSizing) -> KvLayout {
        KvLayout::new(&(0..self.n_layers).map(|il| self.window(il)).collect::<Vec<_>>(), sizing)
    }

    /// The window of layer `il`, or None for full attention.
    pub fn window(&self, il: usize) -> Option<usize> {
        if self.layer_is_local[il] {
            self.sliding_window
        } else {
            None
        }
    }
}
