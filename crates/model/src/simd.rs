//! Small f32 vector primitives (dot, axpy, scale, the residual add, GeGLU) for attention,
//! norms and the FFN, compiled twice: once for AVX2+FMA and once portable, picked at run
//! time so one binary runs anywhere; plus [`par_rows`], the row loop they run under.

use std::sync::OnceLock;

/// Whether to use the AVX2+FMA versions (decided once per process).
pub(crate) fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        if std::env::var("TPSERVE_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("scalar")) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

// The bodies are plain loops that the compiler vectorises into 256-bit registers when AVX2
// is enabled for the enclosing function.
/// a · b + c: one fused instruction where the caller is compiled with FMA (`mul_add` would be
/// a slow libm call anywhere else).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The portable body of [`dot`]; inlined into callers compiled for AVX2 it vectorises there.
#[inline(always)]
pub(crate) fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    // 32 independent lanes = four 256-bit accumulators, so consecutive FMAs do not wait on
    // each other's latency.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 32];
    let mut ca = a.chunks_exact(32);
    let mut cb = b.chunks_exact(32);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..32 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut s: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for i in 0..8 {
        s += (acc[i] + acc[i + 8]) + (acc[i + 16] + acc[i + 24]);
    }
    s
}

/// The portable body of [`axpy`].
#[inline(always)]
pub(crate) fn axpy_body<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(a, *x, *y);
    }
}

/// The portable body of [`scale`].
#[inline(always)]
pub(crate) fn scale_body(y: &mut [f32], a: f32) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

/// GELU (tanh approximation) of every f16 value, indexed by its bits: llama.cpp computes
/// GELU through the same table, which is both faster than `tanh` and closer to its numbers.
fn gelu_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                half::f16::from_f32(gelu_tanh(x)).to_f32()
            })
            .collect()
    })
}

/// GELU with the tanh approximation, computed directly.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU through the f16 table, with the exact limits outside (-10, 10).
#[inline(always)]
fn gelu_lookup(table: &[f32], x: f32, bits: u16) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        table[bits as usize]
    }
}

/// Elements below which element-wise work stays on the calling thread (a decode step's
/// vectors), above which it is split over the current rayon pool (a prefill's matrices).
const PAR_ELEMENTS: usize = 1 << 15;

/// Calls `f(i, row)` for every `row_len`-long row `i` of `x`, in parallel when `x` is large.
pub fn par_rows(x: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    if x.len() >= PAR_ELEMENTS && rayon::current_num_threads() > 1 {
        // Whole rows per task, about PAR_ELEMENTS / 4 elements each.
        let rows_per_task = (PAR_ELEMENTS / 4 / row_len.max(1)).max(1);
        x.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(ci, c)| c.chunks_exact_mut(row_len).enumerate().for_each(|(j, row)| f(ci * rows_per_task + j, row)));
    } else {
        x.chunks_exact_mut(row_len).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// Applies `f` to matching chunks of `x` and `y`, in parallel when they are large.
fn par_zip(x: &mut [f32], y: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    use rayon::prelude::*;
    if x.len() >= PAR_ELEMENTS && rayon::current_num_threads() > 1 {
        x.par_chunks_mut(PAR_ELEMENTS / 4).zip(y.par_chunks(PAR_ELEMENTS / 4)).for_each(|(a, b)| f(a, b));
    } else {
        f(x, y)
    }
}

/// x += y, element-wise (the residual connection).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    par_zip(x, y, |a, b| axpy(a, 1.0, b));
}

/// `gate[i] = GELU(gate[i]) · up[i]`: Gemma's gated FFN activation.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    par_zip(gate, up, geglu_serial);
}

fn geglu_serial(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    #[cfg(target_arch = "x86_64")]
    if use_avx2() && is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C are present (checked at run time).
        return unsafe { avx2::geglu(table, gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_lookup(table, *g, half::f16::from_f32(*g).to_bits()) * u;
    }
}

/// x86 helpers shared by the AVX2 kernels of `quant` and `attention`.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes, in one fixed order (kernels rely on it for batch invariance).
    ///
    /// # Safety
    /// The CPU must have AVX2 (no memory is touched).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The primitives recompiled with AVX2+FMA enabled, so their portable bodies vectorise.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::geglu`] with the f32 → f16 conversion done 8 at a time by F16C, over the
    /// shorter of `gate` and `up`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; any lengths are fine.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn geglu(table: &[f32], gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let mut i = 0;
        let mut bits = [0u16; 8];
        while i + 8 <= n {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(bits.as_mut_ptr() as *mut __m128i, h);
            for k in 0..8 {
                let g = gate[i + k];
                gate[i + k] = super::gelu_lookup(table, g, bits[k]) * up[i + k];
            }
            i += 8;
        }
        for k in i..n {
            gate[k] = super::gelu_lookup(table, gate[k], half::f16::from_f32(gate[k]).to_bits()) * up[k];
        }
    }

    /// [`super::dot`] with FMA.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (these three read only through slices).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_body::<true>(a, b)
    }
    /// [`super::axpy`] with FMA.
    ///
    /// # Safety
    /// As [`dot`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        super::axpy_body::<true>(y, a, x)
    }
    /// [`super::scale`], vectorised.
    ///
    /// # Safety
    /// As [`dot`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale(y: &mut [f32], a: f32) {
        super::scale_body(y, a)
    }
}

/// `Σ a[i] · b[i]` over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time above).
        return unsafe { avx2::dot(a, b) };
    }
    dot_body::<false>(a, b)
}

/// y += a * x, over the shorter length.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(y, a, x) };
    }
    axpy_body::<false>(y, a, x)
}

/// y *= a.
#[inline]
pub fn scale(y: &mut [f32], a: f32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::scale(y, a) };
    }
    scale_body(y, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_primitives_equal_the_plain_loops() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).cos()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-5);
        let mut y = b.clone();
        axpy(&mut y, 0.5, &a);
        for i in 0..37 {
            assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
        }
        scale(&mut y, 2.0);
        assert!((y[3] - 2.0 * (b[3] + 0.5 * a[3])).abs() < 1e-6);
    }

    #[test]
    fn table_gelu_is_within_f16_rounding_of_the_formula() {
        let xs: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 0.013).chain([-12.0, 11.0, 0.0]).collect();
        let ones = vec![1.0; xs.len()];
        let mut got = xs.clone();
        geglu(&mut got, &ones);
        for (x, g) in xs.iter().zip(&got) {
            let want = gelu_tanh(*x);
            assert!((g - want).abs() <= 2e-3 * (1.0 + want.abs()), "gelu({x}) = {g}, formula {want}");
        }
        let mut twice = vec![0.5f32, -0.5];
        geglu(&mut twice, &[2.0, 4.0]);
        assert!((twice[0] - 2.0 * gelu_tanh(0.5)).abs() < 2e-3 && (twice[1] - 4.0 * gelu_tanh(-0.5)).abs() < 2e-3);
    }
}
