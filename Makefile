# kubetune developer targets. Every target that needs Python creates the venv first,
# so `make test` alone works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint crds dashboard controlplane prometheus serving controlplane-up controlplane-down dev-up dev-down demo clean

setup: $(STAMP)

# Reinstall when the project's requirements change; otherwise a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[operator,trainer,cli,dev]'
	touch $(STAMP)

test: $(STAMP) controlplane prometheus serving
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator trainer-image cli
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/python -m kubetune_operator.api.crds crds charts/kubetune/files/crds

# The chart's Grafana dashboard, generated from typed code (hack/grafana_dashboard.py).
dashboard: $(STAMP)
	$(BIN)/python hack/grafana_dashboard.py charts/kubetune/files/grafana-dashboard.json

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, Kueue and the small Go
# programs the tests run (gopher-lua for Argo CD health checks, kstatus), built from Go
# modules once (minutes; each step says what it builds), then reused.
controlplane:
	hack/controlplane.sh build
	hack/kueue.sh build
	hack/gotools.sh build argocd-health
	hack/gotools.sh build kstatus

# Prometheus and promtool for the monitoring tests, built from Go modules once (about
# 5 minutes cold), then reused; `make demo` does not need them.
prometheus:
	hack/prometheus.sh build

# vLLM's CPU build in .venv-serving, which the local kubelet runs model servers with
# (minutes and about 6 GB once, then reused).
serving:
	hack/serving-venv.sh >/dev/null

controlplane-up: controlplane
	hack/controlplane.sh up

controlplane-down:
	hack/controlplane.sh down

# The whole stack in the background: control plane, CRDs, local kubelet, operator.
dev-up: $(STAMP) controlplane serving
	hack/dev.sh up

dev-down:
	hack/dev.sh down

# A tiny VLM tuned end to end on a synthetic image dataset, on this machine's CPU.
demo: $(STAMP) controlplane serving
	$(BIN)/python hack/demo.py

clean:
	rm -rf $(VENV) .venv-serving .pytest_cache .mypy_cache .ruff_cache
