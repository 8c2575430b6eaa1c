"""Image rules: root confinement, base64, formats, modes, decompression bombs, and
that the default check reads headers only."""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import pytest
from data_helpers import data_uri, image_bytes, png_header_only
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import DatasetError, ImageRef, check_image, open_image
from kubetune_trainer.data import image_bytes as read_image_bytes
from kubetune_trainer.data import images as images_mod
from kubetune_trainer.data.images import (
    Base64Reader,
    ImageProblem,
    base64_problem,
    base64_size,
    resolve_image_path,
)

LIMITS = DatasetLimits()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "outside.png").write_bytes(image_bytes("PNG"))
    return root.resolve()


def check(
    source: str, root: Path, limits: DatasetLimits = LIMITS, deep: bool = False
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    result = check_image(ImageRef(source), root, limits, deep=deep)
    return result.errors, result.warnings


# --- paths -----------------------------------------------------------------------


def test_relative_and_absolute_paths_inside_the_root_resolve(root: Path) -> None:
    assert resolve_image_path("sub/a.png", root) == root / "sub" / "a.png"
    assert resolve_image_path("sub/../sub/a.png", root) == root / "sub" / "a.png"
    assert resolve_image_path(str(root / "sub" / "a.png"), root) == root / "sub" / "a.png"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("../outside.png", "leaves the image root through '..'"),
        ("sub/../../outside.png", "leaves the image root through '..'"),
        ("/etc/passwd", "absolute path outside the image root"),
        ("file:///etc/passwd", "file: URLs are not supported"),
        ("file:sub/a.png", "file: URLs are not supported"),
        ("gs://bucket/a.png", "gs: URLs are not supported"),
        ("sub/a.png\0.jpg", "NUL"),
        ("sub/missing.png", "image file not found"),
    ],
)
def test_paths_that_escape_or_do_not_exist_are_refused(
    root: Path, source: str, message: str
) -> None:
    with pytest.raises(ImageProblem, match=message.replace("(", r"\(")):
        resolve_image_path(source, root)


def test_absolute_path_to_the_outside_is_refused_even_next_door(root: Path, tmp_path: Path) -> None:
    sibling = tmp_path / "root-evil"  # shares the root's name as a string prefix
    sibling.mkdir()
    (sibling / "x.png").write_bytes(image_bytes("PNG"))
    with pytest.raises(ImageProblem, match="outside the image root"):
        resolve_image_path(str(sibling / "x.png"), root)


def test_symlinks_may_not_point_out(root: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "outside.png", root / "out.png")
    os.symlink(tmp_path, root / "outdir")
    os.symlink(root / "sub" / "a.png", root / "in.png")
    for source in ("out.png", "outdir/outside.png"):
        with pytest.raises(ImageProblem, match="resolves outside the image root"):
            resolve_image_path(source, root)
    assert resolve_image_path("in.png", root) == root / "sub" / "a.png"
    errors, _ = check("out.png", root)
    assert errors == ("the path resolves outside the image root (through a symlink)",)


def test_a_colon_in_a_file_name_is_a_path(root: Path) -> None:
    (root / "a:b.png").write_bytes(image_bytes("PNG"))
    assert check("a:b.png", root) == ((), ())


def test_not_a_regular_file(root: Path) -> None:
    assert check("sub", root)[0] == ("the image path is not a regular file",)


def test_file_size_limit(root: Path) -> None:
    size = (root / "sub" / "a.png").stat().st_size
    errors, _ = check("sub/a.png", root, DatasetLimits(max_image_bytes=size - 1))
    assert errors and "more than the limit" in errors[0]
    assert check("sub/a.png", root, DatasetLimits(max_image_bytes=size)) == ((), ())


# --- base64 ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"a", b"ab", b"abc", b"abcd", bytes(range(256))])
def test_valid_base64_and_its_size(data: bytes) -> None:
    payload = base64.b64encode(data).decode()
    assert base64_problem(payload) is None
    assert base64_size(payload) == len(data)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("", "empty"),
        ("QUJD!", "unexpected character '!' at character 5"),
        ("QUJ\nD", "unexpected character '\\n'"),
        ("QUJDé===", "unexpected character 'é'"),
        ("QUJDR", "not a multiple of 4"),
        ("QU=D", "misplaced '=' padding at character 3"),
        ("Q===", "misplaced"),
        ("QUJD-_", "unexpected character '-'"),
    ],
)
def test_bad_base64_is_named(payload: str, message: str) -> None:
    problem = base64_problem(payload)
    assert problem is not None and message in problem


@given(
    st.binary(max_size=300),
    st.lists(st.tuples(st.integers(0, 320), st.integers(0, 50)), max_size=8),
)
@settings(max_examples=150, deadline=None)
def test_base64_reader_reads_like_the_decoded_bytes(
    data: bytes, reads: list[tuple[int, int]]
) -> None:
    reader = Base64Reader(base64.b64encode(data).decode())
    for offset, size in reads:
        reader.seek(offset)
        assert reader.read(size) == data[offset : offset + size]
        assert reader.tell() == min(offset + size, max(offset, len(data))) or offset > len(data)
    reader.seek(0)
    assert reader.read() == data


def test_default_check_decodes_only_the_header_of_a_data_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = image_bytes("PNG", (1500, 1500), "RGB", compress_level=0)  # ~6.7 MB
    decoded = 0
    real = binascii.a2b_base64

    def counting(data: str | bytes, **kw: bool) -> bytes:
        nonlocal decoded
        out = real(data, **kw)
        decoded += len(out)
        return out

    monkeypatch.setattr(images_mod.binascii, "a2b_base64", counting)
    result = check_image(ImageRef(data_uri(big)), Path("/"), LIMITS)
    assert result.errors == () and result.info is not None and result.info.width == 1500
    assert decoded < 64 * 1024


def test_default_mode_never_decodes_pixels_and_deep_mode_does(
    monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    calls = []
    real = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        calls.append(self.format)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    assert check("sub/a.png", root) == ((), ())
    assert check(data_uri(image_bytes("JPEG"), "image/jpeg"), root) == ((), ())
    assert calls == []
    assert check("sub/a.png", root, deep=True) == ((), ())
    assert calls == ["PNG"]


# --- formats, modes, bombs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_allowed_formats(fmt: str, mime: str, root: Path) -> None:
    for deep in (False, True):
        assert check(data_uri(image_bytes(fmt), mime), root, deep=deep) == ((), ())


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("ICO", "RGBA"), ("PPM", "RGB")],
)
def test_other_formats_are_named(fmt: str, mode: str, root: Path) -> None:
    errors, _ = check(data_uri(image_bytes(fmt, (16, 16), mode), "image/x"), root)
    assert errors == (f"{fmt} images are not supported; use JPEG, PNG or WEBP",)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "1", "I;16"])
def test_modes_other_than_rgb_warn(mode: str, root: Path) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    errors, warnings = check(data_uri(image_bytes(fmt, (4, 4), mode), f"image/{fmt.lower()}"), root)
    assert errors == ()
    assert warnings == (f"image mode {mode} is converted to RGB at training time",)


def test_mime_prefix_disagreeing_with_the_bytes_warns(root: Path) -> None:
    assert check(data_uri(image_bytes("PNG"), "image/webp"), root)[1] == (
        "the data: URI says image/webp but the bytes are PNG",
    )
    assert check(data_uri(image_bytes("JPEG"), "image/jpg"), root) == ((), ())  # a common alias
    assert check("data:;base64," + base64.b64encode(image_bytes("PNG")).decode(), root) == ((), ())


@pytest.mark.parametrize("size", [(60_000, 60_000), (10_000, 9_000), (100_000, 1_000)])
def test_decompression_bombs_are_refused_without_decoding(
    size: tuple[int, int], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(self: ImageFile.ImageFile) -> None:
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    monkeypatch.setattr(ImageFile.ImageFile, "verify", never)
    (root / "bomb.png").write_bytes(png_header_only(*size))
    for source in ("bomb.png", data_uri(png_header_only(*size))):
        for deep in (False, True):
            errors, _ = check(source, root, deep=deep)
            assert len(errors) == 1 and "decompression bomb" in errors[0], errors


def test_the_pixel_cap_holds_even_if_pil_limit_is_lifted(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    errors, _ = check(data_uri(png_header_only(20_000, 20_000)), root)
    assert errors and "decompression bomb" in errors[0] and "20000 x 20000" in errors[0]


def test_broken_images(root: Path) -> None:
    good = image_bytes("PNG", (64, 64))
    assert check(data_uri(b"not an image at all"), root)[0] == (
        "not a recognisable image (JPEG, PNG or WEBP expected)",
    )
    assert "does not open" in check(data_uri(good[:30]), root)[0][0]
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    truncated = data_uri(buf.getvalue()[:-500])
    assert check(truncated, root) == ((), ())  # the header is fine
    errors, _ = check(truncated, root, deep=True)
    assert errors and "does not decode" in errors[0]


# --- the trainer's API ---------------------------------------------------------------


def test_open_image_returns_a_loaded_image(root: Path) -> None:
    im = open_image(ImageRef("sub/a.png"), root)
    assert im.size == (8, 6) and im.mode == "RGB" and im.format == "PNG"
    im.getpixel((0, 0))  # loaded; no file handle needed
    im2 = open_image(ImageRef(data_uri(image_bytes("WEBP", (5, 3)), "image/webp")), root)
    assert im2.size == (5, 3) and im2.format == "WEBP"
    gray = open_image(ImageRef(data_uri(image_bytes("PNG", (3, 3), "L"))), root)
    assert gray.mode == "L"  # not converted here


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("../outside.png", "leaves the image root"),
        ("https://example.com/a.png", "remote image URLs are not allowed"),
        ("data:image/png;base64,!!!!", "invalid base64"),
    ],
)
def test_open_image_enforces_the_rules(root: Path, source: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        open_image(ImageRef(source), root, line=12)
    assert info.value.line == 12 and str(info.value).startswith("line 12: ")


def test_open_image_refuses_bombs(root: Path) -> None:
    with pytest.raises(DatasetError, match="decompression bomb"):
        open_image(ImageRef(data_uri(png_header_only(50_000, 50_000))), root)


def test_image_bytes_for_embedding(root: Path) -> None:
    data, mime = read_image_bytes(ImageRef("sub/a.png"), root)
    assert data == (root / "sub" / "a.png").read_bytes() and mime == "image/png"
