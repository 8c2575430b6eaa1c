#!/usr/bin/env bash
# hack/helm.sh ARGS...: run helm, built from Go modules into .cache/tools/ on first
# use (the only download is from the Go module proxy), at the version pinned here
# (not in versions.env, whose hash decides when the control plane is rebuilt). The
# chart tests render charts/kubetune with it.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "${HACK_DIR}")"
HELM_VERSION=v3.22.0
TOOLS="${ROOT}/.cache/tools"
BIN="${TOOLS}/helm-${HELM_VERSION}/helm"

if [[ ! -x "${BIN}" ]]; then
  command -v go >/dev/null 2>&1 || { echo "helm.sh: 'go' is not installed" >&2; exit 3; }
  mkdir -p "${TOOLS}"
  # Serialise concurrent first uses (parallel test sessions).
  exec 9> "${TOOLS}/helm.lock"
  flock 9
  if [[ ! -x "${BIN}" ]]; then
    echo "helm.sh: building helm ${HELM_VERSION} ..." >&2
    start=$(date +%s)
    GOBIN="${TOOLS}/helm-${HELM_VERSION}.tmp" GOFLAGS="-trimpath -buildvcs=false" \
      CGO_ENABLED=0 GOTOOLCHAIN=local \
      go install -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    rm -rf "${TOOLS}/helm-${HELM_VERSION}"
    mv "${TOOLS}/helm-${HELM_VERSION}.tmp" "${TOOLS}/helm-${HELM_VERSION}"
    echo "helm.sh: built in $(( $(date +%s) - start ))s" >&2
  fi
  exec 9>&-
fi
exec "${BIN}" "$@"
