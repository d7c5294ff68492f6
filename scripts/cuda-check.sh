#!/usr/bin/env bash
# Compile the GPU path (`--features cuda`: candle-core's CUDA device and kernels, our
# kernels, cudarc's NCCL) on a machine with no GPU, no driver and no CUDA install, so
# that CI type-checks it on every run and a GPU machine can build the binary the same way.
#
#   scripts/cuda-check.sh          cargo clippy --features cuda --workspace --all-targets
#                                  -- -D warnings (a type-check, and the CPU build's lints)
#   scripts/cuda-check.sh build    cargo build --release --features cuda --bin tpserve,
#                                  then print the binary's path (proves it links)
#
# What it sets up, all outside the clone and reused between runs:
#   - nvcc, CCCL and cudart from PyPI's NVIDIA wheels (no apt, and new enough for sm_90a,
#     which Debian's CUDA 11.8 cannot target), in $CUDA_CACHE;
#   - link-only stub libraries for libcuda, libnvrtc, libcurand, libcublas, libcublasLt
#     and libnccl (scripts/cuda-stubs.py), which the linker needs and no GPU-less
#     machine has. They are on LIBRARY_PATH only, never LD_LIBRARY_PATH.
#
# Environment (all optional):
#   CUDA_WHEELS_VERSION  wheel version of nvcc/crt/nvvm/cudart (default 13.2.86). A
#                        binary to run on a CUDA 13.0 driver needs 13.0.88: newer nvcc
#                        writes PTX that an older driver cannot JIT.
#   CUDA_CACHE           where the toolchain and stubs go
#                        (default ~/.cache/tpserve-cuda/$CUDA_WHEELS_VERSION)
#   CUDA_CCCL_VERSION    CCCL wheel version, where it differs from the others (the
#                        script knows 13.0.88 -> 13.0.85)
#   CUDA_TARGET_DIR      cargo's target dir (default
#                        ~/.cache/tpserve-cuda-target/$CUDA_WHEELS_VERSION):
#                        not the CPU build's, so the two builds do not invalidate each
#                        other, and one per toolchain, because candle's kernel builder
#                        (cudaforge) caches objects without regard to which nvcc made
#                        them: after a switch it would keep the other version's PTX
#   CUDA_COMPUTE_CAP     default 90 (Hopper; cudaforge turns it into sm_90a)
#   CUDAFORGE_THREADS    parallel nvcc jobs for the kernels (default 2, CI's cores)
#
# Needs python3 with pip, a C/C++ compiler (cc, g++ for nvcc) and cargo; CI's .ci/run
# installs the first two before calling this.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-check}
case $mode in
  check | build) ;;
  *) echo "usage: $0 [check|build]" >&2; exit 2 ;;
esac

V=${CUDA_WHEELS_VERSION:-13.2.86}
major=${V%%.*}
# CCCL is released with its own version numbers; this is the one NVIDIA's `cuda-toolkit`
# meta-package pins next to each nvcc. Any other nvcc is assumed to have a CCCL of the
# same version (true for 13.2.86); leaving CCCL unpinned would pull the newest, which
# does not match.
case $V in
  13.0.88) cccl_v=13.0.85 ;;
  *) cccl_v=$V ;;
esac
cccl_v=${CUDA_CCCL_VERSION:-$cccl_v}

CUDA_CACHE=${CUDA_CACHE:-$HOME/.cache/tpserve-cuda/$V}
cuda=$CUDA_CACHE/nvidia/cu$major
stubs=$CUDA_CACHE/stubs

start=$SECONDS
phase_start=$SECONDS
summary=()
phase_done() {
  local took=$((SECONDS - phase_start))
  summary+=("$(printf '  %-9s %3dm%02ds  %s' "$1" $((took / 60)) $((took % 60)) "$2")")
  echo "cuda-check: $1 took $((took / 60))m$((took % 60))s: $2"
  phase_start=$SECONDS
}

# --- 1. Toolchain ------------------------------------------------------------------
if [[ -x $cuda/bin/nvcc ]]; then
  phase_done toolchain "CUDA $V already in $CUDA_CACHE"
else
  python3 -m pip --version >/dev/null 2>&1 || { echo "cuda-check: needs python3 -m pip" >&2; exit 1; }
  echo "cuda-check: installing CUDA $V wheels (cccl $cccl_v) into $CUDA_CACHE"
  # Every package pinned: nvcc depends on crt/nvvm/cudart unversioned, which would
  # otherwise resolve to the newest release. --target also keeps clear of the system
  # Python (PEP 668) and --upgrade replaces what an interrupted install left behind.
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --only-binary=:all: --upgrade --target "$CUDA_CACHE" \
    "nvidia-cuda-nvcc==$V" "nvidia-cuda-cccl==$cccl_v" "nvidia-cuda-crt==$V" \
    "nvidia-nvvm==$V" "nvidia-cuda-runtime==$V"
  [[ -x $cuda/bin/nvcc ]] || { echo "cuda-check: no $cuda/bin/nvcc after install" >&2; exit 1; }
  phase_done toolchain "installed CUDA $V (cccl $cccl_v) into $CUDA_CACHE"
fi
# The wheel ships only the versioned cudart; `-lcudart` (candle-kernels) needs the
# unversioned name. Real library, so the binary records libcudart.so.$major.
ln -sfn "libcudart.so.$major" "$cuda/lib/libcudart.so"

# --- 2. Link stubs -------------------------------------------------------------------
# Generated from the cudarc that this workspace resolves to (fetched by cargo metadata
# if need be), so the symbol list follows a cudarc upgrade; the stamp says which one.
cudarc_dir=$(cargo metadata --format-version 1 --features cuda | python3 -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if len(pkgs) != 1:
    sys.exit(f"cuda-check: expected one cudarc in the workspace, found {len(pkgs)}")
print(os.path.dirname(pkgs[0]["manifest_path"]))')
stamp="$(basename "$cudarc_dir") cuda$major $(sha256sum scripts/cuda-stubs.py | cut -c1-16)"
if [[ -f $stubs/.stamp && $(cat "$stubs/.stamp") == "$stamp" ]]; then
  phase_done stubs "up to date in $stubs ($stamp)"
else
  rm -rf "$stubs"
  python3 scripts/cuda-stubs.py "$cudarc_dir" "$stubs" "$major"
  echo "$stamp" >"$stubs/.stamp"
  phase_done stubs "built in $stubs ($stamp)"
fi

# --- 3. Build ------------------------------------------------------------------------
export PATH="$cuda/bin:$PATH"
export NVCC=$cuda/bin/nvcc
export CUDA_HOME=$cuda
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
# The GPU machines run CUDA 13.0 (driver 580): bind cudarc to the 13.0 API whatever nvcc
# says (cudarc's `cuda-version-from-build-system` would otherwise read 13.2 from nvcc).
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$stubs:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$HOME/.cache/tpserve-cuda-target/$V}
# A target dir that another toolchain built into holds kernels from that nvcc, which
# cudaforge would reuse (a 13.2 PTX fails to load on a 13.0 driver): refuse rather than
# build a binary that only fails on the GPU machine.
toolchain_stamp=$CARGO_TARGET_DIR/.cuda-toolchain
if [[ -f $toolchain_stamp && $(cat "$toolchain_stamp") != "$V" ]]; then
  echo "cuda-check: $CARGO_TARGET_DIR was built with CUDA $(cat "$toolchain_stamp"), not $V;" \
    "use another CUDA_TARGET_DIR or delete it" >&2
  exit 1
fi
mkdir -p "$CARGO_TARGET_DIR"
echo "$V" >"$toolchain_stamp"
echo "cuda-check: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute cap $CUDA_COMPUTE_CAP," \
  "cudarc API $CUDARC_CUDA_VERSION, target dir $CARGO_TARGET_DIR"

if [[ $mode == check ]]; then
  cargo clippy --features cuda --workspace --all-targets -- -D warnings
  phase_done check "cargo clippy --features cuda --workspace --all-targets -- -D warnings"
else
  cargo build --release --features cuda --bin tpserve
  bin=$CARGO_TARGET_DIR/release/tpserve
  # The stubs' sonames are the real libraries' names, so the binary asks for those.
  needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' |
    grep -E '^lib(cuda|cudart|nvrtc|curand|cublas|cublasLt|nccl)\.' | tr '\n' ' ' || true)
  # The PTX ISA that the driver must JIT: a CUDA 13.0 driver takes up to 9.0.
  ptx=$(grep -a -o '^\.version [0-9.]*' "$bin" | sort -u | cut -d' ' -f2 | tr '\n' ' ' || true)
  phase_done build "cargo build --release --features cuda --bin tpserve (needs: ${needed:-none}; PTX ISA: ${ptx:-none})"
fi

echo "cuda-check: done in $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
printf '%s\n' "${summary[@]}"
if [[ $mode == build ]]; then
  echo "$bin"
fi
