//! Writes GGUF files: tests make tiny random-weight models with it, and the fuzz target's
//! seed corpus comes from it.

use super::Value;
use crate::GgmlDType;

/// Builds a GGUF (version 3) file in memory: metadata and tensors in the order they were
/// added, tensor data 32-byte aligned (the default, so no `general.alignment` key is needed).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    /// (name, ggml dims, type, encoded bytes)
    tensors: Vec<(String, Vec<u64>, GgmlDType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds metadata key `key`; the caller picks the GGUF type through the [`Value`] variant
    /// (readers of a real model expect llama.cpp's types, e.g. `U32` counts). A repeated key
    /// is written twice and the reader keeps the last.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Adds a tensor; `dims` are in ggml order (fastest-varying first) and `bytes` are
    /// already encoded in `dtype`'s block format.
    pub fn tensor(&mut self, name: &str, dims: &[u64], dtype: GgmlDType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), dtype, bytes));
        self
    }

    /// The whole file. Nothing is checked: `bytes` need not match `dims` and `dtype`, so tests
    /// can build the damaged files the parser must refuse.
    pub fn to_bytes(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, dtype, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.to_u32().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len()).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = out.len().div_ceil(ALIGN) * ALIGN;
        out.resize(data_start, 0);
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Writes [`GgufWriter::to_bytes`] to `path`, replacing any file there.
    pub fn write(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u32.
            let item_ty = items.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}
