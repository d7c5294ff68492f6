//! Quantized weight formats (ggml block layouts) and the CPU kernels that multiply them.
//!
//! Weights stay in their GGUF block encoding; activations are quantized to 8 bits (Q8_0 or
//! Q8_K blocks) right before each matmul, as llama.cpp does, and an integer dot product
//! runs per block. Kernels are picked at run time from the CPU's features.
//!
//! - [`dtype`]: [`GgmlDType`], the type ids and block geometry.
//! - [`blocks`]: scalar reference dequantizers and simple quantizers for every supported type.
//! - [`act`]: activation quantization to Q8_0 / Q8_K, bit-compatible with llama.cpp.
//! - `scalar` / `avx2`: the weight-row · activation-row dot kernels.
//! - [`kernels`]: run-time choice between them (`TPSERVE_KERNELS=scalar` forces the fallback).
//! - [`matrix`]: [`QMatrix`], the weight matrix type the model multiplies with.

pub mod act;
pub mod blocks;
pub mod dtype;
pub mod kernels;
pub mod matrix;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

pub use blocks::{dequantize, quantize};
pub use dtype::GgmlDType;
pub use kernels::kernel_name;
pub use matrix::{QMatrix, WeightBytes};

/// Why a quantized tensor could not be decoded, encoded, built or sliced; carries the
/// offending sizes so a bad GGUF file can be diagnosed from the message alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The tensor type has no kernels in tpserve.
    #[error("tensor type {0} is not supported")]
    Unsupported(GgmlDType),
    /// An element count (a row length, a buffer length) is not a whole number of blocks.
    #[error("{dtype}: {len} elements is not a multiple of the {block}-element block size")]
    NotBlockMultiple { dtype: GgmlDType, len: usize, block: usize },
    /// The encoded bytes do not have the length the element count implies.
    #[error("{dtype}: {elems} elements need {expected} bytes, got {got}")]
    ByteLength { dtype: GgmlDType, elems: usize, expected: usize, got: usize },
    /// The decoded output buffer has the wrong length.
    #[error("{dtype}: output buffer holds {got} values, expected {expected}")]
    OutputLength { dtype: GgmlDType, expected: usize, got: usize },
    /// A matrix shape whose byte size overflows `usize`.
    #[error("{dtype}: shape {rows}x{cols} is too large")]
    ShapeOverflow { dtype: GgmlDType, rows: usize, cols: usize },
    /// A tensor's byte range reaches past the end of the mapped file.
    #[error("tensor bytes [{offset}, {offset}+{len}) lie outside the {file_len}-byte file")]
    OutOfFile { offset: usize, len: usize, file_len: usize },
    /// A row or column range that is reversed or past the end.
    #[error("{axis} range [{start}, {end}) is invalid for size {size}")]
    BadRange { axis: &'static str, start: usize, end: usize, size: usize },
    /// A column split that would cut through a quantization block.
    #[error("{dtype}: column {col} is not on a {block}-element block boundary")]
    ColumnNotOnBlock { dtype: GgmlDType, col: usize, block: usize },
}
