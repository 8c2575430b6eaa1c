"""Scale benchmark: N FineTuneJobs applied at once against the test API server.

Prints, for kubetune's operator and for a floor (a minimal kopf operator that only
creates one Job per FineTuneJob), side by side: seconds until every FineTuneJob has
its Job, the operator's peak RSS, and API requests per job (from the API server's own
apiserver_request_total, less the requests this script makes).

    .venv/bin/python bench/operator.py [--count 500]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import controlplane  # noqa: E402
from hack_scripts import NoGo  # noqa: E402
from kube import Kubectl  # noqa: E402
from kubernetes import client, config  # noqa: E402
from operator_harness import free_port  # noqa: E402

FLOOR = textwrap.dedent(
    '''
    """The floor: a kopf operator that creates one Job per FineTuneJob and nothing else."""
    import kopf
    from kubernetes import client, config

    @kopf.on.startup()
    def startup(settings, **_):
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="floor.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="floor.io")
        config.load_kube_config()

    @kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs")
    def create(name, namespace, body, **_):
        job = {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{name}-train", "labels": {"kubetune.io/finetunejob": name},
                         "ownerReferences": [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                              "name": name, "uid": body["metadata"]["uid"], "controller": True}]},
            "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                     "containers": [{"name": "trainer", "image": "trainer", "command": ["kubetune", "train"]}]}}},
        }
        try:
            client.BatchV1Api().create_namespaced_job(namespace, job)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    '''
)


def request_total(api: client.ApiClient) -> float:
    resp = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False)
    text = (resp[0] if isinstance(resp, tuple) else resp).data.decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{")
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"name": "org/model"},
            "dataset": {"name": "data"},
            "outputModel": {
                "name": name,
                "storage": {"pvc": {"claimName": "models", "path": name}},
            },
            # Suspended, so that nothing runs: the benchmark is about the control loop.
            "suspend": True,
        },
    }


def run_case(
    label: str, command: list[str], kubectl: Kubectl, count: int, workdir: Path
) -> dict[str, float]:
    ns = kubectl.new_namespace(f"bench-{label}")
    kubectl.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "data", "namespace": ns},
            "spec": {"source": {"configMap": {"name": "data", "key": "train.jsonl"}}},
        }
    )
    # The claim the runs write to: the operator looks for it before it makes a Job.
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    kubectl.run(
        "patch",
        "kds",
        "data",
        "-n",
        ns,
        "--type=merge",
        "--subresource=status",
        "-p",
        '{"status": {"phase": "Ready", "observedGeneration": 1, "sha256": "' + "0" * 64 + '"}}',
    )
    api = client.ApiClient()
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    # The operator will not start without the key its servers' admin tokens derive from.
    env = {
        **os.environ,
        "KUBECONFIG": str(kubectl.kubeconfig),
        "KUBETUNE_ADMIN_KEY": "bench-admin-key",
    }
    log = (workdir / f"{label}.log").open("wb")
    proc = subprocess.Popen(
        [*command, "--namespace", ns], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        time.sleep(3)  # let it list and start watching
        before = request_total(api)
        ours = 0
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: custom.create_namespaced_custom_object(
                        "kubetune.io", "v1alpha1", ns, "finetunejobs", ftj(f"job-{i}")
                    ),
                    range(count),
                )
            )
        ours += count
        while True:
            jobs = batch.list_namespaced_job(ns, label_selector="kubetune.io/finetunejob")
            ours += 1
            if len(jobs.items) >= count:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {proc.returncode}; see {log.name}")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        time.sleep(2)  # the status writes that follow each create
        requests = request_total(api) - before - ours - 1
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        kubectl.run("delete", "ns", ns, "--wait=false")
    return {"seconds": seconds, "rss_mb": rss, "requests_per_job": requests / count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    try:
        controlplane.build_binaries()
    except NoGo as exc:
        print(f"{exc}: run `make controlplane` first (see hack/README.md)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        plane = controlplane.start(workdir / "plane")
        try:
            config.load_kube_config(str(plane.kubeconfig))
            kubectl = Kubectl(plane.kubeconfig)
            kubectl.install_crds()
            floor = workdir / "floor.py"
            floor.write_text(FLOOR)
            kubetune = [
                sys.executable,
                "-m",
                "kubetune_operator",
                "--standalone",
                "--liveness",
                "",
                "--metrics-port",
                str(free_port()),
            ]
            minimal = [sys.executable, "-m", "kopf", "run", "--standalone", str(floor)]
            results = {
                "kubetune": run_case("kubetune", kubetune, kubectl, args.count, workdir),
                "floor": run_case("floor", minimal, kubectl, args.count, workdir),
            }
        finally:
            plane.stop()
    print(f"\n{args.count} FineTuneJobs applied at once")
    print(f"{'':24}{'kubetune':>12}{'floor':>12}{'ratio':>8}")
    for key, label in [
        ("seconds", "seconds to all Jobs"),
        ("rss_mb", "peak RSS (MB)"),
        ("requests_per_job", "API requests per job"),
    ]:
        a, b = results["kubetune"][key], results["floor"][key]
        print(f"{label:24}{a:12.2f}{b:12.2f}{a / b if b else float('nan'):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
