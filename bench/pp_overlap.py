#!/usr/bin/env python3
"""Serving throughput of pipeline and tensor parallelism against one worker, side by side.

Alternates, rep by rep, `tpserve up` in each configuration (one thread per worker):
  - pp=1: one worker, 1 thread,
  - pp=2: two pipeline stages, 1 thread each (their steps overlap: each stage computes a
    batch of its own while the other finishes the previous one),
  - tp=2: two tensor-parallel ranks, 1 thread each,
and, with --baseline, pp=2 on another binary (say, the build before the stages overlapped).
Each server starts fresh on a free port; `tpserve bench` then sends --num-requests streamed
completions (prompts of --input-len tokens cut from WikiText-2, --output-len tokens with
ignore_eos, greedy) from --concurrency clients, after one warm-up request; the server is
stopped with Ctrl-C. Reports the medians of output tokens/s, mean TTFT and mean TPOT per
configuration, and each one's output rate against pp=1.

    python3 bench/pp_overlap.py --tpserve target/release/tpserve --reps 3 [--baseline OLD/tpserve]

Only the Python standard library is used.
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_bench(a, binary, up_args):
    port = free_port()
    log = tempfile.TemporaryFile()
    srv = subprocess.Popen([binary, "up", "--port", str(port), "--model", a.model, "--threads", "1"] + up_args,
                           stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            log.seek(0)
            if b"ready:" in log.read():
                break
            if srv.poll() is not None or time.time() > deadline:
                log.seek(0)
                sys.exit(f"`tpserve up {' '.join(up_args)}` did not start:\n{log.read().decode(errors='replace')}")
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            subprocess.run([a.tpserve, "bench", "--base-url", f"http://127.0.0.1:{port}", "--model", a.model,
                            "--num-requests", str(a.num_requests), "--max-concurrency", str(a.concurrency),
                            "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--ignore-eos",
                            "--seed", "1", "--warmup", "1", "--disable-tqdm", "--save-result", out],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = json.load(open(out))
        if r.get("failed", 0):
            sys.exit(f"{r['failed']} requests failed on `tpserve up {' '.join(up_args)}`")
        return r["output_throughput"], r["mean_ttft_ms"], r["mean_tpot_ms"]
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGINT)
            try:
                srv.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(srv.pid, signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpserve", default="target/release/tpserve")
    ap.add_argument("--baseline", help="another tpserve binary whose pp=2 runs beside")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=106)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    configs = [("pp=1, 1 thread", a.tpserve, ["--tp", "1"]),
               ("pp=2, 1 thread per stage", a.tpserve, ["--pp", "2"]),
               ("tp=2, 1 thread per rank", a.tpserve, ["--tp", "2"])]
    if a.baseline:
        configs.append(("pp=2 [baseline]", a.baseline, ["--pp", "2"]))
    results = {name: [] for name, _, _ in configs}
    print(f"{a.concurrency} clients, {a.num_requests} requests of {a.input_len} -> {a.output_len} tokens, {a.reps} reps", flush=True)
    for rep in range(a.reps):
        order = configs if rep % 2 == 0 else configs[::-1]
        for name, binary, args in order:
            r = serve_and_bench(a, binary, args)
            results[name].append(r)
            print(f"rep {rep + 1}: {name:<26} {r[0]:7.1f} tok/s  TTFT {r[1]:7.1f} ms  TPOT {r[2]:6.1f} ms", flush=True)
    base = statistics.median(r[0] for r in results[configs[0][0]])
    print(f"\n{'configuration':<26} {'output tok/s':>12} {'mean TTFT ms':>12} {'mean TPOT ms':>12} {'/ pp=1':>7}")
    for name, _, _ in configs:
        tps, ttft, tpot = (statistics.median(r[i] for r in results[name]) for i in range(3))
        print(f"{name:<26} {tps:12.1f} {ttft:12.1f} {tpot:12.1f} {tps / base:7.2f}")


if __name__ == "__main__":
    main()
