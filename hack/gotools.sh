#!/usr/bin/env bash
# Small Go programs the tests run, each its own module under hack/<tool>/ with its
# versions pinned in go.mod and go.sum (see hack/README.md):
#   argocd-health  runs an Argo CD health.lua in gopher-lua, as Argo CD does
#   kstatus        computes kstatus (sigs.k8s.io/cli-utils) of an object
#
#   hack/gotools.sh build TOOL   build (or reuse) the tool, print its path
#
# A build goes to .cache/controlplane/TOOL-HASH/TOOL, HASH being that of the
# module's files, so an edit or a version bump builds anew and nothing else does.
# Exit codes: 0 ok, 1 failure, 2 usage, 3 go missing and no cached binary.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
CACHE_DIR="${REPO_ROOT}/.cache/controlplane"
TOOLS=(argocd-health kstatus)

log() { echo "gotools: $*" >&2; }

# shellcheck source-path=SCRIPTDIR source=go-build.sh
source "${HACK_DIR}/go-build.sh"

inputs_hash() { # inputs_hash TOOL
  (cd "${HACK_DIR}/$1" && cat go.mod go.sum ./*.go) | sha256sum | cut -c1-16
}

cmd_build() { # cmd_build TOOL
  local tool="$1" bin t
  bin="${CACHE_DIR}/${tool}-$(inputs_hash "${tool}")/${tool}"
  if [[ -x "${bin}" ]]; then echo "${bin}"; return 0; fi
  if ! command -v go >/dev/null 2>&1; then
    log "'go' is not installed and no cached ${tool} exists in ${CACHE_DIR}; install Go >= 1.23 (see hack/README.md)"
    exit 3
  fi
  mkdir -p "$(dirname "${bin}")"
  # Serialise concurrent first uses (parallel test sessions).
  exec 8> "${CACHE_DIR}/${tool}-build.lock"
  flock 8
  if [[ ! -x "${bin}" ]]; then
    go_env
    log "building ${tool} (hack/${tool}; a minute or two when the Go caches are cold) ..."
    t=$(date +%s)
    (cd "${HACK_DIR}/${tool}" && go build -ldflags="-s -w" -o "${bin}.tmp" . 2>&1) | count_downloads gotools 10
    mv "${bin}.tmp" "${bin}"
    log "${tool} built in $(( $(date +%s) - t ))s"
  fi
  exec 8>&-
  echo "${bin}"
}

main() {
  local tool="${2:-}"
  if [[ "${1:-}" != build || " ${TOOLS[*]} " != *" ${tool} "* ]]; then
    echo "usage: $0 build $(IFS='|'; echo "${TOOLS[*]}")" >&2
    exit 2
  fi
  cmd_build "${tool}"
}
main "$@"
