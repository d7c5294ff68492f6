//! AMX GEMM kernels over weights repacked by [`super::packed`]: 16 rows × 16 tokens per
//! call, for Q8_0, Q4_0, Q5_0 and Q4_K, on Intel CPUs with AMX-INT8 (Sapphire Rapids and
//! later).
//!
//! The packed layout already is AMX's: a block's eight 64-byte code registers hold, in
//! register `g`, elements `4g..4g+4` of each of the 16 rows — the "VNNI" layout of a tile `B`
//! with 8 rows of K-quads and 16 columns. So one `tdpbsud` per *piece* of 32 values (a block;
//! a Q4_K sub-block) gives the exact integer dot products of 16 tokens × 16 rows, where the
//! AVX-512 VNNI kernel needs eight `vpdpbusd` per token. Tile `A` holds the signed activation
//! codes, laid out once per matmul ([`TileActs`]); Q4_0/Q5_0/Q4_K codes are first widened to
//! bytes as the VNNI kernel does and stored for the tile load (Q8_0's are loaded in place).
//!
//! After the tile product, everything is the VNNI kernel's per-lane arithmetic in its order:
//! the codes' offset comes off exactly as `offset · Σ a` (integers), then
//! `acc += (d_w · d_a) · dot` per token (Q4_K: `acc = fma(dot, (d · sc) · d_a, acc)` and the
//! mins per block). So these kernels give the scalar kernels' results bit for bit and are
//! batch-invariant like them: a token's result is the same whether its tile was full or
//! padded, and whichever kernel ran it.
//!
//! What bounds them is latency, not the tile unit: a tile load of bytes just stored, or a
//! vector load of a tile just stored, waits about 50 cycles, and a tile load from L2 stalls.
//! So [`pipeline`] issues each piece's product two pieces before its results are scaled,
//! widens codes four pieces ahead, and prefetches codes into L1; the caller walks a task's
//! groups over two token tiles at a time so that both sides stay in L1.
//!
//! The tiles need the kernel's permission (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked
//! once by [`available`]) and a tile configuration in each thread that runs them
//! ([`ensure_config`], loaded on a thread's first call). Rust has no stable AMX intrinsics;
//! the tile instructions are inline assembly.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::act::{BlockQ8K32, BlockQ8_0};
use super::avx512::{decode, prefetch};
use super::packed::{code_offset, layout};
use super::GgmlDType;

/// Tokens per tile (the rows of tile `A` and `C`): the most AMX takes.
pub(super) const TOKENS: usize = 16;

/// Whether this CPU and kernel let this process use AMX-INT8 tiles: CPUID says AMX-TILE and
/// AMX-INT8, the OS saves the tile state (XCR0 bits 17 and 18), and Linux granted the
/// permission to use it (asked here, once per process; the permission covers every thread).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !super::kernels::avx512_vnni_available() {
            return false;
        }
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512; XGETBV is available when
        // CPUID.1:ECX.OSXSAVE says so, checked first.
        let (tile, int8, os) = unsafe {
            let l7 = __cpuid_count(7, 0);
            let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
            let xcr0 = if osxsave { _xgetbv(0) } else { 0 };
            (l7.edx & (1 << 24) != 0, l7.edx & (1 << 25) != 0, xcr0 & (0b11 << 17) == 0b11 << 17)
        };
        tile && int8 && os && request_permission()
    })
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`); false
/// where refused or where the OS is not Linux.
fn request_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes the process's permitted xsave
        // features; it reads and writes no memory of ours.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The tile configuration (palette 1), two sets so that one piece's product runs while the
/// previous one's results are scaled: tmm0 / tmm3 = C, 16 tokens × 16 i32; tmm1 / tmm4 = A,
/// 16 tokens × 32 bytes; tmm2 / tmm5 = B, 8 K-quads × 64 bytes (16 rows × 4 codes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
                  // Bytes per row of tile i (u16 at byte 16 + 2i), then its rows (u8 at byte 48 + i).
        let mut set = 0;
        while set < 2 {
            let t = 3 * set;
            c[16 + 2 * t] = 64;
            c[16 + 2 * (t + 1)] = 32;
            c[16 + 2 * (t + 2)] = 64;
            c[48 + t] = TOKENS as u8;
            c[48 + t + 1] = TOKENS as u8;
            c[48 + t + 2] = 8;
            set += 1;
        }
        Self(c)
    }
}

static CONFIG: TileConfig = TileConfig::new();

thread_local! {
    /// Whether this thread has loaded [`CONFIG`] (nothing else in the process configures tiles).
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

/// Loads the tile configuration in this thread if it has not yet.
///
/// # Safety
/// [`available`] said yes.
#[inline]
unsafe fn ensure_config() {
    if !CONFIGURED.get() {
        asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(true);
    }
}

/// How many pieces ahead of their results' scaling the tile products are issued: the
/// scaling reads the tile's stored rows, which reach the cache tens of cycles later.
const ISSUE_AHEAD: usize = 2;

/// How many pieces ahead of their results' scaling the weight codes are widened: two more
/// than [`ISSUE_AHEAD`], as a tile load of bytes just stored waits for them the same way.
const DECODE_AHEAD: usize = ISSUE_AHEAD + 2;

/// 64-byte aligned scratch for one tile's bytes.
#[repr(C, align(64))]
struct Tile([u8; 1024]);

/// Bytes of activation codes per token in one tile product (a block of 32, or a Q4_K
/// sub-block of 32): tile A's row.
const PIECE: usize = 32;

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The activations' side of every tile product of one matmul, worked out once per matmul
/// instead of once per group of rows. A *piece* is what one tile product covers: a block of
/// 32 (Q8_0, Q4_0, Q5_0) or a sub-block of 32 (Q4_K). For token tile
/// `k` and piece `p`: the 16 tokens' codes back to back (64-byte aligned, so a tile load
/// reads whole lines), the integer each dot product starts from, the activation scale.
pub(super) struct TileActs {
    /// Pieces per token row.
    pieces: usize,
    /// `[tile][piece]`, `16 · PIECE` bytes each.
    codes: Vec<Line>,
    /// `[tile][piece][token]`: `-offset · Σ a`; empty for Q4_K (its offsets are the mins).
    init: Vec<i32>,
    /// `[tile][piece][token]`.
    scales: Vec<f32>,
    /// Q4_K: `[tile][block][j][token]`, the scaled sums `s[j]` the mins are taken off with.
    sums: Vec<f32>,
}

impl TileActs {
    /// For `acts` (`tiles · 16` tokens of `nb` blocks each, zero blocks past the real ones)
    /// multiplied with weights of `dtype` (Q8_0, Q4_0, Q5_0); `sums[i]` is `Σ acts[i].qs`.
    pub(super) fn new(dtype: GgmlDType, acts: &[BlockQ8_0], sums: &[i32], nb: usize) -> Self {
        assert_eq!(acts.len(), sums.len(), "a sum per activation block");
        let offset = code_offset(dtype);
        Self::build(acts, nb, 1, |i, a, _| (0, Some(-offset * sums[i]), a.d), |_, _| None)
    }

    /// For k-quant activations `acts` (as in [`Self::new`]) multiplied with Q4_K.
    pub(super) fn new_q4_k(acts: &[BlockQ8K32], nb: usize) -> Self {
        Self::build(acts, nb, 8, |_, a, j| (PIECE * j, None, a.d[j]), |a, j| Some(a.s[j]))
    }

    /// `piece(i, block, j)` (block `i` of `acts`) says where piece `j` of it starts in its codes, the
    /// integer its dot product starts from (None: Q4_K) and its scale; `sum(block, j)` the
    /// Q4_K sums (None for the others).
    fn build<B: Codes>(
        acts: &[B],
        nb: usize,
        per_block: usize,
        piece: impl Fn(usize, &B, usize) -> (usize, Option<i32>, f32),
        sum: impl Fn(&B, usize) -> Option<f32>,
    ) -> Self {
        assert!(nb > 0 && acts.len().is_multiple_of(nb * TOKENS), "whole tiles of {TOKENS} tokens");
        let tiles = acts.len() / (nb * TOKENS);
        let pieces = nb * per_block;
        let tile_bytes = TOKENS * PIECE;
        let mut codes = vec![Line([0; 64]); tiles * pieces * tile_bytes / 64];
        let (mut init, mut scales, mut sums) = (Vec::new(), Vec::with_capacity(tiles * pieces * TOKENS), Vec::new());
        for k in 0..tiles {
            for b in 0..nb {
                let index = |t: usize| (k * TOKENS + t) * nb + b;
                let token = |t: usize| &acts[index(t)];
                for j in 0..per_block {
                    let at = (k * pieces + b * per_block + j) * tile_bytes;
                    for t in 0..TOKENS {
                        let (from, start, d) = piece(index(t), token(t), j);
                        let o = at + t * PIECE;
                        let dst = &mut codes[o / 64].0[o % 64..o % 64 + PIECE];
                        for (d, &v) in dst.iter_mut().zip(&token(t).codes()[from..from + PIECE]) {
                            *d = v as u8;
                        }
                        init.extend(start);
                        scales.push(d);
                    }
                }
                for j in 0..per_block {
                    sums.extend((0..TOKENS).filter_map(|t| sum(token(t), j)));
                }
            }
        }
        Self { pieces, codes, init, scales, sums }
    }
}

/// The 8-bit codes of an activation block.
trait Codes {
    fn codes(&self) -> &[i8];
}

impl Codes for BlockQ8_0 {
    fn codes(&self) -> &[i8] {
        &self.qs
    }
}

impl Codes for BlockQ8K32 {
    fn codes(&self) -> &[i8] {
        &self.qs
    }
}

/// The tile products of one call, issued [`ISSUE_AHEAD`] pieces before `scale(p, c)` reads
/// piece `p`'s 16 × 16 dot products at `c` (row `t` = token `t`, lane = weight row), with
/// the weight side of piece `p` given by `weights(p, scratch)` [`DECODE_AHEAD`] pieces ahead
/// (the codes in place, or widened into `scratch`, 512 bytes) and the activation side at `a_at(p)`.
///
/// # Safety
/// AMX configured ([`ensure_config`]); the pointers the closures return are tiles of the
/// configured shapes (A: 16 × 32 bytes, B: 8 × 64 bytes).
#[inline(always)]
unsafe fn pipeline(pieces: usize, weights: impl Fn(usize, *mut u8) -> *const u8, a_at: impl Fn(usize) -> *const u8, mut scale: impl FnMut(usize, *const u8)) {
    // Scratch written before it is read (tile stores, widened codes): not zeroed per call.
    let mut c = [const { MaybeUninit::<Tile>::uninit() }; ISSUE_AHEAD + 1];
    let mut scratch = [const { MaybeUninit::<Tile>::uninit() }; DECODE_AHEAD + 1];
    let mut w = [std::ptr::null::<u8>(); DECODE_AHEAD + 1];
    let c: *mut Tile = c.as_mut_ptr().cast();
    let scratch: *mut Tile = scratch.as_mut_ptr().cast();
    let prepare = |w: &mut [*const u8], p: usize| w[p % (DECODE_AHEAD + 1)] = weights(p, scratch.add(p % (DECODE_AHEAD + 1)).cast());
    let issue = |p: usize, w: *const u8| {
        let (a, c) = (a_at(p), c.add(p % (ISSUE_AHEAD + 1)) as *mut u8);
        if p.is_multiple_of(2) {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{a} + {sa}*1]",
                "tileloadd tmm2, [{w} + {s64}*1]",
                "tdpbsud tmm0, tmm1, tmm2",
                "tilestored [{c} + {s64}*1], tmm0",
                a = in(reg) a, sa = in(reg) 32usize, w = in(reg) w, s64 = in(reg) 64usize, c = in(reg) c,
                options(nostack),
            );
        } else {
            asm!(
                "tilezero tmm3",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{w} + {s64}*1]",
                "tdpbsud tmm3, tmm4, tmm5",
                "tilestored [{c} + {s64}*1], tmm3",
                a = in(reg) a, sa = in(reg) 32usize, w = in(reg) w, s64 = in(reg) 64usize, c = in(reg) c,
                options(nostack),
            );
        }
    };
    (0..pieces.min(DECODE_AHEAD)).for_each(|p| prepare(&mut w, p));
    for p in 0..pieces.min(ISSUE_AHEAD) {
        issue(p, w[p % (DECODE_AHEAD + 1)]);
    }
    for p in 0..pieces {
        if p + DECODE_AHEAD < pieces {
            prepare(&mut w, p + DECODE_AHEAD);
        }
        // Later pieces' products run while this one's results are scaled.
        if p + ISSUE_AHEAD < pieces {
            issue(p + ISSUE_AHEAD, w[(p + ISSUE_AHEAD) % (DECODE_AHEAD + 1)]);
        }
        scale(p, c.add(p % (ISSUE_AHEAD + 1)) as *const u8);
    }
}

/// Asks for `bytes` at `src` into L2 [`prefetch`]'s distance ahead and into L1 two pieces
/// ahead: a tile load from L2 stalls the tile unit (the 262k-row Q8_0 head: 1.35 -> 1.5x the
/// VNNI kernel at 16-32 tokens with the L1 prefetch).
///
/// # Safety
/// SSE (every x86-64); prefetches never fault.
#[inline(always)]
unsafe fn prefetch_codes(src: *const u8, bytes: usize) {
    prefetch(src, bytes);
    for l in 0..bytes / 64 {
        _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(2 * bytes + 64 * l) as *const i8);
    }
}

/// Stores `w` (registers of 64 bytes) at `dst`, returning it.
///
/// # Safety
/// AVX-512F; `dst` 64-byte aligned and writable for `64 · w.len()` bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_codes(w: &[__m512i], dst: *mut u8) -> *const u8 {
    for (g, w) in w.iter().enumerate() {
        _mm512_store_si512(dst.add(64 * g) as *mut __m512i, *w);
    }
    dst
}

/// Writes one group's 16 rows of `acc` for the first `tn` tokens.
///
/// # Safety
/// `out.add(t * stride)` writable for the lanes set, `t < tn`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_out(acc: &[__m512; TOKENS], tn: usize, out: *mut f32, stride: usize, lanes: u16) {
    for (t, acc) in acc.iter().enumerate().take(tn) {
        _mm512_mask_storeu_ps(out.add(t * stride), lanes, *acc);
    }
}

/// One group of 16 rows · tokens `t0..t0 + tn` (`t0` a multiple of [`TOKENS`], `tn` ≤
/// [`TOKENS`]): `out[t * stride + l]` for the lanes set in `lanes`, bit-identical to
/// [`super::avx512::gemm_group`].
///
/// # Safety
/// [`available`] said yes; `group` a packed group of `dtype` (Q8_0, Q4_0 or Q5_0) with `nb`
/// blocks per row; `tiles` made by [`TileActs::new`] for `dtype` from activations of `nb`
/// blocks per token, at least `t0 + TOKENS` tokens; `out.add(t * stride)` writable for the
/// lanes set, `t < tn`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group(
    dtype: GgmlDType,
    group: &[u8],
    nb: usize,
    tiles: &TileActs,
    (t0, tn): (usize, usize),
    out: *mut f32,
    stride: usize,
    lanes: u16,
) {
    assert!(t0.is_multiple_of(TOKENS) && tn <= TOKENS && tiles.pieces == nb);
    assert!(tiles.init.len() >= (t0 + TOKENS) * nb && tiles.scales.len() == tiles.init.len());
    ensure_config();
    let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
    let group = group.as_ptr();
    let scales = group.add(nb * code_bytes);
    let tile = t0 / TOKENS;
    let init = tiles.init.as_ptr().add(t0 * nb);
    let da = tiles.scales.as_ptr().add(t0 * nb);
    let a_codes = tiles.codes.as_ptr().add(tile * nb * (TOKENS * PIECE / 64)) as *const u8;
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    let weights = |b: usize, scratch: *mut u8| {
        let src = group.add(b * code_bytes);
        prefetch_codes(src, code_bytes);
        if dtype == GgmlDType::Q8_0 {
            src
        } else {
            store_codes(&decode(dtype, src), scratch)
        }
    };
    pipeline(
        nb,
        weights,
        |b| a_codes.add(TOKENS * PIECE * b),
        |b, cb| {
            let (dab, cib) = (da.add(b * TOKENS), init.add(b * TOKENS));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * meta_bytes) as *const __m256i));
            // Written out token by token so that the accumulators stay in registers.
            macro_rules! scale {
            ($($t:literal)*) => {$({
                let raw = _mm512_load_si512(cb.add(64 * $t) as *const __m512i);
                let dot = _mm512_add_epi32(raw, _mm512_set1_epi32(*cib.add($t)));
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(*dab.add($t)));
                acc[$t] = _mm512_add_ps(acc[$t], _mm512_mul_ps(d, _mm512_cvtepi32_ps(dot)));
            })*};
        }
            scale!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        },
    );
    store_out(&acc, tn, out, stride, lanes);
}

/// [`gemm_group`] for Q4_K over k-quant activations, bit-identical to
/// [`super::avx512::gemm_group_k`]: per sub-block of 32, `acc = fma(dot, (d · sc) · d_a, acc)`,
/// and the mins taken off at the end of each block. (Q6_K stays on the VNNI kernel: its
/// sub-blocks of 16 make a tile product cost as much for half the work, 0.9x measured.)
///
/// # Safety
/// As [`gemm_group`], with `tiles` made by [`TileActs::new_q4_k`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group_q4_k(group: &[u8], nb: usize, tiles: &TileActs, (t0, tn): (usize, usize), out: *mut f32, stride: usize, lanes: u16) {
    let pieces = nb * 8;
    assert!(t0.is_multiple_of(TOKENS) && tn <= TOKENS && tiles.pieces == pieces);
    assert!(tiles.scales.len() >= (t0 + TOKENS) * pieces && tiles.sums.len() == tiles.scales.len());
    ensure_config();
    let (code_bytes, meta_bytes) = layout(GgmlDType::Q4_K).expect("a packed type");
    let group = group.as_ptr();
    let da = tiles.scales.as_ptr().add(t0 * pieces);
    let sums = tiles.sums.as_ptr().add(t0 * pieces);
    let a_codes = tiles.codes.as_ptr().add(t0 / TOKENS * pieces * (TOKENS * PIECE / 64)) as *const u8;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    let mut dw = _mm512_setzero_ps();
    let weights = |p: usize, scratch: *mut u8| {
        let (b, sub) = (p / 8, p % 8);
        let codes = group.add(b * code_bytes);
        if sub == 0 {
            prefetch_codes(codes, code_bytes);
        }
        let w: [__m512i; 8] = std::array::from_fn(|g| {
            let v = _mm512_load_si512(codes.add(64 * (8 * (sub / 2) + g)) as *const __m512i);
            if sub % 2 == 0 {
                _mm512_and_si512(v, low)
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low)
            }
        });
        store_codes(&w, scratch)
    };
    pipeline(
        pieces,
        weights,
        |p| a_codes.add(TOKENS * PIECE * p),
        |p, cb| {
            let (b, sub) = (p / 8, p % 8);
            let meta = group.add(nb * code_bytes + b * meta_bytes);
            if sub == 0 {
                dw = _mm512_cvtph_ps(_mm256_loadu_si256(meta as *const __m256i));
            }
            let v = _mm_loadu_si128(meta.add(64 + 16 * sub) as *const __m128i);
            let wsc = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)));
            let dap = da.add(p * TOKENS);
            macro_rules! scale {
                ($($t:literal)*) => {$({
                    let dot = _mm512_load_si512(cb.add(64 * $t) as *const __m512i);
                    let f = _mm512_mul_ps(wsc, _mm512_set1_ps(*dap.add($t)));
                    acc[$t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[$t]);
                })*};
            }
            scale!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            if sub == 7 {
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(meta.add(32) as *const __m256i));
                let m: [__m512; 8] = std::array::from_fn(|j| {
                    let v = _mm_loadu_si128(meta.add(192 + 16 * j) as *const __m128i);
                    _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)))
                });
                let sb = sums.add(b * 8 * TOKENS);
                macro_rules! mins {
                    ($($t:literal)*) => {$({
                        let mut mins = _mm512_setzero_ps();
                        for (j, m) in m.iter().enumerate() {
                            mins = _mm512_fmadd_ps(*m, _mm512_set1_ps(*sb.add(j * TOKENS + $t)), mins);
                        }
                        acc[$t] = _mm512_sub_ps(acc[$t], mins);
                    })*};
                }
                mins!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
        },
    );
    store_out(&acc, tn, out, stride, lanes);
}
