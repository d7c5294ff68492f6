#!/usr/bin/env python3
"""Decode speed of tensor parallelism on real worker processes, side by side in one run.

Alternates, rep by rep, `tpserve generate --json` at
  - tp=1: the whole model in one process, 1 thread (no network at all, the strict baseline),
  - tp=2: two worker processes on loopback, 1 thread each, TCP collective,
  - 1 process with 2 threads (what the same cores give without tensor parallelism),
  - and, with --python, llama.cpp (llama-cpp-python) with 2 threads, batch 1,
for batch 1 and batch 8 (`--batch`), and reports medians of the aggregate decode tokens/s,
the tp=2 / tp=1 ratio, and the share of a tp=2 step spent in communication.

    python3 bench/tp_scaling.py --tpserve target/release/tpserve --reps 5 [--python VENV/bin/python] [--baseline OLD/tpserve]

With --baseline, every configuration also runs on another tpserve binary (say, the previous
commit's build) in the same alternation, and each gets its ratio to it.
"""
import argparse, json, os, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(__file__))
from engine_vs_llamacpp import LLAMA_SNIPPET  # noqa: E402


def run(a, binary, prompt, batch, extra, n_prompt):
    # Every copy's prompt in one prefill step, so that all copies decode from the same step on
    # and the decode rate is not diluted by other copies' prefill.
    chunk = max(512, batch * (n_prompt + 1))
    cmd = [binary, "generate", "--json", "--model", a.model, "--prompt", prompt, "--max-tokens", str(a.gen_tokens),
           "--temperature", "0", "--ignore-eos", "--batch", str(batch), "--prefill-chunk", str(chunk)] + extra
    out = json.loads(subprocess.check_output(cmd, stderr=subprocess.DEVNULL))
    tps = out["batch"]["decode_tokens_per_s"] if batch > 1 else out["timings"]["decode_tokens_per_s"]
    ranks = out["steps"]["ranks"]
    comm = statistics.mean(r["comm_ms"] / r["compute_ms"] for r in ranks if r["compute_ms"] > 0)
    steps = max(out["steps"]["steps"], 1)
    per_step_bytes = (out["steps"]["request_bytes"] + out["steps"]["response_bytes"]) / steps
    return tps, comm, per_step_bytes, out["output_ids"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpserve", default="target/release/tpserve")
    ap.add_argument("--baseline", help="another tpserve binary to run beside, e.g. a build of the previous commit")
    ap.add_argument("--python", help="python of a venv with llama-cpp-python, to run llama.cpp beside")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "../tests/data/wikitext-2-raw-test.txt"))
    ap.add_argument("--prompt-chars", type=int, default=500)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    prompt = open(a.text, encoding="utf-8").read()[5000:5000 + a.prompt_chars]
    ids = json.loads(subprocess.check_output([a.tpserve, "tokenize", "--json", "--model", a.model, prompt]))["ids"]
    print(f"prompt: {len(ids)} tokens, {a.gen_tokens} generated, {a.reps} reps", flush=True)

    configs = {
        "tp=1 (1 process, 1 thread)": ["--threads", "1"],
        "tp=2 (2 workers, 1 thread each)": ["--tp", "2", "--threads", "1"],
        "1 process, 2 threads": ["--threads", "2"],
    }
    binaries = [("", a.tpserve)] + ([(" [baseline]", a.baseline)] if a.baseline else [])
    for batch in a.batches:
        res = {k + tag: [] for k in configs for tag, _ in binaries}
        comm, nbytes, llama = [], [], []
        want = None
        for rep in range(a.reps):
            for name, extra in configs.items():
                for tag, binary in binaries:
                    tps, c, b, out_ids = run(a, binary, prompt, batch, extra, len(ids))
                    res[name + tag].append(tps)
                    if want is None:
                        want = out_ids
                    assert out_ids == want, f"{name}{tag} produced other tokens"
                    if extra[:2] == ["--tp", "2"] and not tag:
                        comm.append(c)
                        nbytes.append(b)
            if a.python and batch == 1:
                o = subprocess.check_output([a.python, "-c", LLAMA_SNIPPET, a.model, "2", json.dumps(ids), str(a.gen_tokens)])
                llama.append(json.loads(o)["decode_tokens_per_s"])
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"\nbatch {batch}: median decode tokens/s (all {a.reps} runs)")
        for k, v in med.items():
            print(f"  {k:<34} {v:7.1f}   {' '.join(f'{x:.1f}' for x in res[k])}")
        if llama:
            print(f"  {'llama.cpp, 2 threads':<34} {statistics.median(llama):7.1f}   {' '.join(f'{x:.1f}' for x in llama)}")
        t1, t2 = med["tp=1 (1 process, 1 thread)"], med["tp=2 (2 workers, 1 thread each)"]
        print(f"  tp=2 / tp=1: {t2 / t1:.2f}x; tp=2 time in communication: {100 * statistics.median(comm):.1f}%; "
              f"control-plane bytes per step: {statistics.median(nbytes):.0f}")
        if llama:
            print(f"  tp=2 / llama.cpp 2 threads: {t2 / statistics.median(llama):.2f}x")
        if a.baseline:
            print("  against the baseline: " + ", ".join(f"{k} {med[k] / med[k + ' [baseline]']:.3f}x" for k in configs))


if __name__ == "__main__":
    main()
