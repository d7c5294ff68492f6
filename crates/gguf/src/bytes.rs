//! [`TensorBytes`]: the bytes of one tensor, borrowed from the mapped file or owned.

use std::fmt;
use std::sync::Arc;

/// Bytes of one tensor: borrowed from the mmapped GGUF file, or owned (after a column
/// split, or made by tests).
#[derive(Clone)]
pub enum TensorBytes {
    /// `len` bytes at `offset` of a mapped file, shared by every matrix cut from it.
    Mmap {
        /// The whole file.
        map: Arc<memmap2::Mmap>,
        /// Where the tensor starts in it.
        offset: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// Bytes in memory.
    Owned(Arc<Vec<u8>>),
}

/// A tensor's byte range reaches past the end of the mapped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tensor bytes [{offset}, {offset}+{len}) lie outside the {file_len}-byte file")]
pub struct OutOfFile {
    /// Where the range starts.
    pub offset: usize,
    /// Its length.
    pub len: usize,
    /// The file's length.
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
