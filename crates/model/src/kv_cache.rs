//! The memory of the paged KV cache on one rank (layout: `tpserve_types::kv`). The scheduler
//! decides which block holds which positions of which sequence; this pool only stores them.
//! Each layer of the stage has `blocks * block_size` rows of keys and of values for its
//! group; a position `p` of a sequence lives in row `table[p / block_size] * block_size +
//! p % block_size`.
//!
//! Keys and values are stored as f16, as llama.cpp's default cache is: half the memory and
//! half the bytes a decode step's attention reads (which is what it waits on), for a
//! rounding that moves the default model's log-probabilities by 0.0007 nats on average
//! (`bench/accuracy_vs_exact.py`, docs/PERFORMANCE.md). Rounding happens once, when a
//! position is written, so every later read of it sees the same values.

use half::f16;
use tpserve_types::kv::{BlockId, KvLayout, NO_BLOCK};

/// One layer's keys and values: `[blocks * block_size, kv_dim]` each.
struct LayerPool {
    k: ZeroedF16,
    v: ZeroedF16,
}

/// Zeroed f16 values in pages of their own, mapped from the OS: untouched pages cost no
/// memory, and dropping the buffer gives every page back at once. (A `vec![0; n]` comes from
/// the allocator, which after a pool of the same size was freed serves it from its heap,
/// zeroing, and so touching, every page: a worker that re-loads would grow by the whole
/// pool each time.)
struct ZeroedF16 {
    map: Option<memmap2::MmapMut>,
    len: usize,
}

impl ZeroedF16 {
    fn new(len: usize) -> Result<Self, String> {
        if len == 0 {
            return Ok(Self { map: None, len });
        }
        let bytes = len.checked_mul(2).ok_or_else(|| format!("a KV pool of {len} values is too large"))?;
        let map = memmap2::MmapMut::map_anon(bytes).map_err(|e| format!("cannot reserve {bytes} bytes for the KV cache: {e}"))?;
        Ok(Self { map: Some(map), len })
    }
}

impl std::ops::Deref for ZeroedF16 {
    type Target = [f16];
    fn deref(&self) -> &[f16] {
        match &self.map {
            // SAFETY: the map is page-aligned (so f16-aligned), `len * 2` bytes long, lives as
            // long as `self`, and every bit pattern is a valid f16 (zero pages read 0.0).
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<f16>(), self.len) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for ZeroedF16 {
    fn deref_mut(&mut self) -> &mut [f16] {
        match &mut self.map {
            // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
            Some(m) => unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<f16>(), self.len) },
            None => &mut [],
        }
    }
}

/// The bookkeeping of a rank's KV cache, whatever memory holds it: the layout, which group
/// each of the stage's layers belongs to, and the checks of block tables against the pools.
#[derive(Debug, Clone)]
pub struct KvBook {
    layout: KvLayout,
    kv_dim: usize,
    /// Per local layer: the KV group of the layout it belongs to (its window decides it).
    groups: Vec<usize>,
    /// Next never-used block per group, for [`KvBook::grow`] (tests and one-off callers that
    /// do not run a scheduler).
    bump: Vec<usize>,
}

impl KvBook {
    /// The book of model layers `layers` (this stage's), `kv_dim` floats per position.
    pub fn new(layout: &KvLayout, layers: std::ops::Range<usize>, kv_dim: usize) -> Result<Self, String> {
        let groups = layers.map(|l| layout.group_of(l).ok_or_else(|| format!("layer {l} is in no KV group of the layout"))).collect::<Result<_, String>>()?;
        Ok(Self { bump: vec![0; layout.groups.len()], layout: layout.clone(), kv_dim, groups })
    }

    /// The layout the pools were sized by: the groups (and their block counts) that the
    /// block tables of [`crate::model::SeqChunk::tables`] index.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Floats of keys (or values) per position.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Local layers (the stage's).
    pub fn n_layers(&self) -> usize {
        self.groups.len()
    }

    /// The KV group of local layer `il`.
    pub fn group(&self, il: usize) -> usize {
        self.groups[il]
    }

    /// Whether a layer of this stage belongs to KV group `g`.
    pub fn uses_group(&self, g: usize) -> bool {
        self.groups.contains(&g)
    }

    /// Rows (positions) of local layer `il`'s pool: its group's blocks times the block size.
    pub fn rows(&self, il: usize) -> usize {
        self.layout.groups[self.groups[il]].blocks * self.layout.block_size
    }

    /// The pool row of position `p` of a sequence with block table `table`.
    pub fn row(&self, table: &[BlockId], p: usize) -> usize {
        let bs = self.layout.block_size;
        table[p / bs] as usize * bs + p % bs
    }

    /// Checks that `tables` (one per group) can hold positions `0..end` of a sequence whose
    /// chunk starts at `pos`: every block written or read is a real block of its pool.
    pub(crate) fn check(&self, tables: &[Vec<BlockId>], pos: usize, end: usize) -> Result<(), String> {
        if tables.len() != self.layout.groups.len() {
            return Err(format!("{} block tables for {} KV groups", tables.len(), self.layout.groups.len()));
        }
        for (gi, (g, t)) in self.layout.groups.iter().zip(tables).enumerate() {
            if !self.uses_group(gi) {
                continue;
            }
            let need = self.layout.blocks_for(end);
            if t.len() < need {
                return Err(format!("KV group {gi} has {} blocks for {end} positions (needs {need})", t.len()));
            }
            let first = self.layout.first_needed_block(g.window, pos);
            if let Some(&b) = t[first..need].iter().find(|&&b| b == NO_BLOCK || b as usize >= g.blocks) {
                let what = if b == NO_BLOCK { "no block".to_string() } else { format!("block {b}") };
                return Err(format!("KV group {gi} has {what} where the step needs one (the pool has {} blocks)", g.blocks));
            }
        }
        Ok(())
    }

    /// Appends never-used blocks to `tables` until they hold `len` positions. For callers
    /// without a scheduler (tests, one-off runs); blocks are never given back.
    pub fn grow(&mut self, tables: &mut Vec<Vec<BlockId>>, len: usize) -> Result<(), String> {
        tables.resize(self.layout.groups.len(), Vec::new());
        let need = self.layout.blocks_for(len);
        for (gi, t) in tables.iter_mut().enumerate() {
            while t.len() < need {
                if self.bump[gi] >= self.layout.groups[gi].blocks {
                    return Err(format!("KV group {gi} is out of blocks ({})", self.layout.groups[gi].blocks));
                }
                t.push(self.bump[gi] as BlockId);
                self.bump[gi] += 1;
            }
        }
        Ok(())
    }
}

/// Keys and values of every layer of this stage, for every sequence, in host memory.
pub struct KvPool {
    book: KvBook,
    layers: Vec<LayerPool>,
}

impl KvPool {
    /// A pool for model layers `layers` (this stage's), `kv_dim` floats per position. The
    /// memory is zeroed lazily by the OS: pages are touched only when a block is first used.
    pub fn new(layout: &KvLayout, layers: std::ops::Range<usize>, kv_dim: usize) -> Result<Self, String> {
        Self::with_book(KvBook::new(layout, layers, kv_dim)?)
    }

    /// The pool `book` describes.
    pub fn with_book(book: KvBook) -> Result<Self, String> {
        let layers = (0..book.n_layers())
            .map(|il| {
                let n = book.rows(il) * book.kv_dim();
                Ok(LayerPool { k: ZeroedF16::new(n)?, v: ZeroedF16::new(n)? })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { book, layers })
    }

    /// Writes the keys and values of positions `pos0..` (rows of `k`, `v`) of local layer
    /// `il`, rounded to f16 (to nearest, ties to even).
    pub(crate) fn write(&mut self, il: usize, table: &[BlockId], pos0: usize, k: &[f32], v: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        let d = self.book.kv_dim;
        let l = &mut self.layers[il];
        for (i, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            let row = self.book.row(table, pos0 + i) * d;
            l.k[row..row + d].convert_from_f32_slice(kr);
            l.v[row..row + d].convert_from_f32_slice(vr);
        }
    }

    /// Local layer `il`'s keys and values as seen through `table`.
    pub(crate) fn view<'a>(&'a self, il: usize, table: &'a [BlockId]) -> crate::attention::KvView<'a> {
        let l = &self.layers[il];
        crate::attention::KvView { k: &l.k, v: &l.v, table, block_size: self.book.layout.block_size }
    }
}

impl crate::ops::KvMemory for KvPool {
    fn book(&self) -> &KvBook {
        &self.book
    }

    fn book_mut(&mut self) -> &mut KvBook {
        &mut self.book
    }

    /// Bytes this pool reserves (keys and values, f16).
    fn bytes(&self) -> u64 {
        self.layers.iter().map(|l| ((l.k.len() + l.v.len()) * 2) as u64).sum()
    }
}
