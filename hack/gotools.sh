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

tool_present() { [[ -x "${BIN}" ]]; }

build_tool() {
  local t
  log "building ${TOOL} (hack/${TOOL}; a minute or two when the Go caches are cold) ..."
  t=$(date +%s)
  (cd "${HACK_DIR}/${TOOL}" && go build -ldflags="-s -w" -o "${BIN}.tmp" . 2>&1) | count_downloads gotools 10
  mv "${BIN}.tmp" "${BIN}"
  log "${TOOL} built in $(( $(date +%s) - t ))s"
}

cmd_build() { # cmd_build TOOL
  TOOL="$1"
  BIN="${CACHE_DIR}/${TOOL}-$(inputs_hash "${TOOL}")/${TOOL}"
  mkdir -p "$(dirname "${BIN}")"
  go_build_once "${CACHE_DIR}/${TOOL}-build.lock" tool_present build_tool "${TOOL}"
  echo "${BIN}"
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
