//! Activation quantization, done once per matmul input row: Q8_0 blocks (bit-compatible with
//! llama.cpp's `quantize_row_q8_0_ref`) for the 32-element weight formats, and for the
//! k-quants the same blocks of 32 gathered into super-blocks of 256 ([`BlockQ8K32`]).
//!
//! llama.cpp quantizes the k-quants' inputs to Q8_K: one scale per 256 values. An activation
//! row has outliers, so one scale for 256 of them leaves the rest of the block few levels:
//! measured against an exact float64 forward pass of the default model
//! (`bench/accuracy_vs_exact.py`, docs/PERFORMANCE.md), a scale per 32 instead takes about a
//! third off the whole model's error, which is nearly all activation rounding. The k-quant
//! kernels pay for it with one float multiply-add per 32 values instead of per 256.

use half::f16;

use super::blocks::QK_K;

/// A Q8_0 activation block: 32 int8 values and their scale.
///
/// llama.cpp stores `d` as f16; we keep it as the f32 value of that f16 so kernels skip the
/// conversion while producing identical numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale, already rounded through f16.
    pub d: f32,
    /// Quantized values, `x ≈ d · qs`.
    pub qs: [i8; 32],
    /// `d · Σ qs`: lets Q4_0/Q5_0 kernels multiply their unsigned codes directly and subtract
    /// the offset once per block (`Σ (q - o)·a = Σ q·a - o·Σ a`), as llama.cpp's Q8_1 does.
    pub s: f32,
}

/// A k-quant activation super-block: 256 int8 values quantized as eight Q8_0 blocks (a scale
/// per 32, exactly [`quantize_row_q8_0`]'s numbers), with the sums of each 16 that the k-quant
/// kernels use to apply weight offsets and mins without unpacking them per element.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K32 {
    /// Scale of each 32 values, rounded through f16 as Q8_0's: `x ≈ d[j] · qs[32j + i]`.
    pub d: [f32; 8],
    /// `d[j] · Σ qs[32j .. 32j+32]` (Q8_0's `s`).
    pub s: [f32; 8],
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// `bsums[j] = Σ qs[16j .. 16j+16]`.
    pub bsums: [i16; 16],
}

impl BlockQ8_0 {
    /// An all-zero block, for preallocating buffers.
    pub const ZERO: Self = Self { d: 0.0, qs: [0; 32], s: 0.0 };
}

impl BlockQ8K32 {
    /// An all-zero block, for preallocating buffers.
    pub const ZERO: Self = Self { d: [0.0; 8], s: [0.0; 8], qs: [0; QK_K], bsums: [0; 16] };
}

/// C's `roundf` (half away from zero) without a libm call; exact for all finite f32.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32; // truncates toward zero (saturating; NaN -> 0)
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// Largest |x| in a slice, with 8 independent lanes so it vectorises.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut m = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            m[i] = m[i].max(c[i].abs());
        }
    }
    let mut r = chunks.remainder().iter().fold(0f32, |a, v| a.max(v.abs()));
    for v in m {
        r = r.max(v);
    }
    r
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks) as llama.cpp's
/// `quantize_row_q8_0_ref`: `d = amax / 127`, `q = round(x / d)`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * 32, "quantize_row_q8_0: length mismatch");
    for (xb, yb) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = abs_max(xb);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f16::from_f32(d).to_f32();
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = round_away(v * id) as i8;
        }
        yb.s = yb.d * yb.qs.iter().map(|&q| q as i32).sum::<i32>() as f32;
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` super-blocks): each 32
/// values as [`quantize_row_q8_0`], then the sums of each 16.
pub fn quantize_row_q8_k32(x: &[f32], out: &mut [BlockQ8K32]) {
    assert_eq!(x.len(), out.len() * QK_K, "quantize_row_q8_k32: length mismatch");
    let mut blocks = [BlockQ8_0::ZERO; QK_K / 32];
    for (xb, yb) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        quantize_row_q8_0(xb, &mut blocks);
        for (j, b) in blocks.iter().enumerate() {
            yb.d[j] = b.d;
            yb.s[j] = b.s;
            yb.qs[32 * j..32 * j + 32].copy_from_slice(&b.qs);
        }
        for (s, q) in yb.bsums.iter_mut().zip(yb.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
    }
}

/// Expands Q8_0 blocks back to f32 (`d · q`); tests use it as the kernels' ground truth.
pub fn dequantize_q8_0(blocks: &[BlockQ8_0]) -> Vec<f32> {
    blocks.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect()
}

/// Expands k-quant activation super-blocks back to f32 (`d[j] · q`); tests use it as the
/// kernels' ground truth.
pub fn dequantize_q8_k32(blocks: &[BlockQ8K32]) -> Vec<f32> {
    blocks.iter().flat_map(|b| b.qs.iter().enumerate().map(move |(i, &q)| b.d[i / 32] * q as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The reference as written in llama.cpp, with libm rounding.
    fn reference_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
        x.chunks(32)
            .map(|xb| {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut qs = [0i8; 32];
                for (q, v) in qs.iter_mut().zip(xb) {
                    *q = (v * id).round() as i8;
                }
                BlockQ8_0 { d: f16::from_f32(d).to_f32(), qs, s: f16::from_f32(d).to_f32() * qs.iter().map(|&q| q as i32).sum::<i32>() as f32 }
            })
            .collect()
    }

    fn random_row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut x: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        // Exact ties and zero blocks exercise the rounding rules.
        x[5] = 0.5;
        x[6] = -2.5;
        x[QK_K..2 * QK_K].iter_mut().for_each(|v| *v = 0.0);
        x
    }

    #[test]
    fn q8_0_activation_quantization_matches_the_llama_cpp_reference() {
        let x = random_row(4 * QK_K, 1);
        let mut got = vec![BlockQ8_0::ZERO; x.len() / 32];
        quantize_row_q8_0(&x, &mut got);
        assert_eq!(got, reference_q8_0(&x));
    }

    #[test]
    fn k_quant_activations_are_q8_0_blocks_of_32_with_sums_of_16() {
        let x = random_row(4 * QK_K, 2);
        let mut got = vec![BlockQ8K32::ZERO; x.len() / QK_K];
        quantize_row_q8_k32(&x, &mut got);
        let blocks = reference_q8_0(&x);
        for (sb, y) in got.iter().enumerate() {
            for j in 0..8 {
                let b = &blocks[8 * sb + j];
                assert_eq!((y.d[j], y.s[j], &y.qs[32 * j..32 * j + 32]), (b.d, b.s, &b.qs[..]), "super-block {sb}, block {j}");
            }
            for k in 0..16 {
                assert_eq!(y.bsums[k] as i32, y.qs[16 * k..16 * k + 16].iter().map(|&q| q as i32).sum::<i32>());
            }
        }
        // The all-zero super-block quantizes to zeros.
        assert_eq!(got[1], BlockQ8K32::ZERO);
    }

    #[test]
    fn round_away_matches_libm_roundf_on_ties_and_near_ties() {
        for v in [0.5f32, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 126.5, -127.0, 0.0, 3.7, -3.7] {
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
    }
}
