//! 256-bit GEMM micro-kernels over the weights [`super::packed`] repacks for the AVX-512
//! ones: the same layout, the same integer sums, the same float steps in the same order, so
//! they give the scalar kernels' results bit for bit (and batch invariance by construction).
//! The code is written once ([`gemm_256`]) and compiled twice, for two instruction sets that
//! differ in one step, the four-byte dot product `dot4`:
//! - [`vnni`]: AVX-VNNI's `vpdpbusd`, on CPUs with AVX2 and AVX-VNNI but no AVX-512 (Alder
//!   Lake and later clients, Sierra Forest, Arrow Lake);
//! - [`avx2`]: `vpmaddubsw` (two byte products summed into an i16) then `vpmaddwd` (pairs of
//!   those into an i32), on every AVX2 CPU without VNNI (Haswell to Comet Lake, AMD Zen 1-3).
//!   An i16 holds the pair exactly for codes of at most 6 bits (2 · 63 · 127); Q8_0's codes,
//!   stored as `w + 128`, would overflow it, so this path turns them back into signed weights
//!   and multiplies `|w|` by the activation given `w`'s sign (2 · 128 · 127 fits).
//!
//! A packed group holds 16 rows, one per 32-bit lane of a 64-byte line; a 256-bit register
//! holds eight, so each group is done as two halves of eight rows (bytes 0..32 and 32..64 of
//! every line, and the matching half of every per-lane scale), each with its own accumulators
//! and the same code as [`super::avx512`] otherwise: for each block, the codes of eight rows
//! are decoded once into eight registers and each token's activation bytes are broadcast four
//! at a time into the four-byte dot product (`dot4`). A call takes up to 32 tokens (the
//! matmul's `GEMM256_TOKENS`) and runs them four at a time; with more than four, a half
//! group's codes are decoded once for the call into a per-thread stash ([`with_stash`]) that
//! every four tokens read back. The module documentation of `avx512` explains the sums. Activation bytes are in -127..=127 (the quantizers of `act` never give
//! -128 for finite inputs): the AVX2 path's sign trick relies on it.
//!
//! Every kernel is `unsafe`: the caller must have checked the CPU features
//! ([`super::kernels::avx_vnni_available`] or [`super::kernels::avx2_available`]) and the
//! lengths listed under `# Safety`. (One generic body over a `Dot4` trait would not do: a
//! helper compiled without the entry point's features calls the intrinsics instead of
//! inlining them, 30-70x slower, so every function below carries its module's features.)

use std::arch::x86_64::*;

/// Rows of a packed group in one 256-bit register (one per lane).
const HALF: usize = 8;

/// 32 bytes from a 32-byte aligned address.
///
/// # Safety
/// AVX2; `p` aligned to 32 and `p..p + 32` readable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_load_si256(p as *const __m256i)
}

/// Four activation bytes `a[o..o + 4]` in every lane.
///
/// # Safety
/// AVX2; `a.add(o)..a.add(o + 4)` readable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bcast4(a: *const i8, o: usize) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(a.add(o) as *const i32))
}

/// Eight f16 values at `p` as f32 lanes.
///
/// # Safety
/// AVX2, F16C; `p..p + 16` readable.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Eight bytes (one per lane) widened to i32 lanes, unsigned or signed.
///
/// # Safety
/// AVX2; `p..p + 8` readable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bytes_to_lanes<const SIGNED: bool>(p: *const u8) -> __m256i {
    let v = _mm_loadl_epi64(p as *const __m128i);
    if SIGNED {
        _mm256_cvtepi8_epi32(v)
    } else {
        _mm256_cvtepu8_epi32(v)
    }
}

/// Stores the lanes of `v` set in `lanes` at `out`.
///
/// # Safety
/// AVX; `out.add(l)` writable for every lane `l` set in `lanes`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_lanes(out: *mut f32, lanes: u8, v: __m256) {
    if lanes == u8::MAX {
        _mm256_storeu_ps(out, v);
    } else {
        let mut tmp = [0f32; HALF];
        _mm256_storeu_ps(tmp.as_mut_ptr(), v);
        for (l, x) in tmp.iter().enumerate() {
            if lanes & (1 << l) != 0 {
                *out.add(l) = *x;
            }
        }
    }
}

/// Calls the macro `$go!(T)` with `T` the literal equal to `$tn` (1..=[`TOKENS`]).
macro_rules! for_tokens {
    ($tn:expr, $go:ident) => {
        match $tn {
            1 => $go!(1),
            2 => $go!(2),
            3 => $go!(3),
            4 => $go!(4),
            n => unreachable!("{n} tokens in one kernel call"),
        }
    };
}

/// The most tokens one call of a half kernel takes: four accumulators beside the eight code
/// registers fit the sixteen ymm registers (eight, as `avx512` takes, spill).
const TOKENS: usize = 4;

/// Calls `f(h, half_lanes, t, n, stash)` for each half `h` of a group with live lanes
/// (`half_lanes`, its eight bits of `lanes`) and each tile of `n` ≤ [`TOKENS`] tokens from `t`
/// in `0..tn`. With `stash_len` > 0, `fill(h, stash)` first decodes the half group into this
/// thread's stash of that many registers ([`with_stash`]), which the tiles then read; with 0,
/// `stash` is null and `fill` is not called.
#[inline(always)]
fn for_tiles(tn: usize, lanes: u16, stash_len: usize, mut fill: impl FnMut(usize, *mut __m256i), mut f: impl FnMut(usize, u8, usize, usize, *mut __m256i)) {
    with_stash(stash_len, |stash| {
        for h in 0..2 {
            let half_lanes = (lanes >> (HALF * h)) as u8;
            if half_lanes == 0 {
                continue;
            }
            if stash_len > 0 {
                fill(h, stash);
            }
            let mut t = 0;
            while t < tn {
                let n = (tn - t).min(TOKENS);
                f(h, half_lanes, t, n, stash);
                t += n;
            }
        }
    })
}

/// Registers of decoded codes per block in a half group's stash: a block of 32 (Q4_0, Q5_0)
/// takes 8, a k-quant block of 256 takes 64 (Q4_K's eight sub-blocks of eight chunks, Q6_K's
/// sixteen of four, in the order the kernels use them).
const STASH_PER_BLOCK: usize = 8;
const STASH_PER_BLOCK_K: usize = 64;

thread_local! {
    /// The decoded codes of the half group a kernel call is on (see [`with_stash`]).
    static STASH: std::cell::RefCell<Vec<__m256i>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's stash, at least `len` registers long (none where `len` is 0).
/// A call with more tokens than one tile decodes each half group's codes once into it
/// (masking nibbles out, placing Q5_0's and Q6_K's high bits) and every tile reads them back
/// from L1 (or L2, past a few thousand columns), instead of each tile decoding them again:
/// with four tokens a tile, decoding was a third of Q5_0's work and half of Q6_K's. (AVX2's
/// signed Q8_0 codes and their magnitudes stashed too ran no faster at 32 tokens and 0.9x at
/// 8: loading two registers a chunk cost what the sign flip and `vpabsb` did.) Kernel calls
/// do not nest, so the borrow is never contended.
fn with_stash<R>(len: usize, f: impl FnOnce(*mut __m256i) -> R) -> R {
    if len == 0 {
        return f(std::ptr::null_mut());
    }
    STASH.with(|stash| {
        let mut stash = stash.borrow_mut();
        if stash.len() < len {
            // SAFETY: an all-zero __m256i is a valid value.
            stash.resize(len, unsafe { std::mem::zeroed() });
        }
        f(stash.as_mut_ptr())
    })
}

/// The kernels, written once: `gemm_256!(name, "features", q8_unsigned, |acc, w, a| dot4)`
/// makes module `name` whose every function is compiled for `features`, with `dot4` as the
/// four-byte dot product step and Q8_0's codes multiplied as stored (`w + 128`) where
/// `q8_unsigned`, as signed weights otherwise.
macro_rules! gemm_256 {
    ($(#[$doc:meta])* $name:ident, $features:literal, $q8_unsigned:literal, |$acc:ident, $w:ident, $a:ident| $dot4:expr) => {
        $(#[$doc])*
        pub(super) mod $name {
            use std::arch::x86_64::*;

            use super::{bcast4, bytes_to_lanes, f16x8, for_tiles, load256, store_lanes, HALF, STASH_PER_BLOCK, STASH_PER_BLOCK_K, TOKENS};
            use crate::quant::act::{BlockQ8K32, BlockQ8_0};
            use crate::quant::packed::{code_offset, layout};
            use crate::quant::GgmlDType;

            /// Whether Q8_0's codes are multiplied as stored, `w + 128` (the block sums take
            /// the offset off), or as signed weights.
            const Q8_UNSIGNED: bool = $q8_unsigned;

            /// Whether `dot4` is `vpmaddubsw`'s (the modules that multiply Q8_0 as signed
            /// weights): then [`dot32`] sums four chunks' products in 16 bits before widening
            /// them, exact for codes of at most 5 bits (4 · 2 · 31 · 127 = 31,496 < 2^15).
            const I16_SUMS: bool = !Q8_UNSIGNED;

            /// `acc + Σ_{k<4} w[4l+k] · a[4l+k]` in every i32 lane `l`: `w` unsigned codes (of at
            /// most 6 bits unless `Q8_UNSIGNED`, or |w| ≤ 128 from [`half_dot_q8_signed`]), `a`
            /// signed activation bytes in -127..=127.
            ///
            /// # Safety
            /// This module's features.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot4($acc: __m256i, $w: __m256i, $a: __m256i) -> __m256i {
                $dot4
            }

            /// The eight registers of one block's codes for rows `8h..8h + 8` of a group (chunk `g` =
            /// elements `4g..4g+4` of every row, one row per lane), unsigned (Q8_0's as stored: only
            /// where `Q8_UNSIGNED`).
            ///
            /// # Safety
            /// This module's features; `codes` is a block's codes in [`crate::quant::packed`]'s layout for
            /// `dtype`, 64-byte aligned; `h` is 0 or 1.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn decode(dtype: GgmlDType, codes: *const u8, h: usize) -> [__m256i; 8] {
                let mut w = [_mm256_setzero_si256(); 8];
                match dtype {
                    GgmlDType::Q8_0 => {
                        debug_assert!(Q8_UNSIGNED, "signed Q8_0 is half_dot_q8_signed's");
                        for (g, w) in w.iter_mut().enumerate() {
                            *w = load256(codes.add(64 * g + 32 * h));
                        }
                    }
                    _ => {
                        let low = _mm256_set1_epi8(0x0F);
                        for q in 0..4 {
                            let v = load256(codes.add(64 * q + 32 * h));
                            w[q] = _mm256_and_si256(v, low);
                            w[q + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                        }
                        if dtype == GgmlDType::Q5_0 {
                            // Mask g's bits 32h..32h + 32: the fifth bits of this half's 32 bytes.
                            let five = _mm256_set1_epi8(0x10);
                            let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
                            let select = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
                            for (g, w) in w.iter_mut().enumerate() {
                                let bits = std::ptr::read_unaligned(codes.add(256 + 8 * g + 4 * h) as *const i32);
                                let bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(bits), shuf), select);
                                let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
                                *w = _mm256_add_epi8(*w, _mm256_and_si256(set, five));
                            }
                        }
                    }
                }
                w
            }

            /// `init` plus the exact integer dot products of 32 elements for eight rows: `w[g]` holds
            /// elements `4g..4g+4` of each row (unsigned), `a[0..32]` one token's (signed). Two chains when a call has few tokens (`T`); the sum is the same integer
            /// either way.
            ///
            /// # Safety
            /// This module's features; `a..a + 32` readable.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot32<const T: usize>(w: &[__m256i; 8], init: __m256i, a: *const i8) -> __m256i {
                let (mut i0, mut i1) = (init, _mm256_setzero_si256());
                if I16_SUMS {
                    // Codes of at most 5 bits here (Q4_0, Q5_0, Q4_K): four chunks' pair sums
                    // add up in 16 bits exactly, then widen once (one `vpmaddwd` per four).
                    let ones = _mm256_set1_epi16(1);
                    for q in 0..2 {
                        let mut s = _mm256_maddubs_epi16(w[4 * q], bcast4(a, 16 * q));
                        for g in 1..4 {
                            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[4 * q + g], bcast4(a, 16 * q + 4 * g)));
                        }
                        let acc = if T <= 2 && q == 1 { &mut i1 } else { &mut i0 };
                        *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(s, ones));
                    }
                } else {
                    for (g, w) in w.iter().enumerate() {
                        let x = bcast4(a, 4 * g);
                        let acc = if T <= 2 && g % 2 == 1 { &mut i1 } else { &mut i0 };
                        *acc = dot4(*acc, *w, x);
                    }
                }
                if T <= 2 {
                    _mm256_add_epi32(i0, i1)
                } else {
                    i0
                }
            }

            /// Rows `8h..8h + 8` of one Q8_0/Q4_0/Q5_0 group · `T` tokens: `out[t][l] = Σ_b (d_w · d_a) ·
            /// dot_b` for lanes `l` set in `lanes`. The codes come decoded from `stash` where `STASHED`
            /// (see [`stash_half`]), else are decoded here.
            ///
            /// # Safety
            /// This module's features; `group` is a group of [`crate::quant::packed::Packed`] of `dtype` with `nb`
            /// blocks per row (64-byte aligned); every `acts[t]` and `sums[t]` has `nb` readable elements,
            /// `sums[t][b]` being `Σ acts[t][b].qs`; `out[t].add(l)` writable for the lanes set; where
            /// `STASHED`, `stash` holds [`stash_half`]'s registers of this half group. `prefetch`: see
            /// [`half_dot_q8_signed`].
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            unsafe fn half_dot<const T: usize, const STASHED: bool>(
                dtype: GgmlDType,
                group: *const u8,
                nb: usize,
                h: usize,
                acts: [*const BlockQ8_0; T],
                sums: [*const i32; T],
                out: [*mut f32; T],
                lanes: u8,
                stash: *const __m256i,
                prefetch: bool,
            ) {
                if dtype == GgmlDType::Q8_0 && !Q8_UNSIGNED {
                    return half_dot_q8_signed::<T>(group, nb, h, acts, out, lanes, prefetch);
                }
                let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
                let scales = group.add(nb * code_bytes);
                let neg_offset = -code_offset(dtype);
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..nb {
                    let w = if STASHED { *(stash.add(b * STASH_PER_BLOCK) as *const [__m256i; 8]) } else { decode(dtype, group.add(b * code_bytes), h) };
                    let dw = f16x8(scales.add(b * meta_bytes + 16 * h));
                    for t in 0..T {
                        let y = &*acts[t].add(b);
                        let init = _mm256_set1_epi32(neg_offset * *sums[t].add(b));
                        let dot = dot32::<T>(&w, init, y.qs.as_ptr());
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(y.d));
                        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(d, _mm256_cvtepi32_ps(dot)));
                    }
                }
                for t in 0..T {
                    store_lanes(out[t], lanes, acc[t]);
                }
            }

            /// Decodes the codes of rows `8h..8h + 8` of a Q4_0/Q5_0 group, block by block, into
            /// `stash` ([`STASH_PER_BLOCK`] registers a block, as [`decode`] gives them).
            ///
            /// # Safety
            /// This module's features; `group` as for [`half_dot`]; `stash` writable for `nb` blocks.
            #[target_feature(enable = $features)]
            unsafe fn stash_half(dtype: GgmlDType, group: *const u8, nb: usize, h: usize, stash: *mut __m256i) {
                let (code_bytes, _) = layout(dtype).expect("a packed type");
                for b in 0..nb {
                    *(stash.add(b * STASH_PER_BLOCK) as *mut [__m256i; 8]) = decode(dtype, group.add(b * code_bytes), h);
                }
            }

            /// [`half_dot`] of Q8_0 multiplied as signed weights (the modules without VNNI): `|w|`
            /// times the activation given `w`'s sign, `vpmaddubsw`'s pairs (2 · 128 · 127) fitting an
            /// i16 (every `dot4` here is `vpmaddubsw` + `vpmaddwd`, so it is written out with the sign
            /// step between). Half a block (four chunks) at a time, so that the signed codes and
            /// their magnitudes, decoded once for the tile, stay in eight registers beside the
            /// tokens' accumulators (a whole block's sixteen spilled: 40 GMAC/s at 32 tokens here,
            /// 52 this way). Where `prefetch` (the first tile of a group's first half) it also asks
            /// for the next group's codes: at one to eight tokens the kernel waits on memory otherwise.
            ///
            /// # Safety
            /// As [`half_dot`] for Q8_0; the group's codes are followed by its scales (any group is).
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn half_dot_q8_signed<const T: usize>(
                group: *const u8,
                nb: usize,
                h: usize,
                acts: [*const BlockQ8_0; T],
                out: [*mut f32; T],
                lanes: u8,
                prefetch: bool,
            ) {
                let (code_bytes, meta_bytes) = layout(GgmlDType::Q8_0).expect("a packed type");
                let scales = group.add(nb * code_bytes);
                // Groups are padded to whole lines (`packed::Packed`).
                let next_group = (nb * (code_bytes + meta_bytes)).next_multiple_of(64);
                let flip = _mm256_set1_epi8(i8::MIN);
                let ones = _mm256_set1_epi16(1);
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..nb {
                    let codes = group.add(b * code_bytes);
                    if prefetch {
                        // A hint: past the matrix's last group it touches nothing.
                        for line in 0..code_bytes / 64 {
                            _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(next_group + 64 * line) as *const i8);
                        }
                    }
                    let mut dot = [_mm256_setzero_si256(); T];
                    for q in 0..2 {
                        let w: [__m256i; 4] = std::array::from_fn(|g| _mm256_xor_si256(load256(codes.add(64 * (4 * q + g) + 32 * h)), flip));
                        let magnitude: [__m256i; 4] = std::array::from_fn(|g| _mm256_abs_epi8(w[g]));
                        for t in 0..T {
                            let a = (*acts[t].add(b)).qs.as_ptr();
                            for g in 0..4 {
                                let x = _mm256_sign_epi8(bcast4(a, 16 * q + 4 * g), w[g]);
                                dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[g], x), ones));
                            }
                        }
                    }
                    let dw = f16x8(scales.add(b * meta_bytes + 16 * h));
                    for t in 0..T {
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps((*acts[t].add(b)).d));
                        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(d, _mm256_cvtepi32_ps(dot[t])));
                    }
                }
                for t in 0..T {
                    store_lanes(out[t], lanes, acc[t]);
                }
            }

            /// Sub-block `sub` (0..8) of a Q4_K block's codes for eight rows: chunk `g` of its 32
            /// elements in register `g`. `codes` points at the block's codes of this half group.
            ///
            /// # Safety
            /// This module's features; `codes` as [`half_dot_k`] computes it.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_k_sub(codes: *const u8, sub: usize) -> [__m256i; 8] {
                let low = _mm256_set1_epi8(0x0F);
                std::array::from_fn(|g| {
                    let v = load256(codes.add(64 * (8 * (sub / 2) + g)));
                    if sub % 2 == 0 {
                        _mm256_and_si256(v, low)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), low)
                    }
                })
            }

            /// Sub-block `sub` (0..16) of a Q6_K block's codes for eight rows, unsigned 0..64:
            /// chunk `4 sub + q` in register `q`.
            ///
            /// # Safety
            /// As [`q4_k_sub`].
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q6_k_sub(codes: *const u8, sub: usize) -> [__m256i; 4] {
                let low = _mm256_set1_epi8(0x0F);
                let two = _mm256_set1_epi8(0x30);
                std::array::from_fn(|q| {
                    let c = 4 * sub + q;
                    let v = load256(codes.add(64 * (c % 32)));
                    let nib = if c < 32 { _mm256_and_si256(v, low) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(v), low) };
                    let hb = load256(codes.add(64 * (32 + c % 16)));
                    // Bits 2y..2y+1 of each byte moved to bits 4..5.
                    let hb = match c / 16 {
                        0 => _mm256_slli_epi16::<4>(hb),
                        1 => _mm256_slli_epi16::<2>(hb),
                        2 => hb,
                        _ => _mm256_srli_epi16::<2>(hb),
                    };
                    _mm256_or_si256(nib, _mm256_and_si256(hb, two))
                })
            }

            /// [`stash_half`] for Q4_K and Q6_K: [`STASH_PER_BLOCK_K`] registers a block, sub-block
            /// by sub-block as [`q4_k_sub`] / [`q6_k_sub`] give them.
            ///
            /// # Safety
            /// This module's features; `group` as for [`half_dot_k`]; `stash` writable for `nb` blocks.
            #[target_feature(enable = $features)]
            unsafe fn stash_half_k(dtype: GgmlDType, group: *const u8, nb: usize, h: usize, stash: *mut __m256i) {
                let (code_bytes, _) = layout(dtype).expect("a packed type");
                for b in 0..nb {
                    let codes = group.add(b * code_bytes + 32 * h);
                    let out = stash.add(b * STASH_PER_BLOCK_K);
                    if dtype == GgmlDType::Q4_K {
                        for sub in 0..8 {
                            *(out.add(8 * sub) as *mut [__m256i; 8]) = q4_k_sub(codes, sub);
                        }
                    } else {
                        for sub in 0..16 {
                            *(out.add(4 * sub) as *mut [__m256i; 4]) = q6_k_sub(codes, sub);
                        }
                    }
                }
            }

            /// Rows `8h..8h + 8` of one Q4_K or Q6_K group · `T` tokens (see `avx512`'s `group_dot_k`),
            /// the codes decoded from `stash` where `STASHED` (see [`stash_half_k`]).
            ///
            /// # Safety
            /// This module's features; `group` a group of [`crate::quant::packed::Packed`] of `dtype` (Q4_K or
            /// Q6_K) with `nb` blocks per row, 64-byte aligned; every `acts[t]` has `nb` blocks;
            /// `out[t].add(l)` writable for the lanes set; where `STASHED`, `stash` holds
            /// [`stash_half_k`]'s registers of this half group.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            unsafe fn half_dot_k<const T: usize, const STASHED: bool>(
                dtype: GgmlDType,
                group: *const u8,
                nb: usize,
                h: usize,
                acts: [*const BlockQ8K32; T],
                out: [*mut f32; T],
                lanes: u8,
                stash: *const __m256i,
            ) {
                let (code_bytes, meta_bytes) = layout(dtype).expect("a packed type");
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..nb {
                    let codes = group.add(b * code_bytes + 32 * h);
                    let meta = group.add(nb * code_bytes + b * meta_bytes);
                    let dw = f16x8(meta.add(16 * h));
                    if dtype == GgmlDType::Q4_K {
                        for sub in 0..8 {
                            let w = if STASHED { *(stash.add(b * STASH_PER_BLOCK_K + 8 * sub) as *const [__m256i; 8]) } else { q4_k_sub(codes, sub) };
                            let wsc = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(bytes_to_lanes::<false>(meta.add(64 + 16 * sub + HALF * h))));
                            for t in 0..T {
                                let y = &*acts[t].add(b);
                                let dot = dot32::<T>(&w, _mm256_setzero_si256(), y.qs.as_ptr().add(32 * sub));
                                let f = _mm256_mul_ps(wsc, _mm256_set1_ps(y.d[sub]));
                                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), f, acc[t]);
                            }
                        }
                        let dmin = f16x8(meta.add(32 + 16 * h));
                        let m: [__m256; 8] = std::array::from_fn(|j| _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(bytes_to_lanes::<false>(meta.add(192 + 16 * j + HALF * h)))));
                        for t in 0..T {
                            let y = &*acts[t].add(b);
                            let mut mins = _mm256_setzero_ps();
                            for (j, m) in m.iter().enumerate() {
                                mins = _mm256_fmadd_ps(*m, _mm256_set1_ps(y.s[j]), mins);
                            }
                            acc[t] = _mm256_sub_ps(acc[t], mins);
                        }
                    } else {
                        for sub in 0..16 {
                            let w = if STASHED { *(stash.add(b * STASH_PER_BLOCK_K + 4 * sub) as *const [__m256i; 4]) } else { q6_k_sub(codes, sub) };
                            let wsc = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(bytes_to_lanes::<true>(meta.add(32 + 16 * sub + HALF * h))));
                            for t in 0..T {
                                let y = &*acts[t].add(b);
                                let a = y.qs.as_ptr();
                                let mut i0 = _mm256_set1_epi32(-32 * y.bsums[sub] as i32);
                                if I16_SUMS {
                                    // Six-bit codes: two chunks' pair sums add up in 16 bits
                                    // exactly (2 · 2 · 63 · 127 = 32,004 < 2^15).
                                    let ones = _mm256_set1_epi16(1);
                                    for p in 0..2 {
                                        let s = _mm256_add_epi16(
                                            _mm256_maddubs_epi16(w[2 * p], bcast4(a, 16 * sub + 8 * p)),
                                            _mm256_maddubs_epi16(w[2 * p + 1], bcast4(a, 16 * sub + 8 * p + 4)),
                                        );
                                        i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(s, ones));
                                    }
                                } else {
                                    for (q, w) in w.iter().enumerate() {
                                        i0 = dot4(i0, *w, bcast4(a, 16 * sub + 4 * q));
                                    }
                                }
                                let f = _mm256_mul_ps(wsc, _mm256_set1_ps(y.d[sub / 2]));
                                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), f, acc[t]);
                            }
                        }
                    }
                }
                for t in 0..T {
                    store_lanes(out[t], lanes, acc[t]);
                }
            }

            /// One group · tokens `t0..t0 + tn` (any `tn`, done [`TOKENS`] at a time for each half of
            /// the group): `out[(t - t0) * stride + l]` for the group's rows in `lanes`; `acts` and `sums`
            /// hold every token's `nb` blocks back to back. The arguments of `avx512::gemm_group`.
            ///
            /// # Safety
            /// This module's features; activation codes in -127..=127; `group` a packed group of
            /// `dtype` with `nb` blocks per row; `acts`
            /// and `sums` at least `(t0 + tn) · nb` long; `out.add(t * stride + l)` writable for the lanes
            /// `l` set, for `t < tn`.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(in crate::quant) unsafe fn gemm_group(
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
                // Q8_0's codes are used as loaded (VNNI), or decoded half a block at a time.
                let stashed = tn > TOKENS && dtype != GgmlDType::Q8_0;
                let fill = |h, stash| stash_half(dtype, group.as_ptr(), nb, h, stash);
                for_tiles(tn, lanes, if stashed { nb * STASH_PER_BLOCK } else { 0 }, fill, |h, half_lanes, t, n, stash| {
                    macro_rules! go {
                        ($t:literal) => {{
                            let a: [*const BlockQ8_0; $t] = std::array::from_fn(|i| acts.as_ptr().add((t0 + t + i) * nb));
                            let s: [*const i32; $t] = std::array::from_fn(|i| sums.as_ptr().add((t0 + t + i) * nb));
                            let o: [*mut f32; $t] = std::array::from_fn(|i| out.add((t + i) * stride + HALF * h));
                            if stashed {
                                half_dot::<$t, true>(dtype, group.as_ptr(), nb, h, a, s, o, half_lanes, stash, h == 0 && t == 0)
                            } else {
                                half_dot::<$t, false>(dtype, group.as_ptr(), nb, h, a, s, o, half_lanes, stash, h == 0 && t == 0)
                            }
                        }};
                    }
                    for_tokens!(n, go)
                })
            }

            /// [`gemm_group`] for Q4_K and Q6_K over k-quant activations. The arguments of
            /// `avx512::gemm_group_k`.
            ///
            /// # Safety
            /// As [`half_dot_k`]; activation codes in -127..=127; `acts` at least `(t0 + tn) · nb` long; `out.add(t * stride + l)`
            /// writable for the lanes `l` set, for `t < tn`.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(in crate::quant) unsafe fn gemm_group_k(
                dtype: GgmlDType,
                group: &[u8],
                nb: usize,
                acts: &[BlockQ8K32],
                (t0, tn): (usize, usize),
                out: *mut f32,
                stride: usize,
                lanes: u16,
            ) {
                let stashed = tn > TOKENS;
                let fill = |h, stash| stash_half_k(dtype, group.as_ptr(), nb, h, stash);
                for_tiles(tn, lanes, if stashed { nb * STASH_PER_BLOCK_K } else { 0 }, fill, |h, half_lanes, t, n, stash| {
                    macro_rules! go {
                        ($t:literal) => {{
                            let a: [*const BlockQ8K32; $t] = std::array::from_fn(|i| acts.as_ptr().add((t0 + t + i) * nb));
                            let o: [*mut f32; $t] = std::array::from_fn(|i| out.add((t + i) * stride + HALF * h));
                            if stashed {
                                half_dot_k::<$t, true>(dtype, group.as_ptr(), nb, h, a, o, half_lanes, stash)
                            } else {
                                half_dot_k::<$t, false>(dtype, group.as_ptr(), nb, h, a, o, half_lanes, stash)
                            }
                        }};
                    }
                    for_tokens!(n, go)
                })
            }
        }
    };
}

gemm_256!(
    /// The kernels on AVX-VNNI (`vpdpbusd`).
    vnni,
    "avx2,avxvnni,f16c,fma",
    true,
    |acc, w, a| _mm256_dpbusd_avx_epi32(acc, w, a)
);

gemm_256!(
    /// The kernels on plain AVX2 (`vpmaddubsw`, `vpmaddwd`).
    avx2,
    "avx2,f16c,fma",
    false,
    |acc, w, a| _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)))
);
