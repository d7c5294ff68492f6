//! `tpserve-model`: the forward pass and its CPU kernels: what turns one rank's shard of a
//! GGUF file into next-token logits. The file format is `tpserve-gguf`; the tokenizer is
//! `tpserve-tokenizer`; nothing here knows about requests, text or the network.
//!
//! - [`config`]: the architecture hyper-parameters (`gemma3`, `llama`).
//! - [`weights`]: a GGUF tensor as a [`quant::QMatrix`] or an f32 vector.
//! - [`quant`]: ggml block formats and our SIMD quantized matmul kernels.
//! - [`layers`]: tensor-parallel layer types (column-, row-, vocab-parallel) and RMSNorm.
//! - [`attention`]: tiled online-softmax attention over the paged KV cache ([`kv_cache`]).
//! - [`model`]: the transformer forward pass, written once over [`ops`], the operation set
//!   each device implements (the CPU; CUDA with the `cuda` feature).
//! - [`device`]: a shard on the device a worker was started with.
//! - [`simd`]: small f32 vector primitives.
//! - [`testing`]: tiny random-weight models and sequences without a scheduler.

pub mod attention;
pub mod config;
pub mod device;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod testing;
pub mod weights;
