#!/usr/bin/env bash
# Real etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback
# for tests and local development; the local kubelet (hack/local_kubelet.py) runs
# the pods the scheduler binds to its node.
#
#   hack/controlplane.sh build   build (or reuse) the binaries, print their paths
#   hack/controlplane.sh up      start a plane; last stdout line: export KUBECONFIG=...
#   hack/controlplane.sh env     print the export line of a running plane (exit 1 if none)
#   hack/controlplane.sh down    stop the plane and remove its run dir
#   hack/controlplane.sh status  show pids/ports of the plane
#   hack/controlplane.sh restart-kcm  restart kube-controller-manager so its
#                                garbage collector tracks CRDs applied since up
#
# KUBETUNE_CP_DIR overrides the run dir (default: <repo>/.cache/controlplane/run).
# KUBETUNE_CP_NO_KCM=1 skips kube-controller-manager and kube-scheduler.
# Exit codes: 0 ok, 1 failure, 3 go missing and no cached binaries.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
source "${HACK_DIR}/versions.env"

CACHE_DIR="${REPO_ROOT}/.cache/controlplane"
VERSION_TAG="${K8S_VERSION}-etcd-${ETCD_VERSION}"
BIN_DIR="${CACHE_DIR}/${VERSION_TAG}/bin"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
READY_TIMEOUT="${KUBETUNE_CP_READY_TIMEOUT:-60}"

log() { echo "controlplane: $*" >&2; }
die() { echo "controlplane: error: $*" >&2; exit 1; }

# shellcheck source-path=SCRIPTDIR source=go-build.sh
source "${HACK_DIR}/go-build.sh"
# shellcheck source-path=SCRIPTDIR source=processes.sh
source "${HACK_DIR}/processes.sh"

# Hash of everything that determines the binaries; stored next to them.
inputs_hash() {
  # Only the control plane's own pins: Kueue and vLLM have their own builds.
  (cd "${HACK_DIR}" && grep -E '^(K8S|ETCD)_VERSION=' versions.env \
    && cat kube/go.mod kube/go.sum etcd/go.mod etcd/go.sum \
    etcd/main.go kube/cmd/kube-apiserver/main.go kube/cmd/kube-controller-manager/main.go \
    kube/cmd/kube-scheduler/main.go) \
    | sha256sum | cut -c1-16
}

binaries_present() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "${BIN_DIR}/${b}" ]] || return 1; done
  [[ -f "${BIN_DIR}/.inputs" && "$(cat "${BIN_DIR}/.inputs")" == "$(inputs_hash)" ]]
}

kube_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local f="-s -w" pkg key val
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for kv in "gitVersion=${K8S_VERSION}" "gitMajor=1" "gitMinor=${minor}" "gitTreeState=clean"; do
      key="${kv%%=*}"; val="${kv#*=}"
      f+=" -X ${pkg}.${key}=${val}"
    done
  done
  echo "${f}"
}

build_binaries() {
  rm -f "${BIN_DIR}/.inputs"
  local t0 t b i=0
  t0=$(date +%s)
  log "building etcd ${ETCD_VERSION} (first the Go modules are downloaded: minutes, once) ..."
  t=$(date +%s)
  (cd "${HACK_DIR}/etcd" && go build -ldflags="-s -w" -o "${BIN_DIR}/etcd.tmp" . 2>&1) | count_downloads controlplane 100
  mv "${BIN_DIR}/etcd.tmp" "${BIN_DIR}/etcd"
  log "etcd built in $(( $(date +%s) - t ))s"
  for b in "${KUBE_BINARIES[@]}"; do
    i=$(( i + 1 ))
    log "building ${b} ${K8S_VERSION} (${i} of ${#KUBE_BINARIES[@]}; a few minutes each when cold) ..."
    t=$(date +%s)
    (cd "${HACK_DIR}/kube" && go build -ldflags="$(kube_ldflags)" -o "${BIN_DIR}/${b}.tmp" "./cmd/${b}" 2>&1) \
      | count_downloads controlplane 100
    mv "${BIN_DIR}/${b}.tmp" "${BIN_DIR}/${b}"
    log "${b} built in $(( $(date +%s) - t ))s"
  done
  inputs_hash > "${BIN_DIR}/.inputs"
  log "build done in $(( $(date +%s) - t0 ))s"
}

cmd_build() {
  mkdir -p "${BIN_DIR}"
  go_build_once "${CACHE_DIR}/build.lock" binaries_present build_binaries etcd kube
  local b; for b in "${BINARIES[@]}"; do echo "${BIN_DIR}/${b}"; done
}

# ---------------------------------------------------------------- run dir ---
resolve_run_dir() {
  local d="${KUBETUNE_CP_DIR:-${CACHE_DIR}/run}"
  mkdir -p "$(dirname "${d}")"
  RUN_DIR="$(cd "$(dirname "${d}")" && pwd)/$(basename "${d}")"
  PKI="${RUN_DIR}/pki"
  KUBECONFIG_PATH="${RUN_DIR}/kubeconfig"
}

export_line() { echo "export KUBECONFIG=${KUBECONFIG_PATH}"; }

api_port() { sed -n 's/^API_PORT=//p' "${RUN_DIR}/ports.env" 2>/dev/null; }

readyz_ok() {
  local port; port="$(api_port)"
  [[ -n "${port}" ]] || return 1
  [[ "$(curl -sS --max-time 5 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
        "https://127.0.0.1:${port}/readyz" 2>/dev/null)" == "ok" ]]
}

is_running() {
  pid_of etcd >/dev/null && pid_of kube-apiserver >/dev/null || return 1
  if [[ -f "${RUN_DIR}/kube-controller-manager.enabled" ]]; then
    pid_of kube-controller-manager >/dev/null || return 1
    pid_of kube-scheduler >/dev/null || return 1
  fi
  readyz_ok
}

# ------------------------------------------------------------------- certs ---
gen_pki() {
  mkdir -p "${PKI}"
  chmod 700 "${PKI}"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "${PKI}/ca.key" -out "${PKI}/ca.crt" -days 3650 \
    -subj "/CN=kubetune-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  # leaf NAME SUBJECT EXTENSIONS
  leaf() {
    openssl req -new "${ec[@]}" -keyout "${PKI}/$1.key" -out "${PKI}/$1.csr" -subj "$2" 2>/dev/null
    printf '%b' "$3" > "${PKI}/$1.ext"
    openssl x509 -req -in "${PKI}/$1.csr" -CA "${PKI}/ca.crt" -CAkey "${PKI}/ca.key" -CAcreateserial \
      -days 3650 -sha256 -extfile "${PKI}/$1.ext" -out "${PKI}/$1.crt" 2>/dev/null
    rm -f "${PKI}/$1.csr" "${PKI}/$1.ext"
  }
  leaf apiserver "/CN=kube-apiserver" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
  leaf admin "/O=system:masters/CN=kubetune-admin" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
  # Service-account token signing key pair (ES256).
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "${PKI}/sa.key" 2>/dev/null
  openssl pkey -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>/dev/null
  chmod 600 "${PKI}"/*.key
}

write_kubeconfig() { # write_kubeconfig PATH PORT
  cat > "$1" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: kubetune-test
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority: ${PKI}/ca.crt
users:
- name: kubetune-admin
  user:
    client-certificate: ${PKI}/admin.crt
    client-key: ${PKI}/admin.key
contexts:
- name: kubetune-test
  context:
    cluster: kubetune-test
    user: kubetune-admin
    namespace: default
current-context: kubetune-test
KCFG
  chmod 600 "$1"
}

# --------------------------------------------------------------- processes ---
stop_all() { # stop everything recorded in RUN_DIR (reverse start order)
  stop_procs kube-scheduler kube-controller-manager kube-apiserver etcd
  stop_watchdog controlplane.sh
}

wait_ready() {
  local deadline=$(( $(date +%s) + READY_TIMEOUT ))
  while (( $(date +%s) < deadline )); do
    readyz_ok && return 0
    alive etcd || { log "etcd exited during startup"; tail_log etcd; return 1; }
    alive kube-apiserver || { log "kube-apiserver exited during startup"; tail_log kube-apiserver; return 1; }
    sleep 0.5
  done
  log "kube-apiserver did not report /readyz ok within ${READY_TIMEOUT}s (port $(api_port))"
  curl -sS --max-time 5 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
    "https://127.0.0.1:$(api_port)/readyz?verbose" 2>&1 | grep -v '^\[+\]' >&2 || true
  tail_log kube-apiserver
  return 1
}

start_plane() {
  local ports etcd_port peer_port api_port
  mapfile -t ports < <(free_ports 3)
  etcd_port="${ports[0]}"; peer_port="${ports[1]}"; api_port="${ports[2]}"
  printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPI_PORT=%s\n' "${etcd_port}" "${peer_port}" "${api_port}" > "${RUN_DIR}/ports.env"

  start_proc etcd "${BIN_DIR}/etcd" \
    --name=kubetune \
    --data-dir="${RUN_DIR}/etcd-data" \
    --listen-client-urls="http://127.0.0.1:${etcd_port}" \
    --advertise-client-urls="http://127.0.0.1:${etcd_port}" \
    --listen-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-cluster="kubetune=http://127.0.0.1:${peer_port}" \
    --unsafe-no-fsync=true \
    --log-level=warn

  local admission=()
  if [[ "${KUBETUNE_CP_NO_KCM:-0}" == "1" ]]; then
    # Without the serviceaccount controller no "default" ServiceAccount ever exists.
    admission=(--disable-admission-plugins=ServiceAccount)
  fi
  start_proc kube-apiserver "${BIN_DIR}/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:${etcd_port}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="${api_port}" \
    --cert-dir="${PKI}" \
    --tls-cert-file="${PKI}/apiserver.crt" \
    --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --authorization-mode=RBAC \
    --service-account-issuer="https://127.0.0.1:${api_port}" \
    --service-account-key-file="${PKI}/sa.pub" \
    --service-account-signing-key-file="${PKI}/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --allow-privileged=true \
    "${admission[@]}"

  write_kubeconfig "${KUBECONFIG_PATH}" "${api_port}"
  wait_ready || return 1

  if [[ "${KUBETUNE_CP_NO_KCM:-0}" != "1" ]]; then
    touch "${RUN_DIR}/kube-controller-manager.enabled"
    start_kcm "${api_port}" || return 1
    start_scheduler || return 1
  fi
}

# start_scheduler: the default scheduler, binding pods to the local kubelet's node
# (or saying why none fits, as on a real cluster).
start_scheduler() {
  local port
  port="$(free_ports 1)"
  echo "SCHEDULER_PORT=${port}" >> "${RUN_DIR}/ports.env"
  start_proc kube-scheduler "${BIN_DIR}/kube-scheduler" \
    --kubeconfig="${KUBECONFIG_PATH}" \
    --authentication-kubeconfig="${KUBECONFIG_PATH}" \
    --authorization-kubeconfig="${KUBECONFIG_PATH}" \
    --leader-elect=false \
    --bind-address=127.0.0.1 \
    --secure-port="${port}" \
    --cert-dir="${RUN_DIR}/scheduler-certs"
  local deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until [[ "$(curl -sk --max-time 2 "https://127.0.0.1:${port}/readyz" 2>/dev/null)" == "ok" ]]; do
    alive kube-scheduler || { log "kube-scheduler exited during startup"; tail_log kube-scheduler; return 1; }
    (( $(date +%s) < deadline )) || { log "kube-scheduler not ready within ${READY_TIMEOUT}s"; tail_log kube-scheduler; return 1; }
    sleep 0.2
  done
}

# start_kcm API_PORT: start kube-controller-manager and wait until its garbage
# collector has synced all resource monitors (CRDs that exist now included) and
# the serviceaccount controller has created default/default.
start_kcm() {
  local api_port="$1"
  # The controllers the operator's objects meet on a real cluster: Jobs, Deployments
  # and ReplicaSets, TTL after finish, pod garbage collection, and the ones every
  # namespace needs; the node lifecycle controller, which lifts the not-ready taint a
  # new Node gets once its kubelet reports Ready; the PersistentVolume binder, which
  # binds the claims the scheduler requires to the volumes the local kubelet offers;
  # the endpoints controller, whose Endpoints the API server's service proxy follows;
  # the resource quota controller, without which the API server's quota admission finds
  # no usage in a ResourceQuota's status and admits everything.
  start_proc kube-controller-manager "${BIN_DIR}/kube-controller-manager" \
    --kubeconfig="${KUBECONFIG_PATH}" \
    --controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,deployment-controller,replicaset-controller,job-controller,ttl-after-finished-controller,pod-garbage-collector-controller,node-lifecycle-controller,persistentvolume-binder-controller,endpoints-controller,resourcequota-controller \
    --use-service-account-credentials=false \
    --leader-elect=false \
    --secure-port=0 \
    --service-account-private-key-file="${PKI}/sa.key" \
    --root-ca-file="${PKI}/ca.crt" \
    --cluster-name=kubetune-test
  local deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until grep -q "Garbage collector: .*resource monitors" "${RUN_DIR}/kube-controller-manager.log" 2>/dev/null \
      && curl -sf --max-time 5 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
        "https://127.0.0.1:${api_port}/api/v1/namespaces/default/serviceaccounts/default" >/dev/null 2>&1; do
    alive kube-controller-manager || { log "kube-controller-manager exited during startup"; tail_log kube-controller-manager; return 1; }
    (( $(date +%s) < deadline )) || { log "kube-controller-manager not ready within ${READY_TIMEOUT}s"; tail_log kube-controller-manager; return 1; }
    sleep 0.2
  done
}

cmd_watchdog() { # stop the plane when process $1 exits
  WATCHDOG_SELF="$$"
  wait_for_exit "$1"
  if [[ -d "${RUN_DIR}" ]]; then
    stop_all
    rm -rf "${RUN_DIR}"
  fi
  rm -f "${RUN_DIR}.lock"
}

# ---------------------------------------------------------------- commands ---
cmd_up() {
  resolve_run_dir
  if [[ ! -d "${RUN_DIR}" ]] || ! is_running; then
    # Build (or find) the binaries before touching the run dir.
    cmd_build > /dev/null
    command -v openssl >/dev/null 2>&1 || die "openssl is required to generate certificates"
    command -v curl >/dev/null 2>&1 || die "curl is required for readiness checks"
    command -v python3 >/dev/null 2>&1 || die "python3 is required to pick free ports"
  fi
  mkdir -p "${RUN_DIR}"
  exec 9> "${RUN_DIR}.lock"
  flock 9
  if is_running; then
    log "already running in ${RUN_DIR}"
    export_line
    return 0
  fi
  if [[ -n "$(ls -A "${RUN_DIR}" 2>/dev/null)" ]]; then
    log "cleaning up stale state in ${RUN_DIR}"
    stop_all
    rm -rf "${RUN_DIR}"
    mkdir -p "${RUN_DIR}"
  fi
  local t0="${EPOCHREALTIME/,/.}"
  gen_pki
  if ! start_plane; then
    stop_all
    log "control plane failed to start; logs kept in ${RUN_DIR}"
    exit 1
  fi
  [[ -n "${KUBETUNE_CP_WATCH_PID:-}" ]] && start_watchdog "${KUBETUNE_CP_WATCH_PID}" "${HACK_DIR}/controlplane.sh"
  log "ready in $(awk -v a="${t0}" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%.1f", b - a }')s: kube-apiserver https://127.0.0.1:$(api_port) (run dir ${RUN_DIR})"
  export_line
}

# The garbage collector notices CRDs created after it started only on its 30 s
# discovery resync; restarting it right after applying CRDs makes it track them
# at once (and this waits for its monitors to sync).
cmd_restart_kcm() {
  resolve_run_dir
  [[ -f "${RUN_DIR}/kube-controller-manager.enabled" ]] || die "no kube-controller-manager in ${RUN_DIR}"
  exec 9> "${RUN_DIR}.lock"
  flock 9
  readyz_ok || die "no running control plane in ${RUN_DIR}"
  stop_procs kube-controller-manager
  start_kcm "$(api_port)" || die "kube-controller-manager failed to restart"
  log "kube-controller-manager restarted"
}

cmd_down() {
  resolve_run_dir
  if [[ ! -d "${RUN_DIR}" ]]; then
    log "no control plane in ${RUN_DIR}"
    rm -f "${RUN_DIR}.lock"
    return 0
  fi
  exec 9> "${RUN_DIR}.lock"
  flock 9
  stop_all
  rm -rf "${RUN_DIR}"
  rm -f "${RUN_DIR}.lock"
  log "stopped and removed ${RUN_DIR}"
}

cmd_env() {
  resolve_run_dir
  if [[ -f "${KUBECONFIG_PATH}" ]] && pid_of kube-apiserver >/dev/null; then
    export_line
  else
    echo "controlplane: no running control plane in ${RUN_DIR}" >&2
    exit 1
  fi
}

cmd_status() {
  resolve_run_dir
  local name pid
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if pid="$(pid_of "${name}")"; then echo "${name}: running (pid ${pid})"; else echo "${name}: not running"; fi
  done
  [[ -f "${RUN_DIR}/ports.env" ]] && cat "${RUN_DIR}/ports.env"
  if readyz_ok; then echo "readyz: ok"; else echo "readyz: not ok"; return 1; fi
}

main() {
  local cmd="${1:-}"
  case "${cmd}" in
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    restart-kcm) cmd_restart_kcm ;;
    _watchdog) resolve_run_dir; cmd_watchdog "${2:?}" ;;
    *) echo "usage: $0 build|up|down|env|status|restart-kcm" >&2; exit 2 ;;
  esac
}
main "$@"
