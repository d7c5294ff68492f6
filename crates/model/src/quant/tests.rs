//! Cross-module tests of the quantized kernels: every dot kernel against dequantize-then-dot,
//! matmul against a naive reference, matrix slicing, and malformed inputs.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::act::{dequantize_q8_0, dequantize_q8_k32, quantize_row_q8_0, quantize_row_q8_k32, BlockQ8K32, BlockQ8_0};
use super::kernels::{amx_available, available_isas, avx512_vnni_available, select, Isa, Kernel};
use super::packed::{packable, Packed};
use super::*;

use crate::quant::SUPPORTED as TYPES;

/// The kernel sets this machine can run (printed, so a test log says which paths ran).
fn isas() -> Vec<Isa> {
    let v = available_isas();
    eprintln!("kernel paths run here: {}", v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
    v
}

/// Byte offsets of the f16 scale fields of one block.
fn scale_fields(dtype: GgmlDType) -> &'static [usize] {
    match dtype {
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 => &[0],
        GgmlDType::Q4_K | GgmlDType::Q5_K => &[0, 2],
        GgmlDType::Q6_K => &[208],
        _ => &[],
    }
}

fn random_floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// One weight row of `cols` values: random bytes with sane f16 scales (odd seeds) or
/// quantized random floats (even seeds); float types always encode random floats.
fn random_row(dtype: GgmlDType, cols: usize, rng: &mut StdRng, raw: bool) -> Vec<u8> {
    if !raw || scale_fields(dtype).is_empty() {
        return quantize(dtype, &random_floats(rng, cols)).unwrap();
    }
    let mut bytes: Vec<u8> = (0..dtype.bytes_for(cols).unwrap()).map(|_| rng.gen()).collect();
    for block in bytes.chunks_mut(dtype.type_size()) {
        for &off in scale_fields(dtype) {
            let d = half::f16::from_f32(rng.gen_range(0.01f32..0.1));
            block[off..off + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    bytes
}

/// Σ a·b in f64, and Σ |a·b| as the scale for a relative tolerance.
fn dot_ref(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&x, &y)| (s + x as f64 * y as f64, m + (x as f64 * y as f64).abs()))
}

fn assert_close(got: f32, want: (f64, f64), rel: f64, what: &str) {
    let err = (got as f64 - want.0).abs();
    assert!(err <= rel * want.1 + 1e-6, "{what}: got {got}, want {}, err {err}, scale {}", want.0, want.1);
}

#[test]
fn every_dot_kernel_equals_dequantize_then_dot_on_quantized_activations() {
    let mut rng = StdRng::seed_from_u64(11);
    let cols = 4 * 256;
    for dtype in TYPES {
        for isa in isas() {
            let kernel = select(dtype, isa).unwrap();
            for trial in 0..6 {
                let w = random_row(dtype, cols, &mut rng, trial % 2 == 1);
                let mut wf = vec![0f32; cols];
                dequantize(dtype, &w, &mut wf).unwrap();
                let xs: Vec<Vec<f32>> = (0..4).map(|_| random_floats(&mut rng, cols)).collect();
                let what = format!("{dtype} {isa:?} trial {trial}");
                match &kernel {
                    Kernel::F32(k) => {
                        let a: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                        let four = four_tokens(k, &w, [a[0], a[1], a[2], a[3]]);
                        for t in 0..4 {
                            let want = dot_ref(&wf, a[t]);
                            assert_close((k.one)(&w, a[t]), want, 1e-5, &what);
                            assert_close(four[t], want, 1e-5, &what);
                        }
                    }
                    Kernel::Q8_0(k) => {
                        let q: Vec<Vec<BlockQ8_0>> = xs
                            .iter()
                            .map(|x| {
                                let mut b = vec![BlockQ8_0::ZERO; cols / 32];
                                quantize_row_q8_0(x, &mut b);
                                b
                            })
                            .collect();
                        let four = four_tokens(k, &w, [&q[0], &q[1], &q[2], &q[3]]);
                        for t in 0..4 {
                            let want = dot_ref(&wf, &dequantize_q8_0(&q[t]));
                            assert_close((k.one)(&w, &q[t]), want, 1e-4, &what);
                            assert_close(four[t], want, 1e-4, &what);
                        }
                    }
                    Kernel::Q8K32(k) => {
                        let q: Vec<Vec<BlockQ8K32>> = xs
                            .iter()
                            .map(|x| {
                                let mut b = vec![BlockQ8K32::ZERO; cols / 256];
                                quantize_row_q8_k32(x, &mut b);
                                b
                            })
                            .collect();
                        let four = four_tokens(k, &w, [&q[0], &q[1], &q[2], &q[3]]);
                        for t in 0..4 {
                            let want = dot_ref(&wf, &dequantize_q8_k32(&q[t]));
                            assert_close((k.one)(&w, &q[t]), want, 1e-4, &what);
                            assert_close(four[t], want, 1e-4, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn float_kernels_handle_rows_that_are_not_a_multiple_of_sixteen() {
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        for cols in [1, 7, 23, 40] {
            let m = random_matrix(dtype, 3, cols, &mut rng);
            let x = random_floats(&mut rng, 5 * cols);
            check_matmul_against_reference(&m, &x, 5);
        }
    }
}

fn random_matrix(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut StdRng) -> QMatrix {
    let mut bytes = Vec::new();
    for r in 0..rows {
        bytes.extend(random_row(dtype, cols, rng, r % 2 == 1));
    }
    QMatrix::new(dtype, rows, cols, TensorBytes::Owned(Arc::new(bytes))).unwrap()
}

/// The activations a kernel of `dtype` really multiplies with: x itself for float weights,
/// else x after Q8_0 / k-quant activation quantization and back.
fn effective_activations(dtype: GgmlDType, x: &[f32]) -> Vec<f32> {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => x.to_vec(),
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 => {
            let mut b = vec![BlockQ8_0::ZERO; x.len() / 32];
            quantize_row_q8_0(x, &mut b);
            dequantize_q8_0(&b)
        }
        _ => {
            let mut b = vec![BlockQ8K32::ZERO; x.len() / 256];
            quantize_row_q8_k32(x, &mut b);
            dequantize_q8_k32(&b)
        }
    }
}

/// Checks `m.matmul(x, n)` on every kernel set against a naive f64 loop over dequantized W.
fn check_matmul_against_reference(m: &QMatrix, x: &[f32], n: usize) {
    let (rows, cols) = (m.rows(), m.cols());
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        m.dequantize_row(r, &mut w[r * cols..(r + 1) * cols]);
    }
    for isa in isas() {
        let mut out = vec![f32::NAN; n * rows];
        m.matmul_with(isa, x, n, &mut out);
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let xq = effective_activations(m.dtype(), xt);
            for r in 0..rows {
                let wr = &w[r * cols..(r + 1) * cols];
                let what = format!("{} {isa:?} n={n} t={t} r={r}", m.dtype());
                assert_close(out[t * rows + r], dot_ref(wr, &xq), 1e-4, &what);
                // And against the unquantized input, loosely: 8-bit activations.
                assert_close(out[t * rows + r], dot_ref(wr, xt), 2e-2, &what);
            }
        }
    }
}

#[test]
fn matmul_matches_a_naive_reference_for_one_three_and_seventeen_tokens() {
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in TYPES {
        let (rows, cols) = (37, 512);
        let m = random_matrix(dtype, rows, cols, &mut rng);
        for n in [1, 3, 17] {
            let x = random_floats(&mut rng, n * cols);
            check_matmul_against_reference(&m, &x, n);
        }
    }
}

#[test]
fn matmul_of_a_large_matrix_splits_rows_over_threads_without_changing_results() {
    let mut rng = StdRng::seed_from_u64(4);
    // Q8_0 at 2000 x 1024 is above the size where decode cuts the rows into several tasks
    // per thread (the packed path's group split included).
    for (dtype, rows) in [(GgmlDType::Q4_K, 1000), (GgmlDType::Q8_0, 2000), (GgmlDType::Q5_0, 1000)] {
        let cols = 1024;
        let m = random_matrix(dtype, rows, cols, &mut rng);
        let x = random_floats(&mut rng, 9 * cols);
        for isa in isas() {
            let run = |threads: usize, n: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut out = vec![0f32; n * rows];
                pool.install(|| m.matmul_with(isa, &x[..n * cols], n, &mut out));
                out
            };
            for n in [1, 9] {
                assert_eq!(run(1, n), run(3, n), "{dtype} {isa:?} n={n}");
            }
            // A token's result does not depend on which other tokens share the batch.
            assert_eq!(run(2, 1), run(2, 9)[..rows].to_vec(), "{dtype} {isa:?}");
        }
    }
}

#[test]
fn the_packed_layout_holds_every_row_of_the_file() {
    let mut rng = StdRng::seed_from_u64(21);
    for dtype in TYPES.into_iter().filter(|&d| packable(d)) {
        // 37 rows: two full groups of 16 and a partial one; three blocks per row.
        let (rows, cols) = (37, 3 * dtype.block_size());
        let m = random_matrix(dtype, rows, cols, &mut rng);
        let p = Packed::new(dtype, rows, 3, |r| &m.as_bytes()[r * m.row_bytes()..(r + 1) * m.row_bytes()]);
        assert_eq!(p.nbytes() % 64, 0);
        let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            m.dequantize_row(r, &mut want);
            p.dequantize_row(r, &mut got);
            assert_eq!(got, want, "{dtype} row {r}");
        }
    }
}

#[test]
fn row_kernels_on_the_resident_copy_give_the_files_results_bit_for_bit() {
    // `prepare` for the row kernels copies the rows onto huge pages and every later matmul,
    // row lookup and slice reads the copy: it must hold the same rows in the same order.
    if !super::arena::huge_pages_enabled() {
        eprintln!("no transparent huge pages here: the row kernels keep the file's rows, no copy to check");
        return;
    }
    let mut rng = StdRng::seed_from_u64(23);
    for dtype in TYPES {
        for isa in isas() {
            if packable(dtype) && isa >= Isa::Avx2 {
                continue; // these run the packed kernels, on their own copy
            }
            let what = format!("{dtype} on {}", isa.name());
            // A slice, so the copy starts at a row other than the file's first.
            let m = random_matrix(dtype, 37, 512, &mut rng).slice_rows(3, 37).unwrap();
            let (rows, cols) = (m.rows(), m.cols());
            let x = random_floats(&mut rng, 9 * cols);
            let run = |m: &QMatrix, n: usize| {
                let mut out = vec![f32::NAN; n * m.rows()];
                m.matmul_with(isa, &x[..n * cols], n, &mut out);
                out
            };
            let (want1, want9) = (run(&m, 1), run(&m, 9));
            let mut want_row = vec![0f32; cols];
            m.dequantize_row(30, &mut want_row);
            let clone = m.clone();
            assert_eq!(m.packed_bytes(), 0);
            m.prepare_for(isa);
            assert_eq!(m.packed_bytes(), m.nbytes(), "{what}: the copy is the whole matrix");
            let file = m.as_bytes().as_ptr_range();
            assert!(!file.contains(&m.weights().as_ptr()), "{what}: the kernels still read the file");
            assert_eq!(clone.weights().as_ptr(), m.weights().as_ptr(), "{what}: a clone has its own copy");
            assert_eq!(run(&m, 1), want1, "{what}, 1 token");
            assert_eq!(run(&m, 9), want9, "{what}, 9 tokens");
            let mut row = vec![0f32; cols];
            m.dequantize_row(30, &mut row);
            assert_eq!(row, want_row, "{what}");
            let s = m.slice_rows(10, 20).unwrap();
            assert_eq!(s.packed_bytes(), 0, "{what}: a slice starts without a copy");
            let part = run(&s, 9);
            for t in 0..9 {
                assert_eq!(part[t * 10..(t + 1) * 10], want9[t * rows + 10..t * rows + 20], "{what}: slice");
            }
        }
    }
}

#[test]
fn the_packed_gemm_kernels_are_exact_at_the_extreme_codes() {
    // The largest codes of each type against the largest activations (±127), signs arranged
    // so that neighbouring products add up: where a kernel sums byte products in 16 bits
    // (AVX2's `vpmaddubsw`), this is where it would saturate. Q8_0 alternates rows of -128 and
    // 127; the others are all ones (codes 15, 31, 63; Q4_K's six-bit scales and mins 63).
    let packed: Vec<Isa> = available_isas().into_iter().filter(|&i| i >= Isa::Avx2).collect();
    for dtype in TYPES.into_iter().filter(|&d| packable(d)) {
        let (rows, cols) = (19, 4 * dtype.block_size());
        let mut bytes = Vec::new();
        for r in 0..rows {
            let fill = match dtype {
                GgmlDType::Q8_0 if r % 2 == 0 => 0x80,
                GgmlDType::Q8_0 => 0x7F,
                _ => 0xFF,
            };
            let mut row = vec![fill; dtype.bytes_for(cols).unwrap()];
            for block in row.chunks_mut(dtype.type_size()) {
                for &off in scale_fields(dtype) {
                    block[off..off + 2].copy_from_slice(&half::f16::from_f32(0.05).to_le_bytes());
                }
            }
            bytes.extend(row);
        }
        let m = QMatrix::new(dtype, rows, cols, TensorBytes::Owned(Arc::new(bytes))).unwrap();
        let signs: [fn(usize) -> f32; 4] = [|_| 1.0, |_| -1.0, |c| if c % 2 == 0 { 1.0 } else { -1.0 }, |c| if c % 4 < 2 { 1.0 } else { -1.0 }];
        for n in [1, 2, 3, 5] {
            let x: Vec<f32> = (0..n * cols).map(|i| signs[(i / cols) % 4](i % cols)).collect();
            let mut want = vec![f32::NAN; n * rows];
            m.matmul_with(Isa::Scalar, &x, n, &mut want);
            for &isa in &packed {
                let mut got = vec![f32::NAN; n * rows];
                m.matmul_with(isa, &x, n, &mut got);
                assert_eq!(want, got, "{dtype} on {} n={n}", isa.name());
            }
        }
    }
}

#[test]
fn the_packed_gemm_kernels_give_the_scalar_kernels_results_bit_for_bit() {
    // Every packed path (AVX2, AVX-VNNI, AVX-512 VNNI, AMX) against the scalar kernels.
    // Exact integer block sums and the scalar loop's float operations in its order: equal,
    // not close, for every batch size (the kernels' token tiles and their remainders) and
    // every way a group's 16 lanes can be cut off (the 256-bit kernels do them as two halves).
    let packed: Vec<Isa> = available_isas().into_iter().filter(|&i| i >= Isa::Avx2).collect();
    eprintln!("packed GEMM kernels run here: {packed:?}");
    if !avx512_vnni_available() {
        eprintln!("no AVX-512 VNNI on this CPU: the 512-bit packed kernels are not run here");
    }
    if !amx_available() {
        eprintln!("no AMX-INT8 here (CPU, or the OS's permission): the AMX tile kernels are not run here");
    }
    let mut rng = StdRng::seed_from_u64(22);
    for dtype in TYPES.into_iter().filter(|&d| packable(d)) {
        for (rows, blocks) in [(37, 3), (16, 20), (5, 1), (29, 2), (8, 1)] {
            let cols = blocks * dtype.block_size();
            let m = random_matrix(dtype, rows, cols, &mut rng);
            // 16, 32: whole AMX tiles; 33, 44, 47: a last tile run by the VNNI kernel, a padded one.
            for n in [1, 2, 3, 4, 5, 7, 8, 9, 16, 21, 32, 33, 44, 47] {
                let x = random_floats(&mut rng, n * cols);
                let mut want = vec![f32::NAN; n * rows];
                m.matmul_with(Isa::Scalar, &x, n, &mut want);
                for &isa in &packed {
                    let mut got = vec![f32::NAN; n * rows];
                    m.matmul_with(isa, &x, n, &mut got);
                    assert_eq!(want, got, "{dtype} {isa:?} {rows}x{cols} n={n}");
                }
            }
        }
    }
}

#[test]
fn slice_rows_gives_the_matching_rows_of_the_full_matmul() {
    let mut rng = StdRng::seed_from_u64(8);
    for dtype in TYPES {
        let m = random_matrix(dtype, 20, 256, &mut rng);
        let x = random_floats(&mut rng, 5 * 256);
        let mut full = vec![0f32; 5 * 20];
        m.matmul(&x, 5, &mut full);
        let s = m.slice_rows(6, 15).unwrap();
        assert_eq!((s.rows(), s.cols(), s.nbytes()), (9, 256, 9 * m.row_bytes()));
        let mut part = vec![0f32; 5 * 9];
        s.matmul(&x, 5, &mut part);
        for t in 0..5 {
            assert_eq!(part[t * 9..(t + 1) * 9], full[t * 20 + 6..t * 20 + 15], "{dtype}");
        }
        let mut row = vec![0f32; 256];
        let mut want = vec![0f32; 256];
        s.dequantize_row(2, &mut row);
        m.dequantize_row(8, &mut want);
        assert_eq!(row, want);
    }
}

#[test]
fn slice_cols_halves_sum_to_the_full_matmul() {
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in TYPES {
        let (rows, cols) = (12, 1024);
        let m = random_matrix(dtype, rows, cols, &mut rng);
        let x = random_floats(&mut rng, 3 * cols);
        let mut full = vec![0f32; 3 * rows];
        m.matmul(&x, 3, &mut full);
        let (a, b) = (m.slice_cols(0, 512).unwrap(), m.slice_cols(512, 1024).unwrap());
        let xa: Vec<f32> = x.chunks(cols).flat_map(|r| r[..512].to_vec()).collect();
        let xb: Vec<f32> = x.chunks(cols).flat_map(|r| r[512..].to_vec()).collect();
        let (mut oa, mut ob) = (vec![0f32; 3 * rows], vec![0f32; 3 * rows]);
        a.matmul(&xa, 3, &mut oa);
        b.matmul(&xb, 3, &mut ob);
        for i in 0..3 * rows {
            let sum = oa[i] + ob[i];
            assert!((sum - full[i]).abs() <= 1e-4 * (1.0 + full[i].abs()), "{dtype} {i}: {sum} vs {}", full[i]);
        }
    }
}

#[test]
fn malformed_shapes_lengths_and_ranges_are_errors_not_panics() {
    let owned = |n: usize| TensorBytes::Owned(Arc::new(vec![0u8; n]));
    assert!(matches!(QMatrix::new(GgmlDType::Q8_0, 2, 64, owned(135)), Err(QuantError::ByteLength { expected: 136, got: 135, .. })));
    assert!(matches!(QMatrix::new(GgmlDType::Q4_K, 2, 640, owned(0)), Err(QuantError::NotBlockMultiple { len: 640, block: 256, .. })));
    assert!(matches!(QMatrix::new(GgmlDType::Q2_K, 1, 256, owned(84)), Err(QuantError::Unsupported(_))));
    assert!(matches!(QMatrix::new(GgmlDType::F32, usize::MAX / 2, 4, owned(0)), Err(QuantError::ShapeOverflow { .. })));
    let m = QMatrix::new(GgmlDType::Q8_0, 4, 64, owned(4 * 68)).unwrap();
    assert!(matches!(m.slice_rows(3, 5), Err(QuantError::BadRange { axis: "row", .. })));
    assert!(matches!(m.slice_rows(3, 2), Err(QuantError::BadRange { .. })));
    assert!(matches!(m.slice_cols(0, 96), Err(QuantError::BadRange { axis: "column", .. })));
    assert!(matches!(m.slice_cols(16, 64), Err(QuantError::ColumnNotOnBlock { col: 16, block: 32, .. })));
    assert_eq!(m.slice_cols(32, 64).unwrap().nbytes(), 4 * 34);

    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, &[0u8; 100]).unwrap();
    // SAFETY: the temporary file is private to this test and not modified while mapped.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
    let past_end = TensorBytes::Mmap { map: map.clone(), offset: 90, len: 34 };
    assert!(past_end.as_slice().is_empty());
    assert!(matches!(
        QMatrix::new(GgmlDType::Q8_0, 1, 32, past_end),
        Err(QuantError::OutOfFile(tpserve_gguf::OutOfFile { offset: 90, len: 34, file_len: 100 }))
    ));
    let overflow = TensorBytes::Mmap { map: map.clone(), offset: usize::MAX, len: 2 };
    assert!(matches!(QMatrix::new(GgmlDType::Q8_0, 1, 32, overflow), Err(QuantError::OutOfFile(_))));
    let ok = TensorBytes::Mmap { map, offset: 66, len: 34 };
    assert_eq!(QMatrix::new(GgmlDType::Q8_0, 1, 32, ok).unwrap().nbytes(), 34);
}

#[test]
fn kernel_name_reports_the_kernels_this_process_runs() {
    let cap = std::env::var("TPSERVE_KERNELS").unwrap_or_default();
    assert_eq!(kernel_name(), super::kernels::capped_isa(&cap, &available_isas()).name());
}

#[test]
fn a_kernel_cap_picks_the_best_level_at_most_it() {
    use super::kernels::capped_isa;
    let all = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Avx512Amx];
    assert_eq!(capped_isa("", &all), Isa::Avx512Amx);
    assert_eq!(capped_isa("avx512-vnni", &all), Isa::Avx512Vnni, "a cap below AMX turns the tiles off");
    assert_eq!(capped_isa("AVX-VNNI", &all), Isa::AvxVnni);
    assert_eq!(capped_isa("avx2", &all), Isa::Avx2);
    assert_eq!(capped_isa("scalar", &all), Isa::Scalar);
    assert_eq!(capped_isa("sse9", &all), Isa::Avx512Amx, "an unknown name caps nothing");
    // An AVX-512 CPU without AVX-VNNI (Ice Lake, Zen 4): a cap of avx-vnni gives AVX2.
    let no_vex_vnni = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];
    assert_eq!(capped_isa("avx-vnni", &no_vex_vnni), Isa::Avx2);
    assert_eq!(capped_isa("avx512-vnni", &[Isa::Scalar, Isa::Avx2]), Isa::Avx2);
}

#[test]
fn asking_for_a_missing_instruction_set_falls_back_to_scalar_kernels() {
    // On CPUs with AVX2 this only checks that both choices give kernels for every type.
    for dtype in TYPES {
        assert!(select(dtype, Isa::Avx2).is_some() && select(dtype, Isa::Scalar).is_some());
    }
    assert!(select(GgmlDType::Q3_K, Isa::Avx2).is_none());
}

#[test]
fn simd_activation_quantizers_give_the_same_blocks_as_the_scalar_reference() {
    let mut rng = StdRng::seed_from_u64(12);
    let mut x: Vec<f32> = (0..8 * 256).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    // Exact rounding ties and an all-zero block.
    x[3] = 0.5 * 4.0 / 127.0;
    x[300..556].iter_mut().for_each(|v| *v = 0.0);
    for isa in isas() {
        let (q8_0, q8_k32) = super::kernels::activation_quantizers(isa);
        let (mut a, mut b) = (vec![BlockQ8_0::ZERO; x.len() / 32], vec![BlockQ8_0::ZERO; x.len() / 32]);
        q8_0(&x, &mut a);
        quantize_row_q8_0(&x, &mut b);
        assert_eq!(a, b, "{isa:?}");
        let (mut a, mut b) = (vec![BlockQ8K32::ZERO; x.len() / 256], vec![BlockQ8K32::ZERO; x.len() / 256]);
        q8_k32(&x, &mut a);
        quantize_row_q8_k32(&x, &mut b);
        assert_eq!(a, b, "{isa:?}");
    }
}

#[test]
fn a_tokens_result_is_bit_identical_whatever_batch_it_is_in_for_every_type() {
    // Batch invariance: the multi-token kernels add the same terms in the same order as the
    // one-token kernel, so batching and chunked prefill never change a result.
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in TYPES {
        let (rows, cols) = (63, 256);
        let m = random_matrix(dtype, rows, cols, &mut rng);
        let n = 29;
        let x = random_floats(&mut rng, n * cols);
        for isa in isas() {
            let mut all = vec![0f32; n * rows];
            m.matmul_with(isa, &x, n, &mut all);
            for t in 0..n {
                let mut one = vec![0f32; rows];
                m.matmul_with(isa, &x[t * cols..(t + 1) * cols], 1, &mut one);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{dtype} {isa:?}, token {t}");
            }
        }
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let (u, v): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// `x` after llama.cpp's Q8_K activation quantization (`quantize_row_q8_K_ref`: one scale per
/// 256, the signed extreme at -127) and back, in f64: what its k-quant kernels multiply with.
fn q8_k_reference(x: &[f32]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(256) {
        let max = b.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        if max == 0.0 {
            out.extend(b.iter().map(|_| 0.0));
            continue;
        }
        let iscale = -127.0 / max;
        out.extend(b.iter().map(|&v| ((iscale * v).round_ties_even().min(127.0) / iscale) as f64));
    }
    out
}

/// The k-quant matmuls of the default model on its own weights (attention output in Q4_K,
/// FFN down in Q4_K and Q6_K), for every kernel path of this CPU, against the exact product
/// (dequantized weights, unquantized inputs, f64) on heavy-tailed inputs like the FFN down
/// projection's (GELU(gate) · up, with outliers): with a scale per 32 inputs they must come
/// out clearly closer to exact than with llama.cpp's Q8_K inputs (a scale per 256).
#[test]
fn k_quant_matmuls_on_the_default_models_weights_are_closer_to_exact_than_q8_k_inputs() {
    let Some(path) = tpserve_fetch::testing::default_model() else { return };
    let g = tpserve_gguf::Gguf::open(path).unwrap();
    let ffn_down = |dtype: GgmlDType| (0..18).map(|l| format!("blk.{l}.ffn_down.weight")).find(|n| g.tensor_info(n).is_ok_and(|t| t.dtype == dtype)).unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    let n = 4;
    for (name, cols) in [("blk.0.attn_output.weight".to_string(), 1024), (ffn_down(GgmlDType::Q4_K), 2048), (ffn_down(GgmlDType::Q6_K), 2048)] {
        let m = crate::weights::matrix(&g, &name, 640, cols).unwrap();
        assert!(matches!(m.dtype(), GgmlDType::Q4_K | GgmlDType::Q6_K), "{name} is {}", m.dtype());
        let x: Vec<f32> = (0..n * cols)
            .map(|i| {
                let (gate, up) = (normal(&mut rng) * 1.5, normal(&mut rng));
                let gelu = 0.5 * gate * (1.0 + (0.797_884_6 * (gate + 0.044_715 * gate.powi(3))).tanh());
                let outlier = if i % 97 == 0 { 25.0 } else { 1.0 };
                (gelu * up * outlier) as f32
            })
            .collect();
        let mut w = vec![0f32; 640 * cols];
        for r in 0..640 {
            m.dequantize_row(r, &mut w[r * cols..(r + 1) * cols]);
        }
        // Relative RMS distance of `out` from the exact product.
        let exact: Vec<f64> = (0..n * 640).map(|i| dot_ref(&w[(i % 640) * cols..][..cols], &x[(i / 640) * cols..][..cols]).0).collect();
        let rel = |out: &[f64]| {
            let (e, s) = out.iter().zip(&exact).fold((0.0, 0.0), |(e, s), (o, x)| (e + (o - x) * (o - x), s + x * x));
            (e / s).sqrt()
        };
        let q8_k: Vec<f64> = (0..n * 640)
            .map(|i| {
                let xq = q8_k_reference(&x[(i / 640) * cols..][..cols]);
                w[(i % 640) * cols..][..cols].iter().zip(&xq).map(|(&a, b)| a as f64 * b).sum()
            })
            .collect();
        let q8_k_err = rel(&q8_k);
        for isa in isas() {
            let mut out = vec![0f32; n * 640];
            m.matmul_with(isa, &x, n, &mut out);
            let err = rel(&out.iter().map(|&v| v as f64).collect::<Vec<_>>());
            eprintln!("{name} ({}) {isa:?}: relative error {err:.5}, with Q8_K inputs {q8_k_err:.5}", m.dtype());
            assert!(err < 0.8 * q8_k_err, "{name} {isa:?}: error {err} is not clearly below Q8_K's {q8_k_err}");
        }
    }
}

/// One weight row · four activation rows through the multi-row entry point.
fn four_tokens<A>(k: &super::kernels::DotKernels<A>, w: &[u8], a: [&[A]; 4]) -> [f32; 4] {
    let mut out = [[0f32; 4]; 1];
    (k.rows4)(w, w.len(), a, &mut out);
    out[0]
}

/// Throughput of batched matmuls in the shapes of a decode step (one thread), every kernel
/// set this CPU has but the scalar one, interleaved, best of `TPSERVE_BENCH_ROUNDS` (5) rounds:
/// `cargo test -p tpserve-model --release -- --ignored --nocapture matmul_throughput`
/// (`TPSERVE_BENCH_ONLY=Q8_0`, `TPSERVE_BENCH_N=1,8`, `TPSERVE_BENCH_ROWS=4096` narrow it).
#[test]
#[ignore]
fn matmul_throughput() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let rounds: usize = std::env::var("TPSERVE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let isas: Vec<Isa> = available_isas().into_iter().filter(|&i| i != Isa::Scalar).collect();
    let shapes = [
        (GgmlDType::Q8_0, 131072, 640),
        (GgmlDType::Q5_0, 2048, 640),
        (GgmlDType::Q4_0, 2048, 640),
        (GgmlDType::Q4_K, 2048, 1024),
        (GgmlDType::Q6_K, 640, 2048),
    ];
    let only = std::env::var("TPSERVE_BENCH_ONLY").ok();
    let ns: Vec<usize> = std::env::var("TPSERVE_BENCH_N").ok().map_or(vec![1, 8, 32], |v| v.split(',').map(|n| n.parse().unwrap()).collect());
    for (dtype, rows, cols) in shapes {
        if only.as_deref().is_some_and(|o| !o.eq_ignore_ascii_case(&dtype.to_string())) {
            continue;
        }
        let rows = std::env::var("TPSERVE_BENCH_ROWS").ok().map_or(rows, |v| v.parse().unwrap());
        let bytes: Vec<u8> = (0..rows).flat_map(|_| random_row(dtype, cols, &mut rng, false)).collect();
        let m = QMatrix::new(dtype, rows, cols, TensorBytes::Owned(Arc::new(bytes))).unwrap();
        for &n in &ns {
            let x = random_floats(&mut rng, n * cols);
            let mut out = vec![0f32; n * rows];
            let reps = (1_000_000_000 / (rows * cols * n)).max(1);
            // The AVX2 row kernels (`avx2-rows`, what AVX2 ran before its packed kernels) too.
            let paths: Vec<(Isa, bool)> = isas.iter().map(|&i| (i, false)).chain(isas.contains(&Isa::Avx2).then_some((Isa::Avx2, true))).collect();
            let mut best = vec![f64::MAX; paths.len()];
            for _ in 0..rounds {
                for (i, &(isa, rows_only)) in paths.iter().enumerate() {
                    let t = std::time::Instant::now();
                    if rows_only {
                        pool.install(|| (0..reps).for_each(|_| m.matmul_rows(isa, &x, n, &mut out)));
                    } else {
                        pool.install(|| (0..reps).for_each(|_| m.matmul_with(isa, &x, n, &mut out)));
                    }
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
            }
            let rates: Vec<String> = paths
                .iter()
                .zip(&best)
                .map(|(&(isa, rows_only), s)| {
                    format!("{}{} {:.1}", isa.name(), if rows_only { "-rows" } else { "" }, (reps * rows * cols * n) as f64 / s / 1e9)
                })
                .collect();
            println!("{dtype:?} {rows}x{cols} n={n}: GMAC/s {}", rates.join(", "));
        }
    }
}
