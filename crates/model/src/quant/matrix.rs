//! [`QMatrix`]: a weight matrix in ggml blocks and its parallel quantized matmul.
//!
//! `matmul` quantizes the input rows once (Q8_0 blocks, gathered per 256 for k-quants), then
//! splits the weight rows over the *current* rayon pool (the caller sizes it with
//! `--threads` and runs us inside `pool.install`). Decode (n = 1) splits rows evenly over
//! the threads (on the calling thread alone below 32 KiB of weights, eight tasks per thread
//! above 4 MiB); prefill (n > 1) gives each task a chunk of weight rows small enough to stay
//! in L1/L2 while all token rows stream past it four at a time. With AVX2 or better,
//! Q8_0/Q4_0/Q5_0/Q4_K/Q6_K weights are first repacked (`packed`: 16 rows interleaved) and every
//! matmul, decode included, runs the GEMM kernels on them (`gemm256` with AVX2 or AVX-VNNI,
//! `avx512`, `amx`); the row kernels remain for the other types and the portable fallback. The
//! repacked layout lives on transparent huge pages (`arena`); so does, once
//! [`QMatrix::prepare`] ran, a copy of the file's rows for the row kernels, which they stream
//! 9-12% faster than the mapped file's 4 KiB pages.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use super::act::{BlockQ8K32, BlockQ8_0};
use super::arena::Region;
use super::blocks::QK_K;
use super::kernels::{
    activation_quantizers, active_isa, amx_available, avx2_available, avx512_vnni_available, avx_vnni_available, select, DotKernels, Isa, Kernel,
    QuantizeQ8K32, QuantizeQ8_0,
};
use super::packed::{packable, Packed, GROUP};
use super::{dequantize, is_supported, GgmlDType, QuantError};
use tpserve_gguf::TensorBytes;

/// A weight matrix W [rows = out features, cols = in features] (ggml dims `[cols, rows]`),
/// row-major in ggml blocks, over the file's mmap or an owned copy. Cloning and
/// [`QMatrix::slice_rows`] share the bytes.
#[derive(Clone)]
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// Encoded bytes per row: `cols / block_size * type_size`.
    row_bytes: usize,
    /// The encoded bytes, of which this matrix is `rows * row_bytes` from `start`.
    data: TensorBytes,
    /// Byte offset of row 0 within `data` (non-zero after `slice_rows`).
    start: usize,
    /// The rows repacked for the GEMM kernels (AVX2 and better), made on first use (shared by
    /// clones; a slice starts without).
    packed: Arc<OnceLock<Packed>>,
    /// For the row kernels, which read the file's layout: the rows copied onto huge pages
    /// by [`QMatrix::prepare`] (the mapped file's pages are 4 KiB; see `arena`). Shared by
    /// clones; a slice starts without.
    resident: Arc<OnceLock<Region>>,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMatrix {{ {} {}x{}, {:?} }}", self.dtype, self.rows, self.cols, self.data)
    }
}

/// Weight bytes of a prefill task: aim for this much so the chunk stays cache-resident.
const PREFILL_CHUNK_BYTES: usize = 24 * 1024;
/// Below this many weight bytes a decode matmul runs on the calling thread alone.
const SERIAL_BYTES: usize = 32 * 1024;
/// Above this many weight bytes a decode matmul is cut into several tasks per thread, so a
/// descheduled thread does not stall the whole (memory-bound) projection.
const MANY_TASKS_BYTES: usize = 4 << 20;

impl QMatrix {
    /// Wraps `data` as a `rows × cols` matrix of `dtype`; checks the type is supported, rows
    /// are whole blocks and the byte length is exact.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: TensorBytes) -> Result<Self, QuantError> {
        if !is_supported(dtype) {
            return Err(QuantError::Unsupported(dtype));
        }
        let row_bytes = dtype.bytes_for(cols).ok_or(QuantError::NotBlockMultiple { dtype, len: cols, block: dtype.block_size() })?;
        let expected = rows.checked_mul(row_bytes).ok_or(QuantError::ShapeOverflow { dtype, rows, cols })?;
        data.check()?;
        let got = data.as_slice().len();
        if got != expected {
            return Err(QuantError::ByteLength { dtype, elems: rows * cols, expected, got });
        }
        Ok(Self { dtype, rows, cols, row_bytes, data, start: 0, packed: Arc::default(), resident: Arc::default() })
    }

    /// The block type of the weights.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Encoded bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Encoded bytes of the whole matrix (what a matmul streams from memory).
    pub fn nbytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// The encoded rows, e.g. to write the matrix back to a file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data.as_slice()[self.start..self.start + self.nbytes()]
    }

    /// The encoded rows the row kernels read: the resident copy once made, else the file's.
    pub(crate) fn weights(&self) -> &[u8] {
        match self.resident.get() {
            Some(copy) => copy.as_slice(),
            None => self.as_bytes(),
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.weights()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Rows [start, end) — cheap, shares the bytes (tensor-parallel split of output features).
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<Self, QuantError> {
        if start > end || end > self.rows {
            return Err(QuantError::BadRange { axis: "row", start, end, size: self.rows });
        }
        Ok(Self { rows: end - start, start: self.start + start * self.row_bytes, packed: Arc::default(), resident: Arc::default(), ..self.clone() })
    }

    /// Columns [start, end) — copies; both ends must fall on a block boundary (tensor-parallel split of input features).
    pub fn slice_cols(&self, start: usize, end: usize) -> Result<Self, QuantError> {
        if start > end || end > self.cols {
            return Err(QuantError::BadRange { axis: "column", start, end, size: self.cols });
        }
        let block = self.dtype.block_size();
        if let Some(&col) = [start, end].iter().find(|&&c| c % block != 0) {
            return Err(QuantError::ColumnNotOnBlock { dtype: self.dtype, col, block });
        }
        let bpb = self.dtype.type_size();
        let (b0, b1) = (start / block * bpb, end / block * bpb);
        let mut bytes = Vec::with_capacity(self.rows * (b1 - b0));
        for r in 0..self.rows {
            bytes.extend_from_slice(&self.row(r)[b0..b1]);
        }
        Self::new(self.dtype, self.rows, end - start, TensorBytes::Owned(Arc::new(bytes)))
    }

    /// Dequantizes row r into out (len cols) — embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        dequantize(self.dtype, self.row(r), out).expect("QMatrix invariants guarantee a valid row");
    }

    /// Whether matmuls on `isa` run on the repacked layout.
    fn packs_for(&self, isa: Isa) -> bool {
        let cpu = match isa {
            Isa::Avx512Amx => amx_available(),
            Isa::Avx512Vnni => avx512_vnni_available(),
            Isa::AvxVnni => avx_vnni_available(),
            Isa::Avx2 => avx2_available(),
            Isa::Scalar => false,
        };
        cpu && packable(self.dtype)
    }

    /// The repacked rows, made now if this is the first call.
    fn packed(&self) -> &Packed {
        self.packed.get_or_init(|| Packed::new(self.dtype, self.rows, self.cols / self.dtype.block_size(), |r| self.row(r)))
    }

    /// Bytes of this matrix's repacked (or resident) copy, 0 while it has none.
    pub fn packed_bytes(&self) -> usize {
        self.packed.get().map_or(0, |p| p.nbytes()) + self.resident.get().map_or(0, |r| r.len())
    }

    /// Readies the weights for the kernels this process runs: repacked where those kernels
    /// have a layout of their own (otherwise the first matmul would repack them), else, where
    /// the system has transparent huge pages, copied as they are onto them, which the row
    /// kernels stream faster than the mapped file's 4 KiB pages (without `prepare` they read
    /// the file). [`Self::packed_bytes`] then says what that added.
    pub fn prepare(&self) {
        self.prepare_for(active_isa())
    }

    /// [`prepare`](Self::prepare) for the kernels of `isa` (tests prepare for each).
    pub(crate) fn prepare_for(&self, isa: Isa) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        if self.packs_for(isa) {
            self.packed();
        } else if super::arena::huge_pages_enabled() {
            self.resident.get_or_init(|| {
                let mut copy = Region::new(self.nbytes());
                copy.as_mut_slice().copy_from_slice(self.as_bytes());
                copy
            });
        }
    }

    /// [`matmul_with`](Self::matmul_with) on the repacked rows with the AMX or AVX-512 VNNI
    /// kernels, or their 256-bit twins on AVX-VNNI or AVX2 (the caller checked
    /// [`Self::packs_for`] for `isa`).
    fn matmul_packed(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32], q8_0: QuantizeQ8_0, q8_k32: QuantizeQ8K32) {
        let p = self.packed();
        let (rows, dtype) = (self.rows, self.dtype);
        if matches!(dtype, GgmlDType::Q4_K | GgmlDType::Q6_K) {
            let nb = self.cols / QK_K;
            // Q4_K on AMX tiles (Q6_K's sub-blocks of 16 do not pay: see `amx`).
            let (amx, tile, padded) = amx_plan(isa, n, dtype == GgmlDType::Q4_K);
            let mut acts = quantize_rows(x, n, nb, BlockQ8K32::ZERO, q8_k32);
            acts.resize(padded * nb, BlockQ8K32::ZERO);
            #[cfg(target_arch = "x86_64")]
            let tiles = amx.then(|| super::amx::TileActs::new_q4_k(&acts, nb));
            run_packed(p, n, tile, out, |g, (t0, tn), o, lanes| {
                assert!(acts.len() >= (t0 + tn) * nb);
                // SAFETY: `packs_for` checked the CPU; group g has `nb` blocks per row and the
                // token rows `nb` blocks each (asserted); `o` is token t0's
                // output at the group's first row, `rows` apart per token, lanes past `rows`
                // masked off: every write is in `out` and (see `OutPtr`) this task's own.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match &tiles {
                        Some(tiles) if worth_a_tile(tn) => super::amx::gemm_group_q4_k(p.group(g), nb, tiles, (t0, tn), o, rows, lanes),
                        Some(_) => in_vnni_calls((t0, tn), o, rows, |ts, o| super::avx512::gemm_group_k(dtype, p.group(g), nb, &acts, ts, o, rows, lanes)),
                        None if isa >= Isa::Avx512Vnni => super::avx512::gemm_group_k(dtype, p.group(g), nb, &acts, (t0, tn), o, rows, lanes),
                        None if isa == Isa::AvxVnni => super::gemm256::vnni::gemm_group_k(dtype, p.group(g), nb, &acts, (t0, tn), o, rows, lanes),
                        None => super::gemm256::avx2::gemm_group_k(dtype, p.group(g), nb, &acts, (t0, tn), o, rows, lanes),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("packed kernels need x86-64 {g} {t0} {tn} {o:?} {lanes} {amx}");
            });
        } else {
            let nb = self.cols / 32;
            let (amx, tile, padded) = amx_plan(isa, n, true);
            let mut acts = quantize_rows(x, n, nb, BlockQ8_0::ZERO, q8_0);
            acts.resize(padded * nb, BlockQ8_0::ZERO);
            let sums: Vec<i32> = acts.iter().map(|b| b.qs.iter().map(|&q| q as i32).sum()).collect();
            #[cfg(target_arch = "x86_64")]
            let tiles = amx.then(|| super::amx::TileActs::new(dtype, &acts, &sums, nb));
            run_packed(p, n, tile, out, |g, (t0, tn), o, lanes| {
                assert!(acts.len() >= (t0 + tn) * nb && sums.len() == acts.len());
                // SAFETY: as above, with `nb` sums per token; the AMX kernel reads a whole
                // tile of tokens from `tiles`, made from the padded activations (it asserts so).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match &tiles {
                        Some(tiles) if worth_a_tile(tn) => super::amx::gemm_group(dtype, p.group(g), nb, tiles, (t0, tn), o, rows, lanes),
                        Some(_) => in_vnni_calls((t0, tn), o, rows, |ts, o| super::avx512::gemm_group(dtype, p.group(g), nb, &acts, &sums, ts, o, rows, lanes)),
                        None if isa >= Isa::Avx512Vnni => super::avx512::gemm_group(dtype, p.group(g), nb, &acts, &sums, (t0, tn), o, rows, lanes),
                        None if isa == Isa::AvxVnni => super::gemm256::vnni::gemm_group(dtype, p.group(g), nb, &acts, &sums, (t0, tn), o, rows, lanes),
                        None => super::gemm256::avx2::gemm_group(dtype, p.group(g), nb, &acts, &sums, (t0, tn), o, rows, lanes),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("packed kernels need x86-64 {g} {t0} {tn} {o:?} {lanes} {amx}");
            });
        }
    }

    /// `out = x Wᵀ`: `out[t * rows + r] = Σ_c x[t * cols + c] · W[r, c]` for `t` in `0..n`,
    /// with `x` `[n, cols]` and `out` `[n, rows]` (panics on other lengths). `x` is quantized
    /// to 8-bit blocks first unless W is a float type (as llama.cpp does), so the result
    /// carries that rounding. Runs on the current rayon pool.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(active_isa(), x, n, out)
    }

    /// [`matmul`](Self::matmul) with an explicit kernel choice (tests compare both).
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_on(isa, self.packs_for(isa), x, n, out)
    }

    /// [`matmul_with`](Self::matmul_with) on the row kernels of `isa` (its dot kernels, AVX2's
    /// at most), packed layout or not: the benchmark's other side of the packed kernels.
    #[cfg(test)]
    pub(crate) fn matmul_rows(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_on(isa, false, x, n, out)
    }

    /// The matmul on `isa`'s packed kernels (`packed`, which the caller checked the CPU and
    /// type have) or its row kernels.
    fn matmul_on(&self, isa: Isa, packed: bool, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "matmul: input is not n x cols");
        assert_eq!(out.len(), n * self.rows, "matmul: output is not n x rows");
        if n == 0 || self.rows == 0 {
            return;
        }
        if self.cols == 0 {
            out.fill(0.0);
            return;
        }
        let (q8_0, q8_k32) = activation_quantizers(isa);
        if packed {
            return self.matmul_packed(isa, x, n, out, q8_0, q8_k32);
        }
        let kernel = select(self.dtype, isa).expect("QMatrix::new only accepts supported types");
        match kernel {
            Kernel::F32(k) => self.run(x, self.cols, n, &k, out),
            Kernel::Q8_0(k) => {
                let acts = quantize_rows(x, n, self.cols / 32, BlockQ8_0::ZERO, q8_0);
                self.run(&acts, self.cols / 32, n, &k, out)
            }
            Kernel::Q8K32(k) => {
                let acts = quantize_rows(x, n, self.cols / QK_K, BlockQ8K32::ZERO, q8_k32);
                self.run(&acts, self.cols / QK_K, n, &k, out)
            }
        }
    }

    /// The parallel row loop shared by all weight types; `acts` holds `n` rows of `per_tok`
    /// activation units (blocks, or floats for float weights).
    fn run<A: Sync>(&self, acts: &[A], per_tok: usize, n: usize, k: &DotKernels<A>, out: &mut [f32]) {
        let rows = self.rows;
        let threads = rayon::current_num_threads();
        // The rows as the kernels read them, looked up once (not per row).
        let weights = self.weights();
        let row = |r: usize| &weights[r * self.row_bytes..(r + 1) * self.row_bytes];
        if n == 1 {
            let one = k.one;
            let nbytes = self.nbytes();
            if threads == 1 || nbytes < SERIAL_BYTES {
                out.iter_mut().enumerate().for_each(|(r, o)| *o = one(row(r), acts));
                return;
            }
            let tasks = if nbytes > MANY_TASKS_BYTES { threads * 8 } else { threads };
            let chunk = rows.div_ceil(tasks);
            out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = one(row(ci * chunk + j), acts);
                }
            });
            return;
        }

        // Prefill: chunks of weight rows, each multiplied with all n token rows.
        let mut chunk = (PREFILL_CHUNK_BYTES / self.row_bytes).max(1);
        let min_tasks = threads * 4;
        if rows.div_ceil(chunk) < min_tasks {
            chunk = rows.div_ceil(min_tasks).max(1);
        }
        let ntasks = rows.div_ceil(chunk);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let task = |ti: usize| {
            let (r0, r1) = (ti * chunk, ((ti + 1) * chunk).min(rows));
            let act = |t: usize| &acts[t * per_tok..(t + 1) * per_tok];
            let w = &weights[r0 * self.row_bytes..r1 * self.row_bytes];
            let mut tile = vec![[0f32; 4]; r1 - r0];
            // Formats that are costly to decode are decoded once for all the task's tokens.
            let mut unpacked_rows = Vec::new();
            let (w, row_bytes, rows4) = match &k.unpacked {
                Some(u) if n >= 8 => {
                    (u.unpack)(w, &mut unpacked_rows);
                    (&unpacked_rows[..], self.row_bytes / self.dtype.type_size() * u.bytes_per_block, u.rows4)
                }
                _ => (w, self.row_bytes, k.rows4),
            };
            let mut t = 0;
            while t + 4 <= n {
                let a = [act(t), act(t + 1), act(t + 2), act(t + 3)];
                rows4(w, row_bytes, a, &mut tile);
                for (r, v) in (r0..r1).zip(&tile) {
                    for (j, &v) in v.iter().enumerate() {
                        // SAFETY: see `OutPtr`; (t + j) < n and r < rows.
                        unsafe { out_ptr.write((t + j) * rows + r, v) };
                    }
                }
                t += 4;
            }
            for t in t..n {
                for r in r0..r1 {
                    // SAFETY: see `OutPtr`; t < n and r < rows.
                    unsafe { out_ptr.write(t * rows + r, (k.one)(row(r), act(t))) };
                }
            }
        };
        if threads == 1 {
            (0..ntasks).for_each(task);
        } else {
            (0..ntasks).into_par_iter().for_each(task);
        }
    }
}

/// The group loop of the packed kernels: groups of 16 rows split over the current pool as
/// [`QMatrix::run`] splits rows, each group multiplied with up to `tile` tokens per call of
/// `kernel(group, (first token, tokens), output of its first row and token, live lanes)`
/// while its codes stay in L1.
fn run_packed(p: &Packed, n: usize, tile: usize, out: &mut [f32], kernel: impl Fn(usize, (usize, usize), *mut f32, u16) + Sync) {
    let (rows, groups) = (p.rows(), p.groups());
    assert_eq!(out.len(), n * rows, "packed matmul: output is not n x rows");
    let threads = rayon::current_num_threads();
    let group_bytes = p.blocks() * p.block_bytes();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let call = |g: usize, (t, tn): (usize, usize)| {
        let r0 = g * GROUP;
        let live = (rows - r0).min(GROUP);
        let lanes = if live == GROUP { u16::MAX } else { (1u16 << live) - 1 };
        // SAFETY: t < n and r0 < rows, so the index is in `out` (asserted length).
        kernel(g, (t, tn), unsafe { out_ptr.at(t * rows + r0) }, lanes);
    };
    let tiles = |from: usize, to: usize| (from..to).step_by(tile).map(move |t| (t, (to - t).min(tile)));
    let task = |g0: usize, g1: usize| {
        if tile > TILE_TOKENS {
            // AMX tiles (and the 256-bit kernels' calls): the task's groups (about
            // PREFILL_CHUNK_BYTES of codes) for two token tiles at a time, so that both the codes and the tiles' activations stay in L1
            // (a tile load from L2 stalls). All tokens per group instead: 1.26x the VNNI
            // kernel at 512 tokens, not 1.48x; one tile at a time over the groups: the
            // 262k-row head at 32 tokens 1.02x, not 1.45x.
            for t0 in (0..n).step_by(2 * tile) {
                (g0..g1).for_each(|g| tiles(t0, (t0 + 2 * tile).min(n)).for_each(|t| call(g, t)));
            }
        } else {
            (g0..g1).for_each(|g| tiles(0, n).for_each(|t| call(g, t)));
        }
    };
    let bytes = groups * group_bytes;
    let tasks = if threads == 1 || (n == 1 && bytes < SERIAL_BYTES) {
        1
    } else if n == 1 {
        if bytes > MANY_TASKS_BYTES {
            threads * 8
        } else {
            threads
        }
    } else {
        groups.div_ceil((PREFILL_CHUNK_BYTES / group_bytes).max(1)).max(threads * 4)
    };
    let chunk = groups.div_ceil(tasks.min(groups));
    if tasks == 1 {
        task(0, groups);
    } else {
        (0..groups.div_ceil(chunk)).into_par_iter().for_each(|c| task(c * chunk, ((c + 1) * chunk).min(groups)));
    }
}

#[cfg(target_arch = "x86_64")]
const TILE_TOKENS: usize = super::avx512::TOKENS;
#[cfg(not(target_arch = "x86_64"))]
const TILE_TOKENS: usize = 1;

/// Tokens per call of the 256-bit kernels, which run them four at a time and decode a half
/// group's codes once per call (see `gemm256`): of 8, 16, 32 and 64, 32 and 64 were fastest
/// (Q5_0 at 32 tokens 65 GMAC/s at 8, 74-76 at 32-64; Q6_K 42 and 49-51).
const GEMM256_TOKENS: usize = 32;

/// Tokens per AMX tile.
#[cfg(target_arch = "x86_64")]
const AMX_TOKENS: usize = super::amx::TOKENS;
#[cfg(not(target_arch = "x86_64"))]
const AMX_TOKENS: usize = 16;

/// The fewest tokens a matmul runs on AMX tiles with; below, the AVX-512 VNNI kernels (one
/// tile product costs the same at 1 token as at 16).
const AMX_MIN_TOKENS: usize = 16;

/// Whether a matmul of `n` tokens on `isa` runs on AMX tiles (`eligible`: its weight type
/// has tile kernels), with the token tile `run_packed` cuts and how many tokens the
/// activations are padded to with zero blocks (tiles read 16 tokens).
fn amx_plan(isa: Isa, n: usize, eligible: bool) -> (bool, usize, usize) {
    if eligible && isa == Isa::Avx512Amx && n >= AMX_MIN_TOKENS {
        (true, AMX_TOKENS, n.next_multiple_of(AMX_TOKENS))
    } else if matches!(isa, Isa::Avx2 | Isa::AvxVnni) {
        (false, GEMM256_TOKENS, n)
    } else {
        (false, TILE_TOKENS, n)
    }
}

/// Whether a tile of `tn` tokens goes to the tile kernel: a padded tile costs as much as a
/// full one, about 12 tokens' worth of the VNNI kernel; fewer go to the VNNI kernel, which
/// gives the same numbers.
fn worth_a_tile(tn: usize) -> bool {
    4 * tn >= 3 * AMX_TOKENS
}

/// `kernel((first token, tokens), output)` over tokens `t0..t0 + tn` in calls of at most
/// [`TILE_TOKENS`], each with its tokens' output (`rows` apart per token) from `o`.
///
/// # Safety
/// `o` points at token `t0`'s output of a group, with `tn` tokens' outputs after it.
#[cfg(target_arch = "x86_64")]
unsafe fn in_vnni_calls((t0, tn): (usize, usize), o: *mut f32, rows: usize, mut kernel: impl FnMut((usize, usize), *mut f32)) {
    for t in (0..tn).step_by(TILE_TOKENS) {
        kernel((t0 + t, (tn - t).min(TILE_TOKENS)), o.add(t * rows));
    }
}

/// The output of a prefill matmul, written by parallel tasks whose rows interleave in memory.
///
/// SAFETY: `run` creates it from `out: &mut [f32]` with `out.len() == n * rows` (asserted in
/// `matmul_with`) and holds that exclusive borrow until every task has finished. Task `ti`
/// writes only indices `t * rows + r` with `t < n` and `r` in its own row range
/// `[ti * chunk, (ti + 1) * chunk)`, ranges of different tasks are disjoint, and nothing reads
/// `out` meanwhile, so every write is in bounds and no two threads touch the same element.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: see the type's documentation: the pointer is only used for disjoint writes while
// the owning `&mut [f32]` is borrowed by `run`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The address of element `i` (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `i` must be in bounds of the output.
    #[inline(always)]
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }

    /// # Safety
    /// `i` must be in bounds of the output and written by no other task.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Quantizes `n` rows of `x` into `n * per_row` activation blocks, in parallel when large.
fn quantize_rows<B: Copy + Send + Sync>(x: &[f32], n: usize, per_row: usize, zero: B, f: impl Fn(&[f32], &mut [B]) + Sync) -> Vec<B> {
    let mut acts = vec![zero; n * per_row];
    let cols = x.len() / n;
    if n >= 8 && x.len() >= 1 << 15 && rayon::current_num_threads() > 1 {
        acts.par_chunks_mut(per_row).zip(x.par_chunks(cols)).for_each(|(b, x)| f(x, b));
    } else {
        acts.chunks_mut(per_row).zip(x.chunks(cols)).for_each(|(b, x)| f(x, b));
    }
    acts
}
