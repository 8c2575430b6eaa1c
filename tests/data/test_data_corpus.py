"""The corpus under corpus/: every malformed file is rejected on the right line with
the right message, and valid files in every style and mixture pass."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import validate_file
from kubetune_trainer.data.jsonl import DEFAULT_BUDGET, LineBudget

CORPUS = Path(__file__).parent / "corpus"
MANIFEST: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
VALID = sorted((CORPUS / "valid").glob("*.jsonl"))


@pytest.fixture(autouse=True)
def offline_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Literal IPs resolve as themselves; any name lookup fails (no network in tests)."""
    real = socket.getaddrinfo

    def resolve(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        ipaddress.ip_address(host)  # raises ValueError for names
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_corpus_has_at_least_40_malformed_files() -> None:
    assert len({c["file"] for c in MANIFEST if c["severity"] == "error"}) >= 40
    assert {c["file"] for c in MANIFEST} == {p.name for p in (CORPUS / "invalid").glob("*.jsonl")}


@pytest.mark.parametrize("case", MANIFEST, ids=[c["file"] for c in MANIFEST])
def test_malformed_file_is_rejected_on_the_right_line(case: dict[str, Any]) -> None:
    report = validate_file(
        CORPUS / "invalid" / case["file"],
        task=case["task"],
        image_root=CORPUS,
        limits=DatasetLimits.model_validate(case["limits"]),
        deep=case["deep"],
        budget=LineBudget(case["memory_limit"]) if case["memory_limit"] else DEFAULT_BUDGET,
    )
    found = report.errors if case["severity"] == "error" else report.warnings
    assert any(p.line == case["line"] and case["message"] in p.message for p in found), (
        f"expected line {case['line']}: {case['message']!r}; got {[str(p) for p in found]}"
    )
    if case["severity"] == "error":
        assert not report.valid
        assert {p.line for p in report.errors} == {case["line"]}, [str(p) for p in report.errors]
    else:
        assert report.valid, [str(p) for p in report.errors]
        assert {p.line for p in report.warnings} == {case["line"]}


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
@pytest.mark.parametrize("deep", [False, True], ids=["headers", "deep"])
def test_valid_file_passes(path: Path, deep: bool) -> None:
    report = validate_file(path, image_root=CORPUS, deep=deep)
    assert report.valid, [str(p) for p in report.errors]
    assert report.warnings == ()
    assert report.examples == sum(1 for line in path.read_bytes().splitlines() if line.strip())


@pytest.mark.parametrize("path", [p for p in VALID if "preference" in p.name], ids=lambda p: p.name)
def test_preference_files_pass_for_dpo(path: Path) -> None:
    report = validate_file(path, task="dpo", image_root=CORPUS)
    assert report.valid, [str(p) for p in report.errors]
