//! AMX GEMM kernels for the 32-element formats (Q8_0, Q4_0, Q5_0) over weights repacked by
//! [`super::packed`]: 16 rows × 16 tokens per call, on Intel CPUs with AMX-INT8 (Sapphire
//! Rapids and later).
//!
//! The packed layout already is AMX's: a block's eight 64-byte code registers hold, in
//! register `g`, elements `4g..4g+4` of each of the 16 rows — the "VNNI" layout of a tile `B`
//! with 8 rows of K-quads and 16 columns. So per block one `tdpbsud` (signed activations in
//! tile `A`, 16 tokens × 32 bytes read in place from the quantized activations; unsigned
//! codes in tile `B`) gives the exact integer dot products of 16 tokens × 16 rows, where the
//! AVX-512 VNNI kernel needs eight `vpdpbusd` per token. Q4_0/Q5_0 codes are first widened to
//! bytes as the VNNI kernel does ([`super::avx512::decode`]) and stored for the tile load.
//!
//! After the tile product, everything is the VNNI kernel's per-lane arithmetic in its order:
//! the codes' offset comes off exactly as `offset · Σ a` (integers), then
//! `acc += (d_w · d_a) · dot` per token. So these kernels give the scalar kernels' results bit
//! for bit and are batch-invariant like them: a token's result is the same whether its tile
//! was full or padded, and whichever kernel ran it.
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

use super::act::BlockQ8_0;
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

/// The tile configuration (palette 1), two sets so that one block's product runs while the
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

/// How many blocks ahead of their results' scaling the tile products are issued: the
/// scaling reads the tile's stored rows, which reach the cache tens of cycles later.
const ISSUE_AHEAD: usize = 2;

/// How many blocks ahead of their results' scaling Q4_0/Q5_0 codes are widened: two more
/// than [`ISSUE_AHEAD`], as a tile load of bytes just stored waits for them the same way.
const DECODE_AHEAD: usize = ISSUE_AHEAD + 2;

/// 64-byte aligned scratch for one tile's bytes.
#[repr(C, align(64))]
struct Tile([u8; 1024]);

/// One row of a C tile: 16 i32, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct CRow(pub [i32; 16]);

/// The activations' side of every tile product of one matmul, worked out once per matmul
/// instead of once per group of rows: for token tile `k` and block `b`, the C tile's starting
/// value (row `t`: `-offset · Σ a` of token `16k + t`, in every lane) and the 16 tokens'
/// activation scales.
pub(super) struct TileActs {
    nb: usize,
    /// `[tile][block]`: the 16 tokens' 32 codes back to back (512 bytes, 64-byte aligned, so
    /// a tile load reads eight whole lines instead of 16 rows split across lines).
    codes: Vec<[CRow; 8]>,
    /// `[tile][block][token]`: `-offset · Σ a`, added to each dot product.
    init: Vec<i32>,
    /// `[tile][block][token]`.
    scales: Vec<f32>,
}

impl TileActs {
    /// For `acts` (`tiles · 16` tokens of `nb` blocks each, zero blocks past the real ones)
    /// multiplied with weights of `dtype`.
    pub(super) fn new(dtype: GgmlDType, acts: &[BlockQ8_0], nb: usize) -> Self {
        assert!(nb > 0 && acts.len().is_multiple_of(nb * TOKENS), "whole tiles of {TOKENS} tokens");
        let tiles = acts.len() / (nb * TOKENS);
        let offset = code_offset(dtype);
        let mut init = Vec::with_capacity(tiles * nb * TOKENS);
        let mut scales = Vec::with_capacity(tiles * nb * TOKENS);
        let mut codes = vec![[CRow([0; 16]); 8]; tiles * nb];
        for k in 0..tiles {
            for b in 0..nb {
                let bytes: &mut [u8; 512] = bytemuck_512(&mut codes[k * nb + b]);
                for t in 0..TOKENS {
                    let a = &acts[(k * TOKENS + t) * nb + b];
                    for (o, &q) in bytes[32 * t..32 * (t + 1)].iter_mut().zip(&a.qs) {
                        *o = q as u8;
                    }
                    let sum: i32 = a.qs.iter().map(|&q| q as i32).sum();
                    init.push(-offset * sum);
                    scales.push(a.d);
                }
            }
        }
        Self { nb, codes, init, scales }
    }
}

/// The 512 bytes of eight C rows.
fn bytemuck_512(rows: &mut [CRow; 8]) -> &mut [u8; 512] {
    // SAFETY: `[CRow; 8]` is 512 bytes of plain integers with no padding (`CRow` is 64
    // bytes, `repr(C)`), and every byte pattern is a valid u8.
    unsafe { &mut *(rows as *mut [CRow; 8] as *mut [u8; 512]) }
}

/// One group of 16 rows · tokens `t0..t0 + tn` (`t0` a multiple of [`TOKENS`], `tn` ≤
/// [`TOKENS`]): `out[t * stride + l]` for the lanes set in `lanes`, bit-identical to
/// [`super::avx512::gemm_group`].
///
/// # Safety
/// [`available`] said yes; `group` a packed group of `dtype` (Q8_0, Q4_0 or Q5_0) with `nb`
/// blocks per row; `acts` at least `(t0 + TOKENS) · nb` long (the tile reads 16 tokens: pad
/// with zero blocks) and `tiles` made from them for `dtype`; `out.add(t * stride)` writable
/// for the lanes set, `t < tn`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group(
    dtype: GgmlDType,
    group: &[u8],
    nb: usize,
    acts: &[BlockQ8_0],
    tiles: &TileActs,
    (t0, tn): (usize, usize),
    out: *mut f32,
    stride: usize,
    lanes: u16,
) {
    debug_assert!(t0.is_multiple_of(TOKENS) && tn <= TOKENS && acts.len() >= (t0 + TOKENS) * nb);
    debug_assert!(tiles.nb == nb && tiles.init.len() >= (t0 + TOKENS) * nb);
    ensure_config();
    let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
    let group = group.as_ptr();
    let scales = group.add(nb * code_bytes);
    // This token tile's activation terms, block by block.
    let init = tiles.init.as_ptr().add(t0 * nb);
    let da = tiles.scales.as_ptr().add(t0 * nb);
    // Scratch written before it is read (tile stores, decoded codes): not zeroed per call.
    let mut c = [const { MaybeUninit::<Tile>::uninit() }; ISSUE_AHEAD + 1];
    // Q4_0/Q5_0 codes widened to bytes ahead of their tile load (see DECODE_AHEAD).
    let mut codes = [const { MaybeUninit::<Tile>::uninit() }; DECODE_AHEAD + 1];
    let codes: *mut Tile = codes.as_mut_ptr().cast();
    let codes_at = |b: usize| codes.add(b % (DECODE_AHEAD + 1)) as *mut u8;
    let widen = dtype != GgmlDType::Q8_0;
    let decode_block = |b: usize| {
        let dst = codes_at(b);
        for (g, w) in decode(dtype, group.add(b * code_bytes)).iter().enumerate() {
            _mm512_store_si512(dst.add(64 * g) as *mut __m512i, *w);
        }
    };
    if widen {
        (0..nb.min(DECODE_AHEAD)).for_each(decode_block);
    }
    // Block b's tile product into C buffer b % 2, on tile set b % 2.
    let issue = |b: usize, c: *mut u8| {
        let src = group.add(b * code_bytes);
        prefetch(src, code_bytes);
        // And into L1 two blocks ahead: a tile load from L2 stalls the tile unit (the
        // 262k-row head: 1.35 -> 1.5x the VNNI kernel at 16-32 tokens).
        for l in 0..code_bytes / 64 {
            _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(2 * code_bytes + 64 * l) as *const i8);
        }
        let wb = if widen { codes_at(b) as *const u8 } else { src };
        let a = tiles.codes.as_ptr().add(t0 / TOKENS * nb + b) as *const u8;
        if b.is_multiple_of(2) {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{a} + {sa}*1]",
                "tileloadd tmm2, [{w} + {s64}*1]",
                "tdpbsud tmm0, tmm1, tmm2",
                "tilestored [{c} + {s64}*1], tmm0",
                a = in(reg) a, sa = in(reg) 32usize, w = in(reg) wb, s64 = in(reg) 64usize, c = in(reg) c,
                options(nostack),
            );
        } else {
            asm!(
                "tilezero tmm3",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{w} + {s64}*1]",
                "tdpbsud tmm3, tmm4, tmm5",
                "tilestored [{c} + {s64}*1], tmm3",
                a = in(reg) a, sa = in(reg) 32usize, w = in(reg) wb, s64 = in(reg) 64usize, c = in(reg) c,
                options(nostack),
            );
        }
    };
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    for (b, c) in c.iter_mut().enumerate().take(nb.min(ISSUE_AHEAD)) {
        issue(b, c.as_mut_ptr().cast());
    }
    for b in 0..nb {
        if widen && b + DECODE_AHEAD < nb {
            decode_block(b + DECODE_AHEAD);
        }
        // Later blocks' products run while this one's results are scaled.
        if b + ISSUE_AHEAD < nb {
            issue(b + ISSUE_AHEAD, c[(b + ISSUE_AHEAD) % (ISSUE_AHEAD + 1)].as_mut_ptr().cast());
        }
        let cb: *const u8 = c[b % (ISSUE_AHEAD + 1)].as_ptr().cast();
        let dab = da.add(b * TOKENS);
        let cib = init.add(b * TOKENS);
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
    }
    for (t, acc) in acc.iter().enumerate().take(tn) {
        _mm512_mask_storeu_ps(out.add(t * stride), lanes, *acc);
    }
}
