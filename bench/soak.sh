#!/usr/bin/env bash
# A long soak (docs/RELIABILITY.md): `tpserve up --tp 2` on the default model under
# `tpserve bench` at a fixed request rate; prints every process's resident memory after the
# warm-up and at the end, and the bench's completed / failed counts.
#   bash bench/soak.sh [TPSERVE_BINARY] [SECONDS] [RATE]
set -euo pipefail
B=${1:-target/release/tpserve}; SECS=${2:-1800}; RATE=${3:-3}; PORT=${PORT:-18123}
B=$(realpath "$B"); D=$(mktemp -d); cd "$D"
"$B" up --tp 2 --threads 1 --port "$PORT" --max-num-seqs 8 --kv-cache-tokens 2048 > up.log 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 1; done
rss() { for p in $UP $(pgrep -P $UP); do awk -v p="$p" '/VmRSS/{printf "%s:%.1fMiB ", p, $2/1024}' "/proc/$p/status"; done; echo; }
# A run with failed requests is what a soak reports, not a reason to stop.
bench() { "$B" bench --base-url "http://127.0.0.1:$PORT" --request-rate "$RATE" --duration "$1" --num-requests 1000000 --input-len 48 --output-len 24 --seed "$2" --save-result "$3" > "$3.txt" 2>&1 || echo "bench exited $? ($D/$3.txt)"; }
bench 60 1 warm.json
echo "RSS after the warm-up: $(rss)"
bench "$SECS" 2 soak.json
echo "RSS after $SECS s: $(rss)"
python3 -c "import json; r=json.load(open('soak.json')); e=[x for x in r['errors'] if x]; print('completed', r['completed'], 'failed', r['failed'], 'errors', {k: e.count(k) for k in set(e)})"
kill -INT $UP; wait $UP && echo "up exited 0"
trap - EXIT
