//! Quantized weight formats (ggml block layouts) and the CPU kernels that multiply them.
//!
//! Weights stay in their GGUF block encoding; activations are quantized to 8 bits in blocks
//! of 32 with a scale each (Q8_0) right before each matmul, as llama.cpp does for the
//! 32-element formats (for k-quants llama.cpp takes one scale per 256, Q8_K; we keep one per
//! 32, which is closer to exact: see [`act`]), and an integer dot product runs per block. Kernels are picked at run time from the CPU's features.
//!
//! - [`GgmlDType`] (from `tpserve-gguf`): the type ids and block geometry; [`SUPPORTED`]:
//!   the types these kernels compute with.
//! - [`blocks`]: scalar reference dequantizers and simple quantizers for every supported type.
//! - [`act`]: activation quantization (Q8_0 bit-compatible with llama.cpp's).
//! - `scalar` / `avx2`: the weight-row · activation-row dot kernels.
//! - `packed`: weights repacked at load, 16 rows interleaved (in memory from `arena`: 2 MiB
//!   chunks on transparent huge pages); `avx512` / `gemm256`: the GEMM kernels over them
//!   (512-bit; 256-bit for AVX-VNNI CPUs without AVX-512 and for AVX2 CPUs without VNNI);
//!   `amx`: AMX tile kernels over the same layout, for matmuls of 16 tokens and more.
//! - [`kernels`]: run-time choice between them (`TPSERVE_KERNELS=scalar` forces the fallback).
//! - [`matrix`]: [`QMatrix`], the weight matrix type the model multiplies with.

pub mod act;
pub mod blocks;
pub mod kernels;
pub mod matrix;

#[cfg(target_arch = "x86_64")]
mod amx;
mod arena;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod gemm256;
mod packed;
mod scalar;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

pub use blocks::{dequantize, quantize};
pub use kernels::kernel_name;
pub use matrix::QMatrix;
pub use tpserve_gguf::{GgmlDType, TensorBytes};

/// Every tensor type tpserve loads and multiplies (the one list: error messages, tests and
/// the tiny test models use it).
pub const SUPPORTED: [GgmlDType; 9] =
    [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q5_0, GgmlDType::Q4_K, GgmlDType::Q5_K, GgmlDType::Q6_K, GgmlDType::F16, GgmlDType::BF16, GgmlDType::F32];

/// Whether tpserve can load and multiply tensors of this type.
pub fn is_supported(dtype: GgmlDType) -> bool {
    SUPPORTED.contains(&dtype)
}

/// The supported types as a list for messages ("Q8_0, Q4_0, ...").
pub fn supported_list() -> String {
    SUPPORTED.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// Why a quantized tensor could not be decoded, encoded, built or sliced; carries the
/// offending sizes so a bad GGUF file can be diagnosed from the message alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The tensor type has no kernels in tpserve.
    #[error("tensor type {0} is not supported (tpserve computes with {list})", list = supported_list())]
    Unsupported(GgmlDType),
    /// An element count (a row length, a buffer length) is not a whole number of blocks.
    #[error("{dtype}: {len} elements is not a multiple of the {block}-element block size")]
    NotBlockMultiple {
        /// The block type.
        dtype: GgmlDType,
        /// The element count given.
        len: usize,
        /// Elements per block of `dtype` (32, or 256 for k-quants; 1 for float types).
        block: usize,
    },
    /// The encoded bytes do not have the length the element count implies.
    #[error("{dtype}: {elems} elements need {expected} bytes, got {got}")]
    ByteLength {
        /// The block type.
        dtype: GgmlDType,
        /// Elements the shape says (rows × cols for a matrix).
        elems: usize,
        /// Bytes those elements take in `dtype`.
        expected: usize,
        /// Bytes actually there.
        got: usize,
    },
    /// The decoded output buffer has the wrong length.
    #[error("{dtype}: output buffer holds {got} values, expected {expected}")]
    OutputLength {
        /// The block type.
        dtype: GgmlDType,
        /// f32 values the input decodes to.
        expected: usize,
        /// Length of the buffer given.
        got: usize,
    },
    /// A matrix shape whose byte size overflows `usize`.
    #[error("{dtype}: shape {rows}x{cols} is too large")]
    ShapeOverflow {
        /// The block type.
        dtype: GgmlDType,
        /// Rows (output features) of the shape.
        rows: usize,
        /// Columns (input features) of the shape.
        cols: usize,
    },
    /// A tensor's byte range reaches past the end of the mapped file.
    #[error(transparent)]
    OutOfFile(#[from] tpserve_gguf::OutOfFile),
    /// A row or column range that is reversed or past the end.
    #[error("{axis} range [{start}, {end}) is invalid for size {size}")]
    BadRange {
        /// `"row"` or `"column"`.
        axis: &'static str,
        /// First index asked for.
        start: usize,
        /// One past the last index asked for.
        end: usize,
        /// Rows or columns the matrix has.
        size: usize,
    },
    /// A column split that would cut through a quantization block.
    #[error("{dtype}: column {col} is not on a {block}-element block boundary")]
    ColumnNotOnBlock {
        /// The block type.
        dtype: GgmlDType,
        /// The cut (a range's start or end) that is not a multiple of `block`.
        col: usize,
        /// Elements per block of `dtype`.
        block: usize,
    },
}
