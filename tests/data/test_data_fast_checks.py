"""The validator's shortcuts give the answers of the long ways round: base64 checked
and decoded in one pass, a data URI's header read from a prefix of its payload, a
plain PNG's header read without PIL, and nesting measured by a walk before any count.
Each is compared with the plain computation on random and mutated inputs."""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

import pytest
from data_helpers import data_uri, image_bytes, sft, write_jsonl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import ImageRef, check_image, jsonl, validate_file
from kubetune_trainer.data import images as images_mod
from kubetune_trainer.data.images import (
    ImageInfo,
    ImageProblem,
    base64_problem,
    base64_size,
    decode_base64,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
BAD = "=!-_ \n\x00é."

# --- base64 in one pass --------------------------------------------------------------


@st.composite
def payloads(draw: st.DrawFn) -> str:
    """Valid base64 of random bytes, often spoilt: a character changed or inserted,
    padding added, the end cut off."""
    text = base64.b64encode(draw(st.binary(max_size=40))).decode()
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from(BAD + ALPHABET[:4]))
        cut = where + draw(st.integers(0, 1))  # insert, or replace one character
        text = text[:where] + char + text[cut:]
    text += "=" * draw(st.integers(0, 1)) * draw(st.integers(0, 5))
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@given(payloads() | st.text(ALPHABET[60:] + "AQw=", max_size=12))
@example("QUJD====")  # binascii's strict mode takes padding after a complete group
@example("QUJD=")
@example("QQ=")
@example("")
@example("QUJDé===")
@settings(max_examples=600, deadline=None)
def test_decode_base64_refuses_what_the_alphabet_check_refuses(payload: str) -> None:
    problem = base64_problem(payload)
    if problem is None:
        assert decode_base64(payload) == binascii.a2b_base64(payload)
        assert len(decode_base64(payload)) == base64_size(payload)
    else:
        with pytest.raises(ImageProblem) as info:
            decode_base64(payload)
        assert str(info.value) == problem


# --- a data URI's check against a full decode ----------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_text_first() -> bytes:
    """A PNG whose IDAT does not follow IHDR: PIL, not the plain-PNG shortcut, reads it."""
    png = image_bytes("PNG", (9, 7))
    at = png.index(b"IDAT") - 4
    return png[:at] + _chunk(b"tEXt", b"Comment\x00" + b"x" * 3000) + png[at:]


IMAGES: dict[str, Callable[[], bytes]] = {
    "png rgb": lambda: image_bytes("PNG", (40, 30)),
    "png rgba": lambda: image_bytes("PNG", (5, 9), "RGBA"),
    "png l": lambda: image_bytes("PNG", (5, 9), "L"),
    "png la": lambda: image_bytes("PNG", (5, 9), "LA"),
    "png p": lambda: image_bytes("PNG", (5, 9), "P"),
    "png 1": lambda: image_bytes("PNG", (5, 9), "1"),
    "png i;16": lambda: image_bytes("PNG", (5, 9), "I;16"),
    "png interlaced": lambda: image_bytes("PNG", (12, 12), optimize=False, interlace=1),
    "png text first": _png_with_text_first,
    "png noise": lambda: _noise_png(64),
    "jpeg": lambda: image_bytes("JPEG", (33, 17)),
    "jpeg progressive": lambda: image_bytes("JPEG", (33, 17), progressive=True),
    "jpeg l": lambda: image_bytes("JPEG", (8, 8), "L"),
    "webp": lambda: image_bytes("WEBP", (10, 10)),
    "gif": lambda: image_bytes("GIF", (6, 6), "P"),
    "bmp": lambda: image_bytes("BMP", (6, 6)),
    "not an image": lambda: b"just some bytes, long enough to pass for a header",
}
_CACHE: dict[str, bytes] = {}


def _noise_png(side: int) -> bytes:
    noise = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    return buf.getvalue()


def _image(name: str) -> bytes:
    if name not in _CACHE:
        _CACHE[name] = IMAGES[name]()
    return _CACHE[name]


def _full_decode(payload: str, cap: int, *, lazy: bool) -> Callable[[], BinaryIO]:
    """The data URI's bytes the plain way: the alphabet check, the size, then every
    byte decoded before anything is read."""
    problem = base64_problem(payload)
    if problem:
        raise ImageProblem(problem)
    size = base64_size(payload)
    if size > cap:
        raise ImageProblem(
            f"image is {size:,} bytes, more than the limit of {cap:,} (maxImageBytes)"
        )
    data = binascii.a2b_base64(payload)
    return lambda: io.BytesIO(data)


@contextmanager
def long_way_round() -> Iterator[None]:
    """``check_image`` with every shortcut off: PIL reads each header from the fully
    decoded bytes."""
    with (
        mock.patch.object(images_mod, "_open_payload", _full_decode),
        mock.patch.object(images_mod, "_plain_png", lambda head: None),
    ):
        yield


@st.composite
def data_uris(draw: st.DrawFn) -> tuple[str, int]:
    """A data URI of an image, perhaps damaged in its bytes or its base64, and a
    maxImageBytes near its size."""
    data = bytearray(_image(draw(st.sampled_from(sorted(IMAGES)))))
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, min(len(data) - 1, 80)))  # where the headers are
        data[where] = draw(st.integers(0, 255))
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(1, len(data)))]
    payload = base64.b64encode(bytes(data)).decode()
    if draw(st.integers(0, 3)) == 0:
        where = draw(st.integers(0, len(payload) - 1))
        payload = payload[:where] + draw(st.sampled_from(BAD)) + payload[where + 1 :]
    if draw(st.integers(0, 7)) == 0:
        payload += "===="
    mime = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", ""]))
    cap = len(data) + draw(st.integers(-3, 3))
    return f"data:{mime};base64,{payload}", max(cap, 1)


@given(data_uris())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_default_check_of_a_data_uri_is_that_of_a_full_decode(case: tuple[str, int]) -> None:
    uri, cap = case
    limits = DatasetLimits(max_image_bytes=cap)
    fast = check_image(ImageRef(uri), Path("/"), limits)
    with long_way_round():
        slow = check_image(ImageRef(uri), Path("/"), limits)
    assert fast == slow


def test_the_shortcuts_are_taken() -> None:
    """The comparison above would hold with no shortcut at all: these are the cases
    the shortcuts are for."""
    for name in ("png rgb", "png rgba", "png l", "png la", "png noise"):
        head = _image(name)[:41]
        assert images_mod._plain_png(head) is not None, name
    for name in ("png p", "png 1", "png i;16", "png text first", "jpeg", "webp"):
        assert images_mod._plain_png(_image(name)[:41]) is None, name

    decoded: list[int] = []
    real = binascii.a2b_base64

    def counting(data: str | bytes, **kw: bool) -> bytes:
        out = real(data, **kw)
        decoded.append(len(out))
        return out

    with mock.patch.object(images_mod.binascii, "a2b_base64", counting):
        big = _noise_png(400)  # about 480 kB
        assert check_image(ImageRef(data_uri(big)), Path("/"), DatasetLimits()).errors == ()
        assert sum(decoded) <= 1024
        decoded.clear()
        jpeg = image_bytes("JPEG", (400, 400))
        assert check_image(ImageRef(data_uri(jpeg)), Path("/"), DatasetLimits()).errors == ()
        assert len(jpeg) in decoded  # decoded whole, in one call, to count its scans


# --- the plain-PNG header against PIL ------------------------------------------------


@st.composite
def png_heads(draw: st.DrawFn) -> bytes:
    """The plain PNG layout, with up to two things about it changed."""
    width, height = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
    depth, colour = draw(st.sampled_from(sorted(images_mod._PLAIN_PNG_MODES)))
    compression = filter_method = interlace = 0
    extra, following, flip = b"", b"IDAT", None
    for change in draw(st.lists(st.integers(0, 7), max_size=2)):
        if change == 0:
            depth = draw(st.sampled_from([1, 2, 4, 8, 16, 0, 32]))
        elif change == 1:
            colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
        elif change == 2:
            width, height = draw(st.sampled_from([(0, 5), (5, 0), (1 << 31, 2), (20_000, 20_000)]))
        elif change == 3:
            compression, filter_method, interlace = draw(
                st.sampled_from([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 2)])
            )
        elif change == 4:
            extra = b"\x00"  # a 14-byte IHDR
        elif change == 5:
            following = draw(st.sampled_from([b"tEXt", b"IEND", b"PLTE", b"ID!T", b"idat"]))
        else:
            flip = (draw(st.integers(0, 40)), draw(st.integers(1, 255)))
    ihdr = struct.pack(
        ">IIBBBBB", width, height, depth, colour, compression, filter_method, interlace
    )
    data = bytearray(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr + extra)
        + _chunk(following, zlib.compress(b"\x00" * 8))
        + _chunk(b"IEND", b"")
    )
    if flip is not None:
        data[flip[0]] ^= flip[1]
    return bytes(data)


@given(png_heads())
@settings(max_examples=500, deadline=None)
def test_a_plain_png_header_reads_as_pil_reads_it(data: bytes) -> None:
    fast = images_mod._plain_png(data[:41])
    if fast is None:
        return
    im = images_mod._open_header(io.BytesIO(data))  # raises where PIL would refuse
    assert fast == ImageInfo(str(im.format), im.size[0], im.size[1], im.mode)


def test_the_plain_png_shortcut_leaves_bombs_to_pil() -> None:
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"")
    assert images_mod._plain_png(data) is None
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 99):
        small = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
        assert (
            images_mod._plain_png(data.replace(_chunk(b"IHDR", ihdr), _chunk(b"IHDR", small)))
            is None
        )


# --- damage anywhere in a payload is an error on its line -------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_invalid_base64_anywhere_in_a_payload_is_an_error_on_its_line(
    tmp_path: Path, fmt: str
) -> None:
    data = _noise_png(128) if fmt == "PNG" else image_bytes("JPEG", (128, 128), quality=95)
    good = data_uri(data, f"image/{fmt.lower()}")
    head, _, payload = good.partition(",")
    spoilt = {
        "start": payload[:10] + "!" + payload[11:],
        "middle": payload[: len(payload) // 2] + "-" + payload[len(payload) // 2 + 1 :],
        "near the end": payload[:-6] + "\n" + payload[-5:],
        "padding after a full group": payload.rstrip("=") + "====",
    }
    records = [sft(f"<image>{name}", images=[f"{head},{p}"]) for name, p in spoilt.items()]
    path = write_jsonl(tmp_path / "d.jsonl", [sft("<image>fine", images=[good]), *records])
    report = validate_file(path)
    assert [e.line for e in report.errors] == [2, 3, 4, 5]
    for error, bad in zip(report.errors, spoilt.values(), strict=True):
        assert error.message.endswith(str(base64_problem(bad))), error.message
        assert "invalid base64" in error.message


# --- nesting: the walk, then the count ---------------------------------------------------


def _old_too_deep(data: bytes, value: Any) -> bool:
    if data.count(b"[") + data.count(b"{") <= jsonl.MAX_NESTING:
        return False
    return jsonl.nests_deeper(value, jsonl.MAX_NESTING)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@st.composite
def nested_lines(draw: st.DrawFn) -> bytes:
    """A JSON line nested up to 70 deep, with long strings (cheap to walk) or many
    small values (cheap to count) along the way."""
    leaf: Any = draw(st.sampled_from(["x" * 5000, 1, [], {}, "short"]))
    for _ in range(draw(st.integers(0, 70))):
        fillers: list[list[Any]] = [[], [], ["y" * 3000] * 3, [0] * 400, [[1]] * 400, [{}] * 400]
        filler = draw(st.sampled_from(fillers))
        leaf = [*filler, leaf] if draw(st.booleans()) else {"a": filler, "b": leaf}
    return json.dumps(leaf).encode()


@given(nested_lines())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_nesting_check_is_the_depth(data: bytes) -> None:
    value = json.loads(data)
    deeper = _depth(value) > jsonl.MAX_NESTING
    assert jsonl._too_deep(data, value) == _old_too_deep(data, value) == deeper
    value, error = jsonl.decode_line(data)
    assert (error == jsonl._TOO_DEEP) == deeper
