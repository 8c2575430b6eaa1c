"""Lines written to hurt: nested, malformed and oversized ones give a line-numbered
error in validate, convert and the trainer's reader, never a traceback, and never
need more memory than the validation pod has."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from data_helpers import image_bytes, sft, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import DatasetError, convert_file, read_examples, validate_file
from kubetune_trainer.data import validate as validate_mod
from kubetune_trainer.data.commands import memory_size
from kubetune_trainer.data.convert import to_json_record
from kubetune_trainer.data.formats import parse_record
from kubetune_trainer.data.jsonl import (
    BYTE_COST,
    DEFAULT_BUDGET,
    DEFAULT_MEMORY_LIMIT,
    MAX_NESTING,
    RESERVED_MEMORY,
    WIDE_BYTE_COST,
    LineBudget,
    decode_line,
    encode_record,
    nests_deeper,
)
from kubetune_trainer.data.reader import Record, iter_records

MiB = 1 << 20


# --- the budget ------------------------------------------------------------------


def test_the_budget_refuses_by_length_kind_and_values() -> None:
    budget = LineBudget(RESERVED_MEMORY + 100_000)  # 100,000 bytes for one line
    assert budget.max_bytes == 100_000 // BYTE_COST
    assert budget.problem(b'"' + b"a" * 19_990 + b'"') is None
    assert budget.problem(b"a" * 20_001) == (
        "line is longer than 20,000 bytes, the most one line may have in 160.1 MiB of "
        "memory; keep large images in files next to the JSONL"
    )
    # one character beyond ASCII, or an escape for one, can make a string 4 bytes a character
    for wide in ("é".encode() + b"a" * 10_000, b"\\u00e9" + b"a" * 10_000):
        assert budget.problem(wide) == (
            f"line is longer than {100_000 // WIDE_BYTE_COST:,} bytes, the most one line with "
            "non-ASCII text or \\u escapes may have in 160.1 MiB of memory; keep large "
            "images in files next to the JSONL"
        )
    many = b"[" + b"{}," * 999 + b"{}]"
    assert budget.problem(many) == (
        "line holds about 2,000 JSON values; reading them would take about 327.2 KiB, more "
        "than one line may use in 160.1 MiB of memory; split the line up"
    )
    assert LineBudget(RESERVED_MEMORY + 10_000_000).problem(many) is None


def test_a_line_too_costly_is_an_error_on_its_line(tmp_path: Path) -> None:
    budget = LineBudget(RESERVED_MEMORY + 100_000)
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [sft("a"), sft("b", meta=[{}] * 1000), sft("c", pad="x" * 30_000), sft("d")],
    )
    report = validate_file(path, budget=budget, limits=DatasetLimits(min_examples=1))
    assert [p.line for p in report.errors] == [2, 3]
    assert report.errors[0].message.startswith("line holds about 2,0")
    assert report.errors[1].message.startswith("line is longer than 20,000 bytes")
    assert report.examples == 2


@pytest.mark.parametrize(
    ("text", "size"),
    [("1073741824", 1 << 30), ("1Gi", 1 << 30), ("512Mi", 512 << 20), ("64Ki", 64 << 10)],
)
def test_memory_sizes_are_read_as_kubernetes_writes_them(text: str, size: int) -> None:
    assert memory_size(text) == size


@pytest.mark.parametrize("text", ["1G", "1.5Gi", "-1", "lots", ""])
def test_other_memory_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size such as 1Gi"):
        memory_size(text)


def test_the_default_budget_is_the_validation_pods() -> None:
    assert DEFAULT_BUDGET.memory_limit == DEFAULT_MEMORY_LIMIT == 1 << 30
    operator = Path(__file__).parents[2] / "operator/kubetune_operator/resources/dataset"
    assert '"limits": {"memory": "1Gi"}' in (operator / "validation_job.py").read_text()


# --- memory, measured --------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, sys
    from kubetune_trainer.contract.job import DatasetLimits
    from kubetune_trainer.data import validate_file
    report = validate_file(sys.argv[1], limits=DatasetLimits(min_examples=1))
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into a child
    # spawned with vfork (as subprocess does).
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": int(hwm.split()[1]) / 1024,
                      "errors": [str(p) for p in report.errors]}))
    """
)

_HEAD = (
    b'{"messages":[{"role":"user","content":[{"type":"text","text":"what is it?"},'
    b'{"type":"image_url","image_url":{"url":"data:image/png;base64,'
)
_TAIL = b'"}}]},{"role":"assistant","content":"a picture"}]}'
_TEXT = b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"'


def _write(path: Path, pieces: Iterator[bytes]) -> Path:
    with path.open("wb") as fp:
        for piece in pieces:
            fp.write(piece)
    return path


def _repeat(unit: bytes, size: int) -> Iterator[bytes]:
    block = unit * max(1, (1 << 20) // len(unit))
    for _ in range(size // len(block)):
        yield block
    yield unit * ((size % len(block)) // len(unit))


def _data_uri_line(size: int) -> Iterator[bytes]:
    yield _HEAD
    yield from _repeat(b"AAAA", size - len(_HEAD) - len(_TAIL) - 1)
    yield _TAIL + b"\n"


def _wide_invalid_line(size: int) -> Iterator[bytes]:
    # An emoji makes the whole reply 4 bytes a character, and the missing '}' sends
    # the line to the standard library's parser as well: the costliest kind of text.
    yield _TEXT + "😀".encode()
    yield from _repeat(b"a", size - len(_TEXT) - 8)
    yield b'"}]\n'


def _dicts_line(size: int) -> Iterator[bytes]:
    yield b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"m":['
    yield from _repeat(b"{},", size - 100)
    yield b"{}]}\n"


def _measure(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def baseline_mib(tmp_path_factory: pytest.TempPathFactory) -> float:
    path = write_jsonl(tmp_path_factory.mktemp("small") / "d.jsonl", [sft("a")])
    return float(_measure(path)["peak_mib"])


LINE_MIB = (DEFAULT_MEMORY_LIMIT - RESERVED_MEMORY) / MiB
WIDE_CAP = (DEFAULT_MEMORY_LIMIT - RESERVED_MEMORY) // WIDE_BYTE_COST


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        # the two lines: 1.01 GiB and 1.03 GB before, an OOM kill in the pod
        (lambda: _data_uri_line(200 * MiB), "line 1: line is longer than 181,193,932 bytes"),
        (lambda: _dicts_line(30 * MiB), "line 1: line holds about 20,971,4"),
        # the costliest lines the default budget lets through
        (lambda: _data_uri_line(DEFAULT_BUDGET.max_bytes - 1024), "line 1: image 1 (data:"),
        (lambda: _wide_invalid_line(WIDE_CAP - 1024), "line 1: invalid JSON at column"),
    ],
    ids=["data-uri-200MiB", "dicts-30MiB", "data-uri-at-the-cap", "wide-invalid-at-the-cap"],
)
def test_a_line_never_needs_more_than_its_share_of_the_pod(
    tmp_path: Path, baseline_mib: float, lines: Any, error: str
) -> None:
    """With the defaults, one line (whatever it holds) costs at most the pod's memory
    less what the validator itself needs, measured as peak RSS in a fresh process."""
    report = _measure(_write(tmp_path / "d.jsonl", lines()))
    assert report["errors"] and report["errors"][0].startswith(error), report
    assert report["peak_mib"] - baseline_mib < LINE_MIB, (report["peak_mib"], baseline_mib)


def test_one_line_is_let_go_before_the_next_is_read(tmp_path: Path) -> None:
    """Two costly lines in a row cost what one does."""
    one = _write(tmp_path / "one.jsonl", _dicts_line(3 * MiB))
    two = _write(tmp_path / "two.jsonl", (b"".join(_dicts_line(3 * MiB)) for _ in range(2)))
    peaks = [_measure(path)["peak_mib"] for path in (one, two)]
    assert peaks[1] - peaks[0] < 15, peaks


# --- time ------------------------------------------------------------------------------


def test_many_text_parts_take_linear_time() -> None:
    parts = [{"type": "text", "text": "ab"}] * 100_000
    record = {"messages": [{"role": "user", "content": parts}, sft()["messages"][1]]}
    start = time.monotonic()
    parsed = parse_record(record, 1)
    assert time.monotonic() - start < 2
    assert parsed.example is not None and parsed.example.turns[0].text == "ab" * 100_000
    # and joined text parts still may not spell out a placeholder
    split = [{"type": "text", "text": "<ima"}, {"type": "text", "text": "ge>"}]
    assert parse_record({"messages": [{"role": "user", "content": split}]}).errors == (
        "messages[0].content: text parts join up into <image>; in content parts an image "
        "is an image_url part",
    )


# --- what a report may hold ------------------------------------------------------------


def test_messages_that_quote_the_line_are_cut(tmp_path: Path) -> None:
    long_key = "k" * 100_000
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sft("<image>x", images=["s" * 100_000 + "://x.png"]),
            {"messages": [{"role": "user", "content": "q", long_key: 1}, sft()["messages"][1]]},
        ],
    )
    report = validate_file(path, limits=DatasetLimits(min_examples=1))
    problems = [*report.errors, *report.warnings]
    assert [p.line for p in problems] == [1, 2]
    assert all(len(p.message) <= validate_mod.MAX_MESSAGE for p in problems)
    assert problems[0].message.endswith("...")
    assert problems[1].message == f"messages[0].{'k' * 37}... is ignored"


def test_long_image_sources_are_not_kept_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = validate_mod.check_image
    monkeypatch.setattr(
        validate_mod,
        "check_image",
        lambda ref, *a, **k: calls.append(len(ref.source)) or real(ref, *a, **k),
    )
    long_path = "d/" * 3000 + "a.png"
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [sft(f"<image>{i}", images=[src]) for i in range(2) for src in ("a.png", long_path)],
    )
    validate_file(path)
    assert calls == [5, len(long_path), len(long_path)]


# --- convert -------------------------------------------------------------------------


def test_convert_refuses_to_write_a_line_validation_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", (64, 64), compress_level=0))
    path = write_jsonl(
        tmp_path / "d.jsonl", [sft("<image>x", images=["a.png"]), sft("y"), "{", sft("z")]
    )
    budget = LineBudget(RESERVED_MEMORY + 4000 * BYTE_COST)  # ASCII lines of 4,000 bytes
    out = tmp_path / "out.jsonl"
    result = convert_file(path, out, "content-parts", embed_images=True, budget=budget)
    assert [str(p) for p in result.errors] == [
        "line 1: once converted, the line is longer than 4,000 bytes, the most one line may "
        "have in 160 MiB of memory; keep large images in files next to the JSONL",
        "line 3: invalid JSON at column 2: Expecting property name enclosed in double quotes",
    ]
    assert result.examples == 0 and not out.exists()


# --- whatever the line -------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=30,
)


@st.composite
def _nested(draw: st.DrawFn) -> bytes:
    """A record with arrays or objects nested up to 3,000 deep somewhere in it, closed
    or not."""
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"b":', b"}]")]))
    inner = opener * depth + b"1" * (opener != b"[") + closer * draw(st.integers(0, depth))
    where = draw(
        st.sampled_from(
            [
                b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"m":%s}',
                b'{"messages":[{"role":"user","content":"q","x":%s},{"role":"assistant","content":"a"}]}',
                b'{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":%s}}]}]}',
                b"%s",
            ]
        )
    )
    return where % inner


_lines = st.lists(
    _nested()
    | _json.map(lambda v: json.dumps(v).encode())
    | _json.map(lambda v: json.dumps(sft("q", "a", meta=v)).encode())
    | st.binary(max_size=60)
    | st.builds(lambda n: b'{"messages":[' + b"{}," * n + b"{}]}", st.integers(0, 3000))
    | st.builds(lambda s: json.dumps(sft(s, s)).encode(), st.text(min_size=200, max_size=3000)),
    min_size=1,
    max_size=6,
)
_budgets = st.sampled_from(
    [DEFAULT_BUDGET, LineBudget(RESERVED_MEMORY + 30_000), LineBudget(RESERVED_MEMORY + 2_000)]
)


@given(_lines, _budgets)
@settings(max_examples=150, deadline=None)
def test_only_line_numbered_problems_come_out(lines: list[bytes], budget: LineBudget) -> None:
    data = b"\n".join(lines) + b"\n"
    n_lines = data.count(b"\n")
    items = list(iter_records(io.BytesIO(data), budget=budget))
    for item in items:
        if isinstance(item, Record):
            assert 1 <= item.example.line <= n_lines
        else:
            assert 1 <= item.line <= n_lines and item.message
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_bytes(data)
        report = validate_file(path, budget=budget)
        assert all(0 <= p.line <= n_lines for p in (*report.errors, *report.warnings))
        result = convert_file(path, Path(folder) / "out.jsonl", "placeholder", budget=budget)
        assert all(1 <= p.line <= n_lines for p in result.errors)
        try:
            list(read_examples(path, budget=budget))
        except DatasetError as exc:
            assert 1 <= exc.line <= n_lines
    # every example that comes out can be written and read back: nothing nests too deep
    for item in items:
        if isinstance(item, Record):
            written = encode_record(to_json_record(item.example, "content-parts"))
            value, error = decode_line(written)
            assert error is None and not nests_deeper(value, MAX_NESTING)
