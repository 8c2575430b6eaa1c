"""Validation's fast path for embedded images: a line's long base64 payloads are taken
out before the JSON parser sees it, checked and decoded by pybase64, and their bytes
handed to the image check (``jsonl.decode_shortened``, ``iter_records(stand_ins=True)``).

Every answer is compared with the long way round, pybase64 absent: the whole line
parsed, each payload checked by ``base64_problem``. Damage of every kind, at every
place in a payload and around it, must be reported with the same message on the same
line, and hostile lines (a data: URI as a key, inside a longer string, escaped,
repeated keys) must read as they always did."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from data_helpers import data_uri, image_bytes, sft, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import ImageRef, check_image, jsonl, validate_file
from kubetune_trainer.data import images as images_mod
from kubetune_trainer.data.images import base64_problem
from kubetune_trainer.data.validate import ValidationReport

pytest.importorskip("pybase64")


@contextmanager
def long_way_round() -> Iterator[None]:
    """Validation as it is without pybase64: no payload taken out of a line."""
    with (
        mock.patch.object(jsonl, "pybase64", None),
        mock.patch.object(images_mod, "pybase64", None),
    ):
        yield


def _noise_png(side: int = 64) -> bytes:
    """Incompressible: its base64 is longer than ``jsonl.MIN_TAKEN_OUT``."""
    noise = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    return buf.getvalue()


def _noise_jpeg(side: int = 64) -> bytes:
    noise = Image.open(io.BytesIO(_noise_png(side)))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=95)
    return buf.getvalue()


PNG = _noise_png()
JPEG = _noise_jpeg()
PAYLOAD = base64.b64encode(PNG).decode()
assert min(len(PAYLOAD), len(base64.b64encode(JPEG))) > jsonl.MIN_TAKEN_OUT


def _both_ways(path: Path, **kw: Any) -> tuple[ValidationReport, ValidationReport]:
    kw.setdefault("limits", DatasetLimits(min_examples=1))
    fast = validate_file(path, **kw)
    with long_way_round():
        slow = validate_file(path, **kw)
    return fast, slow


def _parts(uri: str, text: str = "what is it?") -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": uri}},
                ],
            },
            {"role": "assistant", "content": "noise"},
        ]
    }


# --- damage in a payload, everywhere ----------------------------------------------------

_MIDDLE = len(PAYLOAD) // 2
_BODY = PAYLOAD.rstrip("=")
DAMAGED: dict[str, str] = {
    "first character": "!" + PAYLOAD[1:],
    "second character": PAYLOAD[:1] + "-" + PAYLOAD[2:],
    "middle": PAYLOAD[:_MIDDLE] + "_" + PAYLOAD[_MIDDLE + 1 :],
    "last character before the padding": _BODY[:-1] + "." + PAYLOAD[len(_BODY) :],
    "very last character": PAYLOAD[:-1] + "*",
    "a space inside": PAYLOAD[:_MIDDLE] + " " + PAYLOAD[_MIDDLE:],
    "a tab inside, escaped": PAYLOAD[:_MIDDLE] + "\t" + PAYLOAD[_MIDDLE:],
    "a newline at the end, escaped": PAYLOAD + "\n",
    "a non-ASCII letter": PAYLOAD[:_MIDDLE] + "é" + PAYLOAD[_MIDDLE + 1 :],
    "a quote inside, escaped": PAYLOAD[:_MIDDLE] + '"' + PAYLOAD[_MIDDLE:],
    "a backslash inside, escaped": PAYLOAD[:_MIDDLE] + "\\" + PAYLOAD[_MIDDLE:],
    "padding in the middle": PAYLOAD[:_MIDDLE] + "==" + PAYLOAD[_MIDDLE + 2 :],
    "padding after a full group": _BODY[: len(_BODY) // 4 * 4] + "====",
    "padding doubled": PAYLOAD + "==",
    "one character short": PAYLOAD[:-1] if PAYLOAD.endswith("=") else PAYLOAD + "A",
    "one character cut": _BODY[:-1],
    "one group cut": PAYLOAD[:-4],
    "empty": "",
    "url-safe alphabet": PAYLOAD.replace("+", "-").replace("/", "_") + "-_",
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
@pytest.mark.parametrize("style", ["placeholder", "content-parts"])
def test_damage_anywhere_in_a_payload_is_reported_as_the_long_way_reports_it(
    tmp_path: Path, name: str, style: str
) -> None:
    bad = f"data:image/png;base64,{DAMAGED[name]}"
    good = data_uri(PNG)

    def line(uri: str, i: int) -> dict[str, Any]:
        return (
            _parts(uri, f"picture {i}")
            if style == "content-parts"
            else (sft(f"<image>picture {i}", images=[uri]))
        )

    path = write_jsonl(tmp_path / "d.jsonl", [line(good, 1), line(bad, 2), line(good, 3)])
    fast, slow = _both_ways(path)
    assert fast == slow
    problem = base64_problem(DAMAGED[name])
    if problem is None:  # valid base64 of a cut image: its header is whole
        assert fast.errors == ()
    else:
        assert [e.line for e in fast.errors] == [2]
        assert fast.errors[0].message.endswith(problem), fast.errors[0].message


def test_a_payload_over_the_cap_by_one_byte_is_refused_as_before(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [_parts(data_uri(PNG)), _parts(data_uri(PNG + b"\0"), "again"), _parts(data_uri(PNG[:-1]))],
    )
    for cap in (len(PNG) - 1, len(PNG), len(PNG) + 1):
        fast, slow = _both_ways(path, limits=DatasetLimits(min_examples=1, max_image_bytes=cap))
        assert fast == slow
        over = [e.line for e in fast.errors]
        assert over == {len(PNG) - 1: [1, 2], len(PNG): [2], len(PNG) + 1: []}[cap], over
        lengths = {1: len(data_uri(PNG)), 2: len(data_uri(PNG + b"\0"))}
        for error in fast.errors:
            assert f"more than the limit of {cap:,} (maxImageBytes)" in error.message
            assert f"({lengths[error.line]:,} characters)" in error.message


# --- hostile and unusual lines --------------------------------------------------------

GOOD = data_uri(PNG)
ESCAPED_SLASHES = json.dumps(_parts(GOOD)).replace("image/png", "image\\/png")

HOSTILE: dict[str, bytes | str | dict[str, Any]] = {
    "as a key": {**sft("<image>x", images=[GOOD]), "meta": {GOOD: 1}},
    "as a key and a value": {**_parts(GOOD), "meta": {GOOD: GOOD}},
    "in a text part": _parts(GOOD, GOOD),
    "as the whole text": sft(GOOD),
    "in an extra field": {**_parts(GOOD), "source": GOOD},
    "as the rejected reply": {**sft("<image>x", images=[GOOD]), "rejected_response": GOOD},
    "after an escaped quote": sft(f'she said "{GOOD}"'),
    "escaped slashes in the head": ESCAPED_SLASHES,
    "escaped slashes in the payload": json.dumps(_parts(GOOD)).replace("/", "\\/"),
    "a \\u escape in the payload": json.dumps(_parts(GOOD)).replace("A", "\\u0041", 1),
    "a repeated key": json.dumps(_parts(GOOD))[:-1] + ', "messages": []}',
    "a repeated url": json.dumps(_parts(GOOD)).replace(
        '"url": ', f'"url": "{data_uri(PNG[::-1])}", "url": '
    ),
    "two commas in the head": _parts(f"data:image/png,x;base64,{PAYLOAD}"),
    "a head without base64": _parts(f"data:image/png,{PAYLOAD}"),
    "an upper-case scheme": _parts(f"DATA:image/png;base64,{PAYLOAD}"),
    "a non-ASCII head": _parts(f"data:image/pñg;base64,{PAYLOAD}"),
    "a head with parameters": _parts(f"data:image/png;name=a.png;base64,{PAYLOAD}"),
    "no MIME type": _parts(f"data:;base64,{PAYLOAD}"),
    "the wrong MIME type": _parts(data_uri(PNG, "image/jpeg")),
    "a JPEG": _parts(data_uri(JPEG, "image/jpeg")),
    "a JPEG said to be a PNG": _parts(data_uri(JPEG)),
    "a palette PNG": _parts(data_uri(image_bytes("PNG", (900, 900), "P", compress_level=0))),
    "not an image": _parts(data_uri(bytes(range(256)) * 40)),
    "a GIF": _parts(data_uri(image_bytes("GIF", (600, 600), "P"), "image/gif")),
    "invalid JSON after it": json.dumps(_parts(GOOD))[:-1],
    "a raw control character after it": json.dumps(_parts(GOOD)).replace("noise", "no\x01ise"),
    "a lone surrogate": json.dumps(_parts(GOOD)).replace("noise", "\\udc00"),
    "too deep": json.dumps(_parts(GOOD))[:-1] + ', "x": ' + "[" * 70 + "]" * 70 + "}",
    "a big integer": {**_parts(GOOD), "id": 2**70},
    "an ignored message key": json.dumps(_parts(GOOD)).replace(
        '"role": "assistant"', '"role": "assistant", "name": "x"'
    ),
    "an image in the assistant's turn": {
        "messages": [
            {"role": "user", "content": "q"},
            _parts(GOOD)["messages"][0] | {"role": "assistant"},
        ]
    },
    "too many images": sft("<image>" * 3, images=[GOOD] * 3),
    "the whole line a string": json.dumps(GOOD),
    "an array of them": json.dumps([GOOD, GOOD]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_hostile_lines_read_as_the_long_way_reads_them(
    tmp_path: Path, name: str, task: str
) -> None:
    line = HOSTILE[name]
    path = write_jsonl(tmp_path / "d.jsonl", [_parts(GOOD), line, line, _parts(GOOD, "other")])
    limits = DatasetLimits(min_examples=1, max_images_per_example=2)
    fast, slow = _both_ways(path, limits=limits, task=task)
    assert fast == slow


@pytest.mark.parametrize("style", ["placeholder", "content-parts"])
def test_a_line_in_the_other_style_is_refused_as_before(tmp_path: Path, style: str) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [_parts(GOOD), sft("<image>x", images=[GOOD]), sft("text")]
    )
    fast, slow = _both_ways(path, style=style)
    assert fast == slow and len(fast.errors) == 1


def test_preference_pairs_compare_their_images_as_before(tmp_path: Path) -> None:
    other = data_uri(_noise_png(65))
    pair = sft("<image>x", images=[GOOD], rejected_response="no")
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {**pair, "rejected_response": "hello", "rejected_images": [GOOD]},  # the same
            {**pair, "rejected_response": "hello", "rejected_images": [other]},  # not
            {**pair, "rejected_images": [GOOD]},
        ],
    )
    fast, slow = _both_ways(path, task="dpo")
    assert fast == slow
    assert [e.line for e in fast.errors] == [1]


def test_duplicate_lines_are_found_as_before(tmp_path: Path) -> None:
    lines = [_parts(GOOD, str(i % 3)) for i in range(7)]
    fast, slow = _both_ways(write_jsonl(tmp_path / "d.jsonl", lines))
    assert fast == slow
    assert [w.line for w in fast.warnings] == [4, 5, 6, 7]


@pytest.mark.parametrize("deep", [False, True])
def test_deep_validation_decodes_what_the_reader_decoded(tmp_path: Path, deep: bool) -> None:
    truncated = data_uri(PNG[: len(PNG) // 2])
    path = write_jsonl(tmp_path / "d.jsonl", [_parts(GOOD), _parts(truncated)])
    fast, slow = _both_ways(path, deep=deep)
    assert fast == slow
    assert [e.line for e in fast.errors] == ([2] if deep else [])


# --- the fast path is taken where it can be, and only there ------------------------------


def test_valid_payloads_are_decoded_once_by_the_reader(tmp_path: Path) -> None:
    def never(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the payload was checked again")

    lines = [
        _parts(GOOD),
        sft("<image>x", images=[GOOD]),
        _parts(data_uri(JPEG, "image/jpeg")),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with (
        mock.patch.object(images_mod, "_open_payload", never),
        mock.patch.object(images_mod, "decode_base64", never),
    ):
        report = validate_file(path, limits=DatasetLimits(min_examples=1))
    assert report.valid and report.images == 3

    damaged = write_jsonl(tmp_path / "bad.jsonl", [_parts(GOOD.replace("A", "!", 1))])
    with (
        mock.patch.object(images_mod, "_open_payload", never),
        pytest.raises(AssertionError, match="checked again"),
    ):
        validate_file(damaged, limits=DatasetLimits(min_examples=1))


@given(st.sampled_from(sorted(HOSTILE)), st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_line_gives_the_whole_parse(name: str, data: st.DataObject) -> None:
    line = HOSTILE[name]
    raw = (
        line
        if isinstance(line, bytes)
        else (line.encode() if isinstance(line, str) else json.dumps(line).encode())
    )
    # a random cut, or a random byte spoilt, around the payloads too
    where = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["keep", "cut", "byte"]))
    if how == "cut":
        raw = raw[:where]
    elif how == "byte":
        spoilt = data.draw(st.sampled_from(b'"\\,:{}[]A=!\x00\xff'))
        raw = raw[:where] + bytes([spoilt]) + raw[where + 1 :]
    assert jsonl.decode_line(raw) == jsonl.decode_whole(raw)
    with mock.patch.object(jsonl, "orjson", None):
        assert jsonl.decode_line(raw) == jsonl.decode_whole(raw)


@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(
                ['"data:image/png;base64,', '"data:;base64,', ";base64,", '\\"data:x;base64,']
            ),
            st.text("AQw+/=", min_size=0, max_size=12),
            st.sampled_from(['"', "\\", ",", ":", "[", "]", "{", "}", " ", "é", "\\/", '\\"']),
        ),
        max_size=30,
    )
)
@settings(max_examples=500, deadline=None)
def test_any_short_line_decodes_as_the_whole_parse(pieces: list[str]) -> None:
    """With every payload long enough to take out, random arrangements of the
    characters that matter."""
    with mock.patch.object(jsonl, "MIN_TAKEN_OUT", 0):
        _decode_both_ways(pieces)


def _decode_both_ways(pieces: list[str]) -> None:
    for raw in ("".join(pieces), '{"a": [' + "".join(pieces) + "]}", '["' + "".join(pieces)):
        data = raw.encode()
        assert jsonl.decode_line(data) == jsonl.decode_whole(data), raw


def test_the_image_check_of_decoded_bytes_is_that_of_the_payload() -> None:
    limits = DatasetLimits()
    for data, mime in (
        (PNG, "image/png"),
        (PNG, "image/jpeg"),
        (image_bytes("JPEG", (40, 30)), "image/jpeg"),
        (image_bytes("WEBP", (40, 30)), "image/webp"),
        (image_bytes("PNG", (40, 30), "P"), "image/png"),
        (image_bytes("GIF", (4, 3), "P"), ""),
        (b"not an image, but long enough for a header", "image/png"),
    ):
        ref = ImageRef(data_uri(data, mime))
        for cap in (len(data) - 1, len(data)):
            for deep in (False, True):
                lim = limits.model_copy(update={"max_image_bytes": cap})
                assert check_image(ref, Path("/"), lim, deep=deep, decoded=data) == check_image(
                    ref, Path("/"), lim, deep=deep
                )


def test_the_lookout_searches_fewer_lines_of_text_and_resumes() -> None:
    text = json.dumps(sft("x" * jsonl.MIN_TAKEN_OUT)).encode()
    image = json.dumps(_parts(GOOD)).encode()
    lookout = jsonl.Lookout()
    searched = []
    real = jsonl.decode_shortened

    def spy(data: bytes) -> jsonl.Shortened | None:
        searched.append(i)
        return real(data)

    with mock.patch.object(jsonl, "decode_shortened", spy):
        for i in range(200):
            found = lookout.shortened(image if i >= 120 else text)
            assert (found is not None) == (i in searched and i >= 120)
    quiet = jsonl.Lookout.QUIET
    assert searched[:quiet] == list(range(quiet))
    assert len([i for i in searched if i < 120]) <= quiet + 120 // quiet
    first = next(i for i in searched if i >= 120)
    assert first < 120 + quiet
    assert searched[searched.index(first) :] == list(range(first, 200))
    assert lookout.shortened(b"x" * (jsonl.MIN_TAKEN_OUT - 1)) is None


# --- start-up -------------------------------------------------------------------------

_IMPORTS = """
import json, sys
from kubetune_trainer.cli import main
main(["validate", sys.argv[1], "--json"])
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_validate_imports_no_other_command_nor_pil_or_http(tmp_path: Path) -> None:
    """`kubetune validate` on embedded PNGs loads neither the other commands' modules
    nor PIL (plain PNG headers are read without it) nor the HTTP client (no URL)."""
    path = write_jsonl(tmp_path / "d.jsonl", [_parts(GOOD), sft("<image>x", images=[GOOD])])
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS, str(path)], capture_output=True, text=True, check=False
    )
    assert json.loads(out.stdout)["valid"] is False  # too few examples, nothing else
    modules = set(json.loads(out.stderr.strip().splitlines()[-1]))
    unwanted = {
        "PIL.Image",
        "http.client",
        "ssl",
        "kubetune_trainer.data.remote",
        "kubetune_trainer.training.commands",
        "kubetune_trainer.serving.commands",
        "kubetune_trainer.transfer",
        "kubetune_trainer.fetch_images",
    }
    assert not modules & unwanted, modules & unwanted


def test_every_command_is_still_there(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune_trainer import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    for commands in cli.GROUPS.values():
        for command in commands:
            assert command in listed
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err
