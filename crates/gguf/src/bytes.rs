//! [`TensorBytes`]: the bytes of one tensor, borrowed from the mapped file or owned.

use std::fmt;
use std::sync::Arc;

/// Bytes of one tensor: borrowed from the mmapped GGUF file, or owned (after a column
/// split, or made by tests).
#[derive(Clone)]
pub enum TensorBytes {
    /// `len` bytes at `offset` of a mapped file, shared by every matrix cut from it.
    Mmap {
        /// The whole file, kept mapped while any tensor cut from it is alive.
        map: Arc<memmap2::Mmap>,
        /// Byte offset of the tensor's first byte in the file.
        offset: usize,
        /// The tensor's length in bytes (not elements).
        len: usize,
    },
    /// Bytes in memory: a column split's rows copied out of the file (a tensor-parallel
    /// slice of input features is not contiguous in it), or bytes a test made.
    Owned(Arc<Vec<u8>>),
}

/// A tensor's byte range reaches past the end of the mapped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tensor bytes [{offset}, {offset}+{len}) lie outside the {file_len}-byte file")]
pub struct OutOfFile {
    /// Byte offset in the file where the range starts.
    pub offset: usize,
    /// The range's length in bytes.
    pub len: usize,
    /// The mapped file's length in bytes.
    pub file_len: usize,
}

impl TensorBytes {
    /// The bytes. An `Mmap` range outside the file reads as empty (which [`TensorBytes::check`]
    /// reports), so a corrupt tensor directory cannot cause a panic here.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Mmap { map, offset, len } => offset.checked_add(*len).and_then(|end| map.get(*offset..end)).unwrap_or(&[]),
            TensorBytes::Owned(v) => v,
        }
    }

    /// Checks an `Mmap` range against the file size.
    pub fn check(&self) -> Result<(), OutOfFile> {
        if let TensorBytes::Mmap { map, offset, len } = self {
            if offset.checked_add(*len).is_none_or(|end| end > map.len()) {
                return Err(OutOfFile { offset: *offset, len: *len, file_len: map.len() });
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorBytes::Mmap { offset, len, .. } => write!(f, "Mmap {{ offset: {offset}, len: {len} }}"),
            TensorBytes::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}
