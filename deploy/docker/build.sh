#!/usr/bin/env bash
# Builds deploy/docker/Dockerfile into the image $TPSERVE_IMAGE (default tpserve:latest).
#
# With a container registry this is just
#   DOCKER_BUILDKIT=1 docker build -f deploy/docker/Dockerfile -t tpserve .
# and that is what this script runs in the end. Where the Dockerfile's base images are
# neither present nor pullable (machines with an apt mirror but no registry), it makes them
# from Debian's packages first, under the names the Dockerfile's FROM lines use:
#   debian:bookworm-slim   mmdebstrap (minbase, slim's dpkg excludes) + docker import
#   rust:<v>-bookworm      that image + Debian's rustc-web/cargo-web (rust-from-debian.Dockerfile),
#                          checked to be at least <v>
# The root filesystem tarball is cached in $TPSERVE_DOCKER_CACHE/rootfs (default
# ~/.cache/tpserve-docker), so a daemon whose data root was wiped imports it again in seconds.
#
# Environment:
#   TPSERVE_IMAGE          tag of the image built (tpserve:latest)
#   TPSERVE_DOCKER_CACHE   cache folder (~/.cache/tpserve-docker)
#   TPSERVE_BUILD_CA       a CA bundle given to cargo inside the build as the secret `ca`, for
#                          a TLS-intercepting proxy (default: /etc/ssl/certs/ca-certificates.crt
#                          when it exists; empty: none). It never enters the image.
#   TPSERVE_BUILD_NETWORK  network of the build steps (host: apt and cargo reach the network
#                          the way the host does, also where the daemon runs with --bridge=none)
#   TPSERVE_LOCAL_BASE=1   make the base images locally even if a registry could be reached
#   DOCKER                 the docker client (default: Debian's /usr/bin/docker when present,
#                          as a newer client without buildx cannot run BuildKit builds)
# Extra arguments are passed to the final `docker build`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${TPSERVE_DOCKER_CACHE:-$HOME/.cache/tpserve-docker}
image=${TPSERVE_IMAGE:-tpserve:latest}
network=${TPSERVE_BUILD_NETWORK:-host}
ca=${TPSERVE_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
if [[ -z ${DOCKER:-} ]]; then
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1

die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*" >&2; }

"$DOCKER" info >/dev/null 2>&1 || die "no docker daemon answers $DOCKER (DOCKER_HOST=${DOCKER_HOST:-unset}); start dockerd first"

# The base images the Dockerfile names (its ARG defaults), so this script follows the file.
dockerfile=$here/Dockerfile
arg_default() { sed -n "s/^ARG $1=//p" "$dockerfile" | head -n1; }
rust_image=$(arg_default RUST_IMAGE)
runtime_image=$(arg_default RUNTIME_IMAGE)
[[ -n $rust_image && -n $runtime_image ]] || die "cannot read the RUST_IMAGE / RUNTIME_IMAGE defaults from $dockerfile"
case $runtime_image in debian:bookworm*) ;; *) die "only a debian:bookworm* runtime image can be made locally, not $runtime_image" ;; esac

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# True when the image is here or could be pulled (unless TPSERVE_LOCAL_BASE=1).
present_or_pulled() {
  have_image "$1" && return 0
  [[ ${TPSERVE_LOCAL_BASE:-0} == 1 ]] && return 1
  if "$DOCKER" pull -q "$1" >/dev/null 2>&1; then say "pulled $1"; return 0; fi
  say "$1 is not here and cannot be pulled: making it from Debian's packages"
  return 1
}

make_debian() {
  local tar=$cache/rootfs/debian-bookworm-slim.tar sources=/etc/apt/sources.list.d/debian.sources
  command -v mmdebstrap >/dev/null || die "mmdebstrap is needed to make $runtime_image (apt-get install mmdebstrap)"
  mkdir -p "$cache/rootfs"
  if [[ ! -s $tar ]]; then
    # The host's apt sources (its mirror and bookworm-security) when it has deb822 ones.
    local mirror=(http://deb.debian.org/debian "deb http://deb.debian.org/debian-security bookworm-security main")
    [[ -r $sources ]] && mirror=("$sources")
    say "mmdebstrap bookworm -> $tar"
    # (mmdebstrap picks the output format from the name: it must end in .tar)
    # What debian:bookworm-slim leaves out: manuals, docs (not their copyrights), locales.
    mmdebstrap --variant=minbase --quiet \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/lintian/*' \
      bookworm "${tar%.tar}.partial.tar" "${mirror[@]}"
    mv "${tar%.tar}.partial.tar" "$tar"
  fi
  "$DOCKER" import --change 'CMD ["bash"]' "$tar" "$runtime_image" >/dev/null
  say "imported $tar as $runtime_image"
}

make_rust() {
  local want=${rust_image#*:}
  want=${want%%-*}
  [[ $want =~ ^[0-9]+\.[0-9]+ ]] || die "cannot read a Rust version from $rust_image"
  say "building $rust_image from $runtime_image + Debian's rustc-web/cargo-web"
  "$DOCKER" build --network "$network" --build-arg "BASE=$runtime_image" -t "$rust_image" - <"$here/rust-from-debian.Dockerfile"
  local got
  got=$("$DOCKER" run --rm --network none --entrypoint rustc "$rust_image" --version | awk '{print $2}')
  if [[ $(printf '%s\n%s\n' "$want" "$got" | sort -V | head -n1) != "$want" ]]; then
    "$DOCKER" rmi "$rust_image" >/dev/null || true
    die "Debian's rustc-web is $got, older than the $want that $rust_image stands for"
  fi
  say "$rust_image has rustc $got"
}

present_or_pulled "$runtime_image" || make_debian
present_or_pulled "$rust_image" || make_rust

secret=()
if [[ -n $ca ]]; then
  [[ -r $ca ]] || die "TPSERVE_BUILD_CA=$ca is not a readable file (set it empty for none)"
  secret=(--secret "id=ca,src=$ca")
fi
say "docker build -> $image"
cd "$root"
"$DOCKER" build --network "$network" "${secret[@]}" -f deploy/docker/Dockerfile -t "$image" "$@" .
