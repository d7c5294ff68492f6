//! With the `cuda` feature, compiles our CUDA kernels (`src/ops/cuda/kernels.cu`) to PTX in
//! `$OUT_DIR/tpserve_kernels.ptx`, which the crate embeds with `include_str!`. Without the
//! feature it does nothing, so a CPU build needs no CUDA toolkit.
//!
//! Environment:
//! - `CUDA_COMPUTE_CAP` (required with `cuda`): the target compute capability, e.g. `90`
//!   (also accepted: `9.0`, or a suffixed `90a`); the PTX is built for `compute_$CUDA_COMPUTE_CAP`.
//! - `NVCC` (optional): the nvcc to run; otherwise `nvcc` from `PATH`.

use std::path::PathBuf;
use std::process::Command;

/// The kernel source, relative to the package root.
const KERNELS: &str = "src/ops/cuda/kernels.cu";

fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        // CPU build: nothing to compile. (Without any rerun-if line cargo would rerun this
        // script whenever any file of the package changes.)
        println!("cargo:rerun-if-changed=build.rs");
        return;
    }
    println!("cargo:rerun-if-changed={KERNELS}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");

    let cap = compute_cap();
    let nvcc = match std::env::var("NVCC") {
        Ok(path) if !path.trim().is_empty() => path,
        _ => "nvcc".to_string(),
    };
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest_dir.join(KERNELS);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("tpserve_kernels.ptx");

    let mut cmd = Command::new(&nvcc);
    cmd.arg("--ptx").arg("-O3").arg(format!("-arch=compute_{cap}")).arg("-o").arg(&out).arg(&src);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => panic!(
            "tpserve-model (feature `cuda`): could not run nvcc `{nvcc}` ({e}). Install the CUDA \
             toolkit and put nvcc on PATH, or set NVCC to its path."
        ),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "tpserve-model (feature `cuda`): nvcc failed ({status}) compiling {src}\ncommand: {cmd:?}\n\
             --- nvcc stdout ---\n{stdout}\n--- nvcc stderr ---\n{stderr}",
            status = output.status,
            src = src.display(),
            stdout = String::from_utf8_lossy(&output.stdout),
        );
    }
    // Surface nvcc's warnings, if any, in cargo's output.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=nvcc: {line}");
    }
}

/// `CUDA_COMPUTE_CAP` as nvcc's architecture suffix: `90` (or `9.0`) gives `90`, `90a` stays.
fn compute_cap() -> String {
    let raw = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "tpserve-model (feature `cuda`): set CUDA_COMPUTE_CAP to the GPU's compute capability \
             without the dot, e.g. CUDA_COMPUTE_CAP=90 for H100/H200 or 80 for A100; the kernels \
             are compiled to PTX for compute_$CUDA_COMPUTE_CAP."
        ),
    };
    let cap = raw.trim().replace('.', "");
    let digits = cap.trim_end_matches(|c: char| c.is_ascii_lowercase());
    let suffix_len = cap.len() - digits.len();
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) || suffix_len > 1 {
        panic!(
            "tpserve-model (feature `cuda`): CUDA_COMPUTE_CAP={raw:?} is not a compute capability; \
             expected e.g. 80, 86, 89 or 90 (optionally 90a)."
        );
    }
    cap
}
