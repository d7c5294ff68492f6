#!/usr/bin/env python3
"""How fast a tpserve cluster notices a lost worker and heals (docs/RELIABILITY.md).

Starts two `tpserve worker`s and a `tpserve coordinator --tp 2` on loopback (the default
model unless --model), then, --reps times each:
  kill:  SIGKILL rank 1 during a streaming request -> the stream's error event, /ready 503;
         start it again at its address             -> /ready 200
  stop:  SIGSTOP rank 1 during a streaming request -> the stream's error event, /ready 503;
         SIGCONT                                   -> /ready 200
and, with --bench, a `tpserve bench` run at a fixed request rate during which rank 1 is
killed and started again: how many requests failed, and that every request ended (none
hung, none lost: successful + failed = sent). Prints medians and writes --json.

  python3 bench/recovery.py --tpserve target/release/tpserve --reps 5 --bench
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

TOKEN = "recovery-bench-0123456789abcdef"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def env():
    e = dict(os.environ)
    e["TPSERVE_CLUSTER_TOKEN"] = TOKEN
    return e


def worker(exe, port, threads):
    p = subprocess.Popen([exe, "worker", "--listen", f"127.0.0.1:{port}", "--threads", str(threads)],
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    p.stdout.readline()  # "listening on ..."
    return p


def ready(url):
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False
    except OSError:
        return False


def wait(pred, limit=120.0):
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > limit:
            raise SystemExit(f"gave up after {limit} s")
        time.sleep(0.02)
    return time.monotonic() - t


def stream(url, out):
    """A long streaming request; records when its error event (or end) came."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: "):
                    out.setdefault("first", time.monotonic())
                    if '"error"' in line:
                        out["error"] = time.monotonic()
                        out["message"] = line
    except OSError as e:
        out["exc"] = str(e)
    out.setdefault("end", time.monotonic())


def one_failure(url, kind, w1, exe, port, threads):
    out = {}
    th = threading.Thread(target=stream, args=(url, out))
    th.start()
    wait(lambda: "first" in out)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(w1.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    not_ready = wait(lambda: not ready(url))
    th.join()
    to_error = out.get("error", out["end"]) - t0
    t1 = time.monotonic()
    if kind == "kill":
        w1.wait()
        w1 = worker(exe, port, threads)
    else:
        os.kill(w1.pid, signal.SIGCONT)
    back = wait(lambda: ready(url))
    return w1, {"to_client_error_s": to_error, "to_ready_503_s": not_ready, "return_to_ready_200_s": back,
                "error_event": "error" in out, "since_return_s": time.monotonic() - t1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpserve", default="target/release/tpserve")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bench", action="store_true", help="also kill and restart a worker under a tpserve bench load")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    exe = os.path.abspath(a.tpserve)
    ports = [free_port(), free_port()]
    ws = [worker(exe, p, a.threads) for p in ports]
    http = free_port()
    cmd = [exe, "coordinator", "--tp", "2", "--port", str(http), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports)]
    if a.model:
        cmd += ["--model", a.model]
    coord = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    results = {"kill": [], "stop": []}
    try:
        wait(lambda: ready(url), 600)
        for _ in range(a.reps):
            for kind in ("kill", "stop"):
                ws[1], r = one_failure(url, kind, ws[1], exe, ports[1], a.threads)
                print(kind, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
                results[kind].append(r)
        if a.bench:
            results["bench"] = under_load(exe, url, ws, ports, a)
        summary = {}
        for kind in ("kill", "stop"):
            for k in ("to_client_error_s", "to_ready_503_s", "return_to_ready_200_s"):
                summary[f"{kind}.{k}.median"] = statistics.median(r[k] for r in results[kind])
        results["summary"] = summary
        print(json.dumps(summary, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        coord.terminate()
        for w in ws:
            w.kill()


def under_load(exe, url, ws, ports, a):
    """tpserve bench at 4 requests/s for 60 requests; rank 1 killed after 5 s and started again."""
    with tempfile.TemporaryDirectory() as d:
        res = os.path.join(d, "r.json")
        cmd = [exe, "bench", "--base-url", url, "--request-rate", "4", "--num-prompts", "60", "--input-len", "64",
               "--output-len", "32", "--save-result", res, "--seed", "1"]
        if a.model:
            cmd += ["--model", a.model]
        b = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(5)
        os.kill(ws[1].pid, signal.SIGKILL)
        ws[1].wait()
        time.sleep(1)
        ws[1] = worker(exe, ports[1], a.threads)
        b.wait(timeout=600)
        with open(res) as f:
            r = json.load(f)
    out = {k: r.get(k) for k in ("completed", "failed", "num_prompts", "errors")}
    out["every_request_ended"] = (r.get("completed", 0) + r.get("failed", 0)) == 60
    print("bench", out, flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
