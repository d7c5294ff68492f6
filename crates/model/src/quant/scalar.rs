//! Portable scalar dot kernels: one weight row (ggml blocks) · one activation row.
//!
//! Integer sums inside each block of 32 activations, then float work per block; they are the
//! fallback on CPUs without AVX2 and the reference the SIMD kernels are tested against (the
//! VNNI GEMM kernels bit for bit: their float steps are these, in this order).
//!
//! Every block kernel takes `w` as exactly `a.len()` weight blocks (the row's encoded bytes)
//! and `a` as the activation row quantized to the matching blocks (Q8_0 for the 32-element
//! formats, [`BlockQ8K32`] for k-quants); this is only debug-asserted, and a mismatch in
//! release silently uses the shorter. `kernels` checks it before any call.
//!
//! The k-quant kernels take an activation scale per 32 values (llama.cpp's take one per 256),
//! so each sub-block's integer dot product gets its own float multiply-add:
//! `acc = fma(dot_j, (d · sc_j) · d_a[j], acc)` for the 32-value pieces `j` of a super-block,
//! then for Q4_K/Q5_K the mins, `acc −= Σ_j fma(dmin · m_j, s_a[j], ·)` summed from zero
//! (`s_a[j] = d_a[j] · Σ a` over the piece); Q6_K's sub-blocks of 16 each get theirs. `f32::mul_add` is IEEE's fused multiply-add,
//! the FMA instruction of the SIMD kernels.

use half::{bf16, f16};

use super::act::{BlockQ8K32, BlockQ8_0};
use super::blocks::{f16_at, k_scales_mins, Q4_0_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES};

/// Q8_0 weights · Q8_0 activations: `Σ_blocks d_w · d_a · Σ_j w_j · a_j`.
pub(super) fn dot_q8_0(w: &[u8], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q8_0_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q8_0_BYTES).zip(a) {
        let mut s = 0i32;
        for j in 0..32 {
            s += b[2 + j] as i8 as i32 * y.qs[j] as i32;
        }
        acc += f16_at(b, 0) * y.d * s as f32;
    }
    acc
}

/// Q4_0 weights · Q8_0 activations, with the weight codes' offset 8 taken off each.
pub(super) fn dot_q4_0(w: &[u8], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q4_0_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q4_0_BYTES).zip(a) {
        let mut s = 0i32;
        for j in 0..16 {
            s += ((b[2 + j] & 0xF) as i32 - 8) * y.qs[j] as i32;
            s += ((b[2 + j] >> 4) as i32 - 8) * y.qs[j + 16] as i32;
        }
        acc += f16_at(b, 0) * y.d * s as f32;
    }
    acc
}

/// Q5_0 weights · Q8_0 activations; bit 4 of each code comes from `qh`, offset 16.
pub(super) fn dot_q5_0(w: &[u8], a: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q5_0_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q5_0_BYTES).zip(a) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            s += (((b[6 + j] & 0xF) as u32 | h0) as i32 - 16) * y.qs[j] as i32;
            s += (((b[6 + j] >> 4) as u32 | h1) as i32 - 16) * y.qs[j + 16] as i32;
        }
        acc += f16_at(b, 0) * y.d * s as f32;
    }
    acc
}

/// The float steps of a Q4_K/Q5_K super-block (module documentation): `dots[j]` the exact
/// integer dot product of piece `j`'s codes with the activations, `sc`/`mn` the six-bit scales
/// and mins.
#[inline(always)]
fn k_block_with_mins(acc: f32, d: f32, dmin: f32, sc: &[u8; 8], mn: &[u8; 8], dots: &[i32; 8], y: &BlockQ8K32) -> f32 {
    let mut acc = acc;
    for j in 0..8 {
        acc = (dots[j] as f32).mul_add((d * sc[j] as f32) * y.d[j], acc);
    }
    let mins = mn.iter().zip(&y.s).fold(0f32, |m, (&mn, &s)| (dmin * mn as f32).mul_add(s, m));
    acc - mins
}

/// Q4_K weights · k-quant activations: per piece of 32, `d · sc_j · (q·a)_j · d_a[j]`, less the
/// mins `dmin · m_j · s_a[j]`.
pub(super) fn dot_q4_k(w: &[u8], a: &[BlockQ8K32]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q4_K_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q4_K_BYTES).zip(a) {
        let (sc, mn) = k_scales_mins(&b[4..16]);
        let qs = &b[16..144];
        let mut dots = [0i32; 8];
        for c in 0..4 {
            for l in 0..32 {
                dots[2 * c] += (qs[32 * c + l] & 0xF) as i32 * y.qs[64 * c + l] as i32;
                dots[2 * c + 1] += (qs[32 * c + l] >> 4) as i32 * y.qs[64 * c + 32 + l] as i32;
            }
        }
        acc = k_block_with_mins(acc, f16_at(b, 0), f16_at(b, 2), &sc, &mn, &dots, y);
    }
    acc
}

/// Q5_K weights · k-quant activations: as [`dot_q4_k`] with a fifth bit per code from `qh`.
pub(super) fn dot_q5_k(w: &[u8], a: &[BlockQ8K32]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q5_K_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q5_K_BYTES).zip(a) {
        let (sc, mn) = k_scales_mins(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..176];
        let mut dots = [0i32; 8];
        for c in 0..4 {
            for l in 0..32 {
                let h0 = ((qh[l] >> (2 * c)) & 1) << 4;
                let h1 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                dots[2 * c] += ((qs[32 * c + l] & 0xF) | h0) as i32 * y.qs[64 * c + l] as i32;
                dots[2 * c + 1] += ((qs[32 * c + l] >> 4) | h1) as i32 * y.qs[64 * c + 32 + l] as i32;
            }
        }
        acc = k_block_with_mins(acc, f16_at(b, 0), f16_at(b, 2), &sc, &mn, &dots, y);
    }
    acc
}

/// Q6_K weights · k-quant activations: per sub-block `k` of 16 (signed 8-bit scale `sc_k`),
/// `acc = fma(Σ (q − 32)·a, (d · sc_k) · d_a[k / 2], acc)`.
pub(super) fn dot_q6_k(w: &[u8], a: &[BlockQ8K32]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * Q6_K_BYTES);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q6_K_BYTES).zip(a) {
        // Sub-block k of 16 elements (element order) and its dot product.
        let mut s = [0i32; 16];
        for h in 0..2 {
            let ql = &b[64 * h..64 * h + 64];
            let qh = &b[128 + 32 * h..128 + 32 * h + 32];
            let q8 = &y.qs[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = 8 * h + l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                s[is] += q1 * q8[l] as i32;
                s[is + 2] += q2 * q8[l + 32] as i32;
                s[is + 4] += q3 * q8[l + 64] as i32;
                s[is + 6] += q4 * q8[l + 96] as i32;
            }
        }
        let d = f16_at(b, 208);
        for (k, &s) in s.iter().enumerate() {
            acc = (s as f32).mul_add((d * b[192 + k] as i8 as f32) * y.d[k / 2], acc);
        }
    }
    acc
}

/// Sums `f(i) * x[i]` with 8 independent accumulators so the compiler can vectorise it.
#[inline(always)]
fn dot_f32_by(n: usize, x: &[f32], f: impl Fn(usize) -> f32) -> f32 {
    debug_assert_eq!(x.len(), n);
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for k in 0..8 {
            acc[k] += f(i + k) * x[i + k];
        }
    }
    let mut r = 0f32;
    for (i, &xv) in x.iter().enumerate().skip(full) {
        r += f(i) * xv;
    }
    acc.iter().sum::<f32>() + r
}

/// F32 weights (little-endian bytes) · f32 activations; `w` is `4 * x.len()` bytes (a
/// shorter `w` panics).
pub(super) fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    dot_f32_by(x.len(), x, |i| f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]))
}

/// F16 weights · f32 activations; `w` is `2 * x.len()` bytes (a shorter `w` panics).
pub(super) fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot_f32_by(x.len(), x, |i| f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32())
}

/// BF16 weights · f32 activations; `w` is `2 * x.len()` bytes (a shorter `w` panics).
pub(super) fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    dot_f32_by(x.len(), x, |i| bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32())
}
