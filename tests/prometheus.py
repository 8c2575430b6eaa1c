"""A real Prometheus (and promtool) for the monitoring tests, built by
``hack/prometheus.sh`` from the pinned Go module.

The tests cannot run the Prometheus Operator, so the chart's PodMonitors are not what
finds the targets here: a test lists them in file-based service discovery, with the
labels the PodMonitors' relabelings would give them (``namespace``, ``finetunejob``,
``modeldeployment``)::

    with prometheus.start(tmp_path) as prom:
        prom.scrape("trainers", [(f"{pod_ip}:9090", {"namespace": ns, "finetunejob": name})])
        series = prom.query_range('kubetune_train_loss{finetunejob="a"}', start, end)
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hack_scripts
from operator_harness import free_port

# Often enough that a run of a minute leaves dozens of samples, and rate() over a few
# seconds has at least two of them.
SCRAPE_INTERVAL = "1s"


def bin_dir() -> Path:
    """The directory holding ``prometheus`` and ``promtool``, built on first use (a cold
    build takes minutes). Skips without Go, and fails instead under CI=true."""
    return hack_scripts.require("the real Prometheus", lambda: hack_scripts.build("prometheus.sh"))


def promtool() -> Path:
    return bin_dir() / "promtool"


@dataclass
class Prometheus:
    """A Prometheus server on loopback whose scrape targets the test writes."""

    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    jobs: dict[str, bool] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "prometheus.log"

    def write_config(self, jobs: Mapping[str, bool]) -> None:
        """One scrape job per name, each reading its targets from <name>.json; True for
        jobs whose own labels win over the target's (the operator's
        kubetune_operator_object_phase carries the object's namespace, as the chart's
        PodMonitor keeps with honorLabels)."""
        scrape_configs = [
            {
                "job_name": name,
                "honor_labels": honor,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "file_sd_configs": [
                    {"files": [str(self.folder / f"{name}.json")], "refresh_interval": "1s"}
                ],
            }
            for name, honor in jobs.items()
        ]
        config = {"global": {"scrape_interval": SCRAPE_INTERVAL}, "scrape_configs": scrape_configs}
        (self.folder / "prometheus.yml").write_text(json.dumps(config, indent=1))
        for name in jobs:
            targets = self.folder / f"{name}.json"
            if not targets.exists():
                targets.write_text("[]")

    def start(self, jobs: Mapping[str, bool]) -> Prometheus:
        self.jobs = dict(jobs)
        self.write_config(jobs)
        self.port = free_port()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(bin_dir() / "prometheus"),
                    f"--config.file={self.folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus was not ready within 60 s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def scrape(self, job: str, targets: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """Replace the targets of ``job`` (address, labels): file-based discovery picks
        the file up within a second. Written whole and renamed, so Prometheus never
        reads half of it."""
        assert job in self.jobs, f"no scrape job {job!r}; jobs: {sorted(self.jobs)}"
        groups = [{"targets": [address], "labels": dict(labels)} for address, labels in targets]
        path = self.folder / f"{job}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.rename(path)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
            raise AssertionError(f"Prometheus refused {params}: {body.get('error')}") from exc
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step: str = SCRAPE_INTERVAL
    ) -> list[dict[str, Any]]:
        """The series ``expr`` gives over [start, end], as a Grafana time-series panel
        asks for them."""
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def answered(series: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a range query's answer holds a number: a panel that would draw
    something. NaN alone (a quantile of no requests) draws nothing."""
    return any(math.isfinite(float(value)) for one in series for _, value in one.get("values", []))


@contextmanager
def start(folder: Path, jobs: Mapping[str, bool]) -> Iterator[Prometheus]:
    """Prometheus with one file-discovered scrape job per entry of ``jobs`` (name to
    honor_labels), for as long as the block runs."""
    prom = Prometheus(folder).start(jobs)
    try:
        yield prom
    finally:
        prom.stop()
