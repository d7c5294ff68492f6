#!/usr/bin/env python3
"""How close tpserve and llama.cpp come to the exact answer, and where the difference comes from.

The exact answer is a float64 forward pass of the same GGUF file written here with NumPy: every
weight dequantized by the `gguf` package (llama.cpp's own Python reader), no activation
quantization, no f16 anywhere. Each case is a sequence teacher-forced in one pass; at each
scored position the script compares, with the exact log-probabilities:
  - top-1: where the exact top-2 margin is at least 0.1 (and 0.25) nats, at how many positions
    the system's most likely token is another one (below that margin two tokens are a near-tie
    that any rounding may flip);
  - |Δ logprob| over the exact top-5 tokens: mean, 90th percentile, max.
Systems:
  - tpserve: the engine itself (`crates/model/examples/teacher_forced.rs`, built by this script
    with cargo unless `--teacher-forced` names the binary);
  - llama.cpp: llama-cpp-python in the venv of `--llama-python` (flash attention and an f16 KV
    cache, its defaults when the reference outputs were made), skipped without it;
  - emulations (`--emulate`): the exact forward with one rounding of the real systems switched
    on at a time, which says which rounding moves the answer how far:
      f32     every operation in float32 (accumulation order and precision),
      aq      activations quantized before each quantized matmul as llama.cpp does (Q8_0
              blocks for Q8_0/Q5_0 weights, Q8_K for Q4_K/Q6_K),
      gelu16  GELU through the f16 table (input and output rounded to f16),
      kv16    keys and values stored as f16,
      fa16    llama.cpp's CPU flash attention with an f16 cache: queries rounded to f16 and the
              value accumulator kept in f16 (kv16 included),
      aq-kq32   aq, with the k-quant weights' inputs in blocks of 32 (a scale each, as Q8_0)
              instead of Q8_K's one scale per 256 (what tpserve does since 2026-12-07),
      aq-but-T  aq on every matmul but those of tensor T (token_embd: the output projection,
              ffn_down, attn_output, ...): which inputs' rounding matters,
      tpserve f32 + aq-kq32 + gelu16 + kv16 (what tpserve computes),
      llama   f32 + aq + gelu16 + fa16 (what llama.cpp computes).
Cases: the prompts of `--reference` (`greedy.jsonl`: prompt, then llama.cpp's 48 greedy tokens)
and `--windows` windows of WikiText-2 (`--prompt-tokens` of text, then the next `--score` tokens
of the text itself). Gemma 3 only (the default model).

    ~/study-venv/bin/python bench/accuracy_vs_exact.py --llama-python ~/llama-venv/bin/python \\
        --emulate f32,aq,gelu16,kv16,fa16,tpserve,llama [--json-out FILE]

Needs numpy and gguf (`pip install numpy gguf`) in the Python that runs it.
"""
import argparse, json, os, subprocess, sys, tempfile, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "tests", "data")
MARGINS = (0.1, 0.25)


# ---------------------------------------------------------------------------------------------
# The model file
# ---------------------------------------------------------------------------------------------

class Gemma3:
    """Gemma 3's weights dequantized once (f32 values, as ggml computes them), with their types."""

    def __init__(self, path):
        import gguf
        from gguf.quants import dequantize
        r = gguf.GGUFReader(path)

        def meta(key):
            f = r.fields[key]
            v = f.parts[f.data[0]]
            return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()

        arch = meta("general.architecture")
        if arch != "gemma3":
            sys.exit(f"accuracy_vs_exact.py: {path} is {arch}, only gemma3 is written here")
        self.n_layer = meta("gemma3.block_count")
        self.hidden = meta("gemma3.embedding_length")
        self.n_head = meta("gemma3.attention.head_count")
        self.n_kv = meta("gemma3.attention.head_count_kv")
        self.head_dim = meta("gemma3.attention.key_length")
        self.eps = meta("gemma3.attention.layer_norm_rms_epsilon")
        self.rope_global = meta("gemma3.rope.freq_base")
        self.rope_local = 10000.0  # llama.cpp's gemma3 loader: fixed for sliding-window layers
        self.window = meta("gemma3.attention.sliding_window")
        for k in r.fields:
            if "rope.scaling" in k:
                sys.exit(f"accuracy_vs_exact.py: {k} is set; RoPE scaling is not written here")
        self.w, self.types = {}, {}
        for t in r.tensors:
            name = t.name.removesuffix(".weight")
            self.w[name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
                [int(d) for d in reversed(t.shape)] if len(t.shape) > 1 else -1)
            self.types[name] = t.tensor_type.name
        self.vocab = self.w["token_embd"].shape[0]


# ---------------------------------------------------------------------------------------------
# Roundings of the real systems
# ---------------------------------------------------------------------------------------------

def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def round_away(v):
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def quant_q8_0(x):
    """llama.cpp's quantize_row_q8_0_ref then dequantized: d = amax/127 (stored f16), q = roundf(x/d)."""
    x = np.asarray(x, np.float32)
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = round_away(b * idv)
    return (q * f16(d)).reshape(x.shape)


def quant_q8_k(x):
    """quantize_row_q8_K_ref: the signed value of largest magnitude maps to -127, d = 1/iscale."""
    x = np.asarray(x, np.float32)
    b = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(b).argmax(axis=2)[..., None]
    mx = np.take_along_axis(b, idx, axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(iscale * b), 127)  # nearest_int rounds half to even
    with np.errstate(divide="ignore"):
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return (q * d).reshape(x.shape)


def gelu_tanh(x):
    c = np.sqrt(2.0 / np.pi)
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x ** 3)))


def gelu_f16_table(x):
    """ggml's GELU_FP16 path: outside (-10, 10) exact limits, inside the f16 table."""
    x32 = np.asarray(x, np.float32)
    t = f16(gelu_tanh(f16(x32)).astype(np.float32))
    return np.where(x32 <= -10, 0.0, np.where(x32 >= 10, x32, t))


# ---------------------------------------------------------------------------------------------
# The forward pass, exact unless told to round
# ---------------------------------------------------------------------------------------------

def forward(m, ids, opts):
    """Logits `[len(ids), vocab]` of one sequence, every position, teacher-forced."""
    ft = np.float32 if "f32" in opts else np.float64
    T, hd = len(ids), m.head_dim

    def W(name):
        return m.w[name].astype(ft, copy=False)

    def matmul(x, name):
        if "aq" in opts and f"noaq:{name.split('.')[-1]}" not in opts:
            kquant = m.types[name] in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K") and "kq32" not in opts
            x = quant_q8_k(x) if kquant else quant_q8_0(x) if m.types[name] not in ("F32", "F16", "BF16") else x
        return np.asarray(x, ft) @ W(name).T

    def rms(x, name):
        w = W(name)
        d = w.shape[-1]
        xs = x.reshape(-1, d)
        s = 1.0 / np.sqrt((xs * xs).mean(axis=1, keepdims=True, dtype=ft) + ft(m.eps))
        return (xs * s * w).reshape(x.shape).astype(ft)

    def rope(x, base):  # NEOX style over the whole head: pairs (i, i + hd/2)
        half = hd // 2
        inv = base ** (-2.0 * np.arange(half) / hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        cos, sin = np.cos(ang).astype(ft)[:, None, :], np.sin(ang).astype(ft)[:, None, :]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(ft)

    x = W("token_embd")[ids] * ft(np.sqrt(m.hidden))
    group = m.n_head // m.n_kv
    pos = np.arange(T)
    for il in range(m.n_layer):
        p = f"blk.{il}."
        local = il % 6 != 5
        h = rms(x, p + "attn_norm")
        q = matmul(h, p + "attn_q").reshape(T, m.n_head, hd)
        k = matmul(h, p + "attn_k").reshape(T, m.n_kv, hd)
        v = matmul(h, p + "attn_v").reshape(T, m.n_kv, hd)
        q, k = rms(q, p + "attn_q_norm"), rms(k, p + "attn_k_norm")
        base = m.rope_local if local else m.rope_global
        q, k = rope(q, base), rope(k, base)
        q = q * ft(1.0 / np.sqrt(hd))
        if "kv16" in opts or "fa16" in opts:
            k, v = f16(k).astype(ft), f16(v).astype(ft)
        allowed = pos[None, :] <= pos[:, None]
        if local:
            allowed &= (pos[:, None] - pos[None, :]) < m.window
        out = np.empty((T, m.n_head, hd), ft)
        for hh in range(m.n_head):
            kh, vh = k[:, hh // group], v[:, hh // group]
            if "fa16" in opts:
                out[:, hh] = flash_f16(q[:, hh], kh, vh, allowed)
            else:
                s = np.where(allowed, q[:, hh] @ kh.T, -np.inf)
                s = np.exp(s - s.max(axis=1, keepdims=True))
                out[:, hh] = (s / s.sum(axis=1, keepdims=True)) @ vh
        o = matmul(out.reshape(T, -1), p + "attn_output")
        x = x + rms(o, p + "post_attention_norm")
        h = rms(x, p + "ffn_norm")
        g, u = matmul(h, p + "ffn_gate"), matmul(h, p + "ffn_up")
        g = gelu_f16_table(g).astype(ft) if "gelu16" in opts else gelu_tanh(g)
        d = matmul(g * u, p + "ffn_down")
        x = x + rms(d, p + "post_ffw_norm")
    x = rms(x, "output_norm")
    return np.asarray(matmul(x, "token_embd"), np.float64)


def flash_f16(q, k, v, allowed):
    """ggml's CPU flash attention with an f16 cache, one head: the query rounded to f16, one key
    at a time with an online softmax (f32 scores, max and sum), the value accumulator in f16."""
    qh = f16(q)
    T = q.shape[0]
    acc = np.zeros_like(q, dtype=np.float32)
    mx = np.full(T, -np.inf, np.float32)
    total = np.zeros(T, np.float32)
    for j in range(k.shape[0]):
        ok = allowed[:, j]
        s = (qh @ k[j].astype(np.float32)).astype(np.float32)
        s = np.where(ok, s, -np.inf)
        new_mx = np.maximum(mx, s)
        ms = np.where(new_mx > mx, np.exp(mx - new_mx), 1.0).astype(np.float32)
        vs = np.where(ok, np.exp(s - new_mx), 0.0).astype(np.float32)
        ms = np.where(np.isfinite(new_mx), ms, 1.0)
        acc = f16(acc * ms[:, None])
        acc = f16(acc + vs[:, None] * v[j].astype(np.float32)[None, :])
        total = total * ms + vs
        mx = np.where(ok, new_mx, mx)
    return acc / total[:, None]


def log_softmax(z):
    z = np.asarray(z, np.float64)
    mx = z.max(axis=-1, keepdims=True)
    return z - mx - np.log(np.exp(z - mx).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Cases and the two real systems
# ---------------------------------------------------------------------------------------------

def cases(args):
    out = []
    with open(args.reference) as f:
        for line in f:
            c = json.loads(line)
            out.append({"name": c["prompt"][:40], "ids": c["prompt_ids"] + c["output_ids"], "from": len(c["prompt_ids"])})
    if args.windows:
        text = open(args.wikitext, encoding="utf-8").read()
        step = len(text) // (args.windows + 1)
        for i in range(args.windows):
            chunk = text[(i + 1) * step:(i + 1) * step + 6 * (args.prompt_tokens + args.score)]
            chunk = chunk[chunk.index(" ") + 1:]  # start on a word
            ids = tokenize(args, chunk)[: 1 + args.prompt_tokens + args.score]
            out.append({"name": f"wikitext@{(i + 1) * step}", "ids": ids, "from": 1 + args.prompt_tokens})
    return out


def tokenize(args, text):
    r = subprocess.run([args.tpserve, "tokenize", "--json", "--model", args.model, "-"], input=text,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["ids"]


def read_rows(path, cs, vocab):
    """The rows a system wrote, per case, mapped (not read: 1 MB a position)."""
    flat = np.memmap(path, dtype="<f4", mode="r")
    rows, off = [], 0
    for c in cs:
        n = len(c["ids"]) - c["from"]
        rows.append(flat[off * vocab:(off + n) * vocab].reshape(n, vocab))
        off += n
    if off * vocab != flat.size:
        sys.exit(f"accuracy_vs_exact.py: {path} holds {flat.size / vocab} rows, expected {off}")
    return rows


def run_tpserve(args, cs, vocab, tmp):
    binary = args.teacher_forced
    if not binary:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tpserve-model", "--example", "teacher_forced"], cwd=ROOT, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        binary = os.path.join(target, "release", "examples", "teacher_forced")
    inp, out = os.path.join(tmp, "cases.jsonl"), os.path.join(tmp, "tpserve.f32")
    with open(inp, "w") as f:
        for c in cs:
            f.write(json.dumps({"ids": c["ids"], "from": c["from"]}) + "\n")
    subprocess.run([binary, args.model, inp, out], check=True)
    return read_rows(out, cs, vocab)


LLAMA_CHILD = r"""
import json, sys, numpy as np
from llama_cpp import Llama
model, inp, out = sys.argv[1:4]
cases = [json.loads(l) for l in open(inp)]
n_ctx = max(len(c["ids"]) for c in cases) + 8
kw = dict(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, logits_all=True, verbose=False)
try:
    llm = Llama(flash_attn=True, **kw)
except TypeError:
    llm = Llama(**kw)
with open(out, "wb") as f:
    for c in cases:
        llm.reset()
        llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        llm.eval(c["ids"][:-1])
        z = np.asarray(llm.scores[c["from"] - 1:len(c["ids"]) - 1], np.float64)
        z = z - z.max(axis=1, keepdims=True)
        z = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        f.write(z.astype("<f4").tobytes())
"""


def run_llama(args, cs, vocab, tmp):
    inp, out, child = os.path.join(tmp, "cases.jsonl"), os.path.join(tmp, "llama.f32"), os.path.join(tmp, "child.py")
    with open(inp, "w") as f:
        for c in cs:
            f.write(json.dumps({"ids": c["ids"], "from": c["from"]}) + "\n")
    with open(child, "w") as f:
        f.write(LLAMA_CHILD)
    subprocess.run([args.llama_python, child, args.model, inp, out], check=True)
    return read_rows(out, cs, vocab)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

def compare(exact, got):
    """Figures of one system against the exact log-probabilities, over every case."""
    top1_diff = {m: [0, 0] for m in MARGINS}
    diffs = []
    for e, g in zip(exact, got):
        g = np.asarray(g, np.float64)
        srt = np.sort(e, axis=1)
        margin = srt[:, -1] - srt[:, -2]
        differ = e.argmax(axis=1) != g.argmax(axis=1)
        for mth in MARGINS:
            sel = margin >= mth
            top1_diff[mth][0] += int((differ & sel).sum())
            top1_diff[mth][1] += int(sel.sum())
        top5 = np.argsort(-e, axis=1)[:, :5]
        diffs.append(np.abs(np.take_along_axis(e, top5, 1) - np.take_along_axis(g, top5, 1)).ravel())
    d = np.concatenate(diffs)
    return {
        **{f"top1_differs_margin_{m}": top1_diff[m] for m in MARGINS},
        "top1_differs_all": int(sum(int((e.argmax(1) != np.asarray(g).argmax(1)).sum()) for e, g in zip(exact, got))),
        "positions": int(sum(e.shape[0] for e in exact)),
        "dlogprob_mean": float(d.mean()), "dlogprob_p90": float(np.percentile(d, 90)), "dlogprob_max": float(d.max()),
    }


EMULATIONS = {
    "f32": {"f32"}, "aq": {"aq"}, "aq-kq32": {"aq", "kq32"}, "gelu16": {"gelu16"}, "kv16": {"kv16"}, "fa16": {"fa16"},
    "tpserve": {"f32", "aq", "kq32", "gelu16", "kv16"}, "llama": {"f32", "aq", "gelu16", "fa16"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--tpserve", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "tpserve"),
                    help="the tpserve binary (for `tpserve tokenize`)")
    ap.add_argument("--teacher-forced", help="the teacher_forced example binary (default: built with cargo)")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python; without it llama.cpp is skipped")
    ap.add_argument("--reference", default=os.path.join(DATA, "reference", "greedy.jsonl"))
    ap.add_argument("--wikitext", default=os.path.join(DATA, "wikitext-2-raw-test.txt"))
    ap.add_argument("--windows", type=int, default=12, help="WikiText windows (default 12)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--score", type=int, default=48, help="scored tokens per window (default 48)")
    ap.add_argument("--emulate", default="", help=f"comma-separated emulations: {','.join(EMULATIONS)}")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    emul = [e for e in args.emulate.split(",") if e]
    for e in emul:
        if e.startswith("aq-but-"):
            EMULATIONS[e] = {"aq", "noaq:" + e.removeprefix("aq-but-")}
    bad = [e for e in emul if e not in EMULATIONS]
    if bad:
        sys.exit(f"accuracy_vs_exact.py: unknown emulation {bad[0]!r}; known: {', '.join(EMULATIONS)}")

    t0 = time.time()
    m = Gemma3(args.model)
    cs = cases(args)
    print(f"{len(cs)} cases, {sum(len(c['ids']) - c['from'] for c in cs)} scored positions; weights read in {time.time() - t0:.0f} s", file=sys.stderr)
    # Every system's rows are 1 MB a position: each is compared as soon as it exists and only
    # the emulations of the real systems are kept (in f32) for the comparison with them.
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        real = {"tpserve": run_tpserve(args, cs, m.vocab, tmp)}
        if args.llama_python:
            real["llama.cpp"] = run_llama(args, cs, m.vocab, tmp)
        exact = []
        for i, c in enumerate(cs):
            t = time.time()
            exact.append(log_softmax(forward(m, c["ids"][:-1], set()))[c["from"] - 1:])
            print(f"exact {i + 1}/{len(cs)} {c['name']!r}: {time.time() - t:.1f} s", file=sys.stderr)
        for name, rows in real.items():
            results[name] = compare(exact, rows)
        for name in emul:
            rows = [log_softmax(forward(m, c["ids"][:-1], EMULATIONS[name]))[c["from"] - 1:].astype(np.float32) for c in cs]
            results[f"emulated {name}"] = compare(exact, rows)
            # The real system against its emulation: what the emulation does not explain.
            for sys_name, emu in (("tpserve", "tpserve"), ("llama.cpp", "llama")):
                if name == emu and sys_name in real:
                    results[f"{sys_name} vs emulated {emu}"] = compare([r.astype(np.float64) for r in rows], real[sys_name])
            del rows
            print(f"emulated {name} done", file=sys.stderr)

    hdr = f"{'system':<34} {'top-1 differs (margin>=0.1)':>28} {'(>=0.25)':>12} {'(all)':>8} {'|dlp| mean':>11} {'p90':>7} {'max':>7}"
    print(hdr)
    for name, r in results.items():
        a, b = r["top1_differs_margin_0.1"], r["top1_differs_margin_0.25"]
        print(f"{name:<34} {f'{a[0]} of {a[1]}':>28} {f'{b[0]} of {b[1]}':>12} {r['top1_differs_all']:>8} "
              f"{r['dlogprob_mean']:>11.4f} {r['dlogprob_p90']:>7.4f} {r['dlogprob_max']:>7.4f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cases": [{k: c[k] for k in ("name", "from")} | {"len": len(c["ids"])} for c in cs], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
