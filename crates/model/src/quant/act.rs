//! Activation quantization to Q8_0 / Q8_K blocks, bit-compatible with llama.cpp's
//! `quantize_row_q8_0_ref` and `quantize_row_q8_K_ref`, done once per matmul input row.

use half::f16;

use super::blocks::{nearest_int, QK_K};

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

/// A Q8_K activation block: 256 int8 values, their f32 scale and the sums of each 16, which
/// the k-quant kernels use to apply the weight mins without unpacking them per element.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale, `x ≈ d · qs`.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// `bsums[j] = Σ qs[16j .. 16j+16]`.
    pub bsums: [i16; 16],
}

impl BlockQ8_0 {
    /// An all-zero block, for preallocating buffers.
    pub const ZERO: Self = Self { d: 0.0, qs: [0; 32], s: 0.0 };
}

impl BlockQ8K {
    /// An all-zero block, for preallocating buffers.
    pub const ZERO: Self = Self { d: 0.0, qs: [0; QK_K], bsums: [0; 16] };
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

/// Quantizes `x` (a multiple of 256 long) into `out` as llama.cpp's `quantize_row_q8_K_ref`:
/// the signed value of largest magnitude `max` maps to -127 (`iscale = -127 / max`, the
/// current llama.cpp constant), `q = min(127, nearest_int(iscale · x))`, `d = 1 / iscale`.
pub fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "quantize_row_q8_k: length mismatch");
    for (xb, yb) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let amax = abs_max(xb);
        if amax == 0.0 || !amax.is_finite() {
            *yb = BlockQ8K::ZERO;
            continue;
        }
        // The first element reaching amax, with its sign (what the reference's `>` scan finds).
        let max = xb.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, q) in yb.bsums.iter_mut().zip(yb.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        yb.d = 1.0 / iscale;
    }
}

/// Expands Q8_0 blocks back to f32 (`d · q`); tests use it as the kernels' ground truth.
pub fn dequantize_q8_0(blocks: &[BlockQ8_0]) -> Vec<f32> {
    blocks.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect()
}

/// Expands Q8_K blocks back to f32 (`d · q`); tests use it as the kernels' ground truth.
pub fn dequantize_q8_k(blocks: &[BlockQ8K]) -> Vec<f32> {
    blocks.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect()
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

    fn reference_q8_k(x: &[f32]) -> Vec<BlockQ8K> {
        x.chunks(QK_K)
            .map(|xb| {
                let (mut max, mut amax) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    return BlockQ8K::ZERO;
                }
                let iscale = -127.0 / max;
                let mut b = BlockQ8K::ZERO;
                for (q, v) in b.qs.iter_mut().zip(xb) {
                    *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
                }
                for j in 0..16 {
                    b.bsums[j] = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
                }
                b.d = 1.0 / iscale;
                b
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
    fn q8_k_activation_quantization_matches_the_llama_cpp_reference() {
        let x = random_row(4 * QK_K, 2);
        let mut got = vec![BlockQ8K::ZERO; x.len() / QK_K];
        quantize_row_q8_k(&x, &mut got);
        assert_eq!(got, reference_q8_k(&x));
    }

    #[test]
    fn round_away_matches_libm_roundf_on_ties_and_near_ties() {
        for v in [0.5f32, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 126.5, -127.0, 0.0, 3.7, -3.7] {
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
    }
}
