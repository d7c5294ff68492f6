#!/usr/bin/env bash
# CI's container smoke test: build the image (build.sh), start compose.yaml's coordinator
# and two workers from it, wait for /ready, check that a greedy completion equals the host's
# `tpserve generate`, stop everything. Also checks that the image runs as a non-root user
# and holds none of the build secret's CA certificates beyond Debian's own.
#
# It starts its own dockerd (data root cached in $TPSERVE_DOCKER_CACHE/data, default
# ~/.cache/tpserve-docker; its sockets in a temporary folder) and stops it on exit, also on
# failure. Run as root on Debian bookworm; it installs docker.io, mmdebstrap and
# docker-compose when they are missing.
#
# Environment:
#   TPSERVE_BIN           the host binary the answers are compared with (default: `cargo build
#                         --bin tpserve` in $CARGO_TARGET_DIR, a no-op after `cargo test`)
#   TPSERVE_HOME          where the host's default model is cached (~/.cache/tpserve)
#   TPSERVE_DOCKER_CACHE  see build.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${TPSERVE_DOCKER_CACHE:-$HOME/.cache/tpserve-docker}
export TPSERVE_DOCKER_CACHE=$cache
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tpserve-ci-target}
image=tpserve:ci
model_file=gemma-3-270m-q4_k_m.gguf
ca_bundle=/etc/ssl/certs/ca-certificates.crt
DOCKER=/usr/bin/docker            # Debian's client: BuildKit without buildx
export DOCKER_BUILDKIT=1

t0=$SECONDS
times=()
phase() { times+=("$(printf '%-28s %4ds' "$1" $((SECONDS - t0)))"); }
say() { echo "ci-smoke: $*" >&2; }
die() { echo "ci-smoke: FAILED: $*" >&2; exit 1; }

# --- what it needs ---------------------------------------------------------------------
need=()
[[ -x /usr/bin/docker ]] && command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
  say "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
phase "packages"

# --- the host's binary and model -------------------------------------------------------
if [[ -z ${TPSERVE_BIN:-} ]]; then
  (cd "$root" && cargo build --quiet --bin tpserve)
  TPSERVE_BIN=$CARGO_TARGET_DIR/debug/tpserve
fi
[[ -x $TPSERVE_BIN ]] || die "no host binary at $TPSERVE_BIN"
host_model=${TPSERVE_HOME:-$HOME/.cache/tpserve}/models/$model_file
if [[ ! -s $host_model ]]; then
  say "fetching the default model on the host"
  "$TPSERVE_BIN" model fetch
fi
[[ -s $host_model ]] || die "no default model at $host_model after \`tpserve model fetch\`"
# The containers run as uid 10001 and the host's file may be private (0600): they get a
# copy in a folder of theirs, as a named volume would be (the `model` service may write the
# .sha256 marker of a verified file there), refreshed when the host's file changes.
mkdir -p "$cache/models"
exec 9>"$cache/lock"
flock -w 3600 9 || die "another ci-smoke holds $cache/lock"
if ! cmp -s "$host_model" "$cache/models/$model_file"; then
  rm -f "$cache/models/$model_file.sha256"
  cp "$host_model" "$cache/models/$model_file.partial"
  chmod 0644 "$cache/models/$model_file.partial"
  mv "$cache/models/$model_file.partial" "$cache/models/$model_file"
  if [[ -f $host_model.sha256 ]]; then cp "$host_model.sha256" "$cache/models/$model_file.sha256"; fi
fi
chown -R 10001:10001 "$cache/models"
phase "host binary and model"

# --- our own dockerd -------------------------------------------------------------------
mkdir -p "$cache/data"
# A daemon of an earlier run that was killed before its trap ran still holds the data root.
if [[ -s $cache/dockerd.pid ]]; then
  old=$(cat "$cache/dockerd.pid")
  if [[ -r /proc/$old/cmdline ]] && tr '\0' ' ' <"/proc/$old/cmdline" | grep -q -- "--data-root $cache/data"; then
    say "stopping the dockerd ($old) an earlier run left behind"
    kill -TERM "$old" 2>/dev/null || true
    for _ in $(seq 30); do [[ -d /proc/$old ]] || break; sleep 1; done
  fi
fi
run=$(mktemp -d /tmp/tpserve-ci-docker.XXXXXX)
chmod 0755 "$run"
export DOCKER_HOST=unix://$run/docker.sock
project=tpserveci$$
dockerd_pid=
compose_up=0

compose() {
  docker-compose --ansi never -p "$project" -f "$here/compose.yaml" "$@"
}
cleanup() {
  local rc=$?
  set +e
  if ((compose_up)); then
    if ((rc != 0)); then
      say "logs of the containers:"
      compose logs --no-color --tail 40 >&2
    fi
    compose down -v --timeout 45 >/dev/null 2>&1
  fi
  [[ -n $dockerd_pid ]] && "$DOCKER" volume prune -f >/dev/null 2>&1
  if [[ -n $dockerd_pid ]]; then
    kill -TERM "$dockerd_pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$dockerd_pid" 2>/dev/null
    wait "$dockerd_pid" 2>/dev/null
    rm -f "$cache/dockerd.pid"
  fi
  # dockerd can leave mounts in its exec root (netns/default after a host-network container).
  awk -v r="$run/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  rm -rf "$run"
  printf 'ci-smoke: %s\n' "${times[@]}" >&2
  if ((rc == 0)); then say "passed in $((SECONDS - t0)) s"; else say "failed (exit $rc) after $((SECONDS - t0)) s"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# No iptables and no default bridge (as the machine allows); compose's user-defined bridge
# network still connects the containers, and docker-proxy publishes the HTTP port.
dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
  --data-root "$cache/data" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
  -H "$DOCKER_HOST" >"$run/dockerd.log" 2>&1 9>&- &
dockerd_pid=$!
echo "$dockerd_pid" >"$cache/dockerd.pid"
for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
"$DOCKER" info >/dev/null 2>&1 || { tail -n 20 "$run/dockerd.log" >&2; die "dockerd did not start"; }
phase "dockerd up"

# Keep the cached data root bounded: BuildKit's cache (cargo's target folder with it) grows
# with each changed build; past the limit it starts over, and that build is a cold one.
max_gb=${TPSERVE_DOCKER_CACHE_MAX_GB:-12}
used_gb=$(du -s --block-size=1G "$cache/data" | cut -f1)
if ((used_gb > max_gb)); then
  say "the docker data root holds ${used_gb} GB (> $max_gb): dropping the build cache"
  "$DOCKER" builder prune -af >/dev/null
fi

# --- build -----------------------------------------------------------------------------
TPSERVE_IMAGE=$image DOCKER=$DOCKER "$here/build.sh" --progress plain
"$DOCKER" image prune -f >/dev/null    # the previous run's image, now untagged
phase "image built"

# --- the image: non-root, no CA but Debian's --------------------------------------------
user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$image")
[[ $user == 10001:10001 ]] || die "the image's user is '$user', expected 10001:10001"
uid=$("$DOCKER" run --rm --network none --entrypoint id "$image" -u)
[[ $uid != 0 ]] || die "the image runs as root"
[[ $("$DOCKER" run --rm --network none "$image" --version) == tpserve* ]] || die "the image's tpserve --version does not answer"

fs=$run/image-fs.tar
cid=$("$DOCKER" create "$image")
"$DOCKER" export "$cid" >"$fs"
"$DOCKER" rm -v "$cid" >/dev/null
tar -xOf "$fs" etc/ssl/certs/ca-certificates.crt >"$run/image-ca.crt"
# What Debian's ca-certificates package ships, from the build stage's image (the runtime
# stage copies its bundle from there).
rust_image=$(sed -n 's/^ARG RUST_IMAGE=//p' "$here/Dockerfile" | head -n1)
"$DOCKER" run --rm --network none --entrypoint sh "$rust_image" -c 'cat /usr/share/ca-certificates/mozilla/*.crt' >"$run/debian-ca.crt"
# The build secret is the host's bundle: Debian's certificates (of the host's package version)
# plus the proxy's CA. The image's bundle must hold Debian's certificates only, and no
# certificate that the secret adds to Debian's may be in any file of the image.
python3 - "$ca_bundle" "$run/image-ca.crt" "$run/debian-ca.crt" "$fs" <<'EOF'
import glob, hashlib, re, ssl, sys, tarfile

def certs(text):
    return re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)

def fp(pem):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()

secret = {fp(c): c for c in certs(open(sys.argv[1]).read())}
image = {fp(c) for c in certs(open(sys.argv[2]).read())}
debian = {fp(c) for c in certs(open(sys.argv[3]).read())}
host_debian = {fp(c) for f in glob.glob("/usr/share/ca-certificates/mozilla/*.crt") for c in certs(open(f).read())}
if not image or not debian:
    sys.exit(f"ci-smoke: FAILED: {len(image)} certificates in the image's bundle, {len(debian)} in Debian's package")
extra = {f: c for f, c in secret.items() if f not in debian and f not in host_debian}
print(f"ci-smoke: image bundle: {len(image)} certificates, Debian's package {len(debian)}; "
      f"build secret {len(secret)}, of which {len(extra)} not Debian's: {sorted(f[:16] for f in extra)}", file=sys.stderr)
if image - debian:
    sys.exit(f"ci-smoke: FAILED: the image's CA bundle holds {len(image - debian)} certificates that are not Debian's: {sorted(image - debian)}")
# The body of each extra certificate, as PEM text, in any file of the image.
needles = [re.sub(r"\s", "", c.split("-----")[2])[:64].encode() for c in extra.values()]
with tarfile.open(sys.argv[4]) as t:
    for m in t:
        if not m.isfile():
            continue
        flat = t.extractfile(m).read().replace(b"\n", b"").replace(b"\r", b"")
        for n in needles:
            if n in flat:
                sys.exit(f"ci-smoke: FAILED: the image's file /{m.name} holds a certificate of the build secret that is not Debian's")
print("ci-smoke: the image holds Debian's CA certificates only (none of the build secret's others)", file=sys.stderr)
EOF
rm -f "$fs"
phase "image checks"

# --- the cluster -----------------------------------------------------------------------
openssl rand -hex 32 >"$run/cluster-token"
chmod 0644 "$run/cluster-token"     # read by uid 10001 through the compose secret's bind mount
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
unset RUST_LOG TPSERVE_API_KEY
export TPSERVE_IMAGE=$image TPSERVE_MODELS=$cache/models TPSERVE_MODEL_FILE=$model_file \
  TPSERVE_CLUSTER_TOKEN_FILE=$run/cluster-token TPSERVE_HTTP_PORT=$port
# Two workers and the coordinator share 2 cores: one compute thread each, and a collective
# receive that sleeps at once instead of polling.
export TPSERVE_THREADS=1 TPSERVE_COMM_SPIN_US=0
compose_up=1
compose up -d
ready=0
for _ in $(seq 180); do
  if [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready") == 200 ]]; then ready=1; break; fi
  sleep 1
done
((ready)) || die "/ready did not answer 200 within 180 s"
phase "cluster ready"

# Every process in the servers' containers runs as uid 10001.
for c in $(compose ps -q coordinator worker0 worker1); do
  uids=$("$DOCKER" top "$c" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | tr '\n' ' ')
  [[ $uids == "10001 " ]] || die "container $c runs processes as uid(s) $uids, expected 10001 only"
done

# --- greedy answers equal the host's ---------------------------------------------------
max_tokens=16
for prompt in "The capital of France is" "The Nile is a river"; do
  body=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": int(sys.argv[2]), "temperature": 0}))' "$prompt" "$max_tokens")
  got=$(curl -sS --fail-with-body -m 120 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' -d "$body") \
    || die "the completion request failed: $got"
  want=$("$TPSERVE_BIN" generate --model "$host_model" --prompt "$prompt" --max-tokens "$max_tokens" --temperature 0 --json 2>/dev/null) \
    || die "the host's tpserve generate failed"
  python3 - "$prompt" "$got" "$want" <<'EOF'
import json, sys
prompt, got, want = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
text, tokens = got["choices"][0]["text"], got["usage"]["completion_tokens"]
if (text, tokens) != (want["text"], len(want["output_ids"])):
    sys.exit(f"ci-smoke: FAILED: {prompt!r}: the containers answered {text!r} ({tokens} tokens), "
             f"the host's tpserve generate {want['text']!r} ({len(want['output_ids'])} tokens)")
print(f"ci-smoke: {prompt!r} -> {text!r} ({tokens} tokens), as the host's tpserve generate", file=sys.stderr)
EOF
done
phase "greedy answers checked"

# --- stop: SIGTERM, each exits 0 -------------------------------------------------------
ids=$(compose ps -q)
compose stop --timeout 45
for c in $ids; do
  read -r name code < <("$DOCKER" inspect -f '{{.Name}} {{.State.ExitCode}}' "$c")
  [[ $code == 0 ]] || die "$name exited $code after SIGTERM"
done
compose down -v --timeout 45
compose_up=0
left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project")
[[ -z $left ]] || die "containers left after down: $left"
phase "stopped and removed"
