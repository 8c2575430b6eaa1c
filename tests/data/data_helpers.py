"""Shared helpers for the dataset tests: small images and JSONL files."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image


def image_bytes(
    fmt: str = "PNG", size: tuple[int, int] = (8, 6), mode: str = "RGB", **save: Any
) -> bytes:
    """A small image in the given format; the colour varies with the size."""
    color: Any = (size[0] * 7 % 256, size[1] * 13 % 256, 90)
    if mode in ("L", "P", "1"):
        color = 128
    elif mode == "LA":
        color = (128, 200)
    elif mode.startswith("I"):
        color = 1000
    elif mode == "RGBA":
        color = (*color, 200)
    elif mode == "CMYK":
        color = (10, 20, 30, 40)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with an empty image stream: a
    decompression bomb's shape, without the bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def sft(user: Any = "hi", reply: str = "hello", **extra: Any) -> dict[str, Any]:
    """A minimal placeholder-style example."""
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
        **extra,
    }


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Records as JSONL; a str or bytes record is written verbatim as the line."""
    with path.open("wb") as fp:
        for record in records:
            if isinstance(record, bytes):
                fp.write(record + b"\n")
            elif isinstance(record, str):
                fp.write(record.encode("utf-8") + b"\n")
            else:
                fp.write(json.dumps(record).encode("utf-8") + b"\n")
    return path
