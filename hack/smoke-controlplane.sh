#!/usr/bin/env bash
# End-to-end smoke test of hack/controlplane.sh (run after a version bump):
# starts a plane in a temp dir, checks PodSecurity, CRD CEL validation,
# server-side apply, status subresource, ownerReference GC and namespace
# deletion with kubectl, then stops it and checks no process is left.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v kubectl >/dev/null 2>&1 || { echo "smoke: kubectl is required" >&2; exit 1; }

work="$(mktemp -d)"
export KUBETUNE_CP_DIR="${work}/plane"
cleanup() { "${HACK_DIR}/controlplane.sh" down >/dev/null 2>&1 || true; rm -rf "${work}"; }
trap cleanup EXIT

t0=$(date +%s)
eval "$("${HACK_DIR}/controlplane.sh" up | tail -n 1)"
echo "smoke: up in $(( $(date +%s) - t0 ))s"
k() { kubectl --request-timeout=20s "$@"; }
ok() { echo "smoke: ok - $*"; }
fail() { echo "smoke: FAIL - $*" >&2; exit 1; }
expect_reject() { # expect_reject PATTERN MANIFEST
  local out
  if out="$(k apply -f - 2>&1 <<<"$2")"; then fail "accepted, expected rejection: ${out}"; fi
  grep -q "$1" <<<"${out}" || fail "unexpected error: ${out}"
}
wait_gone() { # wait_gone SECONDS ARGS...
  local deadline=$(( $(date +%s) + $1 )); shift
  while k get "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || return 1
    sleep 0.5
  done
}

k get --raw /readyz >/dev/null && ok "readyz"
k version -o json | grep -q '"gitVersion"' && ok "version"

k create namespace smoke-restricted >/dev/null
k label namespace smoke-restricted pod-security.kubernetes.io/enforce=restricted >/dev/null
expect_reject 'violates PodSecurity "restricted' '
apiVersion: v1
kind: Pod
metadata: {name: priv, namespace: smoke-restricted}
spec:
  containers: [{name: c, image: busybox, securityContext: {privileged: true}}]'
ok "PodSecurity restricted rejects a privileged pod"
k apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: restricted-ok, namespace: smoke-restricted}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: c
    image: busybox
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
YAML
ok "PodSecurity restricted admits a compliant pod (default ServiceAccount present)"

k apply -f - >/dev/null <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.kubetune.io}
spec:
  group: smoke.kubetune.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - {rule: "self.min <= self.max", message: "min must be <= max"}
            properties: {min: {type: integer}, max: {type: integer}}
          status:
            type: object
            properties: {phase: {type: string}}
YAML
k wait --for=condition=Established crd/widgets.smoke.kubetune.io --timeout=30s >/dev/null
expect_reject 'min must be <= max' '
apiVersion: smoke.kubetune.io/v1
kind: Widget
metadata: {name: bad, namespace: default}
spec: {min: 5, max: 1}'
ok "CRD CEL validation rejects a violating object"
k apply --server-side --field-manager=smoke -f - >/dev/null <<'YAML'
apiVersion: smoke.kubetune.io/v1
kind: Widget
metadata: {name: owner, namespace: default}
spec: {min: 1, max: 2}
YAML
ok "server-side apply"
k patch widget owner --subresource=status --type=merge -p '{"status":{"phase":"Running"}}' >/dev/null
[[ "$(k get widget owner -o jsonpath='{.status.phase}')" == "Running" ]] || fail "status subresource"
ok "status subresource"

if [[ -f "${KUBETUNE_CP_DIR}/kube-controller-manager.enabled" ]]; then
  uid="$(k get widget owner -o jsonpath='{.metadata.uid}')"
  k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: child
  namespace: default
  ownerReferences: [{apiVersion: smoke.kubetune.io/v1, kind: Widget, name: owner, uid: "${uid}", controller: true}]
YAML
  # Without this the GC would notice the new CRD only on its 30 s discovery resync.
  "${HACK_DIR}/controlplane.sh" restart-kcm 2>/dev/null
  t0=$(date +%s)
  k delete widget owner >/dev/null
  wait_gone 10 configmap child || fail "ConfigMap owned by a deleted Widget was not garbage-collected"
  ok "garbage collection of a ConfigMap owned by a custom resource ($(( $(date +%s) - t0 ))s)"
  k create configmap in-ns -n smoke-restricted >/dev/null
  k delete namespace smoke-restricted --wait=false >/dev/null
  wait_gone 60 namespace smoke-restricted || fail "namespace deletion did not finish"
  ok "namespace deletion"
fi

pids="$(cat "${KUBETUNE_CP_DIR}"/*.pid)"
"${HACK_DIR}/controlplane.sh" down >/dev/null
sleep 1
for pid in ${pids}; do
  if [[ -d "/proc/${pid}" ]] && [[ "$(awk '{print $3}' "/proc/${pid}/stat")" != "Z" ]]; then fail "pid ${pid} still running after down"; fi
done
ok "down stopped all processes"
echo "smoke: PASS"
