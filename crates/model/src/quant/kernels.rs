//! Run-time kernel selection, detected once per process: AMX-INT8 tiles for the matmuls of
//! 16 tokens or more in the formats that have them, on top of AVX-512 VNNI (GEMM kernels over
//! repacked weights for the formats the default model uses, AVX2 for the rest) when the CPU
//! and the OS allow AMX; else AVX-512 VNNI; else AVX-VNNI (the same GEMM kernels at 256 bits,
//! AVX2 for the rest) when it has that, else AVX2, else the portable scalar kernels;
//! `TPSERVE_KERNELS=avx512-vnni`, `avx-vnni`, `avx2` or `scalar` caps the choice (for
//! comparing them and for debugging).

use std::sync::OnceLock;

use super::act::{BlockQ8K32, BlockQ8_0};
use super::{scalar, GgmlDType};

/// An instruction-set level the dot kernels are written for, in order: each later one is
/// preferred where the CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust; the reference and the fallback.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: the row kernels (`avx2`), and the 256-bit GEMM kernels
    /// over repacked weights where a type has them (`gemm256::avx2`, `vpmaddubsw`).
    Avx2,
    /// AVX2's kernels, and the 256-bit AVX-VNNI twins of the AVX-512 GEMM kernels over
    /// repacked weights where a type has them (CPUs with AVX-VNNI but no AVX-512).
    AvxVnni,
    /// AVX2's kernels, and the AVX-512 (F, BW) + VNNI GEMM kernels over repacked weights
    /// where a type has them.
    Avx512Vnni,
    /// AVX-512 VNNI's kernels, and AMX-INT8 tile kernels (`quant::amx`) for Q8_0, Q4_0, Q5_0
    /// and Q4_K matmuls of 16 tokens and more (prefill and batched decode).
    Avx512Amx,
}

impl Isa {
    /// The name reported in logs and by [`kernel_name`].
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512Amx => "avx512-amx",
        }
    }
}

/// Whether this CPU can run the AVX2 kernels (independent of `TPSERVE_KERNELS`).
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU can run the AVX-VNNI kernels (independent of `TPSERVE_KERNELS`).
pub fn avx_vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_available() && is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU can run the AVX-512 VNNI kernels (independent of `TPSERVE_KERNELS`).
pub fn avx512_vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU (and OS) can run the AMX-INT8 tile kernels (independent of
/// `TPSERVE_KERNELS`); asks Linux for the tile permission on the first call.
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Every kernel set this CPU can run, the portable one first.
pub fn available_isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if avx2_available() {
        v.push(Isa::Avx2);
    }
    if avx_vnni_available() {
        v.push(Isa::AvxVnni);
    }
    if avx512_vnni_available() {
        v.push(Isa::Avx512Vnni);
    }
    if amx_available() {
        v.push(Isa::Avx512Amx);
    }
    v
}

/// The kernels this process uses: the best the CPU supports, or at most what the environment
/// variable `TPSERVE_KERNELS` names (`scalar`, `avx2`, `avx-vnni`, `avx512-vnni`; for testing and for
/// debugging; another value is ignored).
pub fn active_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| capped_isa(&std::env::var("TPSERVE_KERNELS").unwrap_or_default(), &available_isas()))
}

/// The best of `available` (ascending) that is at most the level `cap` names.
pub(crate) fn capped_isa(cap: &str, available: &[Isa]) -> Isa {
    let cap = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Avx512Amx].into_iter().find(|i| i.name().eq_ignore_ascii_case(cap.trim()));
    available.iter().copied().filter(|&i| cap.is_none_or(|c| i <= c)).max().unwrap_or(Isa::Scalar)
}

/// "avx512-amx", "avx512-vnni", "avx-vnni", "avx2" or "scalar": which matmul kernels this process runs, for the startup log.
pub fn kernel_name() -> &'static str {
    active_isa().name()
}

/// Weight row · one activation row.
pub(crate) type Dot1<A> = fn(&[u8], &[A]) -> f32;
/// Many weight rows (back to back, `row_bytes` each) · four activation rows: `out[r][t]`.
/// One call per task keeps the per-row call and length checks out of the prefill loop, and
/// lets a kernel work on two rows at once.
pub(crate) type DotRows4<A> = fn(&[u8], usize, [&[A]; 4], &mut [[f32; 4]]);

/// The two entry points of one weight type's kernel, over activations of type `A`.
pub(crate) struct DotKernels<A> {
    /// Decode (and the last `n % 4` tokens of a prefill): one row · one token.
    pub one: Dot1<A>,
    /// Prefill: a task's rows · four tokens at a time.
    pub rows4: DotRows4<A>,
    /// For formats worth decoding once per prefill task: how, and the kernel over the result.
    pub unpacked: Option<Unpacked<A>>,
}

/// A decoded copy of a task's weight rows and the kernel that reads it. The results are
/// bit-identical to `rows4` on the packed rows.
pub(crate) struct Unpacked<A> {
    /// Bytes of one decoded row per packed block.
    pub bytes_per_block: usize,
    /// Packed rows (back to back) → decoded rows, written into the buffer.
    pub unpack: fn(&[u8], &mut Vec<u8>),
    /// [`DotKernels::rows4`] over the decoded rows (`row_bytes` is then the decoded length).
    pub rows4: DotRows4<A>,
}

/// Checks the lengths every multi-row entry point relies on: `w` is exactly `out.len()`
/// rows of `row_bytes`, and every activation row has `row_bytes / unit` units (blocks, or
/// floats for float weights, `unit` bytes of weight each). Panics otherwise.
fn check_rows4<A>(w: &[u8], row_bytes: usize, unit: usize, a: &[&[A]; 4], out: &[[f32; 4]]) {
    assert_eq!(w.len(), out.len() * row_bytes, "weight rows / output length mismatch");
    for r in a {
        assert_eq!(row_bytes, r.len() * unit, "weight row / activation length mismatch");
    }
}

/// A weight type's kernels, tagged by the activation format they need.
pub(crate) enum Kernel {
    /// F32/F16/BF16 weights: activations stay f32.
    F32(DotKernels<f32>),
    /// Q8_0/Q4_0/Q5_0 weights: activations quantized to Q8_0.
    Q8_0(DotKernels<BlockQ8_0>),
    /// k-quant weights: activations quantized to [`BlockQ8K32`] (a scale per 32).
    Q8K32(DotKernels<BlockQ8K32>),
}

/// Scalar kernels: the multi-row entry point is one-row calls.
macro_rules! scalar_kernels {
    ($variant:ident, $f:path, $a:ty) => {
        Kernel::$variant(DotKernels {
            one: $f,
            rows4: |w: &[u8], row_bytes: usize, a: [&[$a]; 4], out: &mut [[f32; 4]]| {
                for (wr, o) in w.chunks_exact(row_bytes.max(1)).zip(out.iter_mut()) {
                    *o = [$f(wr, a[0]), $f(wr, a[1]), $f(wr, a[2]), $f(wr, a[3])];
                }
            },
            unpacked: None,
        })
    };
}

/// Safe wrappers around the AVX2 kernels. They are only reachable through [`select`], which
/// hands them out only after [`avx2_available`] said yes; each checks the lengths the
/// unsafe kernel relies on.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_kernels {
    ($variant:ident, $f:ident, $a:ty, $bytes_per_unit:expr, $pairs:expr) => {{
        fn one(w: &[u8], a: &[$a]) -> f32 {
            assert_eq!(w.len(), a.len() * $bytes_per_unit, "weight row / activation length mismatch");
            // SAFETY: only handed out by `select` after `avx2_available()`; lengths checked above.
            unsafe { super::avx2::$f::<1>(w, [a])[0] }
        }
        fn rows4(w: &[u8], row_bytes: usize, a: [&[$a]; 4], out: &mut [[f32; 4]]) {
            check_rows4(w, row_bytes, $bytes_per_unit, &a, out);
            // SAFETY: as in `one`; `check_rows4` verified every length.
            unsafe { super::avx2::rows4!($f, $pairs, w, row_bytes, a, out) }
        }
        Kernel::$variant(DotKernels { one, rows4, unpacked: None })
    }};
}

/// AVX2 Q4_0/Q5_0 kernels with the decode-once prefill path.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_unpacking_kernels {
    ($f:ident, $k:ident, $bytes:expr) => {{
        let Kernel::Q8_0(mut k) = avx2_kernels!(Q8_0, $f, BlockQ8_0, $bytes, false) else { unreachable!() };
        fn unpack(w: &[u8], out: &mut Vec<u8>) {
            assert_eq!(w.len() % $bytes, 0, "packed rows are whole blocks");
            // SAFETY: only handed out by `select` after `avx2_available()`; whole blocks checked.
            unsafe { super::avx2::unpack_32::<{ super::avx2::$k }>(w, $bytes, out) }
        }
        fn rows4(w: &[u8], row_bytes: usize, a: [&[BlockQ8_0]; 4], out: &mut [[f32; 4]]) {
            check_rows4(w, row_bytes, super::avx2::UNPACKED_BYTES, &a, out);
            // SAFETY: as in `unpack`; `check_rows4` verified every length.
            unsafe { super::avx2::rows4_unpacked::<{ super::avx2::$k }>(w, row_bytes, a, out) }
        }
        k.unpacked = Some(Unpacked { bytes_per_block: super::avx2::UNPACKED_BYTES, unpack, rows4 });
        Kernel::Q8_0(k)
    }};
}

/// Whether the k-quant AVX2 kernels run four tokens as two pairs: four at once needs more
/// than the 16 ymm registers and spills.
const K_PAIRS: bool = true;

/// The kernels for weights of `dtype` on `isa`, or `None` for an unsupported type. Asking
/// for AVX2 on a CPU without it gives the scalar kernels.
pub(crate) fn select(dtype: GgmlDType, isa: Isa) -> Option<Kernel> {
    use super::blocks::*;
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_available() {
        return Some(match dtype {
            GgmlDType::F32 => avx2_kernels!(F32, dot_f32, f32, 4, false),
            GgmlDType::F16 => avx2_kernels!(F32, dot_f16, f32, 2, false),
            GgmlDType::BF16 => avx2_kernels!(F32, dot_bf16, f32, 2, false),
            GgmlDType::Q8_0 => avx2_kernels!(Q8_0, dot_q8_0, BlockQ8_0, Q8_0_BYTES, false),
            GgmlDType::Q4_0 => avx2_unpacking_kernels!(dot_q4_0, K_Q4_0_ID, Q4_0_BYTES),
            GgmlDType::Q5_0 => avx2_unpacking_kernels!(dot_q5_0, K_Q5_0_ID, Q5_0_BYTES),
            GgmlDType::Q4_K => avx2_kernels!(Q8K32, dot_q4_k, BlockQ8K32, Q4_K_BYTES, K_PAIRS),
            GgmlDType::Q5_K => avx2_kernels!(Q8K32, dot_q5_k, BlockQ8K32, Q5_K_BYTES, K_PAIRS),
            GgmlDType::Q6_K => avx2_kernels!(Q8K32, dot_q6_k, BlockQ8K32, Q6_K_BYTES, K_PAIRS),
            _ => return None,
        });
    }
    let _ = isa;
    Some(match dtype {
        GgmlDType::F32 => scalar_kernels!(F32, scalar::dot_f32, f32),
        GgmlDType::F16 => scalar_kernels!(F32, scalar::dot_f16, f32),
        GgmlDType::BF16 => scalar_kernels!(F32, scalar::dot_bf16, f32),
        GgmlDType::Q8_0 => scalar_kernels!(Q8_0, scalar::dot_q8_0, BlockQ8_0),
        GgmlDType::Q4_0 => scalar_kernels!(Q8_0, scalar::dot_q4_0, BlockQ8_0),
        GgmlDType::Q5_0 => scalar_kernels!(Q8_0, scalar::dot_q5_0, BlockQ8_0),
        GgmlDType::Q4_K => scalar_kernels!(Q8K32, scalar::dot_q4_k, BlockQ8K32),
        GgmlDType::Q5_K => scalar_kernels!(Q8K32, scalar::dot_q5_k, BlockQ8K32),
        GgmlDType::Q6_K => scalar_kernels!(Q8K32, scalar::dot_q6_k, BlockQ8K32),
        _ => return None,
    })
}

/// Quantizes one activation row to Q8_0 blocks.
pub(crate) type QuantizeQ8_0 = fn(&[f32], &mut [BlockQ8_0]);
/// Quantizes one activation row to k-quant activation super-blocks.
pub(crate) type QuantizeQ8K32 = fn(&[f32], &mut [BlockQ8K32]);

/// The activation quantizers for `isa` (the AVX2 ones give bit-identical blocks).
pub(crate) fn activation_quantizers(isa: Isa) -> (QuantizeQ8_0, QuantizeQ8K32) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_available() {
        fn q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
            // SAFETY: only handed out after `avx2_available()`; the kernel checks lengths.
            unsafe { super::avx2::quantize_row_q8_0(x, out) }
        }
        fn q8_k32(x: &[f32], out: &mut [BlockQ8K32]) {
            // SAFETY: as above.
            unsafe { super::avx2::quantize_row_q8_k32(x, out) }
        }
        return (q8_0, q8_k32);
    }
    let _ = isa;
    (super::act::quantize_row_q8_0, super::act::quantize_row_q8_k32)
}
