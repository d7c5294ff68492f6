//! Small f32 vector primitives (dot, axpy, scale) for attention and norms, compiled twice:
//! once for AVX2+FMA and once portable, picked at run time so one binary runs anywhere.

use std::sync::OnceLock;

/// Whether to use the AVX2+FMA versions (decided once per process).
fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        if std::env::var("TPSERVE_KERNELS").as_deref() == Ok("scalar") {
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

// The bodies are written with 8 independent accumulators so the compiler vectorises them
// into one 256-bit register when AVX2 is enabled for the enclosing function.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for v in acc {
        s += v;
    }
    s
}

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn scale_body(y: &mut [f32], a: f32) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_body(a, b)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        super::axpy_body(y, a, x)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale(y: &mut [f32], a: f32) {
        super::scale_body(y, a)
    }
}

/// Sum of a[i] * b[i] over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time above).
        return unsafe { avx2::dot(a, b) };
    }
    dot_body(a, b)
}

/// y += a * x.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { avx2::axpy(y, a, x) };
    }
    axpy_body(y, a, x)
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
}
