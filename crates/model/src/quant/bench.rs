//! A speed check of the matmul kernels on the default model's shapes (Gemma 3 270M), run by
//! hand: `cargo test -p tpserve-model --lib quant::bench -- --ignored --nocapture`.

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kernels::{active_isa, Isa};
use super::{GgmlDType, QMatrix, TensorBytes};

/// Random blocks with sane f16 scales (the values do not matter for speed).
fn random_matrix(dtype: GgmlDType, rows: usize, cols: usize) -> QMatrix {
    let mut rng = StdRng::seed_from_u64(1);
    let mut bytes = vec![0u8; rows * dtype.bytes_for(cols).unwrap()];
    rng.fill(&mut bytes[..]);
    let scale_at: &[usize] = match dtype {
        GgmlDType::Q4_K | GgmlDType::Q5_K => &[0, 2],
        GgmlDType::Q6_K => &[208],
        _ => &[0],
    };
    let d = half::f16::from_f32(0.02).to_le_bytes();
    for block in bytes.chunks_mut(dtype.type_size()) {
        for &o in scale_at {
            block[o..o + 2].copy_from_slice(&d);
        }
    }
    QMatrix::new(dtype, rows, cols, TensorBytes::Owned(Arc::new(bytes))).unwrap()
}

/// Nanoseconds this thread has spent on a CPU (Linux `schedstat`), to see through the other
/// jobs sharing the build machine; `None` where unavailable.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Seconds of one matmul of `n` tokens on a pool of `threads`: the fastest wall time, and
/// for one thread also the mean on-CPU time (time the thread was not preempted).
fn time_matmul(m: &QMatrix, isa: Isa, n: usize, threads: usize) -> (f64, Option<f64>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let x: Vec<f32> = (0..n * m.cols()).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut out = vec![0f32; n * m.rows()];
    pool.install(|| {
        m.matmul_with(isa, &x, n, &mut out);
        let mut best = f64::MAX;
        let mut iters = 0;
        let cpu0 = thread_cpu_ns();
        let budget = Instant::now();
        while iters < 5 || (budget.elapsed().as_secs_f64() < 1.0 && iters < 200) {
            let t0 = Instant::now();
            m.matmul_with(isa, &x, n, &mut out);
            best = best.min(t0.elapsed().as_secs_f64());
            iters += 1;
        }
        let cpu = match (threads, cpu0, thread_cpu_ns()) {
            (1, Some(a), Some(b)) => Some((b - a) as f64 / 1e9 / iters as f64),
            _ => None,
        };
        std::hint::black_box(&out);
        (best, cpu)
    })
}

/// Single-thread read bandwidth of a buffer the size of the output projection, as the
/// ceiling for the memory-bound decode matmul.
fn read_bandwidth() -> f64 {
    let buf: Vec<u64> = (0..178_000_000 / 8).map(|i| i as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut s = [0u64; 8];
        for c in buf.chunks_exact(8) {
            for k in 0..8 {
                s[k] = s[k].wrapping_add(c[k]);
            }
        }
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best / 1e9
}

#[test]
#[ignore = "speed check, run by hand with --ignored --nocapture"]
fn matmul_speed_on_gemma_270m_shapes() {
    let isa = active_isa();
    let cases: &[(GgmlDType, usize, usize, &[usize])] = &[
        (GgmlDType::Q8_0, 262144, 640, &[1]),
        (GgmlDType::Q8_0, 2048, 640, &[1, 512]),
        (GgmlDType::Q5_0, 2048, 640, &[1, 512]),
        (GgmlDType::Q5_0, 640, 640, &[1, 512]),
        (GgmlDType::Q4_K, 640, 2048, &[1, 512]),
        (GgmlDType::Q6_K, 640, 2048, &[1, 512]),
        (GgmlDType::Q4_K, 640, 1024, &[1, 512]),
        (GgmlDType::Q4_0, 2048, 640, &[1, 512]),
        (GgmlDType::Q5_K, 640, 2048, &[1, 512]),
        (GgmlDType::F32, 640, 640, &[1, 64]),
    ];
    println!("kernels: {}; single-thread read bandwidth {:.1} GB/s", isa.name(), read_bandwidth());
    let only = std::env::var("QUANT_BENCH_ONLY").ok();
    for &(dtype, rows, cols, ns) in cases {
        if only.as_deref().is_some_and(|o| !o.eq_ignore_ascii_case(&dtype.to_string())) {
            continue;
        }
        let m = random_matrix(dtype, rows, cols);
        for &n in ns {
            for threads in [1, 2] {
                let (s, cpu) = time_matmul(&m, isa, n, threads);
                let gmac = |s: f64| (rows * cols * n) as f64 / s / 1e9;
                let cpu = cpu.map(|c| format!("  (on-CPU: {:.3} ms, {:.2} GB/s, {:.2} GMAC/s)", c * 1e3, m.nbytes() as f64 / c / 1e9, gmac(c)));
                println!(
                    "{dtype:>5} {rows:>6}x{cols:<5} n={n:<4} threads={threads}: {:>9.3} ms  {:>6.2} GB/s  {:>6.2} GMAC/s{}",
                    s * 1e3,
                    m.nbytes() as f64 / s / 1e9,
                    gmac(s),
                    cpu.unwrap_or_default()
                );
            }
        }
    }
}
