#!/usr/bin/env bash
# The GPU path proven on a real NVIDIA GPU: one prepared run that a maintainer with a GPU
# runs, and that fits the project's lent H200 machine (no network there, at most 64 MiB
# carried, so the binary is built elsewhere and the models are made there by the binary).
#
#   On a machine with the toolchain (any x86-64 Linux; no GPU needed):
#     CUDA_WHEELS_VERSION=13.0.88 scripts/cuda-check.sh build   # PTX a CUDA 13.0 driver can JIT
#     scripts/gpu-check.sh pack                                 # stripped, xz: gpu-check/tpserve.xz
#   On the GPU machine, in the repository root:
#     OUT=/some/dir scripts/gpu-check.sh run                    # results in $OUT/gpu-check.txt
#   (with the device tool: run `scripts/gpu-check.sh run` with carry ["gpu-check"]; the
#   stripped binary is 61 MB, 9.5 MB compressed)
#
# `run` checks, each against the CPU on the same machine and the same file:
#   1. tiny Gemma 3 (every weight type tpserve computes with): greedy tokens on cuda:0 equal
#      those on the CPU, and the mean log-likelihood of a text (log perplexity) within 1%;
#   2. the same at tp 2 as two worker processes on the one GPU (TCP through the host);
#   3. `tpserve up` + a short `tpserve bench` on cuda:0, then the same with
#      `--collective nccl` (NCCL at world 1);
#   4. a Llama-3.2-1B-shaped model: decode and prefill tokens/s on cuda:0 (and the CPU's
#      for scale), greedy tokens equal up to near-ties.
# It prints PASS/FAIL per check and the figures, and exits non-zero if any check failed.
# It needs about 5 minutes on an H200 host (16 cores).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
BIN=${TPSERVE_BIN:-gpu-check/tpserve}
# The GPU under test; GPU=cpu runs the same steps on the CPU (a dry run of the script itself
# on a machine without a GPU: every comparison then holds trivially, and NCCL is refused).
# QUICK=1 skips the 1B model (hours on a small CPU).
GPU=${GPU:-cuda:0}
QUICK=${QUICK:-0}

if [[ $mode == pack ]]; then
  # The binary carries candle's kernels as PTX text: stripped it is still larger than what
  # the lent machine receives (64 MiB), compressed it is not.
  src=${2:-$HOME/.cache/tpserve-cuda-target/13.0.88/release/tpserve}
  mkdir -p gpu-check
  strip -o gpu-check/tpserve "$src"
  xz -T0 -9 -f gpu-check/tpserve
  ls -l gpu-check/
  echo "carry gpu-check/ (ignored by git) with the working tree"
  exit 0
fi
[[ $mode == run ]] || { echo "usage: $0 pack [binary] | run" >&2; exit 2; }

if [[ ! -x $BIN && -f $BIN.xz ]]; then
  # Python's lzma, not xz(1): the lent machine has Python for sure.
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN.xz" "$BIN" && chmod +x "$BIN"
fi
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
RES=$OUT/gpu-check.txt
W=$(mktemp -d)
export TPSERVE_HOME=$W/home
: >"$RES"
say() { echo "$*" | tee -a "$RES"; }
fails=0
check() { # name, then a command whose success is the check
  local name=$1; shift
  if "$@" >>"$OUT/log.txt" 2>&1; then say "PASS $name"; else say "FAIL $name (see log.txt)"; fails=$((fails + 1)); fi
}

# The CUDA libraries of the machine's Python packages (cuBLAS, NVRTC, NCCL, the runtime);
# libcuda comes with the driver.
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
if [[ -n $site ]]; then
  libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
  # The wheels ship versioned names only; the binary asks for the sonames, which they have.
fi
say "gpu-check $(date -u +%FT%TZ) on $(hostname)"
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
say "binary: $("$BIN" --version 2>&1) ($(ldd "$BIN" | grep -cE 'not found') libraries not found)"
ldd "$BIN" | grep -E 'not found' | tee -a "$RES"

"$BIN" model synth --out "$W/tiny.gguf" | tee -a "$RES"
[[ $QUICK == 1 ]] || "$BIN" model synth --preset llama1b --out "$W/l1b.gguf" | tee -a "$RES"
PROMPT="the quick brown fox jumps over the lazy dog and then"
yes "$PROMPT" | head -40 | tr '\n' ' ' >"$W/text.txt"

ids() { # model device tp [extra flags]: greedy output ids as a JSON array
  "$BIN" generate --model "$1" --device "$2" --tp "$3" "${@:4}" --json --temperature 0 --max-tokens 32 --prompt "$PROMPT" 2>>"$OUT/log.txt" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["output_ids"])'
}
same_ids() { # model tp: the GPU's greedy tokens equal the CPU's
  local cpu gpu
  cpu=$(ids "$1" cpu "$2") && gpu=$(ids "$1" "$GPU" "$2") || return 1
  echo "cpu $cpu"; echo "gpu $gpu"
  [[ $cpu == "$gpu" ]]
}
ppl() { # model device tp
  "$BIN" eval perplexity --model "$1" --device "$2" --tp "$3" --file "$W/text.txt" --ctx 128 --chunks 8 --json 2>>"$OUT/log.txt" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])'
}
close_ppl() { # model tp: log-perplexities (mean NLL) within 1%
  local a b
  a=$(ppl "$1" cpu "$2") && b=$(ppl "$1" "$GPU" "$2") || return 1
  say "  perplexity tp $2: cpu $a, $GPU $b"
  # In log space: the tiny model's perplexity of this text is astronomically high.
  python3 -c "import math, sys; a,b=math.log($a),math.log($b); sys.exit(0 if abs(a-b) <= 0.01*abs(a) + 1e-3 else 1)"
}

check "tiny gemma3 greedy tokens, $GPU = cpu" same_ids "$W/tiny.gguf" 1
check "tiny gemma3 log-perplexity, $GPU within 1% of cpu" close_ppl "$W/tiny.gguf" 1
check "tiny gemma3 tp 2 on one GPU (TCP), tokens = cpu" same_ids "$W/tiny.gguf" 2
check "tiny gemma3 tp 2 log-perplexity within 1% of cpu" close_ppl "$W/tiny.gguf" 2

ready() { # port: the server answers /ready with 200 (loaded)
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/ready', timeout=2)" 2>/dev/null
}
serve_bench() { # model, device, extra up flags: tpserve up + a short bench; prints throughput
  local port=18555 pid out
  "$BIN" up --model "$1" --device "$2" --tp 1 --port $port "${@:3}" >>"$OUT/log.txt" 2>&1 &
  pid=$!
  for _ in $(seq 120); do ready $port && break; kill -0 $pid 2>/dev/null || return 1; sleep 1; done
  out=$("$BIN" bench --base-url http://localhost:$port --max-concurrency 8 --num-requests 32 --input-len 256 --output-len 64 --ignore-eos --dataset-name random --tokenizer "$1" 2>&1)
  local rc=$?
  kill -INT $pid; wait $pid
  echo "$out" | grep -iE 'throughput|TTFT|TPOT' | sed 's/^/  /' | tee -a "$RES"
  [[ $rc == 0 ]] && echo "$out" | grep -q 'Successful requests: *32'
}
check "tiny gemma3 serving on $GPU: up + bench" serve_bench "$W/tiny.gguf" "$GPU"
check "NCCL at world 1: up --collective nccl serves bench (tiny)" serve_bench "$W/tiny.gguf" "$GPU" --collective nccl

speed() { # device: the 1B model's prefill and decode rate, one request
  "$BIN" generate --model "$W/l1b.gguf" --device "$1" --temperature 0 --ignore-eos --max-tokens 128 --prompt-file "$W/text.txt" 2>&1 >/dev/null |
    grep -E '^prefill' | sed "s/^/  $1 llama1b: /" | tee -a "$RES"
}
if [[ $QUICK != 1 ]]; then
check "llama1b speed on $GPU" speed "$GPU"
check "llama1b speed on cpu" speed cpu
check "llama1b greedy tokens, $GPU = cpu" same_ids "$W/l1b.gguf" 1
check "llama1b serving on $GPU (TCP world 1)" serve_bench "$W/l1b.gguf" "$GPU"
fi

say "gpu-check: $fails failed"
rm -rf "$W"
exit $((fails > 0))
