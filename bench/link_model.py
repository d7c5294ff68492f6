#!/usr/bin/env python3
"""Checks the step-time model of docs/PERFORMANCE.md ("Across hosts") against a run of
`cargo test --test netns -- --ignored --nocapture link_latency` with TPSERVE_LATENCY_OUT set.

    step = compute + hops * (one_way_delay + wake) + bytes_on_the_critical_path / bandwidth

compute is the step measured through the relays with no delay and no rate limit; hops and
bytes come from the model's shape and the collective's algorithms; wake is what a message
that is late costs beyond its delay (the receiver has stopped spinning and sleeps in the
kernel, and is woken; here also the relay's timer wake-up), calibrated on one point (tp = 2
decode at --calibrate-ms, the smallest delay) and checked on every other:

  tp = 2, decode (one token):   hops = 2 (gRPC step request + answer) + (2 L + 1) all-reduces
                                 (embedding, attention out, FFN down) x 1 round (direct);
                                 bytes = (2 L + 1) x hidden x 4 per direction.
  tp = 2, prefill of P tokens:  each all-reduce of P x hidden x 4 bytes >= 32 KiB takes the
                                 reduce-scatter + all-gather path: 2 rounds, and
                                 2 x (buffer / 2) = buffer bytes per direction.
  pp = 2:                        hops = 3 (request to both stages, stage 0 -> stage 1, answer
                                 from stage 1); bytes = the activations, P x hidden x 4.

Prints measured and predicted times and exits 1 when any prediction is off by more than
--tolerance (default 10%).

    python3 bench/link_model.py /tmp/latency.jsonl
"""
import argparse
import json
import sys

LAYERS, HIDDEN = 18, 640  # Gemma 3 270M (the default model)
SPLIT_THRESHOLD = 32 * 1024  # crates/comm/src/tcp.rs DEFAULT_SPLIT_THRESHOLD


def network(split, tokens, delay_s, rate, wake_s):
    """Seconds the network adds to one step computing `tokens` tokens."""
    buf = tokens * HIDDEN * 4
    if split == "tp2":
        rounds = 2 if buf >= SPLIT_THRESHOLD else 1
        hops = 2 + (2 * LAYERS + 1) * rounds
        nbytes = (2 * LAYERS + 1) * buf  # direct: the whole buffer; split: two halves
    else:
        hops = 3
        nbytes = buf
    late = hops * (delay_s + wake_s) if delay_s else 0.0
    return late + (nbytes / rate if rate else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="JSON lines written by link_latency (TPSERVE_LATENCY_OUT)")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--calibrate-ms", type=float, default=0.5, help="the tp = 2 decode delay that calibrates `wake`")
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.results) if l.strip()]
    # The compute baseline: the runs with no delay and no rate limit (first and last), averaged.
    base = {}
    for split in {r["split"] for r in rows}:
        zero = [r for r in rows if r["split"] == split and r["delay_ms"] == 0 and r["bytes_per_s"] == 0]
        base[split] = {k: sum(z[k] for z in zero) / len(zero) for k in ("tpot_ms", "ttft_long_ms")}
    cal = next(r for r in rows if r["split"] == "tp2" and r["delay_ms"] == args.calibrate_ms and not r["bytes_per_s"])
    hops = 2 + 2 * LAYERS + 1
    wake = ((cal["tpot_ms"] - base["tp2"]["tpot_ms"]) / 1e3 - hops * cal["delay_ms"] / 1e3) / hops
    print(f"wake = {wake * 1e3:.3f} ms per late message (from tp2 decode at {args.calibrate_ms:g} ms)")
    worst = 0.0
    print(f"{'split':>5} {'delay':>6} {'MB/s':>6} | {'decode step ms':>25} | {'TTFT long prompt ms':>25}")
    print(f"{'':>5} {'ms':>6} {'':>6} | {'measured':>8} {'model':>8} {'error':>7} | {'measured':>8} {'model':>8} {'error':>7}")
    for r in rows:
        b = base[r["split"]]
        d, rate = r["delay_ms"] / 1e3, r["bytes_per_s"]
        pred_tpot = b["tpot_ms"] + 1e3 * network(r["split"], 1, d, rate, wake)
        pred_ttft = b["ttft_long_ms"] + 1e3 * network(r["split"], r["long_prompt_tokens"], d, rate, wake)
        e1 = pred_tpot / r["tpot_ms"] - 1
        e2 = pred_ttft / r["ttft_long_ms"] - 1
        if (r["delay_ms"] or rate) and r is not cal:
            worst = max(worst, abs(e1), abs(e2))
        mbs = "-" if not rate else f"{rate / 1e6:g}"
        print(f"{r['split']:>5} {r['delay_ms']:>6g} {mbs:>6} | {r['tpot_ms']:>8.1f} {pred_tpot:>8.1f} {e1:>+7.1%} | {r['ttft_long_ms']:>8.0f} {pred_ttft:>8.0f} {e2:>+7.1%}")
    print(f"worst error {worst:.1%} (tolerance {args.tolerance:.0%})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
