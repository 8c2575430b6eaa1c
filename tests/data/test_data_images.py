"""Image rules: root confinement (of paths, and of the root to its volume), base64,
formats, modes, decompression and scan bombs, and that the default check decodes no
pixels."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from pathlib import Path

import pytest
from data_helpers import data_uri, image_bytes, png_header_only, sft, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import DatasetError, ImageRef, check_image, open_image, validate_file
from kubetune_trainer.data import image_bytes as read_image_bytes
from kubetune_trainer.data import images as images_mod
from kubetune_trainer.data.images import (
    MAX_JPEG_SCANS,
    Base64Reader,
    ImageProblem,
    ImageRootError,
    base64_problem,
    base64_size,
    jpeg_scans,
    resolve_image_path,
    resolve_image_root,
    volume_of,
)
from kubetune_trainer.training.images import ImageFitter

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


def test_symlinked_images_may_not_point_out_at_training_time_either(
    root: Path, tmp_path: Path
) -> None:
    os.symlink(tmp_path / "outside.png", root / "out.png")
    with pytest.raises(DatasetError, match="resolves outside the image root") as info:
        ImageFitter(3136)("out.png", str(root), 4)
    assert info.value.line == 4


# --- the image root and its volume ------------------------------------------------


@pytest.fixture
def volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that counts as a mount point, as a dataset's volume in a pod is, with
    an ``images`` folder; beside it, ``outside`` holds ``secret.png``."""
    base = tmp_path.resolve()
    vol = base / "vol"
    (vol / "images").mkdir(parents=True)
    (vol / "images" / "a.png").write_bytes(image_bytes("PNG"))
    (base / "outside").mkdir()
    (base / "outside" / "secret.png").write_bytes(image_bytes("PNG"))
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == vol or real(p))
    return vol


def test_the_volume_is_the_deepest_mount_before_any_symlink(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = volume.parent / "outside"
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) in (volume, elsewhere))
    os.symlink(elsewhere, volume / "link")
    assert volume_of(volume / "images" / "x") == volume
    assert volume_of(volume) == volume
    # The link's target is a mount too, but a symlink is never followed to find it.
    assert volume_of(volume / "link" / "x") == volume
    assert volume_of(elsewhere / "x") == elsewhere


def test_image_roots_inside_their_volume_resolve(volume: Path) -> None:
    assert resolve_image_root(volume / "images") == volume / "images"
    assert resolve_image_root(volume) == volume
    (volume / "shared" / "pictures").mkdir(parents=True)
    os.symlink(volume / "shared" / "pictures", volume / "linked")  # stays in the volume
    assert resolve_image_root(volume / "linked") == volume / "shared" / "pictures"
    os.symlink("../images", volume / "shared" / "up")
    assert resolve_image_root(str(volume / "shared" / "up")) == volume / "images"


@pytest.mark.parametrize("target", ["/", "outside"])
def test_an_image_root_that_is_a_symlink_out_of_its_volume_is_refused(
    volume: Path, target: str
) -> None:
    os.symlink(volume.parent / target, volume / "escape")
    root = volume / "escape"
    with pytest.raises(
        ImageRootError, match=rf"the image root {re.escape(str(root))} resolves to .*, outside"
    ):
        resolve_image_root(root)
    secret = str(volume.parent / "outside" / "secret.png")
    # Training opens images under the same guard: the error names the line and root.
    with pytest.raises(
        DatasetError, match=rf"the image root {re.escape(str(root))} resolves to"
    ) as info:
        open_image(ImageRef(secret), root, line=3)
    assert info.value.line == 3
    with pytest.raises(DatasetError, match="outside its volume") as info:
        ImageFitter(3136)(secret, str(root), 5)
    assert info.value.line == 5
    with pytest.raises(DatasetError, match="outside its volume"):
        read_image_bytes(ImageRef(secret), root, line=6)


def test_an_image_root_below_a_symlinked_folder_out_of_its_volume_is_refused(
    volume: Path,
) -> None:
    os.symlink(volume.parent, volume / "up")
    with pytest.raises(ImageRootError, match="outside its volume"):
        resolve_image_root(volume / "up" / "outside")


def test_a_missing_or_file_image_root(volume: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_image_root(volume / "missing")
    with pytest.raises(NotADirectoryError):
        resolve_image_root(volume / "images" / "a.png")
    with pytest.raises(DatasetError, match=r"the image root .* cannot be used"):
        open_image(ImageRef("a.png"), volume / "missing", line=2)
    # Nothing of an embedded image is read under the root.
    assert open_image(ImageRef(data_uri(image_bytes("PNG"))), volume / "missing").size == (8, 6)


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


# --- JPEG scans --------------------------------------------------------------------


def progressive_jpeg(size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    noisy = Image.effect_noise(size, 60).convert(mode)
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", progressive=True, quality=90)
    return buf.getvalue()


def with_scans(jpeg: bytes, total: int) -> bytes:
    """``jpeg`` with its last scan repeated until it has ``total`` scans: a scan bomb's
    shape. Entropy-coded data holds no 0xFF 0xDA, so the last one starts the last scan,
    which runs to the end-of-image marker."""
    last = jpeg[jpeg.rindex(b"\xff\xda") : -2]
    return jpeg[:-2] + last * (total - jpeg.count(b"\xff\xda")) + jpeg[-2:]


class Trickle(io.RawIOBase):
    """Reads ``data`` at most ``step`` bytes at a time, so that markers fall across reads."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__()
        self._data, self._step, self._pos = data, step, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = (self._pos if whence == io.SEEK_CUR else 0) + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._data[self._pos : self._pos + min(self._step, len(buffer))]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def test_real_jpegs_have_few_scans() -> None:
    assert jpeg_scans(io.BytesIO(image_bytes("JPEG")), MAX_JPEG_SCANS) == 1
    assert jpeg_scans(io.BytesIO(progressive_jpeg()), MAX_JPEG_SCANS) == 10
    assert jpeg_scans(io.BytesIO(progressive_jpeg(mode="L")), MAX_JPEG_SCANS) == 6
    assert jpeg_scans(io.BytesIO(progressive_jpeg(mode="CMYK")), MAX_JPEG_SCANS) == 18


def test_scans_are_counted_as_libjpeg_reads_them() -> None:
    image = progressive_jpeg((64, 48))
    # An APP1 segment holding a thumbnail with scans of its own: skipped by its length.
    thumbnail = with_scans(progressive_jpeg((8, 8)), 50)
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    # Stray bytes and fill bytes before a marker, which libjpeg skips to find it.
    second = image.index(b"\xff\xda", image.index(b"\xff\xda") + 2)
    messy = image[:2] + app1 + image[2:second] + b"\x12\x00\xff\x00\xff\xff" + image[second:]
    assert Image.open(io.BytesIO(messy)).load() is not None  # still a JPEG to PIL
    # Nothing after the end-of-image marker is read.
    bomb_after_the_end = image + with_scans(image, 500)[2:]
    for data, scans in ((messy, 10), (bomb_after_the_end, 10), (with_scans(image, 500), 101)):
        assert jpeg_scans(io.BytesIO(data), MAX_JPEG_SCANS) == scans
        for step in (1, 2, 3, 7):
            assert jpeg_scans(io.BufferedReader(Trickle(data, step), 4), MAX_JPEG_SCANS) == scans


def test_a_scan_bomb_is_refused_by_validation_with_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(self: ImageFile.ImageFile) -> None:
        raise AssertionError("a scan bomb was decoded")

    bomb = with_scans(progressive_jpeg(), 5_000)  # about 240 kB
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    (tmp_path / "ok.jpg").write_bytes(with_scans(progressive_jpeg(), MAX_JPEG_SCANS))
    (tmp_path / "normal.jpg").write_bytes(progressive_jpeg())
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sft("<image>a", images=["normal.jpg"]),
            sft("<image>b", images=["bomb.jpg"]),
            sft("<image>c", images=["ok.jpg"]),
            sft("<image>d", images=[data_uri(bomb, "image/jpeg")]),
        ],
    )
    message = (
        f"refused as a possible scan bomb: the JPEG has more than {MAX_JPEG_SCANS} scans, "
        "and decoding costs a pass over the whole image for each"
    )
    embedded = images_mod.describe(ImageRef(data_uri(bomb, "image/jpeg")))
    expected = [(2, f"image 1 (bomb.jpg): {message}"), (4, f"image 1 ({embedded}): {message}")]
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    assert [(e.line, e.message) for e in validate_file(path).errors] == expected
    monkeypatch.undo()  # deep validation decodes the other two
    assert [(e.line, e.message) for e in validate_file(path, deep=True).errors] == expected


def test_open_image_refuses_scan_bombs_before_decoding(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "ok.jpg").write_bytes(with_scans(progressive_jpeg(), MAX_JPEG_SCANS))
    assert open_image(ImageRef("ok.jpg"), root).size == (16, 16)
    (root / "bomb.jpg").write_bytes(with_scans(progressive_jpeg(), MAX_JPEG_SCANS + 1))

    def never(self: ImageFile.ImageFile) -> None:
        raise AssertionError("a scan bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(DatasetError, match="scan bomb") as info:
        open_image(ImageRef("bomb.jpg"), root, line=9)
    assert info.value.line == 9


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


def test_validation_refuses_an_image_root_that_leaves_its_volume(volume: Path) -> None:
    secret = str(volume.parent / "outside" / "secret.png")
    line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "<image>what?"},
                {"role": "assistant", "content": "a secret"},
            ],
            "images": [secret],
        }
    )
    (volume / "d.jsonl").write_text(line + "\n")
    os.symlink("/", volume / "escape")
    with pytest.raises(ImageRootError, match="outside its volume"):
        validate_file(volume / "d.jsonl", image_root=volume / "escape")
    # The default root, the JSONL's folder, when that folder is a link out of the volume.
    os.symlink(volume.parent / "outside", volume / "data")
    (volume.parent / "outside" / "d.jsonl").write_text(line + "\n")
    with pytest.raises(ImageRootError, match="outside its volume"):
        validate_file(volume / "data" / "d.jsonl")
