#!/usr/bin/env python3
"""Single-process engine speed, tpserve vs llama.cpp, side by side in one run.

For each thread count, alternates runs of `tpserve generate --json` and llama.cpp (through
the llama-cpp-python package) on the same GGUF file and the same prompt token ids, and
reports the median prefill and decode tokens/s of each and their ratio.

    python3 bench/engine_vs_llamacpp.py --python /path/to/venv/bin/python \
        --tpserve target/release/tpserve --threads 1 2 --reps 5 [--baseline OLD/tpserve]

With --baseline, another tpserve binary (say, the last release's) runs in the same
alternation, and the table adds its medians and the ratio to it ("nothing got slower").

The venv needs `pip install llama-cpp-python` (builds llama.cpp from source, 10-20 min).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

LLAMA_SNIPPET = r'''
import json, sys, time
import llama_cpp
from llama_cpp import Llama
model, threads, ids, n_gen = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=1024, n_ubatch=1024, verbose=False)
llm.reset()
t0 = time.perf_counter()
llm.eval(ids)                     # prefill, one batch
t1 = time.perf_counter()
for _ in range(n_gen):            # greedy decode, one token per eval
    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
t2 = time.perf_counter()
print(json.dumps({"prefill_tokens_per_s": len(ids) / (t1 - t0), "decode_tokens_per_s": n_gen / (t2 - t1)}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="python of a venv with llama-cpp-python")
    ap.add_argument("--tpserve", default="target/release/tpserve")
    ap.add_argument("--baseline", help="another tpserve binary to run beside, e.g. a build of the previous commit")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tpserve/models/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "../tests/data/wikitext-2-raw-test.txt"))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    # A prompt of exactly --prompt-tokens ids (BOS included), cut from real text.
    text = open(a.text, encoding="utf-8").read()[5000:5000 + 8 * a.prompt_tokens]
    ids = json.loads(subprocess.check_output([a.tpserve, "tokenize", "--json", "--model", a.model, text]))["ids"][: a.prompt_tokens]
    # Our CLI takes text; write the ids back as text through the special-token-free decode of
    # the same tokenizer is lossy, so instead pass a prompt whose tokenization we checked.
    prompt = None
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix of the text that tokenizes to <= prompt_tokens ids
        mid = (lo + hi + 1) // 2
        n = len(json.loads(subprocess.check_output([a.tpserve, "tokenize", "--json", "--model", a.model, text[:mid]]))["ids"])
        lo, hi = (mid, hi) if n <= a.prompt_tokens else (lo, mid - 1)
    prompt = text[:lo]
    ids = json.loads(subprocess.check_output([a.tpserve, "tokenize", "--json", "--model", a.model, prompt]))["ids"]
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    f.write(prompt)
    f.close()

    def ours(binary, t):
        out = subprocess.check_output([binary, "generate", "--json", "--model", a.model, "--prompt-file", f.name,
                                       "--temperature", "0", "--ignore-eos", "--max-tokens", str(a.gen_tokens + 1),
                                       "--threads", str(t), "--prefill-chunk", str(len(ids))])
        return json.loads(out)["timings"]

    rows = []
    for t in a.threads:
        new, base, theirs = [], [], []
        for _ in range(a.reps):
            new.append(ours(a.tpserve, t))
            if a.baseline:
                base.append(ours(a.baseline, t))
            out = subprocess.check_output([a.python, "-c", LLAMA_SNIPPET, a.model, str(t), json.dumps(ids), str(a.gen_tokens)])
            theirs.append(json.loads(out))
        med = lambda xs, k: statistics.median(x[k] for x in xs) if xs else float("nan")
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            rows.append((t, k, med(new, k), med(theirs, k), med(base, k)))
    print(f"prompt {len(ids)} tokens, {a.gen_tokens} generated, {a.reps} runs each, medians")
    extra = f" {'baseline':>9} {'vs base':>7}" if a.baseline else ""
    print(f"{'threads':>7} {'metric':<22} {'tpserve':>9} {'llama.cpp':>9} {'ratio':>6}{extra}")
    for t, k, o, l, b in rows:
        extra = f" {b:9.1f} {o / b:7.3f}" if a.baseline else ""
        print(f"{t:>7} {k:<22} {o:9.1f} {l:9.1f} {o / l:6.2f}{extra}")
    os.unlink(f.name)


if __name__ == "__main__":
    main()
