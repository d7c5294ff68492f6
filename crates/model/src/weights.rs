//! Weights read out of a GGUF file as the forward pass's types: matrices stay in their
//! block encoding over the mmap, norm vectors are dequantized to f32.

use tpserve_gguf::Gguf;

use crate::model::ModelError;
use crate::quant::{is_supported, QMatrix};

/// The 2-D weight `name` as a matrix `[rows, cols]` (ggml dims `[cols, rows]`), checking its
/// shape and that tpserve computes with its type.
pub fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
    let (t, bytes) = g.tensor_of_shape(name, &[cols, rows])?;
    if !is_supported(t.dtype) {
        return Err(ModelError::UnsupportedType { name: name.into(), dtype: t.dtype });
    }
    QMatrix::new(t.dtype, rows, cols, bytes).map_err(|source| ModelError::Tensor { name: name.into(), source })
}

/// The 1-D tensor `name` (a norm weight) of length `n`, dequantized to f32.
pub fn vector(g: &Gguf, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let (t, bytes) = g.tensor_of_shape(name, &[n])?;
    let m = QMatrix::new(t.dtype, 1, n, bytes).map_err(|source| ModelError::Tensor { name: name.into(), source })?;
    let mut out = vec![0f32; n];
    m.dequantize_row(0, &mut out);
    Ok(out)
}
