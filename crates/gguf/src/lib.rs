//! `tpserve-gguf`: GGUF, the llama.cpp model file format: a header, typed metadata, a tensor
//! directory, and the tensor bytes (which we mmap and never copy unless a tensor-parallel
//! split needs to). It knows the format, not what the tensors mean: the forward pass
//! (`tpserve-model`) and the tokenizer (`tpserve-tokenizer`) read their parts out of it.
//!
//! - [`Gguf`]: an opened file; [`Value`] and [`TensorInfo`]: its metadata and directory.
//! - [`GgmlDType`]: the tensor element types and their block geometry.
//! - [`TensorBytes`]: one tensor's bytes, borrowed from the mmap or owned.
//! - [`GgufWriter`]: writes files (tests, fuzz seeds, tiny models).
//!
//! The parser trusts nothing in the file: every length is bounds-checked against the bytes
//! actually present, so a truncated or hostile file is an error, never a panic or a huge
//! allocation (`fuzz/` runs it under libFuzzer).

mod bytes;
mod dtype;
mod writer;

pub use bytes::{OutOfFile, TensorBytes};
pub use dtype::GgmlDType;
pub use writer::GgufWriter;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// More dimensions than this is not a tensor any model uses; refuse rather than allocate.
const MAX_DIMS: u32 = 8;

/// Everything that can be wrong with a GGUF file. Apart from `Io`, every variant means the
/// file is damaged or is not a model tpserve can run: re-download it or pick another file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped (missing, unreadable, a directory...).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file we tried to open.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`: another format (safetensors, an HTML error page
    /// saved as the download...).
    #[error("not a GGUF file: the magic bytes are {found:?}, expected \"GGUF\"")]
    BadMagic {
        /// The file's first four bytes.
        found: [u8; 4],
    },
    /// A GGUF version other than 2 or 3 (version 1 had 32-bit counts; newer ones are unknown).
    #[error("unsupported GGUF version {0} (tpserve reads versions 2 and 3)")]
    Version(u32),
    /// The file ends (or a count claims more items than the bytes left can hold) in the
    /// middle of the header, metadata or tensor directory: an interrupted download.
    #[error("GGUF file is truncated: needed {needed} bytes at offset {offset} while reading {what}, but the file has {len} bytes; re-download it")]
    Truncated {
        /// The part being read ("metadata key", "tensor dims"...).
        what: &'static str,
        /// Byte offset in the file where it starts.
        offset: usize,
        /// Bytes it needs from `offset` on.
        needed: usize,
        /// Bytes the file (or buffer) has in all.
        len: usize,
    },
    /// A metadata value (or array element) type id outside GGUF's 0..=12, or arrays nested
    /// deeper than 5 levels.
    #[error("GGUF metadata value type {0} is unknown")]
    BadValueType(u32),
    /// A key or tensor name is not UTF-8 (string *values* are decoded lossily instead,
    /// because some tokenizers store raw bytes in them).
    #[error("GGUF string at offset {offset} is not valid UTF-8")]
    BadUtf8 {
        /// Byte offset of the string's first byte.
        offset: usize,
    },
    /// A tensor claims more than 8 dimensions: refused rather than allocated for.
    #[error("tensor {name:?} has {n_dims} dimensions (at most {MAX_DIMS} are supported)")]
    TooManyDims {
        /// The tensor's name in the directory.
        name: String,
        /// The dimension count it claims.
        n_dims: u32,
    },
    /// A tensor's ggml type id is not one [`GgmlDType`] knows (a newer quantization, or
    /// corruption).
    #[error("tensor {name:?} has unknown ggml type id {id}")]
    UnknownType {
        /// The tensor's name in the directory.
        name: String,
        /// The type id found in the file.
        id: u32,
    },
    /// A tensor's element count is not a whole number of its type's blocks (or overflows
    /// u64), so its byte size is undefined.
    #[error("tensor {name:?} has shape {shape:?} that is not a whole number of {dtype} blocks")]
    BadShape {
        /// The tensor's name in the directory.
        name: String,
        /// Its dimensions in ggml order (`shape[0]` is the row length).
        shape: Vec<u64>,
        /// Its element type, whose block size the element count must be a multiple of.
        dtype: GgmlDType,
    },
    /// A tensor's bytes reach past the end of the file: a truncated download.
    #[error("tensor {name:?} lies outside the file (bytes {start}..{end}, file has {len}); the file is truncated or corrupt")]
    TensorOutOfBounds {
        /// The tensor's name in the directory.
        name: String,
        /// Absolute file offset of its first byte (`u64::MAX` if that overflows).
        start: u64,
        /// Absolute file offset just past its last byte (`u64::MAX` if that overflows).
        end: u64,
        /// Bytes the file has.
        len: u64,
    },
    /// `general.alignment` is 0, not a power of two, or not an integer.
    #[error("GGUF alignment {0} is not a power of two")]
    BadAlignment(u64),
    /// A tensor the caller asked for by name is not in the directory: the file is of another
    /// architecture, or was converted without it.
    #[error("model file has no tensor named {0:?}")]
    MissingTensor(String),
    /// [`Gguf::tensor_of_shape`] found the tensor with other dimensions than the model's
    /// hyperparameters imply: the metadata and the weights disagree.
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name in the directory.
        name: String,
        /// The dimensions asked for, in ggml order.
        expected: Vec<usize>,
        /// The dimensions in the file, in ggml order.
        got: Vec<usize>,
    },
    /// A metadata key a `get_*` accessor needs is absent.
    #[error("metadata key {key:?} is missing")]
    MissingKey {
        /// The GGUF key, e.g. `gemma3.block_count`.
        key: String,
    },
    /// A metadata key holds a value of a type the accessor cannot convert (a string where a
    /// number is needed...).
    #[error("metadata key {key:?} has the wrong type: expected {expected}, found {found}")]
    WrongKeyType {
        /// The GGUF key.
        key: String,
        /// What the accessor accepts ("string", "integer", "number").
        expected: &'static str,
        /// [`Value::type_name`] of what the file holds.
        found: &'static str,
    },
}

/// One metadata value, in the GGUF type it was written as (value type ids 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Type id 0.
    U8(u8),
    /// Type id 1.
    I8(i8),
    /// Type id 2.
    U16(u16),
    /// Type id 3.
    I16(i16),
    /// Type id 4; the usual type of counts and token ids, though writers vary.
    U32(u32),
    /// Type id 5; token types (`tokenizer.ggml.token_type`) are stored as these.
    I32(i32),
    /// Type id 10.
    U64(u64),
    /// Type id 11.
    I64(i64),
    /// Type id 6; hyperparameters such as `rope.freq_base` and token scores.
    F32(f32),
    /// Type id 12.
    F64(f64),
    /// Type id 7 (one byte, non-zero is true).
    Bool(bool),
    /// Type id 8: length-prefixed UTF-8 (invalid bytes become U+FFFD).
    String(String),
    /// Type id 9: items all of one type, nested at most 5 deep (the vocabulary is one).
    Array(Vec<Value>),
}

impl Value {
    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type as u64 (GGUF writers disagree on u32 vs i32 vs u64); a bool as 0 or 1.
    /// `None` for negative integers, floats, strings and arrays.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    /// Any float, or any integer [`Value::as_u64`] accepts, as f64 (so a negative integer is
    /// `None`, as are strings and arrays).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The text of a `String` value; `None` for every other type (no number formatting).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items of an `Array` value (`tokenizer.ggml.tokens`, `.scores`...); `None` otherwise.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file. The parser has checked that `offset..offset + nbytes`
/// lies inside the file and that `nbytes` is exactly what `dims` and `dtype` need.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`); also the key in [`Gguf::tensors`].
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (the row length, i.e. input features).
    pub dims: Vec<u64>,
    /// Element type; quantized types store whole blocks along `dims[0]`.
    pub dtype: GgmlDType,
    /// Absolute byte offset in the file: the aligned start of the data section plus the
    /// offset the directory gives.
    pub offset: u64,
    /// Byte length of the encoded tensor: elements / block size × bytes per block.
    pub nbytes: u64,
}

/// Metadata keys and their values.
pub type Metadata = BTreeMap<String, Value>;
/// The tensor directory by name.
pub type Tensors = BTreeMap<String, TensorInfo>;

/// An opened GGUF file: parsed header, metadata and tensor directory over an mmap.
pub struct Gguf {
    /// GGUF format version from the header: 2 or 3 (the only ones the parser accepts).
    pub version: u32,
    /// Every metadata key-value pair (`general.architecture`, `tokenizer.ggml.*`, the
    /// architecture's hyperparameters), sorted by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory by tensor name; every entry's bytes are inside the file.
    pub tensors: BTreeMap<String, TensorInfo>,
    map: Arc<memmap2::Mmap>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf").field("version", &self.version).field("metadata_keys", &self.metadata.len()).field("tensors", &self.tensors.len()).finish()
    }
}

impl Gguf {
    /// Opens and parses a GGUF file. Tensor bytes are mmapped, not read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a model file changed under a running server is
        // undefined behaviour we accept, as llama.cpp and candle do.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let map = Arc::new(map);
        let (version, metadata, tensors) = parse(&map)?;
        Ok(Self { version, metadata, tensors, map })
    }

    /// Parses GGUF bytes already in memory (the fuzz target and tests use this).
    pub fn parse_bytes(bytes: &[u8]) -> Result<(Metadata, Tensors), GgufError> {
        parse(bytes).map(|(_, m, t)| (m, t))
    }

    /// The value of metadata key `key`, for keys that are optional or of varying type.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required string key; `MissingKey` or `WrongKeyType` name the key otherwise.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { key: key.into() })?;
        v.as_str().ok_or_else(|| GgufError::WrongKeyType { key: key.into(), expected: "string", found: v.type_name() })
    }

    /// A required integer key, whatever integer type the writer used (see [`Value::as_u64`]).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { key: key.into() })?;
        v.as_u64().ok_or_else(|| GgufError::WrongKeyType { key: key.into(), expected: "integer", found: v.type_name() })
    }

    /// A required numeric key (float or integer; see [`Value::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { key: key.into() })?;
        v.as_f64().ok_or_else(|| GgufError::WrongKeyType { key: key.into(), expected: "number", found: v.type_name() })
    }

    /// The directory entry of tensor `name`, or `MissingTensor`.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors.get(name).ok_or_else(|| GgufError::MissingTensor(name.into()))
    }

    /// The raw bytes of a tensor, borrowed from the mmap.
    pub fn tensor_bytes(&self, name: &str) -> Result<TensorBytes, GgufError> {
        let t = self.tensor_info(name)?;
        Ok(TensorBytes::Mmap { map: self.map.clone(), offset: t.offset as usize, len: t.nbytes as usize })
    }

    /// The tensor `name` with its bytes, checked to have exactly the ggml dimensions `dims`
    /// (`dims[0]` fastest-varying: a `[rows, cols]` matrix is `[cols, rows]`).
    pub fn tensor_of_shape(&self, name: &str, dims: &[usize]) -> Result<(&TensorInfo, TensorBytes), GgufError> {
        let t = self.tensor_info(name)?;
        let got: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if got != dims {
            return Err(GgufError::ShapeMismatch { name: name.into(), expected: dims.to_vec(), got });
        }
        Ok((t, self.tensor_bytes(name)?))
    }

    /// Total bytes of the file.
    pub fn file_len(&self) -> usize {
        self.map.len()
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated { what, offset: self.pos, needed: n, len: self.bytes.len() }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be satisfiable by the remaining bytes (each item at least
    /// `min_item` bytes), so a corrupt count cannot make us allocate gigabytes.
    fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item.max(1) as u64) > remaining {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n.saturating_mul(min_item as u64).min(usize::MAX as u64) as usize,
                len: self.bytes.len(),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.count(1, what)?;
        let offset = self.pos;
        let s = self.take(n, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_owned()),
            // Some tokenizers store raw bytes; keep them readable rather than refusing the file.
            Err(_) if what == "metadata string" => Ok(String::from_utf8_lossy(s).into_owned()),
            Err(_) => Err(GgufError::BadUtf8 { offset }),
        }
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => Value::Bool(self.array::<1>("bool")?[0] != 0),
            8 => Value::String(self.string("metadata string")?),
            9 => {
                if depth > 4 {
                    return Err(GgufError::BadValueType(ty));
                }
                let item_ty = self.u32("array type")?;
                let min_item = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    other => return Err(GgufError::BadValueType(other)),
                };
                let n = self.count(min_item, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(GgufError::BadValueType(other)),
        })
    }
}

type Parsed = (u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>);

fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    // A tensor entry is at least 8 (name len) + 4 + 8 + 4 + 8 bytes; a KV at least 8 + 4 + 1.
    let n_tensors = c.count(32, "tensor count")?;
    let n_kv = c.count(13, "metadata count")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let value = c.value(ty, 0)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        Some(v) => v.as_u64().unwrap_or(0),
        None => DEFAULT_ALIGNMENT,
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(alignment));
    }

    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor dims")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("tensor dim")?);
        }
        let type_id = c.u32("tensor type")?;
        let dtype = GgmlDType::from_u32(type_id).ok_or(GgufError::UnknownType { name: name.clone(), id: type_id })?;
        let rel_offset = c.u64("tensor offset")?;
        infos.push((name, dims, dtype, rel_offset));
    }

    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let len = bytes.len() as u64;
    let mut tensors = BTreeMap::new();
    for (name, dims, dtype, rel_offset) in infos {
        let n_elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let nbytes = n_elems.filter(|n| n % dtype.block_size() as u64 == 0).and_then(|n| (n / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64));
        let Some(nbytes) = nbytes else {
            return Err(GgufError::BadShape { name, shape: dims, dtype });
        };
        let start = data_start.checked_add(rel_offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= len => {
                tensors.insert(name.clone(), TensorInfo { name, dims, dtype, offset: start, nbytes });
            }
            _ => return Err(GgufError::TensorOutOfBounds { name, start: start.unwrap_or(u64::MAX), end: end.unwrap_or(u64::MAX), len }),
        }
    }
    Ok((version, metadata, tensors))
}
