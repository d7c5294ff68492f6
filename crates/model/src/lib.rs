//! tpserve-model: everything that turns a GGUF file into next-token logits on a CPU.
//!
//! - [`gguf`]: the file format (metadata, tensor directory, mmap).
//! - [`quant`]: ggml block formats and our SIMD quantized matmul kernels.
//! - [`tokenizer`]: SentencePiece-style and GPT-2-style BPE read from the GGUF.
//! - [`config`]: the architecture hyper-parameters (`gemma3`, `llama`).
//! - [`layers`]: tensor-parallel layer types (column-, row-, vocab-parallel).
//! - [`attention`]: tiled online-softmax attention over the KV cache.
//! - [`model`]: the transformer forward pass.

pub mod fetch;
pub mod gguf;
pub mod quant;
pub mod tokenizer;
pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod simd;
pub mod chat;
pub mod testing;
