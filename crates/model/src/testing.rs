//! Tiny random-weight GGUF models (gemma3- and llama-shaped, a few layers, a small vocab,
//! every tensor type we support) for fast tests of the loader and the forward pass here, of
//! the worker and the coordinator's engine, and end to end of the `tpserve` binary (whose
//! `tokenize` tests read the tiny vocabulary with `tpserve-tokenizer`).

use crate::config::Arch;
use crate::model::{LogitsWanted, Model, ModelError, SeqChunk};
use crate::ops::{Cpu, KvMemory, Ops};
use crate::quant::{quantize, GgmlDType, SUPPORTED};
use tpserve_gguf::{GgufWriter, Value};

/// The shape of a tiny model. Input dimensions are multiples of 256 so k-quants fit.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// Which family's tensors and metadata keys to write.
    pub arch: Arch,
    /// Transformer blocks; with Gemma 3, layer 5 (every 6th) is the first global one.
    pub n_layers: usize,
    /// Residual width; a multiple of 256 (the k-quant block).
    pub hidden: usize,
    /// FFN inner width; a multiple of 256, since `ffn_down` takes it as input.
    pub ffn: usize,
    /// Query heads; `n_heads * head_dim` is `attn_output`'s input, so a multiple of 256.
    pub n_heads: usize,
    /// KV heads; divides `n_heads`. Fewer than tp shards when they divide tp: each rank then
    /// holds a copy of the one KV head its query heads read.
    pub n_kv_heads: usize,
    /// Floats per head, written as `attention.key_length`.
    pub head_dim: usize,
    /// `context_length`: the longest sequence the model accepts.
    pub context_len: usize,
    /// `attention.sliding_window` (Gemma 3 only); small, so short tests cross it.
    pub sliding_window: usize,
    /// Seed of the weights: equal specs give byte-identical files.
    pub seed: u64,
    /// Tensor types used in turn for the weight matrices.
    pub dtypes: Vec<GgmlDType>,
    /// Embedding values are drawn from `-embed_range..embed_range`. At 1 the residual
    /// stream is mostly the input embedding and, the output being the tied embedding, the
    /// last token's own logit stands far above the rest (greedy repeats it); smaller values
    /// give flatter distributions that sampling at temperatures of 1-2 varies.
    pub embed_range: f32,
}

impl TinySpec {
    /// The default tiny model: gemma3-shaped, 6 layers (5 local, 1 global) of width 256, 4
    /// query heads over 1 KV head of 64, a window of 8; every supported type in turn.
    pub fn gemma3() -> Self {
        Self {
            arch: Arch::Gemma3,
            n_layers: 6,
            hidden: 256,
            ffn: 512,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 64,
            context_len: 512,
            sliding_window: 8,
            seed: 1,
            dtypes: SUPPORTED.to_vec(),
            embed_range: 1.0,
        }
    }

    /// A gemma3-shaped model whose attention output (4 heads of 256) and FFN (1024) split on
    /// 256-column quant blocks at tp = 1, 2 and 4, for sharding tests.
    pub fn gemma3_shardable() -> Self {
        Self { head_dim: 256, ffn: 1024, seed: 3, ..Self::gemma3() }
    }

    /// A llama-shaped model with 4 KV heads that splits at tp = 1, 2 and 4.
    pub fn llama_shardable() -> Self {
        Self { n_kv_heads: 4, head_dim: 256, ffn: 1024, n_layers: 3, ..Self::llama() }
    }

    /// A llama-shaped model: 2 layers, 4 query heads over 2 KV heads, otherwise as
    /// [`TinySpec::gemma3`].
    pub fn llama() -> Self {
        Self { arch: Arch::Llama, n_layers: 2, n_kv_heads: 2, seed: 2, ..Self::gemma3() }
    }

    /// The same model with embeddings small enough that sampling at temperature 2 (the
    /// highest the API allows) gives varied text, for tests of sampling, seeds and stop
    /// strings. Gemma scales embeddings by sqrt(hidden), so it needs them smaller.
    pub fn for_sampling(self) -> Self {
        let embed_range = match self.arch {
            Arch::Gemma3 => 0.15,
            Arch::Llama => 0.3,
        };
        Self { embed_range, ..self }
    }
}

/// A small deterministic generator (no dependency, same numbers everywhere).
struct Lcg(u64);

impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// The toy vocabulary: specials, 256 byte tokens, then letters and a few words.
pub fn tiny_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"].map(String::from).to_vec();
    let mut types = vec![3, 3, 3, 2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let words = [
        "▁", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z", "▁t", "▁a",
        "he", "▁the", "in", "er", "an", "▁s", "on", "▁hello", "▁world", ".", ",", "!", "\n",
    ];
    for w in words {
        tokens.push(w.to_owned());
        types.push(1);
    }
    let scores = (0..tokens.len()).map(|i| if types[i] == 1 { -(i as f32) / 10.0 + (tokens[i].chars().count() as f32) } else { 0.0 }).collect();
    (tokens, scores, types)
}

/// Writes a tiny model as GGUF bytes.
pub fn tiny_gguf(spec: &TinySpec) -> Vec<u8> {
    let mut rng = Lcg(spec.seed);
    let (tokens, scores, types) = tiny_vocab();
    let vocab = tokens.len();
    let arch = match spec.arch {
        Arch::Gemma3 => "gemma3",
        Arch::Llama => "llama",
    };
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.meta("general.architecture", Value::String(arch.into()))
        .meta("general.name", Value::String(format!("tiny-{arch}")))
        .meta(&k("block_count"), Value::U32(spec.n_layers as u32))
        .meta(&k("embedding_length"), Value::U32(spec.hidden as u32))
        .meta(&k("feed_forward_length"), Value::U32(spec.ffn as u32))
        .meta(&k("attention.head_count"), Value::U32(spec.n_heads as u32))
        .meta(&k("attention.head_count_kv"), Value::U32(spec.n_kv_heads as u32))
        .meta(&k("attention.key_length"), Value::U32(spec.head_dim as u32))
        .meta(&k("attention.value_length"), Value::U32(spec.head_dim as u32))
        .meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6))
        .meta(&k("context_length"), Value::U32(spec.context_len as u32))
        .meta(&k("rope.freq_base"), Value::F32(if spec.arch == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 }))
        .meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect()))
        .meta("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect()))
        .meta("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(2))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.unknown_token_id", Value::U32(3))
        .meta("tokenizer.ggml.padding_token_id", Value::U32(0))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .meta("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    if spec.arch == Arch::Gemma3 {
        w.meta(&k("attention.sliding_window"), Value::U32(spec.sliding_window as u32));
    }

    let mut next_type = 0usize;
    let mut matrix = |w: &mut GgufWriter, rng: &mut Lcg, name: &str, rows: usize, cols: usize| {
        let dtype = spec.dtypes[next_type % spec.dtypes.len()];
        next_type += 1;
        let values = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt() * 1.7);
        let bytes = quantize(dtype, &values).expect("tiny shapes are whole blocks");
        w.tensor(name, &[cols as u64, rows as u64], dtype, bytes);
    };
    let norm = |w: &mut GgufWriter, rng: &mut Lcg, name: &str, n: usize| {
        let values: Vec<f32> = rng.vec(n, 0.2).into_iter().map(|v| 1.0 + v).collect();
        w.tensor(name, &[n as u64], GgmlDType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect());
    };
    let (h, hd) = (spec.hidden, spec.head_dim);
    // The embedding is Q8_0 like the real model's, so it doubles as the tied output.
    let embd = rng.vec(vocab * h, spec.embed_range);
    w.tensor("token_embd.weight", &[h as u64, vocab as u64], GgmlDType::Q8_0, quantize(GgmlDType::Q8_0, &embd).expect("whole blocks"));
    norm(&mut w, &mut rng, "output_norm.weight", h);
    for il in 0..spec.n_layers {
        let n = |s: &str| format!("blk.{il}.{s}.weight");
        norm(&mut w, &mut rng, &n("attn_norm"), h);
        matrix(&mut w, &mut rng, &n("attn_q"), spec.n_heads * hd, h);
        matrix(&mut w, &mut rng, &n("attn_k"), spec.n_kv_heads * hd, h);
        matrix(&mut w, &mut rng, &n("attn_v"), spec.n_kv_heads * hd, h);
        matrix(&mut w, &mut rng, &n("attn_output"), h, spec.n_heads * hd);
        norm(&mut w, &mut rng, &n("ffn_norm"), h);
        matrix(&mut w, &mut rng, &n("ffn_gate"), spec.ffn, h);
        matrix(&mut w, &mut rng, &n("ffn_up"), spec.ffn, h);
        matrix(&mut w, &mut rng, &n("ffn_down"), h, spec.ffn);
        if spec.arch == Arch::Gemma3 {
            norm(&mut w, &mut rng, &n("attn_q_norm"), hd);
            norm(&mut w, &mut rng, &n("attn_k_norm"), hd);
            norm(&mut w, &mut rng, &n("post_attention_norm"), h);
            norm(&mut w, &mut rng, &n("post_ffw_norm"), h);
        }
    }
    w.to_bytes()
}

/// Sequences run through a model without a scheduler (tests, one-off runs): each grows its
/// block tables from a pool that never takes blocks back. Blocks of 4 positions, so that
/// even short test prompts cross block boundaries.
pub struct Seqs<O: Ops = Cpu> {
    pool: O::Kv,
    seqs: Vec<(Vec<Vec<tpserve_types::kv::BlockId>>, usize)>,
}

impl<O: Ops> Seqs<O> {
    /// Room for `n` sequences of up to `max_len` positions each.
    pub fn new(model: &Model<O>, n: usize, max_len: usize) -> Self {
        let sizing = tpserve_types::kv::KvSizing { block_size: 4, tokens: n * (max_len + 4), max_seqs: n, max_chunk: max_len };
        let pool = model.kv_pool(&model.kv_layout(sizing)).expect("a layout of the model's own layers");
        Self { pool, seqs: vec![(Vec::new(), 0); n] }
    }

    /// Positions sequence `i` holds.
    pub fn len(&self, i: usize) -> usize {
        self.seqs[i].1
    }

    /// One forward pass over `(sequence, new tokens, logits wanted)`; a refused pass leaves
    /// every sequence where it was.
    pub fn forward(&mut self, model: &Model<O>, work: &[(usize, &[u32], LogitsWanted)]) -> Result<Vec<Vec<f32>>, ModelError> {
        for &(i, tokens, _) in work {
            let (tables, pos) = &mut self.seqs[i];
            let end = (*pos + tokens.len()).min(model.config().context_len);
            self.pool.book_mut().grow(tables, end).map_err(ModelError::Kv)?;
        }
        let chunks: Vec<SeqChunk<'_>> =
            work.iter().map(|&(i, tokens, logits)| SeqChunk { tokens, pos: self.seqs[i].1, tables: &self.seqs[i].0, logits }).collect();
        let out = model.forward(&mut self.pool, &chunks)?;
        for &(i, tokens, _) in work {
            self.seqs[i].1 += tokens.len();
        }
        Ok(out)
    }
}
