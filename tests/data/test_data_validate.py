"""The validation pass: the report, line reading, duplicates, error caps, flat memory."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from data_helpers import data_uri, image_bytes, sft, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import jsonl, validate_file
from kubetune_trainer.data import validate as validate_mod
from kubetune_trainer.data.duplicates import FingerprintTable
from kubetune_trainer.data.jsonl import (
    BOM,
    BYTE_COST,
    RESERVED_MEMORY,
    Line,
    LineBudget,
    decode_line,
    iter_lines,
)
from kubetune_trainer.data.problems import Problem


def test_image_urls_are_counted_as_remote_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sft("<image>one", images=["a.png"]),
            sft("<image>two", images=["https://example.com/b.png"]),
        ],
    )
    report = validate_file(path).to_json()
    assert (report["images"], report["remoteImages"]) == (2, 1)


def test_report_json_shape(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [sft("<image>one", images=["a.png"]), sft("two"), "", sft("three"), sft("two"), "{bad"],
    )
    report = validate_file(path).to_json()
    assert report == {
        "valid": False,
        "examples": 4,
        "images": 1,
        "textOnlyExamples": 3,
        "remoteImages": 0,
        "remoteImagesSha256": None,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "errors": [
            {
                "line": 6,
                "message": "invalid JSON at column 2: Expecting property name enclosed in double quotes",
            }
        ],
        "warnings": [
            {"line": 3, "message": "blank line skipped"},
            {"line": 5, "message": "exact duplicate of line 2"},
        ],
        "errorCount": 1,
        "warningCount": 2,
        "truncatedErrors": 0,
        "truncatedWarnings": 0,
    }


def test_plain_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a"), "", sft("b", ""), sft("c")])
    lines = list(validate_file(path).plain_lines("d.jsonl"))
    assert lines[:2] == [
        "line 2: warning: blank line skipped",
        "line 3: the assistant reply is empty",
    ]
    assert lines[2] == "file: 2 examples; at least 3 are needed (minExamples)" or lines[
        2
    ].startswith("d.jsonl")
    assert lines[-1].startswith(
        "d.jsonl: INVALID: 3 examples (3 text-only), 0 images, 1 errors, 1 warnings; sha256 "
    )


def test_errors_are_capped_at_1000_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["[]"] * 1500 + [sft(str(i)) for i in range(3)])
    report = validate_file(path)
    data = report.to_json()
    assert (
        data["errorCount"] == 1500
        and len(data["errors"]) == 1000
        and data["truncatedErrors"] == 500
    )
    assert data["errors"][-1]["line"] == 1000
    assert any(
        "1,500 more problems" in line or "500 more problems" in line
        for line in report.plain_lines("d")
    )


def test_limits_are_applied(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [sft(str(i)) for i in range(5)])
    assert validate_file(path).valid
    assert not validate_file(path, limits=DatasetLimits(min_examples=6)).valid
    report = validate_file(path, limits=DatasetLimits(max_examples=4))
    assert [(p.line, p.message) for p in report.errors] == [
        (0, "5 examples; at most 4 are allowed (maxExamples)")
    ]


def test_missing_file_or_root_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a")])
    with pytest.raises(FileNotFoundError):
        validate_file(path, image_root=tmp_path / "missing")


def test_repeated_image_paths_are_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    calls = []
    real = validate_mod.check_image
    monkeypatch.setattr(
        validate_mod,
        "check_image",
        lambda ref, *a, **k: calls.append(ref.source) or real(ref, *a, **k),
    )
    uri = data_uri(image_bytes("PNG"))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [sft(f"<image>{i}", images=["a.png"]) for i in range(5)]
        + [sft(f"<image>{i}", images=[uri]) for i in range(2)],
    )
    assert validate_file(path).valid
    assert calls == ["a.png", uri, uri]


# --- lines -----------------------------------------------------------------------


def lines_of(data: bytes, **kw: Any) -> list[Line | Problem]:
    return list(iter_lines(io.BytesIO(data), **kw))


def budget_for(max_bytes: int) -> LineBudget:
    """The budget whose longest (ASCII) line is ``max_bytes``."""
    return LineBudget(RESERVED_MEMORY + max_bytes * BYTE_COST)


def test_line_endings_bom_and_last_line_without_newline() -> None:
    data = BOM + b'{"a":1}\r\n\n  \t\n{"b":2}'
    digest = hashlib.sha256()
    items = list(iter_lines(io.BytesIO(data), digest=digest))
    assert items == [
        Line(1, b'{"a":1}'),
        Problem(2, "blank line skipped", "warning"),
        Problem(3, "blank line skipped", "warning"),
        Line(4, b'{"b":2}'),
    ]
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    # a BOM is only a BOM at the start of the file
    assert lines_of(b"{}\n" + BOM + b"{}\n")[1] == Line(2, BOM + b"{}")


def test_long_lines_are_read_in_pieces_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "_CHUNK", 7)
    data = b"x" * 50 + b"\n" + b"y" * 20 + b"\n" + b"z" * 21 + b"\n" + b"w" * 30
    items = lines_of(data, budget=budget_for(20))
    too_long = (
        "line is longer than 20 bytes, the most one line may have in 160 MiB of memory; "
        "keep large images in files next to the JSONL"
    )
    assert items == [
        Problem(1, too_long),
        Line(2, b"y" * 20),
        Problem(3, too_long),
        Problem(4, too_long),
    ]


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("with_orjson", [True, False], ids=["orjson", "stdlib"])
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"a": [1, 2.5, "\\u00e9"]}', ({"a": [1, 2.5, "é"]}, None)),
        (b'{"a": 12345678901234567890}', ({"a": 12345678901234567890}, None)),  # 64-bit unsigned
        (b'{"a": "\\ud83d\\ude00"}', ({"a": "😀"}, None)),
        (b'{"a": NaN}', (None, "invalid JSON")),
        (b'{"a": Infinity}', (None, "invalid JSON")),
        (b'{"a": "\\udc00"}', (None, "lone UTF-16 surrogate")),
        (b'{"a": "\xff"}', (None, "not valid UTF-8 at byte 8")),
        (b"{'a': 1}", (None, "invalid JSON at column 2")),
        (b"[" * 100_000, (None, "nest more than 64 levels deep")),
        (b"[" * 64 + b"]" * 64, (_nested(64), None)),
        (b"[" * 65 + b"]" * 65, (None, "nest more than 64 levels deep")),
        (b'{"a":' * 400 + b"1" + b"}" * 400, (None, "nest more than 64 levels deep")),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, (None, "nest more than 64 levels deep")),
    ],
)
def test_decode_line_is_the_same_with_and_without_orjson(
    monkeypatch: pytest.MonkeyPatch,
    with_orjson: bool,
    line: bytes,
    expected: tuple[object, str | None],
) -> None:
    if not with_orjson:
        monkeypatch.setattr(jsonl, "orjson", None)
    elif jsonl.orjson is None:
        pytest.skip("orjson is not installed")
    value, error = decode_line(line)
    assert value == expected[0]
    assert (error is None) == (expected[1] is None)
    if expected[1] is not None:
        assert error is not None and expected[1] in error


# --- duplicates ----------------------------------------------------------------------


def test_fingerprint_table_grows_and_remembers_first_lines() -> None:
    table = FingerprintTable()
    for i in range(20_000):
        assert table.add(hash(f"line {i}"), i + 1) is None
    for i in range(0, 20_000, 997):
        assert table.add(hash(f"line {i}"), 99_999) == i + 1
    assert table.add(0, 5) is None and table.add(0, 6) == 5  # 0 is the empty marker; still works
    assert table.count == 20_001


def test_fingerprint_table_stops_growing_at_its_limit() -> None:
    table = FingerprintTable(limit=10)
    for i in range(50):
        table.add(i * 7919, i + 1)
    assert table.count == 10 and table.full
    assert table.add(3 * 7919, 99) == 4  # lookups still work
    assert table.add(49 * 7919, 99) is None


# --- memory --------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, sys
    from kubetune_trainer.data import validate_file
    report = validate_file(sys.argv[1])
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into a child
    # spawned with vfork (as subprocess does), and the parent here is a pytest process
    # that may hold a model.
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"rss_mb": int(hwm.split()[1]) / 1024,
                      "examples": report.examples, "valid": report.valid,
                      "errors": report.error_count}))
    """
)


def test_memory_stays_flat_on_a_big_file(tmp_path: Path) -> None:
    """~80 MB of distinct lines (text, and every 50th with an embedded PNG) stays far
    below 200 MB RSS, and no higher than a 1 MB file plus the duplicate table."""
    png = data_uri(image_bytes("PNG", (96, 96), "RGB", compress_level=0))
    filler = "lorem ipsum dolor sit amet " * 12

    def write(path: Path, target_bytes: int) -> None:
        with path.open("w") as fp:
            size, i = 0, 0
            while size < target_bytes:
                if i % 50 == 0:
                    record = sft(f"<image>{i}", filler, images=[png])
                else:
                    record = sft(f"question {i}: {filler}", f"answer {i}")
                line = json.dumps(record) + "\n"
                fp.write(line)
                size += len(line)
                i += 1

    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write(small, 1 << 20)
    write(big, 80 << 20)

    def measure(path: Path) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout)

    small_run, big_run = measure(small), measure(big)
    assert big_run["valid"] and big_run["examples"] > 50_000
    assert big_run["rss_mb"] < 200, big_run
    assert big_run["rss_mb"] - small_run["rss_mb"] < 30, (small_run, big_run)


# --- properties ----------------------------------------------------------------------

_record_lines = st.sampled_from(
    [
        sft("hi"),
        sft("<image>x", images=["a.png"]),
        sft("<image>x", images=["/"]),
        sft("<image>x", images=["data:image/png;base64,iVBORw0KGgo="]),
        sft("<image>x", images=["data:,"]),
        sft("<image>x", images=["http://[::1"]),
        sft("<image>x", images=["https://x/"]),
        sft([{"type": "image_url", "image_url": {"url": "a.png"}}], rejected_response=""),
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
        },
    ]
).map(lambda r: json.dumps(r).encode())
_lines = st.lists(
    st.binary(max_size=40)
    | st.text(max_size=30).map(str.encode)
    | _record_lines
    | st.tuples(_record_lines, st.integers(0, 200), st.binary(min_size=1, max_size=3)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]  # a valid line with bytes spliced in
    ),
    max_size=8,
)


@given(_lines, st.sampled_from(["sft", "dpo"]), st.booleans())
@settings(max_examples=150, deadline=None)
def test_validation_never_raises_and_every_problem_names_a_line(
    lines: list[bytes], task: Any, deep: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "a.png").write_bytes(image_bytes("PNG"))
        path = root / "d.jsonl"
        data = b"\n".join(lines)
        path.write_bytes(data)
        report = validate_file(path, task=task, deep=deep)
        n_lines = len(data.split(b"\n")) if data else 0
        for problem in (*report.errors, *report.warnings):
            assert 0 <= problem.line <= n_lines and problem.message
            if problem.line == 0:
                assert "example" in problem.message or "duplicates" in problem.message
        assert report.valid == (report.error_count == 0)
        assert report.examples <= n_lines


@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\n")),
    st.integers(1, 40),
    st.integers(1, 30),
)
@settings(max_examples=200, deadline=None)
def test_line_splitting_matches_a_plain_split(data: bytes, chunk: int, cap: int) -> None:
    jsonl._CHUNK, saved = chunk, jsonl._CHUNK
    try:
        digest = hashlib.sha256()
        got = list(jsonl._split_lines(io.BytesIO(data), cap, digest))
    finally:
        jsonl._CHUNK = saved
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert got == [line if len(line) <= cap else None for line in expected]
    assert digest.digest() == hashlib.sha256(data).digest()
