//! AVX2 + FMA + F16C dot kernels: one weight row · `N` activation rows at once.
//!
//! The integer paths follow llama.cpp's x86 kernels: `_mm256_maddubs_epi16` multiplies
//! unsigned by signed bytes (so signed weights go through the `sign_epi8` trick or an
//! offset), `_mm256_madd_epi16` widens to i32 while applying sub-block scales, and each
//! block's total is scaled into an f32 accumulator with FMA. Processing `N` tokens per
//! weight row unpacks each weight block once for all of them (the prefill path).
//!
//! Every kernel here is `unsafe`: the caller must have checked that the CPU has AVX2, FMA
//! and F16C, and the lengths each `# Safety` section lists (the kernels read through raw
//! pointers and check nothing). `kernels` is the one caller; it asserts those lengths.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::act::{BlockQ8K32, BlockQ8_0};
use super::blocks::{Q4_0_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES};

/// Unaligned 32-byte load. `lddqu` is as fast as `movdqu` and, unlike `_mm256_loadu_si256`,
/// carries no debug-build precondition checks (tests run with debug assertions on).
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 32` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_lddqu_si256(p as *const __m256i)
}

/// Unaligned 16-byte load (see [`load256`]).
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 16` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load128(p: *const u8) -> __m128i {
    _mm_lddqu_si128(p as *const __m128i)
}

/// Unaligned little-endian u32 load.
///
/// # Safety
/// `p..p + 4` readable (no CPU feature needed).
#[inline(always)]
unsafe fn rd_u32(p: *const u8) -> u32 {
    u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)])
}

use crate::simd::x86::hsum;

/// Every f16 bit pattern widened to f32 (256 KiB, built on first use), as ggml keeps.
///
/// Converting one scale with F16C (`vcvtph2ps`) lets LLVM merge the scalar into whatever
/// register is at hand with `vpinsrw` — often an accumulator — which chains every block
/// behind the previous block's FMA. A table load has no such false dependency.
fn f16_table() -> &'static [f32; 65536] {
    static TABLE: OnceLock<Box<[f32; 65536]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 65536]);
        for (i, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(i as u16).to_f32();
        }
        t
    })
}

/// Widens the little-endian f16 at `p` through `table` ([`f16_table`]).
///
/// # Safety
/// `p..p + 2` readable.
#[inline(always)]
unsafe fn f16_at(table: &[f32; 65536], p: *const u8) -> f32 {
    table[u16::from_le_bytes([*p, *p.add(1)]) as usize]
}

/// Expands 32 bits into 32 bytes: 0xFF where the bit is set (llama.cpp's `bytes_from_bits_32`).
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 4` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bytes_from_bits_32(p: *const u8) -> __m256i {
    let x32 = rd_u32(p);
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// 16 packed nibbles at `p` as 32 bytes: low nibbles first, then high nibbles.
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 16` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let lo = load128(p);
    let both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Each token's accumulator summed to one f32 ([`hsum`]'s fixed order).
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn finish<const N: usize>(acc: [__m256; N]) -> [f32; N] {
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum(acc[t]);
    }
    out
}

/// What a format subtracts from its stored codes: Q4_0 stores `q + 8`, Q5_0 `q + 16`.
const fn code_offset(k: u8) -> f32 {
    match k {
        K_Q4_0 => 8.0,
        K_Q5_0 => 16.0,
        _ => 0.0,
    }
}

/// The 32-element formats, as a const parameter so one loop body serves all three.
const K_Q8_0: u8 = 0;
const K_Q4_0: u8 = 1;
const K_Q5_0: u8 = 2;

/// Q8_0/Q4_0/Q5_0 weights (`K`, blocks of `bytes`) · `N` Q8_0 activation rows, decoding each
/// weight block once for all `N` tokens.
///
/// Q4_0/Q5_0 codes are unsigned (0..15 / 0..31 for the value `q - 8` / `q - 16`), so they go
/// straight into `maddubs` as the unsigned operand and the offset is taken off once per block
/// through the activation block's sum. Q8_0 is signed and uses the `|w| · sign(a, w)` trick.
///
/// # Safety
/// AVX2, FMA, F16C; `bytes` is `K`'s block size (34, 18 or 22), and every `a[t]` holds at
/// least `w.len() / bytes` blocks (a trailing partial block of `w` is ignored).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_32<const K: u8, const N: usize>(w: &[u8], bytes: usize, a: [&[BlockQ8_0]; N]) -> [f32; N] {
    let nb = w.len() / bytes;
    let wp = w.as_ptr();
    let tab = f16_table();
    let ap = a.map(|r| r.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let offset = code_offset(K);
    // One accumulator per token, blocks added in order: the same operations in the same order
    // as `dot2x4_32`, so a token's result never depends on how many share the call (batch
    // invariance: a chunked prefill equals a one-shot one bit for bit).
    let mut acc = [_mm256_setzero_ps(); N];
    // Σ_blocks d_w · d_a · Σ a, per token: the offset correction.
    let mut corr = [0f32; N];
    for i in 0..nb {
        let b = wp.add(i * bytes);
        let dw = f16_at(tab, b);
        let dwv = _mm256_set1_ps(dw);
        if K == K_Q8_0 {
            let qx = load256(b.add(2));
            let ax = _mm256_sign_epi8(qx, qx);
            for t in 0..N {
                let y = &*ap[t].add(i);
                let qy = load256(y.qs.as_ptr() as *const u8);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, qx)), ones);
                let d = _mm256_mul_ps(dwv, _mm256_broadcast_ss(&y.d));
                acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc[t]);
            }
        } else {
            let qx = if K == K_Q4_0 {
                nibbles_32(b.add(2))
            } else {
                let hi = _mm256_and_si256(bytes_from_bits_32(b.add(2)), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles_32(b.add(6)), hi)
            };
            for t in 0..N {
                let y = &*ap[t].add(i);
                let qy = load256(y.qs.as_ptr() as *const u8);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
                corr[t] += dw * y.s;
                let d = _mm256_mul_ps(dwv, _mm256_broadcast_ss(&y.d));
                acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc[t]);
            }
        }
    }
    let mut out = finish(acc);
    for t in 0..N {
        out[t] -= offset * corr[t];
    }
    out
}

/// Two weight rows · four Q8_0 activation rows: each activation block is loaded once for both
/// rows and each weight block decoded once for all four tokens (8 accumulators).
///
/// # Safety
/// AVX2, FMA, F16C; `w0` and `w1` each point to `nb` readable blocks of `bytes` bytes: `K`'s
/// packed blocks, or [`UNPACKED_BYTES`] blocks from [`unpack_32`] when `UNPACKED`; every
/// `a[t]` holds at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot2x4_32<const K: u8, const UNPACKED: bool>(w0: *const u8, w1: *const u8, nb: usize, bytes: usize, a: [&[BlockQ8_0]; 4]) -> [[f32; 4]; 2] {
    let tab = f16_table();
    let ap = a.map(|r| r.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let offset = code_offset(K);
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut corr = [[0f32; 4]; 2];
    let decode = |b: *const u8| -> __m256i {
        match K {
            K_Q8_0 => load256(b.add(2)),
            K_Q4_0 => nibbles_32(b.add(2)),
            _ => {
                let hi = _mm256_and_si256(bytes_from_bits_32(b.add(2)), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles_32(b.add(6)), hi)
            }
        }
    };
    for i in 0..nb {
        let b = [w0.add(i * bytes), w1.add(i * bytes)];
        let (dw, qx) = if UNPACKED {
            // [`unpack_32`]'s layout: the scale as f32, then the 32 codes as bytes.
            let d = |p: *const u8| std::ptr::read_unaligned(p as *const f32);
            ([d(b[0]), d(b[1])], [load256(b[0].add(4)), load256(b[1].add(4))])
        } else {
            ([f16_at(tab, b[0]), f16_at(tab, b[1])], [decode(b[0]), decode(b[1])])
        };
        let dwv = [_mm256_set1_ps(dw[0]), _mm256_set1_ps(dw[1])];
        // Q8_0 weights are signed: multiply |w| by sign(a, w) instead.
        let ax = if K == K_Q8_0 { [_mm256_sign_epi8(qx[0], qx[0]), _mm256_sign_epi8(qx[1], qx[1])] } else { qx };
        for t in 0..4 {
            let y = &*ap[t].add(i);
            let qy = load256(y.qs.as_ptr() as *const u8);
            let dy = _mm256_broadcast_ss(&y.d);
            for r in 0..2 {
                let qyr = if K == K_Q8_0 { _mm256_sign_epi8(qy, qx[r]) } else { qy };
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[r], qyr), ones);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dwv[r], dy), _mm256_cvtepi32_ps(dot), acc[r][t]);
                if K != K_Q8_0 {
                    corr[r][t] += dw[r] * y.s;
                }
            }
        }
    }
    let mut out = [[0f32; 4]; 2];
    for r in 0..2 {
        for t in 0..4 {
            out[r][t] = hsum(acc[r][t]) - offset * corr[r][t];
        }
    }
    out
}

/// Rows × four tokens for the 32-element formats: two rows at a time, then the odd one.
///
/// # Safety
/// AVX2, FMA, F16C; `w` holds at least `out.len()` rows of `row_bytes`, `row_bytes` is a
/// multiple of `bytes`, `K`'s block size, and every `a[t]` holds `row_bytes / bytes` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows4_32<const K: u8>(w: &[u8], row_bytes: usize, bytes: usize, a: [&[BlockQ8_0]; 4], out: &mut [[f32; 4]]) {
    let nb = row_bytes / bytes;
    let rows = out.len();
    let wp = w.as_ptr();
    let mut r = 0;
    while r + 2 <= rows {
        let [o0, o1] = dot2x4_32::<K, false>(wp.add(r * row_bytes), wp.add((r + 1) * row_bytes), nb, bytes, a);
        out[r] = o0;
        out[r + 1] = o1;
        r += 2;
    }
    if r < rows {
        out[r] = dot_32::<K, 4>(&w[r * row_bytes..(r + 1) * row_bytes], bytes, a);
    }
}

/// Bytes of one unpacked Q4_0/Q5_0 block: the scale as f32 and the 32 codes as bytes.
pub(super) const UNPACKED_BYTES: usize = 36;

/// Decodes Q4_0/Q5_0 blocks once into [`UNPACKED_BYTES`] blocks, so a prefill task that
/// multiplies the same rows with hundreds of tokens does not decode them for every four.
/// Replaces the contents of `out`.
///
/// # Safety
/// AVX2, FMA, F16C; `K` is `K_Q4_0` or `K_Q5_0` (any other is decoded as Q5_0) and `bytes`
/// its block size, 18 or 22 (a trailing partial block of `w` is ignored).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_32<const K: u8>(w: &[u8], bytes: usize, out: &mut Vec<u8>) {
    let nb = w.len() / bytes;
    let tab = f16_table();
    out.clear();
    out.reserve(nb * UNPACKED_BYTES);
    let dst = out.as_mut_ptr();
    for i in 0..nb {
        let b = w.as_ptr().add(i * bytes);
        let qx = if K == K_Q4_0 {
            nibbles_32(b.add(2))
        } else {
            let hi = _mm256_and_si256(bytes_from_bits_32(b.add(2)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(nibbles_32(b.add(6)), hi)
        };
        let o = dst.add(i * UNPACKED_BYTES);
        std::ptr::write_unaligned(o as *mut f32, f16_at(tab, b));
        _mm256_storeu_si256(o.add(4) as *mut __m256i, qx);
    }
    out.set_len(nb * UNPACKED_BYTES);
}

/// Rows × four tokens over rows unpacked by [`unpack_32`]; bit-identical to [`rows4_32`].
///
/// # Safety
/// AVX2, FMA, F16C; `K` is the format the rows were unpacked from; `w` holds at least
/// `out.len()` rows of `row_bytes`, a multiple of [`UNPACKED_BYTES`], and every `a[t]` holds
/// `row_bytes / UNPACKED_BYTES` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows4_unpacked<const K: u8>(w: &[u8], row_bytes: usize, a: [&[BlockQ8_0]; 4], out: &mut [[f32; 4]]) {
    let nb = row_bytes / UNPACKED_BYTES;
    let rows = out.len();
    let wp = w.as_ptr();
    let mut r = 0;
    while r < rows {
        // An odd last row is paired with itself.
        let r1 = (r + 1).min(rows - 1);
        let [o0, o1] = dot2x4_32::<K, true>(wp.add(r * row_bytes), wp.add(r1 * row_bytes), nb, UNPACKED_BYTES, a);
        out[r] = o0;
        if r1 != r {
            out[r1] = o1;
        }
        r += 2;
    }
}

/// The multi-row entry point of each AVX2 kernel (see `kernels::DotRows4`): the 32-element
/// formats go to [`rows4_32`], the others call the `N`-token kernel per row, as two pairs of
/// tokens when `$pairs`. Expands to calls of the unsafe kernels: use it inside `unsafe`
/// after checking their preconditions (`kernels::check_rows4` does).
macro_rules! rows4 {
    (dot_q8_0, $pairs:expr, $w:expr, $rb:expr, $a:expr, $out:expr) => {
        super::avx2::rows4_32::<{ super::avx2::K_Q8_0_ID }>($w, $rb, super::blocks::Q8_0_BYTES, $a, $out)
    };
    (dot_q4_0, $pairs:expr, $w:expr, $rb:expr, $a:expr, $out:expr) => {
        super::avx2::rows4_32::<{ super::avx2::K_Q4_0_ID }>($w, $rb, super::blocks::Q4_0_BYTES, $a, $out)
    };
    (dot_q5_0, $pairs:expr, $w:expr, $rb:expr, $a:expr, $out:expr) => {
        super::avx2::rows4_32::<{ super::avx2::K_Q5_0_ID }>($w, $rb, super::blocks::Q5_0_BYTES, $a, $out)
    };
    ($f:ident, $pairs:expr, $w:expr, $rb:expr, $a:expr, $out:expr) => {
        for (wr, o) in $w.chunks_exact($rb.max(1)).zip($out.iter_mut()) {
            *o = if $pairs {
                let [x, y] = super::avx2::$f::<2>(wr, [$a[0], $a[1]]);
                let [z, v] = super::avx2::$f::<2>(wr, [$a[2], $a[3]]);
                [x, y, z, v]
            } else {
                super::avx2::$f::<4>(wr, $a)
            };
        }
    };
}
pub(crate) use rows4;

/// The format ids, visible to `kernels` for [`rows4`] and [`unpack_32`]'s `K`.
pub(super) const K_Q8_0_ID: u8 = K_Q8_0;
/// See [`K_Q8_0_ID`].
pub(super) const K_Q4_0_ID: u8 = K_Q4_0;
/// See [`K_Q8_0_ID`].
pub(super) const K_Q5_0_ID: u8 = K_Q5_0;

/// Q8_0 weights · `N` Q8_0 activation rows.
///
/// # Safety
/// AVX2, FMA, F16C; `w` is whole Q8_0 blocks and every `a[t]` holds at least as many.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_0<const N: usize>(w: &[u8], a: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_32::<K_Q8_0, N>(w, Q8_0_BYTES, a)
}

/// Q4_0 weights · `N` Q8_0 activation rows.
///
/// # Safety
/// As [`dot_q8_0`], for Q4_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_0<const N: usize>(w: &[u8], a: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_32::<K_Q4_0, N>(w, Q4_0_BYTES, a)
}

/// Q5_0 weights · `N` Q8_0 activation rows.
///
/// # Safety
/// As [`dot_q8_0`], for Q5_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5_0<const N: usize>(w: &[u8], a: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_32::<K_Q5_0, N>(w, Q5_0_BYTES, a)
}

/// Unpacks a Q4_K/Q5_K 12-byte scale field into (8 scales as i16 lanes, 8 mins as i16 lanes).
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 12` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k_scales(p: *const u8) -> (__m128i, __m128i) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let u0 = rd_u32(p);
    let u1 = rd_u32(p.add(4));
    let u2 = rd_u32(p.add(8));
    let m_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let m_lo = u1 & KMASK1;
    let s_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let s_lo = u0 & KMASK1;
    let sc = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, s_hi as i32, s_lo as i32));
    let mn = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, m_hi as i32, m_lo as i32));
    (sc, mn)
}

/// Lane `j` of `v` in every lane.
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn lane(v: __m256, j: usize) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j as i32))
}

/// Eight f32 at `p` (unaligned).
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 8` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f32x8(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

/// Eight i16 lanes as f32 lanes.
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn i16_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v))
}

/// Q4_K or Q5_K weights (`Q5`: with the fifth bit) · `N` k-quant activation rows: per piece
/// `j` of 32 values, the eight i32 lanes of its integer dot product are scaled by
/// `(d · sc_j) · d_a[j]` into the f32 accumulator; the mins `dmin · m_j · s_a[j]` go, eight
/// pieces at once, into a second one that is subtracted at the end.
///
/// # Safety
/// AVX2, FMA, F16C; `w` is whole blocks of the format and every `a[t]` holds at least as many
/// activation super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k4<const Q5: bool, const N: usize>(w: &[u8], a: [&[BlockQ8K32]; N]) -> [f32; N] {
    let bytes = if Q5 { Q5_K_BYTES } else { Q4_K_BYTES };
    let nb = w.len() / bytes;
    let wp = w.as_ptr();
    let tab = f16_table();
    let ap = a.map(|r| r.as_ptr());
    let m4 = _mm256_set1_epi8(0xF);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        let b = wp.add(i * bytes);
        let (sc, mins) = k_scales(b.add(4));
        let wsc = _mm256_mul_ps(_mm256_set1_ps(f16_at(tab, b)), i16_to_f32(sc));
        let wmn = _mm256_mul_ps(_mm256_set1_ps(f16_at(tab, b.add(2))), i16_to_f32(mins));
        let mut f = [_mm256_setzero_ps(); N];
        for t in 0..N {
            let y = &*ap[t].add(i);
            f[t] = _mm256_mul_ps(wsc, load_f32x8(y.d.as_ptr()));
            accm[t] = _mm256_fmadd_ps(wmn, load_f32x8(y.s.as_ptr()), accm[t]);
        }
        let hbits = if Q5 { load256(b.add(16)) } else { _mm256_setzero_si256() };
        let qs = b.add(if Q5 { 48 } else { 16 });
        for j in 0..4 {
            let q = load256(qs.add(32 * j));
            let mut ql = _mm256_and_si256(q, m4);
            let mut qh = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if Q5 {
                // Bit 2j (resp. 2j+1) of each qh byte is bit 4 of the low (resp. high) nibble.
                let hl = _mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * j as i32)), _mm256_set1_epi8(1));
                let hh = _mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * j as i32 + 1)), _mm256_set1_epi8(1));
                ql = _mm256_or_si256(ql, _mm256_slli_epi16(hl, 4));
                qh = _mm256_or_si256(qh, _mm256_slli_epi16(hh, 4));
            }
            for t in 0..N {
                let q8 = (*ap[t].add(i)).qs.as_ptr().add(64 * j);
                let pl = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ql, load256(q8 as *const u8)));
                let ph = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(qh, load256(q8.add(32) as *const u8)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), lane(f[t], 2 * j), acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ph), lane(f[t], 2 * j + 1), acc[t]);
            }
        }
    }
    let (dots, mins) = (finish(acc), finish(accm));
    std::array::from_fn(|t| dots[t] - mins[t])
}

/// Q4_K weights · `N` k-quant activation rows (see [`dot_k4`]).
///
/// # Safety
/// As [`dot_k4`], for Q4_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_k<const N: usize>(w: &[u8], a: [&[BlockQ8K32]; N]) -> [f32; N] {
    dot_k4::<false, N>(w, a)
}

/// Q5_K weights · `N` k-quant activation rows (see [`dot_k4`]).
///
/// # Safety
/// As [`dot_k4`], for Q5_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q5_k<const N: usize>(w: &[u8], a: [&[BlockQ8K32]; N]) -> [f32; N] {
    dot_k4::<true, N>(w, a)
}

/// Q6_K weights · `N` k-quant activation rows: per piece `j` of 32 values (two sub-blocks of
/// 16 with their signed scales), the integer dot product scaled by `d · d_a[j]`.
///
/// Unlike llama.cpp's AVX2 kernel, the `-32` offset is applied once per block through the
/// activation sums (`Σ (q-32)·a = Σ q·a − 32·Σ a`, and `Σ a` per 16 is `bsums`), which saves
/// a `maddubs` and a subtraction per 32 values per token.
///
/// # Safety
/// AVX2, FMA, F16C; `w` is whole Q6_K blocks and every `a[t]` holds at least as many
/// activation super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q6_k<const N: usize>(w: &[u8], a: [&[BlockQ8K32]; N]) -> [f32; N] {
    let nb = w.len() / Q6_K_BYTES;
    let wp = w.as_ptr();
    let tab = f16_table();
    let ap = a.map(|r| r.as_ptr());
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        let b = wp.add(i * Q6_K_BYTES);
        let d = _mm256_set1_ps(f16_at(tab, b.add(208)));
        let sc8 = load128(b.add(192));
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut f = [_mm256_setzero_ps(); N];
        for t in 0..N {
            let y = &*ap[t].add(i);
            f[t] = _mm256_mul_ps(d, load_f32x8(y.d.as_ptr()));
            // Lane j: sc[2j]·Σa over sub-block 2j + sc[2j+1]·Σa over 2j+1, times 32, taken off.
            let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, load256(y.bsums.as_ptr() as *const u8)), 5);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(off), f[t], acc[t]);
        }
        for h in 0..2 {
            let ql1 = load256(b.add(64 * h));
            let ql2 = load256(b.add(64 * h + 32));
            let qh = load256(b.add(128 + 32 * h));
            for k in 0..4 {
                let lo = match k {
                    0 => _mm256_and_si256(ql1, m4),
                    1 => _mm256_and_si256(ql2, m4),
                    2 => _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _ => _mm256_and_si256(_mm256_srli_epi16(ql2, 4), m4),
                };
                let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)), m2);
                let q6 = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                // Scales 8h+2k (first 16 values) and 8h+2k+1 (next 16) as i16 lanes (llama.cpp's
                // `get_scale_shuffle`).
                let s = (8 * h + 2 * k) as i64;
                let mask = _mm_set_epi64x((s + 1) * 0x0101010101010101, s * 0x0101010101010101);
                let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, mask));
                for t in 0..N {
                    let q8 = load256((*ap[t].add(i)).qs.as_ptr().add(128 * h + 32 * k) as *const u8);
                    let p = _mm256_madd_epi16(scale, _mm256_maddubs_epi16(q6, q8));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane(f[t], 4 * h + k), acc[t]);
                }
            }
        }
    }
    finish(acc)
}

/// Float weight encodings, as a const parameter so the loads resolve at compile time.
const K_F32: u8 = 0;
const K_F16: u8 = 1;
const K_BF16: u8 = 2;

/// Loads 8 weights of float format `K` at `p` as f32 lanes.
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 32` (F32) or `p..p + 16` (F16, BF16) readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
    match K {
        K_F32 => _mm256_castsi256_ps(load256(p)),
        K_F16 => _mm256_cvtph_ps(load128(p)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16)),
    }
}

/// Float weights · `N` f32 activation rows, two accumulators per row to hide FMA latency;
/// the last `n % 16` elements go through the scalar `tail`.
///
/// # Safety
/// AVX2, FMA, F16C; every `x[t]` holds exactly `w.len() / 4` (F32) or `w.len() / 2` (F16,
/// BF16) floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_float<const K: u8, const N: usize>(w: &[u8], x: [&[f32]; N], tail: fn(&[u8], &[f32]) -> f32) -> [f32; N] {
    let size = if K == K_F32 { 4 } else { 2 };
    let n = w.len() / size;
    let wp = w.as_ptr();
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    let full = n / 16 * 16;
    for i in (0..full).step_by(16) {
        let w0 = load8::<K>(wp.add(i * size));
        let w1 = load8::<K>(wp.add((i + 8) * size));
        for t in 0..N {
            let xp = x[t].as_ptr().add(i);
            acc0[t] = _mm256_fmadd_ps(w0, _mm256_castsi256_ps(load256(xp as *const u8)), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(w1, _mm256_castsi256_ps(load256(xp.add(8) as *const u8)), acc1[t]);
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + tail(&w[full * size..], &x[t][full..]);
    }
    out
}

/// F32 weights · `N` f32 rows.
///
/// # Safety
/// AVX2, FMA, F16C; `w.len() == 4 * x[t].len()` for every `t`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f32<const N: usize>(w: &[u8], x: [&[f32]; N]) -> [f32; N] {
    dot_float::<K_F32, N>(w, x, super::scalar::dot_f32)
}

/// F16 weights · `N` f32 rows.
///
/// # Safety
/// AVX2, FMA, F16C; `w.len() == 2 * x[t].len()` for every `t`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f16<const N: usize>(w: &[u8], x: [&[f32]; N]) -> [f32; N] {
    dot_float::<K_F16, N>(w, x, super::scalar::dot_f16)
}

/// BF16 weights · `N` f32 rows.
///
/// # Safety
/// As [`dot_f16`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_bf16<const N: usize>(w: &[u8], x: [&[f32]; N]) -> [f32; N] {
    dot_float::<K_BF16, N>(w, x, super::scalar::dot_bf16)
}

/// Rounds 8 lanes half away from zero, exactly as C's `roundf` (and Rust's `f32::round`).
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round_away(v: __m256) -> __m256 {
    let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let frac = _mm256_sub_ps(v, t); // exact
    let one = _mm256_set1_ps(1.0);
    let up = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5), _CMP_GE_OQ), one);
    let down = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(-0.5), _CMP_LE_OQ), one);
    _mm256_sub_ps(_mm256_add_ps(t, up), down)
}

/// Packs 4×8 i32 lanes (values in -128..=127; others saturate) into 32 i8 in order.
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack_i8(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
    let ab = _mm256_packs_epi32(a, b);
    let cd = _mm256_packs_epi32(c, d);
    let abcd = _mm256_packs_epi16(ab, cd);
    // The in-lane packs leave the 4-byte groups in order 0 2 4 6 1 3 5 7.
    _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Largest |x| of the `n` floats at `x`.
///
/// # Safety
/// AVX2, FMA, F16C; `n` a multiple of 8 and `x..x + n` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn abs_max(x: *const f32, n: usize) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_castsi256_ps(load256(x.add(i) as *const u8))));
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// Sum of 32 signed bytes.
///
/// # Safety
/// AVX2, FMA, F16C (no memory is read).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_i8(v: __m256i) -> i32 {
    let w = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
    let s = _mm_add_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// One Q8_0 block of the 32 floats at `p`: its scale (rounded through f16) and its 32 codes.
///
/// # Safety
/// AVX2, FMA, F16C; `p..p + 32` readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn quantize32(p: *const f32) -> (f32, __m256i) {
    let amax = abs_max(p, 32);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let q = |k: usize| _mm256_cvttps_epi32(round_away(_mm256_mul_ps(_mm256_castsi256_ps(load256(p.add(8 * k) as *const u8)), id)));
    (half::f16::from_f32(d).to_f32(), pack_i8(q(0), q(1), q(2), q(3)))
}

/// AVX2 twin of [`super::act::quantize_row_q8_0`], bit-identical to it for finite input.
///
/// # Safety
/// AVX2, FMA, F16C; lengths are asserted (`x` is `32 * out.len()` floats).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * 32, "quantize_row_q8_0: length mismatch");
    for (xb, yb) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, packed) = quantize32(xb.as_ptr());
        yb.d = d;
        _mm256_storeu_si256(yb.qs.as_mut_ptr() as *mut __m256i, packed);
        yb.s = yb.d * hsum_i8(packed) as f32;
    }
}

/// AVX2 twin of [`super::act::quantize_row_q8_k32`], bit-identical to it for finite input:
/// each 32 as [`quantize_row_q8_0`], written in place, with the sums of each 16 taken from
/// the packed codes.
///
/// # Safety
/// AVX2, FMA, F16C; lengths are asserted (`x` is `256 * out.len()` floats).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q8_k32(x: &[f32], out: &mut [BlockQ8K32]) {
    assert_eq!(x.len(), out.len() * 256, "quantize_row_q8_k32: length mismatch");
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for (xb, yb) in x.chunks_exact(256).zip(out.iter_mut()) {
        for j in 0..8 {
            let (d, packed) = quantize32(xb.as_ptr().add(32 * j));
            _mm256_storeu_si256(yb.qs.as_mut_ptr().add(32 * j) as *mut __m256i, packed);
            // Sums of 4 in i32 lanes: lanes 0-3 are the first 16 codes, 4-7 the next 16.
            let s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, packed), ones16);
            let h = _mm_hadd_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            let h = _mm_hadd_epi32(h, h);
            let (lo, hi) = (_mm_cvtsi128_si32(h), _mm_extract_epi32::<1>(h));
            yb.bsums[2 * j] = lo as i16;
            yb.bsums[2 * j + 1] = hi as i16;
            yb.d[j] = d;
            yb.s[j] = d * (lo + hi) as f32;
        }
    }
}
