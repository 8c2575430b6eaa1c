#!/usr/bin/env bash
# Real Kueue controller manager (sigs.k8s.io/kueue, pinned in versions.env) on
# loopback, next to a plane started by hack/controlplane.sh.
#
#   hack/kueue.sh build   build (or reuse) the kueue binary, print its path
#   hack/kueue.sh up      install CRDs + webhooks and start the manager against
#                         $KUBECONFIG; last stdout line: export KUBETUNE_KUEUE_DIR=...
#   hack/kueue.sh env     print that export line for a running manager (exit 1 if none)
#   hack/kueue.sh down    stop the manager, remove its webhook configurations
#                         (and the CRDs' conversion webhooks) and the run dir
#   hack/kueue.sh gomod   regenerate hack/kueue/{go.mod,go.sum,main.go} for KUEUE_VERSION
#
# KUBETUNE_KUEUE_DIR: run dir (default: <repo>/.cache/controlplane/kueue-run).
# KUBETUNE_KUEUE_WATCH_PID: if set, `up` starts a watchdog running `down` when that
#   process exits.
# KUBETUNE_KUEUE_READY_TIMEOUT: seconds to wait for health and webhooks (default 90).
# KUBECONFIG (up): the plane's kubeconfig file; down/env use the one recorded by up.
# Exit codes: 0 ok, 1 failure, 3 go missing and no cached binary,
#   4 /etc/kueue/metrics/certs not writable (see ensure_metrics_cert).
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
source "${HACK_DIR}/versions.env"

MODULE=sigs.k8s.io/kueue
CACHE_DIR="${REPO_ROOT}/.cache/controlplane"
BIN_DIR="${CACHE_DIR}/kueue-${KUEUE_VERSION}/bin"
BIN="${BIN_DIR}/kueue"
READY_TIMEOUT="${KUBETUNE_KUEUE_READY_TIMEOUT:-90}"
# Kueue's own namespace: it keeps a few objects there (and its webhooks skip it).
KUEUE_NAMESPACE=kueue-system

log() { echo "kueue: $*" >&2; }
die() { echo "kueue: error: $*" >&2; exit 1; }

# shellcheck source-path=SCRIPTDIR source=go-build.sh
source "${HACK_DIR}/go-build.sh"

# Hash of everything that determines the binary; stored next to it.
inputs_hash() {
  (cd "${HACK_DIR}" && echo "${KUEUE_VERSION}" && cat kueue/go.mod kueue/go.sum kueue/main.go) \
    | sha256sum | cut -c1-16
}

binary_present() {
  [[ -x "${BIN}" && -f "${BIN_DIR}/.inputs" && "$(cat "${BIN_DIR}/.inputs")" == "$(inputs_hash)" ]]
}

# module_dir: the pinned Kueue module in the Go module cache (downloaded on demand;
# `up` reads its CRDs and webhook manifests from there).
module_dir() {
  local dir
  if ! dir="$(cd "${HACK_DIR}/kueue" && go_env && go list -m -f '{{.Dir}}' "${MODULE}" 2>/dev/null)" || [[ ! -d "${dir}" ]]; then
    (cd "${HACK_DIR}/kueue" && go_env && go mod download "${MODULE}") >&2 \
      || die "cannot download ${MODULE}@${KUEUE_VERSION}"
    dir="$(cd "${HACK_DIR}/kueue" && go_env && go list -m -f '{{.Dir}}' "${MODULE}")"
  fi
  [[ -d "${dir}/config/components/crd/bases" ]] || die "no config/components/crd/bases in ${dir}"
  echo "${dir}"
}

cmd_build() {
  if binary_present; then echo "${BIN}"; return 0; fi
  if ! command -v go >/dev/null 2>&1; then
    echo "kueue: 'go' is not installed and no cached binary exists in ${BIN_DIR}; install Go >= 1.25 (see hack/README.md)" >&2
    exit 3
  fi
  mkdir -p "${BIN_DIR}"
  exec 8> "${CACHE_DIR}/kueue-build.lock"
  flock 8
  if binary_present; then exec 8>&-; echo "${BIN}"; return 0; fi
  rm -f "${BIN_DIR}/.inputs"
  go_env
  # The same -X flags as Kueue's Makefile (LD_FLAGS); the build date is the
  # release's commit time from the module proxy, so the binary is reproducible.
  local info date ldflags t
  info="$(cd "${HACK_DIR}/kueue" && go mod download -json "${MODULE}" | sed -n 's/.*"Info": "\(.*\)",*/\1/p')"
  date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "${info}" 2>/dev/null || true)"
  ldflags="-s -w -X ${MODULE}/pkg/version.GitVersion=${KUEUE_VERSION} -X ${MODULE}/pkg/version.BuildDate=${date:-unknown}"
  log "building kueue ${KUEUE_VERSION} (one binary; a few minutes when the Go build cache is cold) ..."
  t=$(date +%s)
  (cd "${HACK_DIR}/kueue" && go build -ldflags="${ldflags}" -o "${BIN}.tmp" . 2>&1) | count_downloads kueue 100
  mv "${BIN}.tmp" "${BIN}"
  inputs_hash > "${BIN_DIR}/.inputs"
  exec 8>&-
  log "kueue built in $(( $(date +%s) - t ))s"
  echo "${BIN}"
}

# Regenerate the module after a KUEUE_VERSION bump: main.go is upstream's
# cmd/kueue/main.go (license header kept), go.mod requires only Kueue, and tidy
# resolves exactly Kueue's own requirements (it has no replace directives).
cmd_gomod() {
  command -v go >/dev/null 2>&1 || { echo "kueue: 'go' not found in PATH" >&2; exit 3; }
  export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS=-mod=mod
  local dir gover
  dir="$(cd "${HACK_DIR}/kueue" && go mod download -json "${MODULE}@${KUEUE_VERSION}" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
  [[ -f "${dir}/cmd/kueue/main.go" ]] || die "no cmd/kueue/main.go in ${MODULE}@${KUEUE_VERSION}"
  gover="$(awk '$1 == "go" { print $2; exit }' "${dir}/go.mod")"
  if grep -q '^replace' "${dir}/go.mod"; then
    die "${MODULE}@${KUEUE_VERSION} has replace directives; mirror them in hack/kueue/go.mod"
  fi
  install -m 0644 "${dir}/cmd/kueue/main.go" "${HACK_DIR}/kueue/main.go"
  {
    echo "// Code generated by hack/kueue.sh gomod from ${MODULE}@${KUEUE_VERSION}; DO NOT EDIT."
    echo "// main.go is that module's cmd/kueue/main.go, unmodified."
    echo
    echo "module kubetune.local/hack/kueue"
    echo
    echo "go ${gover}"
    echo
    echo "require ${MODULE} ${KUEUE_VERSION}"
  } > "${HACK_DIR}/kueue/go.mod"
  rm -f "${HACK_DIR}/kueue/go.sum"
  (cd "${HACK_DIR}/kueue" && go mod tidy)
  (cd "${HACK_DIR}/kueue" && go list -m "${MODULE}") | grep -qx "${MODULE} ${KUEUE_VERSION}" \
    || die "${MODULE} was not resolved to ${KUEUE_VERSION}"
  log "hack/kueue now builds ${MODULE}@${KUEUE_VERSION} (go ${gover})"
}

# ---------------------------------------------------------------- run dir ---
resolve_run_dir() {
  local d="${KUBETUNE_KUEUE_DIR:-${CACHE_DIR}/kueue-run}"
  mkdir -p "$(dirname "${d}")"
  RUN_DIR="$(cd "$(dirname "${d}")" && pwd)/$(basename "${d}")"
}

export_line() { echo "export KUBETUNE_KUEUE_DIR=${RUN_DIR}"; }

# kc ARGS...: kubectl against the plane Kueue serves (KCFG).
kc() { kubectl --kubeconfig="${KCFG}" --request-timeout=20s "$@"; }

# pid_of: the manager's pid if it is alive and belongs to RUN_DIR.
pid_of() {
  local f="${RUN_DIR}/kueue.pid" pid
  [[ -f "${f}" ]] || return 1
  pid="$(cat "${f}")"
  [[ "${pid}" =~ ^[0-9]+$ && -r "/proc/${pid}/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/${pid}/cmdline" | grep -qF -- "${RUN_DIR}/" || return 1
  echo "${pid}"
}

# alive: liveness of the manager this run just started (no cmdline check: right
# after the fork the child still shows this script's cmdline).
alive() {
  local pid
  pid="$(cat "${RUN_DIR}/kueue.pid" 2>/dev/null)" || return 1
  [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null \
    && [[ "$(awk '{print $3}' "/proc/${pid}/stat" 2>/dev/null)" != "Z" ]]
}

port_of() { sed -n "s/^$1=//p" "${RUN_DIR}/ports.env" 2>/dev/null; }

# readyz_ok: Kueue's readiness probe, which passes once its webhook server listens.
readyz_ok() {
  local port; port="$(port_of HEALTH_PORT)"
  [[ -n "${port}" ]] || return 1
  [[ "$(curl -sS --max-time 2 "http://127.0.0.1:${port}/readyz" 2>/dev/null)" == "ok" ]]
}

is_running() {
  [[ -f "${RUN_DIR}/kubeconfig.path" && "$(cat "${RUN_DIR}/kubeconfig.path")" == "${KCFG}" ]] \
    && pid_of >/dev/null && readyz_ok
}

free_ports() { # free_ports N -> N distinct free loopback TCP ports, one per line
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
PY
}

tail_log() {
  if [[ -f "${RUN_DIR}/kueue.log" ]]; then
    echo "---- last lines of ${RUN_DIR}/kueue.log ----" >&2
    tail -n 30 "${RUN_DIR}/kueue.log" >&2
    echo "----" >&2
  fi
}

# ------------------------------------------------------------------ certs ---
# Serving certificate of the webhook server (controller-runtime reads
# <certDir>/tls.crt and tls.key), signed by a CA of this run; the API server
# gets that CA as caBundle of every webhook.
gen_certs() {
  local d="${RUN_DIR}/certs"
  mkdir -p "${d}"
  chmod 700 "${d}"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "${d}/ca.key" -out "${d}/ca.crt" -days 3650 \
    -subj "/CN=kubetune-kueue-webhook-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new "${ec[@]}" -keyout "${d}/tls.key" -out "${d}/tls.csr" -subj "/CN=kueue-webhook" 2>/dev/null
  printf '%b' "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n" > "${d}/tls.ext"
  openssl x509 -req -in "${d}/tls.csr" -CA "${d}/ca.crt" -CAkey "${d}/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "${d}/tls.ext" -out "${d}/tls.crt" 2>/dev/null
  rm -f "${d}/tls.csr" "${d}/tls.ext" "${d}/ca.key"
  chmod 600 "${d}/tls.key"
  [[ -s "${d}/ca.crt" && -s "${d}/tls.crt" && -s "${d}/tls.key" ]] || { log "openssl failed to create ${d}/tls.crt"; return 1; }
}

# Kueue v0.17.0 with internalCertManagement off loads the metrics server's
# certificate from a FIXED path (cmd/kueue/main.go: metricsCertPath :=
# "/etc/kueue/metrics/certs"; apis/config/v1beta2 InternalCertManagement docs)
# and exits if tls.crt/tls.key are not there. There is no flag or config field
# for it, so `up` provides a self-signed pair there (shared by all runs; nothing
# scrapes the metrics port) when that directory is writable, and otherwise stops
# with exit 4 and the commands to run once.
METRICS_CERT_DIR=/etc/kueue/metrics/certs
ensure_metrics_cert() {
  local d="${METRICS_CERT_DIR}"
  if [[ -r "${d}/tls.key" ]] && openssl x509 -noout -in "${d}/tls.crt" 2>/dev/null; then
    return 0
  fi
  if ! mkdir -p "${d}" 2>/dev/null || [[ ! -w "${d}" ]]; then
    echo "kueue: Kueue ${KUEUE_VERSION} needs a metrics certificate in ${d} (a path fixed in its cmd/kueue/main.go" \
      "when internalCertManagement is off), and that directory is not writable. Run once:" \
      "sudo mkdir -p ${d} && sudo chown $(id -u):$(id -g) ${d}   (then hack/kueue.sh up creates the pair)" >&2
    exit 4
  fi
  exec 7> "${CACHE_DIR}/kueue-metrics-cert.lock"
  flock 7
  if ! { [[ -r "${d}/tls.key" ]] && openssl x509 -noout -in "${d}/tls.crt" 2>/dev/null; }; then
    log "writing a self-signed metrics certificate to ${d} (Kueue reads it from this fixed path)"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "${d}/tls.key.tmp" -out "${d}/tls.crt.tmp" -days 3650 -subj "/CN=kueue-metrics" \
      -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" 2>/dev/null
    chmod 600 "${d}/tls.key.tmp"
    mv "${d}/tls.key.tmp" "${d}/tls.key"
    mv "${d}/tls.crt.tmp" "${d}/tls.crt"
  fi
  exec 7>&-
}

# --------------------------------------------------------------- manifests ---
# Kueue's own install manifests, rendered from the pinned module exactly as its
# release YAML is (kubectl kustomize config/default), as a stream of JSON
# objects. Cached per version: the module content is fixed by go.sum.
upstream_manifests() {
  local out="${CACHE_DIR}/kueue-${KUEUE_VERSION}/config-default.json" dir
  if [[ ! -s "${out}" ]]; then
    if command -v go >/dev/null 2>&1; then
      dir="$(module_dir)"
    else
      dir="$(go env GOMODCACHE 2>/dev/null || echo "${HOME}/go/pkg/mod")/${MODULE}@${KUEUE_VERSION}"
      [[ -d "${dir}/config" ]] || die "${MODULE}@${KUEUE_VERSION} is not in the Go module cache and 'go' is missing"
    fi
    mkdir -p "$(dirname "${out}")"
    kubectl kustomize "${dir}/config/default" > "${RUN_DIR}/config-default.yaml" \
      || die "kubectl kustomize ${dir}/config/default failed"
    # YAML -> JSON without a YAML library: kubectl converts (it needs the API
    # server only for discovery; nothing is created).
    kc create --dry-run=client -o json -f "${RUN_DIR}/config-default.yaml" > "${out}.tmp.$$" \
      || die "cannot convert Kueue's manifests to JSON"
    mv "${out}.tmp.$$" "${out}"
    rm -f "${RUN_DIR}/config-default.yaml"
  fi
  echo "${out}"
}

# render_manifests JSON WEBHOOK_PORT: writes into RUN_DIR
#   base.json      the kueue-system Namespace and the CRDs, whose conversion
#                  webhooks (service kueue-webhook-service, path /convert) now
#                  point at https://127.0.0.1:PORT/convert with our CA
#   webhooks.json  the Mutating/ValidatingWebhookConfigurations, every
#                  clientConfig.service rewritten the same way (path kept)
#   conversion-crds.txt  CRDs with a conversion webhook (for `down`)
render_manifests() {
  python3 - "$1" "https://127.0.0.1:$2" "${RUN_DIR}/certs/ca.crt" "${RUN_DIR}" <<'PY'
import base64, json, sys
src, base_url, ca_file, run_dir = sys.argv[1:5]
ca = base64.b64encode(open(ca_file, "rb").read()).decode()
text, dec, i, objs = open(src).read(), json.JSONDecoder(), 0, []
while True:
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        break
    obj, i = dec.raw_decode(text, i)
    objs.extend(obj["items"] if obj.get("kind") == "List" else [obj])

def to_url(cc):
    svc = cc.pop("service")
    cc["url"] = base_url + svc.get("path", "/")
    cc["caBundle"] = ca

base, hooks, conv = [], [], []
for o in objs:
    kind = o["kind"]
    if kind == "Namespace":
        base.append(o)
    elif kind == "CustomResourceDefinition":
        wh = o["spec"].get("conversion", {}).get("webhook")
        if wh and "service" in wh.get("clientConfig", {}):
            to_url(wh["clientConfig"])
            conv.append(o["metadata"]["name"])
        base.append(o)
    elif kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for w in o["webhooks"]:
            to_url(w["clientConfig"])
        hooks.append(o)
names = {o["kind"] for o in hooks}
if len([o for o in base if o["kind"] == "CustomResourceDefinition"]) < 5 or len(names) != 2:
    sys.exit(f"unexpected Kueue manifests in {src}: {sorted({o['kind'] for o in objs})}")
for name, items in (("base.json", base), ("webhooks.json", hooks)):
    with open(f"{run_dir}/{name}", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
with open(f"{run_dir}/crds.txt", "w") as f:
    f.write("".join(f"crd/{o['metadata']['name']}\n" for o in base if o["kind"] == "CustomResourceDefinition"))
with open(f"{run_dir}/conversion-crds.txt", "w") as f:
    f.write("".join(n + "\n" for n in conv))
with open(f"{run_dir}/webhook-configs.txt", "w") as f:
    f.write("".join(f"{o['kind'].lower()}/{o['metadata']['name']}\n" for o in hooks))
PY
}

write_config() { # write_config WEBHOOK_PORT HEALTH_PORT METRICS_PORT
  # Configuration API config.kueue.x-k8s.io/v1beta2 (apis/config/v1beta2 in the
  # module); defaults not set here are Kueue's own. KUBETUNE_KUEUE_MANAGE_ALL=true
  # manages Jobs without a queue-name label too, in the namespaces labelled
  # KUBETUNE_KUEUE_NAMESPACE_LABEL=key=value when that is set (what a platform that
  # queues every batch workload configures).
  local managed_namespaces=""
  if [[ -n "${KUBETUNE_KUEUE_NAMESPACE_LABEL:-}" ]]; then
    managed_namespaces="managedJobsNamespaceSelector: {matchLabels: {${KUBETUNE_KUEUE_NAMESPACE_LABEL%%=*}: \"${KUBETUNE_KUEUE_NAMESPACE_LABEL#*=}\"}}"
  fi
  cat > "${RUN_DIR}/config.yaml" <<CFG
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: ${KUEUE_NAMESPACE}
manageJobsWithoutQueueName: ${KUBETUNE_KUEUE_MANAGE_ALL:-false}
${managed_namespaces}
health:
  healthProbeBindAddress: 127.0.0.1:$2
metrics:
  bindAddress: 127.0.0.1:$3
webhook:
  host: 127.0.0.1
  port: $1
  certDir: ${RUN_DIR}/certs
leaderElection:
  leaderElect: false
# The serving certificate is ours (gen_certs) and the webhooks are registered
# by url; Kueue's cert rotator would issue one for kueue-webhook-service.<ns>.svc.
internalCertManagement:
  enable: false
clientConnection:
  qps: 50
  burst: 100
integrations:
  frameworks:
  - batch/job
featureGates:
  # The visibility API server is an aggregated API (APIService -> Service);
  # a loopback process cannot back a Service here, and with
  # internalCertManagement off it would read its certificate from /visibility.
  VisibilityOnDemand: false
CFG
}

# probe_webhooks: true once the API server calls Kueue's webhooks: the Job
# mutating webhook suspends a queued Job, the Job validating webhook rejects a
# bad max-exec-time label, and a v1beta1 ClusterQueue goes through the
# conversion webhook (all server-side dry runs; nothing is stored).
probe_webhooks() {
  local out
  out="$(kc create --dry-run=server -o jsonpath='{.spec.suspend}' -f - 2>&1 <<'JOB'
{"apiVersion": "batch/v1", "kind": "Job",
 "metadata": {"generateName": "kueue-probe-", "namespace": "default",
              "labels": {"kueue.x-k8s.io/queue-name": "kueue-probe"}},
 "spec": {"suspend": false, "template": {"spec": {"restartPolicy": "Never",
   "containers": [{"name": "c", "image": "busybox"}]}}}}
JOB
)" || { PROBE_ERR="mutating: ${out}"; return 1; }
  [[ "${out}" == "true" ]] || { PROBE_ERR="mutating: a queued Job was not suspended (spec.suspend=${out})"; return 1; }
  if out="$(kc create --dry-run=server -o name -f - 2>&1 <<'JOB'
{"apiVersion": "batch/v1", "kind": "Job",
 "metadata": {"generateName": "kueue-probe-", "namespace": "default",
              "labels": {"kueue.x-k8s.io/queue-name": "kueue-probe",
                         "kueue.x-k8s.io/max-exec-time-seconds": "0"}},
 "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
   "containers": [{"name": "c", "image": "busybox"}]}}}}
JOB
)"; then
    PROBE_ERR="validating: a Job with max-exec-time-seconds=0 was accepted"; return 1
  fi
  [[ "${out}" == *vjob.kb.io* ]] || { PROBE_ERR="validating: ${out}"; return 1; }
  out="$(kc create --dry-run=server -o name -f - 2>&1 <<'CQ'
{"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ClusterQueue",
 "metadata": {"name": "kueue-probe"}, "spec": {"namespaceSelector": {}}}
CQ
)" || { PROBE_ERR="conversion: ${out}"; return 1; }
}

# remove_webhooks: delete our webhook configurations (only if they still point
# at this run's port) and turn the CRDs' conversion webhooks off, so that a
# plane without Kueue never calls a dead endpoint.
remove_webhooks() {
  local port prefix listing configured=() ours=() crds=() ref url crd pid pids=()
  port="$(port_of WEBHOOK_PORT)"
  [[ -n "${port}" && -f "${RUN_DIR}/kubeconfig.path" ]] || return 0
  KCFG="$(cat "${RUN_DIR}/kubeconfig.path")"
  [[ -f "${KCFG}" ]] || return 0
  prefix="https://127.0.0.1:${port}/"
  mapfile -t configured < "${RUN_DIR}/webhook-configs.txt"
  (( ${#configured[@]} )) || return 0
  if ! listing="$(kc --request-timeout=5s get "${configured[@]}" --ignore-not-found \
      -o jsonpath='{range .items[*]}{.kind}/{.metadata.name} {.webhooks[0].clientConfig.url}{"\n"}{end}' 2>/dev/null)"; then
    log "API server not reachable; webhook configurations left alone"
    return 0
  fi
  while read -r ref url; do
    [[ "${url}" == "${prefix}"* ]] && ours+=("${ref}")
  done <<< "${listing}"
  if (( ${#ours[@]} )); then
    kc delete "${ours[@]}" --ignore-not-found >/dev/null || log "could not delete ${ours[*]}"
  fi
  mapfile -t crds < "${RUN_DIR}/conversion-crds.txt"
  (( ${#crds[@]} )) || return 0
  while read -r crd url; do
    [[ "${url}" == "${prefix}"* ]] || continue
    kc patch crd "${crd}" --type=merge -p '{"spec":{"conversion":{"strategy":"None","webhook":null}}}' >/dev/null &
    pids+=($!)
  done < <(kc get crd "${crds[@]}" --ignore-not-found \
    -o jsonpath='{range .items[*]}{.metadata.name} {.spec.conversion.webhook.clientConfig.url}{"\n"}{end}' 2>/dev/null)
  for pid in "${pids[@]}"; do
    wait "${pid}" || log "could not turn off a CRD conversion webhook"
  done
}

stop_manager() {
  local pid i
  if pid="$(pid_of)"; then
    kill -TERM "${pid}" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
      [[ -d "/proc/${pid}" && "$(awk '{print $3}' "/proc/${pid}/stat" 2>/dev/null)" != "Z" ]] || break
      sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  if pid="$(cat "${RUN_DIR}/watchdog.pid" 2>/dev/null)" && [[ "${pid}" =~ ^[0-9]+$ && "${pid}" != "${WATCHDOG_SELF:-}" ]]; then
    if tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -qF "kueue.sh"; then
      kill -TERM "${pid}" 2>/dev/null || true
    fi
  fi
}

start_manager() {
  local ports webhook_port health_port metrics_port manifests
  mapfile -t ports < <(free_ports 3)
  webhook_port="${ports[0]}"; health_port="${ports[1]}"; metrics_port="${ports[2]}"
  printf 'WEBHOOK_PORT=%s\nHEALTH_PORT=%s\nMETRICS_PORT=%s\n' "${webhook_port}" "${health_port}" "${metrics_port}" \
    > "${RUN_DIR}/ports.env"
  echo "${KCFG}" > "${RUN_DIR}/kubeconfig.path"
  # Called as `if ! start_manager`, so errexit is off in here: check every step.
  gen_certs || return 1
  write_config "${webhook_port}" "${health_port}" "${metrics_port}" || return 1
  manifests="$(upstream_manifests)" || return 1
  render_manifests "${manifests}" "${webhook_port}" || { log "cannot render Kueue's manifests"; return 1; }

  # CRDs first (their conversion webhooks are only called once objects of a
  # second version are read, i.e. after the manager is up).
  kc apply --server-side --force-conflicts --field-manager=kubetune-kueue --validate=false -f "${RUN_DIR}/base.json" >/dev/null \
    || { log "installing Kueue's CRDs failed"; return 1; }
  local crds
  mapfile -t crds < "${RUN_DIR}/crds.txt"
  kubectl --kubeconfig="${KCFG}" wait --for=condition=Established --timeout=30s "${crds[@]}" >/dev/null \
    || { log "Kueue's CRDs were not established"; return 1; }

  # RBAC: the manager uses the plane's admin kubeconfig (O=system:masters), so
  # Kueue's ClusterRoles are not installed or exercised here. Fine for tests;
  # a real install binds kueue-manager-role to its ServiceAccount.
  # 8>&- 9>&-: do not leak lock fds into the long-running child.
  "${BIN}" --config="${RUN_DIR}/config.yaml" --kubeconfig="${KCFG}" \
    --zap-log-level=2 --zap-encoder=console \
    > "${RUN_DIR}/kueue.log" 2>&1 < /dev/null 7>&- 8>&- 9>&- &
  echo $! > "${RUN_DIR}/kueue.pid"

  local deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until readyz_ok; do
    alive || { log "kueue exited during startup"; tail_log; return 1; }
    (( $(date +%s) < deadline )) || { log "kueue not ready within ${READY_TIMEOUT}s (http://127.0.0.1:${health_port}/readyz)"; tail_log; return 1; }
    sleep 0.3
  done

  kc apply --server-side --force-conflicts --field-manager=kubetune-kueue --validate=false -f "${RUN_DIR}/webhooks.json" >/dev/null \
    || { log "registering Kueue's webhooks failed"; return 1; }
  # The API server picks webhook configurations up asynchronously; probe until
  # its calls reach Kueue.
  PROBE_ERR=""
  until probe_webhooks; do
    alive || { log "kueue exited while its webhooks were being registered"; tail_log; return 1; }
    (( $(date +%s) < deadline )) || { log "Kueue's webhooks do not answer as expected within ${READY_TIMEOUT}s: ${PROBE_ERR}"; tail_log; return 1; }
    sleep 0.3
  done
}

start_watchdog() { # run `down` when process $1 exits
  local watch="$1"
  [[ "${watch}" =~ ^[0-9]+$ ]] || die "KUBETUNE_KUEUE_WATCH_PID must be a pid, got '${watch}'"
  KUBETUNE_KUEUE_DIR="${RUN_DIR}" nohup "${HACK_DIR}/kueue.sh" _watchdog "${watch}" > /dev/null 2>&1 < /dev/null 7>&- 8>&- 9>&- &
  echo $! > "${RUN_DIR}/watchdog.pid"
}

cmd_watchdog() {
  local watch="$1"
  WATCHDOG_SELF="$$"
  while kill -0 "${watch}" 2>/dev/null; do sleep 2; done
  [[ -d "${RUN_DIR}" ]] || return 0
  exec 9> "${RUN_DIR}.lock"
  flock 9
  remove_webhooks || true
  stop_manager
  rm -rf "${RUN_DIR}"
  rm -f "${RUN_DIR}.lock"
}

# ---------------------------------------------------------------- commands ---
cmd_up() {
  resolve_run_dir
  [[ -n "${KUBECONFIG:-}" && "${KUBECONFIG}" != *:* && -f "${KUBECONFIG}" ]] \
    || die "KUBECONFIG must name the kubeconfig file of a running plane (eval \"\$(hack/controlplane.sh env)\")"
  KCFG="$(cd "$(dirname "${KUBECONFIG}")" && pwd)/$(basename "${KUBECONFIG}")"
  if [[ ! -d "${RUN_DIR}" ]] || ! is_running; then
    cmd_build > /dev/null
    local tool
    for tool in kubectl openssl curl python3; do
      command -v "${tool}" >/dev/null 2>&1 || die "${tool} is required"
    done
    kc get --raw /readyz >/dev/null || die "the API server of ${KCFG} is not ready"
    ensure_metrics_cert
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
    remove_webhooks || true
    stop_manager
    rm -rf "${RUN_DIR}"
    mkdir -p "${RUN_DIR}"
  fi
  KCFG="$(cd "$(dirname "${KUBECONFIG}")" && pwd)/$(basename "${KUBECONFIG}")"
  local t0="${EPOCHREALTIME/,/.}"
  if ! start_manager; then
    remove_webhooks || true
    stop_manager
    log "kueue failed to start; logs kept in ${RUN_DIR}"
    exit 1
  fi
  [[ -n "${KUBETUNE_KUEUE_WATCH_PID:-}" ]] && start_watchdog "${KUBETUNE_KUEUE_WATCH_PID}"
  log "ready in $(awk -v a="${t0}" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%.1f", b - a }')s: kueue ${KUEUE_VERSION}, webhooks https://127.0.0.1:$(port_of WEBHOOK_PORT) (run dir ${RUN_DIR})"
  export_line
}

cmd_down() {
  resolve_run_dir
  if [[ ! -d "${RUN_DIR}" ]]; then
    log "no kueue in ${RUN_DIR}"
    rm -f "${RUN_DIR}.lock"
    return 0
  fi
  exec 9> "${RUN_DIR}.lock"
  flock 9
  # Webhooks first: no API request may meet a stopped endpoint.
  remove_webhooks || true
  stop_manager
  rm -rf "${RUN_DIR}"
  rm -f "${RUN_DIR}.lock"
  log "stopped and removed ${RUN_DIR}"
}

cmd_env() {
  resolve_run_dir
  if pid_of >/dev/null && readyz_ok; then
    export_line
  else
    echo "kueue: no running kueue in ${RUN_DIR}" >&2
    exit 1
  fi
}

main() {
  local cmd="${1:-}"
  case "${cmd}" in
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    gomod) cmd_gomod ;;
    _watchdog) resolve_run_dir; cmd_watchdog "${2:?}" ;;
    *) echo "usage: $0 build|up|down|env|gomod" >&2; exit 2 ;;
  esac
}
main "$@"
