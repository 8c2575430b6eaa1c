# shellcheck shell=bash
# Sourced by the scripts that build Go programs from pinned modules (controlplane.sh,
# kueue.sh, prometheus.sh, gotools.sh): the build environment, one build at a time,
# and go's download chatter as a count. The caller defines HACK_DIR and log.

# go_env: a reproducible, static build from go.mod and go.sum as committed, with the
# Go that is installed.
go_env() {
  export GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath -buildvcs=false"
  export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
  export CGO_ENABLED=0
}

# count_downloads PREFIX EVERY: go's "go: downloading MODULE VERSION", hundreds of
# lines on a cold module cache, shown as "PREFIX: N Go modules downloaded" every EVERY
# modules; everything else go says passes through (to stderr).
count_downloads() {
  awk -v prefix="$1" -v every="$2" '
    /^go: downloading /{ n++; if (n % every == 0) { printf "%s: %d Go modules downloaded ...\n", prefix, n; fflush() }; next }
    { print; fflush() }
    END { if (n % every) printf "%s: %d Go modules downloaded\n", prefix, n }' >&2
}

# go_build_once LOCK PRESENT BUILD MODULE_DIR...: runs the function BUILD in go_env
# unless the function PRESENT finds its outputs already built; under an exclusive lock
# on the file LOCK, so that concurrent first uses (make, pytest fixtures, parallel test
# sessions) build once while the others wait and reuse it. Without Go (and nothing
# built) it exits 3, naming the Go that the MODULE_DIRs' go.mod files ask for.
go_build_once() {
  local lock="$1" present="$2" build="$3"; shift 3
  "${present}" && return 0
  if ! command -v go >/dev/null 2>&1; then
    local need
    need="$(cd "${HACK_DIR}" && awk '$1 == "go" { print $2 }' "${@/%//go.mod}" | sort -V | tail -n 1)"
    log "'go' is not installed and nothing built is cached; install Go >= ${need} (see hack/README.md)"
    exit 3
  fi
  mkdir -p "$(dirname "${lock}")"
  exec 8> "${lock}"
  flock 8
  if ! "${present}"; then
    go_env
    "${build}"
  fi
  exec 8>&-
}
