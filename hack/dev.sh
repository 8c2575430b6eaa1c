#!/usr/bin/env bash
# A local kubetune stack for trying things out (`make dev-up` / `make dev-down`):
# the test control plane (Kubernetes' own controllers and scheduler), kubetune's CRDs,
# the local kubelet (runs the pods as local processes) and the operator, all in the
# background. `up` prints `export KUBECONFIG=...` last; `up --kueue` also starts Kueue
# (hack/kueue.sh), so that FineTuneJobs and Datasets with a queueName are queued.
# `up` also gives namespace `default` what the files in examples/ name
# (hack/example_storage.py: the claims `models` and `datasets`, holding a tiny base
# model and the datasets), so each of them can be applied as it stands.
#
# State lives in .cache/dev/: the kubelet's volumes (a PVC named X in namespace N is the
# folder .cache/dev/state/pvc/N/X), pod logs (.cache/dev/state/logs) and the
# operator's and kubelet's own logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="${ROOT}/.cache/dev"
PY="${ROOT}/.venv/bin/python"
export KUBETUNE_CP_DIR="${KUBETUNE_CP_DIR:-${DEV}/controlplane}"

stop_pid() {
  local file="$1"
  [[ -f "${file}" ]] || return 0
  local pid
  pid="$(cat "${file}")"
  if kill -0 "${pid}" 2>/dev/null; then
    kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "${pid}" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-${pid}" 2>/dev/null || true
  fi
  rm -f "${file}"
}

start_bg() {  # name, command...
  local name="$1"; shift
  if [[ -f "${DEV}/${name}.pid" ]] && kill -0 "$(cat "${DEV}/${name}.pid")" 2>/dev/null; then
    return 0
  fi
  setsid "$@" >"${DEV}/${name}.log" 2>&1 < /dev/null &
  echo $! >"${DEV}/${name}.pid"
}

up() {
  local with_kueue=""
  [[ "${1:-}" == "--kueue" ]] && with_kueue=1
  mkdir -p "${DEV}/state"
  "${ROOT}/hack/controlplane.sh" up >"${DEV}/controlplane.out"
  local export_line
  export_line="$(tail -n 1 "${DEV}/controlplane.out")"
  export KUBECONFIG="${export_line#export KUBECONFIG=}"
  kubectl apply --server-side --force-conflicts -f "${ROOT}/crds" >/dev/null
  kubectl wait --for=condition=Established --timeout=60s -f "${ROOT}/crds" >/dev/null
  if [[ -n "${with_kueue}" ]]; then
    KUBETUNE_KUEUE_DIR="${DEV}/kueue" "${ROOT}/hack/kueue.sh" up >/dev/null
  fi
  # The garbage collector then tracks the CRDs applied since the plane started.
  "${ROOT}/hack/controlplane.sh" restart-kcm >/dev/null
  start_bg kubelet "${PY}" "${ROOT}/hack/local_kubelet.py" --kubeconfig "${KUBECONFIG}" \
    --state-dir "${DEV}/state" --gpus "${KUBETUNE_DEV_GPUS:-2}"
  echo "giving namespace default the tiny base model and datasets examples/ names ..." >&2
  "${PY}" "${ROOT}/hack/example_storage.py" default >/dev/null
  # Free ports, so that nothing else listening (another stack) can answer for ours.
  local metrics health
  read -r metrics health < <("${PY}" -c 'import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')
  # The key the vLLM servers' admin tokens derive from: kept, so that servers started
  # before an operator restart still answer it.
  [[ -s "${DEV}/admin-key" ]] || "${PY}" -c 'import secrets; print(secrets.token_hex(32))' >"${DEV}/admin-key"
  # An operator left running by an earlier `up` is replaced: it may run older code, and
  # it answers on ports other than the ones just chosen (a second `make demo` failed so).
  stop_pid "${DEV}/operator.pid"
  # The dev stack is its own platform: runs that name no output go to the `models`
  # claim of their namespace (examples/finetunejob-minimal.yaml).
  start_bg operator env KUBETUNE_RESYNC_SECONDS="${KUBETUNE_RESYNC_SECONDS:-3}" \
    KUBETUNE_ADMIN_KEY="$(cat "${DEV}/admin-key")" \
    KUBETUNE_DEFAULT_MODEL_STORE="${KUBETUNE_DEFAULT_MODEL_STORE:-pvc://models/tuned}" \
    "${PY}" -m kubetune_operator --all-namespaces --standalone \
    --metrics-port "${metrics}" --liveness "http://127.0.0.1:${health}/healthz"
  echo "${metrics}" >"${DEV}/operator.metrics-port"
  local live=""
  for _ in $(seq 1 100); do
    kill -0 "$(cat "${DEV}/operator.pid")" 2>/dev/null || { tail -n 30 "${DEV}/operator.log" >&2; exit 1; }
    if curl -fsS "http://127.0.0.1:${health}/healthz" >/dev/null 2>&1; then live=1; break; fi
    sleep 0.3
  done
  [[ -n "${live}" ]] || { echo "the operator did not become live; see ${DEV}/operator.log" >&2; exit 1; }
  echo "operator log: ${DEV}/operator.log (metrics on :${metrics}); kubelet log: ${DEV}/kubelet.log; volumes: ${DEV}/state/pvc" >&2
  echo "export KUBECONFIG=${KUBECONFIG}"
}

down() {
  stop_pid "${DEV}/operator.pid"
  stop_pid "${DEV}/kubelet.pid"
  if [[ -d "${DEV}/kueue" ]]; then
    KUBETUNE_KUEUE_DIR="${DEV}/kueue" "${ROOT}/hack/kueue.sh" down >/dev/null 2>&1 || true
  fi
  "${ROOT}/hack/controlplane.sh" down >/dev/null 2>&1 || true
}

# claim NAMESPACE NAME: a PersistentVolumeClaim NAME (bound to a volume of the folder
# .cache/dev/state/pvc/NAMESPACE/NAME) for pods to mount.
claim() {
  local ns="${1:?usage: $0 claim NAMESPACE NAME}" name="${2:?usage: $0 claim NAMESPACE NAME}"
  export KUBECONFIG="${KUBECONFIG:-${KUBETUNE_CP_DIR}/kubeconfig}"
  mkdir -p "${DEV}/state/pvc/${ns}/${name}"
  PYTHONPATH="${ROOT}/hack" "${PY}" -c 'import json, sys
from pathlib import Path
from local_kubelet import volume_claim
ns, name, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": volume_claim(ns, name, folder)}))' \
    "${ns}" "${name}" "${DEV}/state/pvc/${ns}/${name}" | kubectl apply -f -
}

# endpoint NAME [-n NAMESPACE]: the OpenAI base URL of ModelDeployment NAME's server,
# reachable from this machine (a ready server pod's own address: no cluster network).
endpoint() {
  local name="${1:?usage: $0 endpoint NAME [-n NAMESPACE]}" ns="default"
  shift
  [[ "${1:-}" == "-n" ]] && ns="${2:?usage: $0 endpoint NAME [-n NAMESPACE]}"
  export KUBECONFIG="${KUBECONFIG:-${KUBETUNE_CP_DIR}/kubeconfig}"
  local ip
  ip="$(kubectl get pods -n "${ns}" -l "kubetune.io/modeldeployment=${name}" -o json | "${PY}" -c 'import json, sys
pods = json.load(sys.stdin)["items"]
ready = [p["status"]["podIP"] for p in pods
         if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
print(ready[0] if ready else "")')"
  [[ -n "${ip}" ]] || { echo "no ready server pod of ModelDeployment ${ns}/${name}" >&2; exit 1; }
  echo "http://${ip}:8000/v1"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  claim) shift; claim "$@" ;;
  endpoint) shift; endpoint "$@" ;;
  *) echo "usage: $0 up [--kueue]|down|claim NAMESPACE NAME|endpoint NAME [-n NAMESPACE]" >&2; exit 2 ;;
esac
