# shellcheck shell=bash
# Sourced by the scripts that build Go programs from pinned modules (controlplane.sh,
# kueue.sh, gotools.sh): the build environment, and go's download chatter as a count.

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
