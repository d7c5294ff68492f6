//! AVX-512 VNNI GEMM micro-kernels over weights repacked by [`super::packed`]: 16 rows (one
//! per lane) × `T` tokens per call.
//!
//! For each block, the weight codes of the 16 rows are decoded once into eight registers of
//! unsigned bytes, and each token's 32 activation bytes are broadcast four at a time into
//! `vpdpbusd`, which adds four u8 × i8 products into every lane: eight instructions give the
//! block's exact integer dot products for 16 rows. The codes' offset (128 for Q8_0 stored as
//! `w + 128`, 8 for Q4_0, 16 for Q5_0) is taken off exactly, as `offset · Σ a`, before the
//! first product. Then, per lane, `acc += (d_w · d_a) · dot` — the scalar reference's
//! operations in the scalar reference's order, so these kernels give the scalar kernels'
//! results bit for bit, for every batch size (batch invariance by construction).
//!
//! The k-quants work the same way per piece of 32 values, each with its own activation
//! scale (see `scalar`): Q4_K's eight sub-blocks of 32 give eight exact dot products, each
//! added as `acc = fma(dot, (d · sc_j) · d_a[j], acc)` with the lanes' six-bit scales, and the
//! mins come off at the end of the block as `Σ_j fma(dmin · m_j, s_a[j], ·)`; Q6_K's sixteen
//! sub-blocks of 16 start from `-32 · Σ a` and are each added as
//! `acc = fma(dot, (d · sc_k) · d_a[k / 2], acc)` with their signed scales.

//! Every kernel is `unsafe`: the caller must have checked the CPU features
//! ([`super::kernels::avx512_vnni_available`]) and the lengths listed under `# Safety`.

use std::arch::x86_64::*;

use super::act::{BlockQ8K32, BlockQ8_0};
use super::packed::{code_offset, layout};
use super::GgmlDType;

/// 64 bytes from a 64-byte aligned address.
///
/// # Safety
/// AVX-512F; `p` aligned to 64 and `p..p + 64` readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load512(p: *const u8) -> __m512i {
    _mm512_load_si512(p as *const __m512i)
}

/// The eight registers of one block's unsigned codes for 16 rows (chunk `g` = elements
/// `4g..4g+4` of every row, one row per lane).
///
/// # Safety
/// AVX-512F/BW; `codes` is a block's codes in [`super::packed`]'s layout for `dtype`, 64-byte
/// aligned.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn decode(dtype: GgmlDType, codes: *const u8) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    match dtype {
        GgmlDType::Q8_0 => {
            for (g, w) in w.iter_mut().enumerate() {
                *w = load512(codes.add(64 * g));
            }
        }
        _ => {
            let low = _mm512_set1_epi8(0x0F);
            for h in 0..4 {
                let v = load512(codes.add(64 * h));
                w[h] = _mm512_and_si512(v, low);
                w[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            if dtype == GgmlDType::Q5_0 {
                let five = _mm512_set1_epi8(0x10);
                for (g, w) in w.iter_mut().enumerate() {
                    let mask: __mmask64 = std::ptr::read_unaligned(codes.add(256 + 8 * g) as *const u64);
                    *w = _mm512_mask_add_epi8(*w, mask, *w, five);
                }
            }
        }
    }
    w
}

/// Asks for the `bytes` of codes [`PREFETCH_AHEAD`] past `p` into L2. One token at a time is
/// bound by memory: on one Zen 4 core this took a 131072-row Q8_0 matmul (89 MB, from DRAM)
/// from 11.4 to 16.8 GMAC/s and a 16384-row one (11 MB, in L3) from 19 to 58; prefetching into
/// L1 (`T0`) or 2 KiB ahead stalled the DRAM case below the row kernels' 15. A prefetch past
/// the end of the buffer is harmless (it never faults), hence `wrapping_add`.
#[inline(always)]
pub(super) unsafe fn prefetch(p: *const u8, bytes: usize) {
    for l in 0..bytes / 64 {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH_AHEAD + 64 * l) as *const i8);
    }
}

/// How far ahead of the codes in use [`prefetch`] asks for more.
const PREFETCH_AHEAD: usize = 8192;

/// `init` plus the exact integer dot products of 32 elements for 16 rows: `w[g]` holds
/// elements `4g..4g+4` of each row (unsigned), `a[0..32]` one token's (signed), broadcast four
/// at a time. Two independent chains when a call has few tokens whose chains could overlap
/// (`T`, the caller's token count); the sum is the same integer either way.
///
/// # Safety
/// AVX-512F/VNNI; `a..a + 32` readable.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dot32<const T: usize>(w: &[__m512i; 8], init: __m512i, a: *const i8) -> __m512i {
    let (mut i0, mut i1) = (init, _mm512_setzero_si512());
    for (g, w) in w.iter().enumerate() {
        if T <= 2 && g % 2 == 1 {
            i1 = _mm512_dpbusd_epi32(i1, *w, bcast4(a, 4 * g));
        } else {
            i0 = _mm512_dpbusd_epi32(i0, *w, bcast4(a, 4 * g));
        }
    }
    if T <= 2 {
        _mm512_add_epi32(i0, i1)
    } else {
        i0
    }
}

/// One group of 16 rows · `T` tokens: `out[t][l] = Σ_b (d_w · d_a) · dot_b` for lanes `l`
/// set in `lanes`.
///
/// # Safety
/// AVX-512F/BW/VNNI, F16C; `group` is a group of [`super::packed::Packed`] of `dtype`
/// with `nb` blocks per row (64-byte aligned); every `acts[t]` and `sums[t]` has `nb`
/// readable elements, `sums[t][b]` being `Σ acts[t][b].qs`; every `out[t]..out[t] + 16` is
/// writable where `lanes` is set.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn group_dot<const T: usize>(
    dtype: GgmlDType,
    group: *const u8,
    nb: usize,
    acts: [*const BlockQ8_0; T],
    sums: [*const i32; T],
    out: [*mut f32; T],
    lanes: __mmask16,
) {
    let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
    let scales = group.add(nb * code_bytes);
    let neg_offset = -code_offset(dtype);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        prefetch(group.wrapping_add(b * code_bytes), code_bytes);
        let w = decode(dtype, group.add(b * code_bytes));
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * meta_bytes) as *const __m256i));
        for t in 0..T {
            let y = &*acts[t].add(b);
            let dot = dot32::<T>(&w, _mm512_set1_epi32(neg_offset * *sums[t].add(b)), y.qs.as_ptr());
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(y.d));
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(d, _mm512_cvtepi32_ps(dot)));
        }
    }
    for t in 0..T {
        _mm512_mask_storeu_ps(out[t], lanes, acc[t]);
    }
}

/// Calls the macro `$go!(T)` with `T` the literal equal to `$tn` (1..=[`TOKENS`]): the token
/// count of a call becomes the kernels' const parameter.
macro_rules! for_tokens {
    ($tn:expr, $go:ident) => {
        match $tn {
            1 => $go!(1),
            2 => $go!(2),
            3 => $go!(3),
            4 => $go!(4),
            5 => $go!(5),
            6 => $go!(6),
            7 => $go!(7),
            8 => $go!(8),
            n => unreachable!("{n} tokens in one kernel call"),
        }
    };
}

/// The most tokens one call of the kernel takes (its register tile).
pub(super) const TOKENS: usize = 8;

/// One group · tokens `t0..t0 + tn` (`tn` in 1..=[`TOKENS`]): `out[(t - t0) * stride + l]` for
/// the group's rows in `lanes`; `acts` and `sums` hold every token's `nb` blocks back to back.
///
/// # Safety
/// As [`group_dot`]: AVX-512F/BW/VNNI and F16C; `group` a packed group of `dtype` with `nb`
/// blocks per row; `acts` and `sums` at least `(t0 + tn) · nb` long; `out.add(t * stride)`
/// writable for the lanes set, for `t < tn`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group(
    dtype: GgmlDType,
    group: &[u8],
    nb: usize,
    acts: &[BlockQ8_0],
    sums: &[i32],
    (t0, tn): (usize, usize),
    out: *mut f32,
    stride: usize,
    lanes: u16,
) {
    macro_rules! go {
        ($t:literal) => {{
            let a: [*const BlockQ8_0; $t] = std::array::from_fn(|t| acts.as_ptr().add((t0 + t) * nb));
            let s: [*const i32; $t] = std::array::from_fn(|t| sums.as_ptr().add((t0 + t) * nb));
            let o: [*mut f32; $t] = std::array::from_fn(|t| out.add(t * stride));
            group_dot::<$t>(dtype, group.as_ptr(), nb, a, s, o, lanes)
        }};
    }
    for_tokens!(tn, go)
}

/// Sixteen bytes (one per lane) widened to i32 lanes, unsigned or signed.
///
/// # Safety
/// AVX-512F; `p..p + 16` readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bytes_to_lanes<const SIGNED: bool>(p: *const u8) -> __m512i {
    let v = _mm_loadu_si128(p as *const __m128i);
    if SIGNED {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    }
}

/// Four activation bytes `a[o..o + 4]` in every lane.
///
/// # Safety
/// AVX-512F; `a.add(o)..a.add(o + 4)` readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bcast4(a: *const i8, o: usize) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(a.add(o) as *const i32))
}

/// Q4_K or Q6_K: one group of 16 rows · `T` tokens (see the module documentation).
///
/// # Safety
/// AVX-512F/BW/VNNI, F16C; `group` a group of [`super::packed::Packed`] of `dtype` (Q4_K or
/// Q6_K) with `nb` blocks per row, 64-byte aligned; every `acts[t]` has `nb` blocks;
/// `out[t]..out[t] + 16` writable where `lanes` is set.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn group_dot_k<const T: usize>(dtype: GgmlDType, group: *const u8, nb: usize, acts: [*const BlockQ8K32; T], out: [*mut f32; T], lanes: __mmask16) {
    let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let codes = group.add(b * code_bytes);
        let meta = group.add(nb * code_bytes + b * meta_bytes);
        prefetch(codes, code_bytes);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(meta as *const __m256i));
        if dtype == GgmlDType::Q4_K {
            for sub in 0..8 {
                let mut w = [_mm512_setzero_si512(); 8];
                for (g, w) in w.iter_mut().enumerate() {
                    let v = load512(codes.add(64 * (8 * (sub / 2) + g)));
                    *w = if sub % 2 == 0 { _mm512_and_si512(v, low) } else { _mm512_and_si512(_mm512_srli_epi16::<4>(v), low) };
                }
                let wsc = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(bytes_to_lanes::<false>(meta.add(64 + 16 * sub))));
                for t in 0..T {
                    let y = &*acts[t].add(b);
                    let dot = dot32::<T>(&w, _mm512_setzero_si512(), y.qs.as_ptr().add(32 * sub));
                    let f = _mm512_mul_ps(wsc, _mm512_set1_ps(y.d[sub]));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[t]);
                }
            }
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(meta.add(32) as *const __m256i));
            let m: [__m512; 8] = std::array::from_fn(|j| _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(bytes_to_lanes::<false>(meta.add(192 + 16 * j)))));
            for t in 0..T {
                let y = &*acts[t].add(b);
                let mut mins = _mm512_setzero_ps();
                for (j, m) in m.iter().enumerate() {
                    mins = _mm512_fmadd_ps(*m, _mm512_set1_ps(y.s[j]), mins);
                }
                acc[t] = _mm512_sub_ps(acc[t], mins);
            }
        } else {
            let two = _mm512_set1_epi8(0x30);
            for sub in 0..16 {
                let mut w = [_mm512_setzero_si512(); 4];
                for (q, w) in w.iter_mut().enumerate() {
                    let c = 4 * sub + q;
                    let v = load512(codes.add(64 * (c % 32)));
                    let nib = if c < 32 { _mm512_and_si512(v, low) } else { _mm512_and_si512(_mm512_srli_epi16::<4>(v), low) };
                    let h = load512(codes.add(64 * (32 + c % 16)));
                    // Bits 2y..2y+1 of each byte moved to bits 4..5.
                    let h = match c / 16 {
                        0 => _mm512_slli_epi16::<4>(h),
                        1 => _mm512_slli_epi16::<2>(h),
                        2 => h,
                        _ => _mm512_srli_epi16::<2>(h),
                    };
                    *w = _mm512_or_si512(nib, _mm512_and_si512(h, two));
                }
                let wsc = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(bytes_to_lanes::<true>(meta.add(32 + 16 * sub))));
                for t in 0..T {
                    let y = &*acts[t].add(b);
                    let a = y.qs.as_ptr();
                    let mut i0 = _mm512_set1_epi32(-32 * y.bsums[sub] as i32);
                    for (q, w) in w.iter().enumerate() {
                        i0 = _mm512_dpbusd_epi32(i0, *w, bcast4(a, 16 * sub + 4 * q));
                    }
                    let f = _mm512_mul_ps(wsc, _mm512_set1_ps(y.d[sub / 2]));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), f, acc[t]);
                }
            }
        }
    }
    for t in 0..T {
        _mm512_mask_storeu_ps(out[t], lanes, acc[t]);
    }
}

/// [`gemm_group`] for Q4_K and Q6_K over k-quant activations.
///
/// # Safety
/// As [`group_dot_k`]; `acts` at least `(t0 + tn) · nb` long.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group_k(
    dtype: GgmlDType,
    group: &[u8],
    nb: usize,
    acts: &[BlockQ8K32],
    (t0, tn): (usize, usize),
    out: *mut f32,
    stride: usize,
    lanes: u16,
) {
    macro_rules! go {
        ($t:literal) => {{
            let a: [*const BlockQ8K32; $t] = std::array::from_fn(|t| acts.as_ptr().add((t0 + t) * nb));
            let o: [*mut f32; $t] = std::array::from_fn(|t| out.add(t * stride));
            group_dot_k::<$t>(dtype, group.as_ptr(), nb, a, o, lanes)
        }};
    }
    for_tokens!(tn, go)
}
