"""Images: finding their bytes safely, checking them cheaply, opening them for training.

Where the bytes are: a path under the image root (never outside it, whatever ``..``,
absolute paths or symlinks say), a base64 ``data:`` URI, or an http(s) URL when
remote images are allowed (see ``remote.py``). The image root itself must stay in the
volume that holds it (``resolve_image_root``).

What is checked: the encoded size, the format (JPEG, PNG or WEBP), the pixel count
and a JPEG's number of scans (decompression bombs and scan bombs are refused before
anything is decoded) and the mode. The default check decodes no pixels: PIL's
``Image.open`` is lazy and reads the header only. A data URI's payload is checked
whole, but decoded from base64 only as far as the check reads it: a PNG's header is in
its first bytes (``Base64Reader``), so a 10 MB embedded PNG costs a scan of its
characters and well under a kilobyte of decoding; a JPEG is read to its end, to count
its scans from its markers, and PIL reads a WEBP whole, so those are decoded whole,
which checks the payload in the same pass (``decode_base64``). With pybase64
installed (SIMD base64, about 10 GB/s), every payload is checked by decoding it whole,
faster than the scan alone; validation has the reader do that for long payloads
(``jsonl.decode_shortened``) and hands the bytes to ``check_image``. ``deep=True``
decodes every image fully.
"""

from __future__ import annotations

import binascii
import errno
import hashlib
import io
import os
import re
import stat
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

try:  # optional speed-up (SIMD base64); behaviour is the same without it
    import pybase64
except ImportError:  # pragma: no cover - exercised when pybase64 is absent
    pybase64 = None  # type: ignore[assignment]

from kubetune_trainer.contract.limits import DEFAULT_LIMITS, Limits
from kubetune_trainer.data.example import ImageRef
from kubetune_trainer.data.problems import DatasetError

if TYPE_CHECKING:
    from PIL import Image

# PIL (about 20 ms to import) and ``remote`` (http.client, ssl: about 20 ms) are
# imported where they are first needed: checking embedded PNGs laid out the plain way
# needs neither, and `kubetune validate` starts that much sooner.

ALLOWED_FORMATS: Final = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
MIME_ALIASES: Final = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
TRAINING_MODES: Final = ("RGB", "RGBA")
MAX_IMAGE_PIXELS: Final = 89_478_485
"""Most pixels an image may declare (PIL's own default, about 9459 x 9459). Larger
headers are refused as decompression bombs without decoding anything."""
MAX_JPEG_SCANS: Final = 100
"""Most scans a JPEG may have. Decoding makes a pass over the whole image for each scan
of a progressive JPEG, so a small file that repeats a scan tens of thousands of times
costs CPU-minutes (a scan bomb). libjpeg's standard progression has 10 scans (6 for
greyscale) and encoders that tune theirs (mozjpeg, jpegrescan) stay near that. At this
limit a JPEG makes ten times the passes of libjpeg's progression, and training decodes
it once per run (``training.images.ImageFitter``). libjpeg-turbo can refuse more scans
(``djpeg -maxscans``, ``TJPARAM_SCANLIMIT``) but is unlimited by default, and Pillow
sets no limit."""

_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_BAD_CHAR: Final = re.compile(r"[^A-Za-z0-9+/=]")
_URL_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# A marker as libjpeg finds one: 0xFF, then a code that is neither a stuffed zero nor
# another 0xFF (fill bytes before a marker are skipped the same way).
_JPEG_MARKER: Final = re.compile(rb"\xff[^\x00\xff]")
_JPEG_WITHOUT_LENGTH: Final = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI
_JPEG_EOI: Final = 0xD9
_JPEG_SOS: Final = 0xDA
_JPEG_READ: Final = 1 << 16
_HEADER_READ: Final = 512
"""Bytes decoded at a time from a data URI whose header is read: a PNG's header and
first chunks fit (PIL reads on if they do not), and decoding more than is read costs
more than PIL's own work on the header."""
_READ_WHOLE: Final = frozenset({"JPEG", "WEBP"})
"""Formats whose default check reads every byte: JPEG (the scan count), WEBP (PIL)."""
_SNIFF_CHARS: Final = 16  # base64 characters for the 12 bytes that ``_sniff`` looks at
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG_START: Final = _PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"
_PLAIN_PNG_HEAD: Final = 41  # the signature, IHDR (8 + 13 + 4 bytes), the next chunk's head
# (bit depth, colour type) -> mode, as PIL's PngImagePlugin maps them, for the types
# whose mode no later chunk changes (no palette).
_PLAIN_PNG_MODES: Final = {
    (8, 0): "L",
    (8, 2): "RGB",
    (8, 4): "LA",
    (8, 6): "RGBA",
    (16, 2): "RGB",
    (16, 6): "RGBA",
}


class ImageRootError(OSError):
    """The image root lies outside the volume that holds it."""


class ImageProblem(Exception):
    """Internal: why an image cannot be used. The public functions turn it into an
    error message or a ``DatasetError``."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True, slots=True)
class ImageCheck:
    """The outcome of checking one image."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    info: ImageInfo | None = None
    sha256: str | None = None
    """A downloaded image's digest (remote images only): what the fetch before a run
    checks that it brings the same bytes."""


# --- where the bytes are ---------------------------------------------------------


def resolve_image_root(root: str | Path) -> Path:
    """The image root with its symlinks resolved, which must be a folder in the volume
    that holds it (``volume_of``): a root that is, or passes through, a symlink out of
    the volume would let image paths read anything in the container.

    Raises ``FileNotFoundError`` or ``NotADirectoryError`` for a root that is missing
    or not a folder, and ``ImageRootError`` (naming the root) for one outside its
    volume; all are ``OSError``."""
    nominal = Path(os.path.abspath(root))
    resolved = Path(os.path.realpath(nominal, strict=True))
    if not resolved.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
    volume = volume_of(nominal)
    if not resolved.is_relative_to(volume):
        raise ImageRootError(
            f"the image root {root} resolves to {resolved}, outside its volume {volume}"
        )
    return resolved


def volume_of(path: Path) -> Path:
    """The mount point that the absolute ``path`` lies in as written: the deepest one
    among its leading folders up to the first symlink. In a pod that is the dataset's
    volume (every volume is mounted); a symlink is not followed, since its target may
    be any mount in the container."""
    volume = current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        if current.is_symlink():
            break
        if os.path.ismount(current):
            volume = current
    return volume


def resolve_image_path(source: str, root: Path) -> Path:
    """The file ``source`` names, which must lie under ``root`` (as
    ``resolve_image_root`` returns it).

    Relative paths resolve under the root. Absolute paths are accepted only when they
    point inside it, so a dataset cannot read the validator's or trainer's files."""
    if "\0" in source:
        raise ImageProblem("the image path contains a NUL character")
    scheme = _URL_SCHEME.match(source)
    if scheme and (source[scheme.end() :].startswith("//") or scheme.group(1).lower() == "file"):
        raise ImageProblem(
            f"{scheme.group(1)}: URLs are not supported; use a path, an http(s) URL or a data: URI"
        )
    given = Path(source)
    candidate = given if given.is_absolute() else root / given
    if not Path(os.path.normpath(candidate)).is_relative_to(root):
        if given.is_absolute():
            raise ImageProblem("absolute path outside the image root")
        raise ImageProblem("the path leaves the image root through '..'")
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ImageProblem("image file not found") from None
    except OSError as exc:  # permission, symlink loop, name too long
        raise ImageProblem(f"image file cannot be read: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # symlink loop on older Pythons
        raise ImageProblem(f"image file cannot be read: {exc}") from None
    if not resolved.is_relative_to(root):
        raise ImageProblem("the path resolves outside the image root (through a symlink)")
    return resolved


def split_data_uri(uri: str) -> tuple[str | None, str]:
    """``data:[<mime>][;params];base64,<payload>`` as (mime or None, payload)."""
    head, comma, payload = uri.partition(",")
    if not comma:
        raise ImageProblem("the data: URI has no ',' before its payload")
    return _data_uri_mime(head), payload


def _data_uri_mime(head: str) -> str | None:
    """The MIME type of a data: URI's head (what comes before its first ','), or None."""
    params = head[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageProblem("the data: URI is not base64 (';base64' is missing)")
    mime = params[0].strip().lower()
    return MIME_ALIASES.get(mime, mime) or None


def base64_problem(payload: str) -> str | None:
    """Why ``payload`` is not strict standard base64, or None.

    The common case is one C-speed pass: delete every alphabet byte and look at what
    is left, which for valid input is at most the padding at the very end."""
    if not payload:
        return "the base64 payload is empty"
    if payload.isascii():
        raw = payload.encode("ascii")
        leftover = raw.translate(None, _B64_ALPHABET)
        if leftover in (b"", b"=", b"==") and raw.endswith(leftover):
            if len(raw) % 4:
                return f"invalid base64: {len(raw):,} characters is not a multiple of 4"
            return None
    # Something is wrong; find what, for the message.
    bad = _B64_BAD_CHAR.search(payload)
    if bad is not None:
        return (
            f"invalid base64: unexpected character {bad.group()!r} at character {bad.start() + 1:,}"
        )
    return f"invalid base64: misplaced '=' padding at character {payload.index('=') + 1:,}"


def base64_size(payload: str) -> int:
    """Decoded size of a valid base64 payload, computed without decoding it."""
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0  # no copy
    return len(payload) // 4 * 3 - padding


def decode_base64(payload: str) -> bytes:
    """The bytes of a payload that is strict standard base64 (as ``base64_problem``
    defines it), checked and decoded in one pass; ``ImageProblem`` otherwise.

    binascii's strict mode refuses any character outside the alphabet and any padding
    but at the end. It takes an empty payload, and padding after a complete group
    ("QUJD=", "QUJD===="), which decodes to fewer bytes than the text promises: the
    tests around it refuse those. Whatever it refuses goes to ``base64_problem`` for
    the message."""
    if payload:
        try:
            decoded = binascii.a2b_base64(payload, strict_mode=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            pass
        else:
            if len(decoded) == base64_size(payload):
                return decoded
    problem = base64_problem(payload)
    if problem:
        raise ImageProblem(problem)
    # Valid after all: a binascii stricter than base64_problem (a later Python's).
    return binascii.a2b_base64(payload)


class Base64Reader(io.RawIOBase):
    """A seekable binary stream over base64 text that decodes only what is read."""

    def __init__(self, payload: str) -> None:
        super().__init__()
        self._payload = payload
        self._size = base64_size(payload)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        end = min(self._pos + len(buffer), self._size)
        if end <= self._pos:
            return 0
        # base64 maps each 3 bytes to 4 characters: decode the covering quads only.
        first, last = self._pos // 3, (end + 2) // 3
        chunk = binascii.a2b_base64(self._payload[first * 4 : last * 4])
        data = chunk[self._pos - first * 3 : end - first * 3]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True, slots=True)
class _Source:
    """An image's bytes, found and size-checked but not yet read."""

    open: Callable[[], BinaryIO]
    declared_mime: str | None = None
    sha256: str | None = None


def fetched_name(url: str) -> str:
    """The file a remote image is fetched to before a run, in the run's folder of them."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def remote_images_sha256(images: Mapping[str, str]) -> str:
    """One digest of a file's remote images (URL -> the SHA-256 of its bytes): what
    validation saw, against which the fetch before a run checks what it brought."""
    digest = hashlib.sha256()
    for url in sorted(images):
        digest.update(f"{url}\t{images[url]}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _locate(
    ref: ImageRef,
    root: Path,
    limits: Limits,
    *,
    lazy: bool,
    fetched: Path | None = None,
    decoded: bytes | None = None,
) -> _Source:
    """Where ``ref``'s bytes are. A URL is downloaded, unless ``fetched`` names the
    folder it was fetched to before the run (``fetched_name``). ``decoded`` is a data
    URI's payload that the reader has checked as strict base64 and decoded."""
    cap = limits.max_image_bytes
    kind = ref.kind
    if decoded is not None and kind == "data":
        _check_size(len(decoded), cap)
        mime = _data_uri_mime(ref.source[: ref.source.index(",")])
        return _Source(lambda: io.BytesIO(decoded), mime)
    if kind == "data":
        mime, payload = split_data_uri(ref.source)
        return _Source(_open_payload(payload, cap, lazy=lazy), mime)
    if kind == "url":
        if not limits.allow_remote_images:
            raise ImageProblem("remote image URLs are not allowed (allowRemoteImages is off)")
        if fetched is not None:
            path = fetched / fetched_name(ref.source)
            if not path.exists():
                raise ImageProblem("the remote image was not fetched before the run")
            return _file_source(path, cap)
        from kubetune_trainer.data import remote

        try:
            body = remote.fetch(ref.source, cap)
        except remote.RemoteImageError as exc:
            raise ImageProblem(f"remote image refused: {exc}") from None
        return _Source(lambda: io.BytesIO(body), sha256=hashlib.sha256(body).hexdigest())
    return _file_source(resolve_image_path(ref.source, root), cap)


def _file_source(path: Path, cap: int) -> _Source:
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageProblem(f"image file cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageProblem("the image path is not a regular file")
    _check_size(st.st_size, cap)
    return _Source(lambda: open(path, "rb"))


def _open_payload(payload: str, cap: int, *, lazy: bool) -> Callable[[], BinaryIO]:
    """How to read a data URI's bytes, once the whole payload is known to be valid
    base64 of at most ``cap`` bytes (else ``ImageProblem``, the base64 one first).

    Both ways pass over every character once. A payload whose check reads only a
    header (``lazy``, and not a format in ``_READ_WHOLE``) is decoded whole by
    pybase64 where it is installed (``_simd_decode``, faster than any check without
    it); else it is checked by ``base64_problem``, several times faster than decoding,
    and decoded as far as it is read. Any other is decoded whole by ``decode_base64``,
    which checks it too. (Validation has most payloads checked and decoded by the time
    it reads their line: ``jsonl.decode_shortened``.)"""
    size = base64_size(payload)
    if size > cap:
        problem = base64_problem(payload)
        raise ImageProblem(problem) if problem else _too_big(size, cap)
    if lazy and _sniff(_decode_prefix(payload)) not in _READ_WHOLE:
        whole = _simd_decode(payload)
        if whole is not None:
            return lambda: io.BytesIO(whole)
        problem = base64_problem(payload)
        if problem:
            raise ImageProblem(problem)
        return lambda: io.BufferedReader(Base64Reader(payload), _HEADER_READ)
    decoded = decode_base64(payload)
    return lambda: io.BytesIO(decoded)


def _simd_decode(payload: str) -> bytes | None:
    """The bytes of ``payload`` if it is strict standard base64 (as ``base64_problem``
    defines it), decoded by pybase64's SIMD decoder; None when pybase64 is absent or
    refuses it (``base64_problem`` then says why, or finds it valid after all).

    Its strict mode (``validate=True``) refuses every character outside the alphabet
    and padding anywhere but at the end; the length checks refuse what it might take
    that ``base64_problem`` does not (a length that is not a multiple of 4, padding
    after a complete group). Decoding whole at about 10 GB/s is several times faster
    than ``base64_problem``'s scan, and leaves no header to decode lazily."""
    if pybase64 is None or not payload or len(payload) % 4:
        return None
    try:
        decoded: bytes = pybase64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        return None
    return decoded if len(decoded) == base64_size(payload) else None


def _decode_prefix(payload: str) -> bytes:
    """The first bytes of a payload that may not be valid base64 (then whatever they
    decode to, or nothing: its check reports it)."""
    try:
        return binascii.a2b_base64(payload[:_SNIFF_CHARS])
    except ValueError:
        return b""


def _check_size(size: int, cap: int) -> None:
    if size > cap:
        raise _too_big(size, cap)


def _too_big(size: int, cap: int) -> ImageProblem:
    return ImageProblem(f"image is {size:,} bytes, more than the limit of {cap:,} (maxImageBytes)")


# --- what the bytes are ----------------------------------------------------------


def _open_header(fp: BinaryIO) -> Image.Image:
    """PIL's lazy open (header only), with decompression bombs refused."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"refused as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        fp.seek(0)
        claimed = _sniff(fp.read(16))
        if claimed:  # PIL gives up on a damaged header the same way as on a non-image
            raise ImageProblem(
                f"the {claimed} image does not open: its header is damaged"
            ) from None
        raise ImageProblem("not a recognisable image (JPEG, PNG or WEBP expected)") from None
    except Exception as exc:  # PIL raises many types for malformed headers
        raise ImageProblem(f"the image does not open: {_exc_text(exc)}") from None
    if im.format not in ALLOWED_FORMATS:
        raise ImageProblem(f"{im.format} images are not supported; use JPEG, PNG or WEBP")
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageProblem(
            f"refused as a possible decompression bomb: {width} x {height} pixels is more "
            f"than {MAX_IMAGE_PIXELS:,}"
        )
    if width < 1 or height < 1:
        raise ImageProblem(f"the image is {width} x {height} pixels")
    if im.format == "JPEG":
        _check_scans(fp)
    return im


def _check_scans(fp: BinaryIO) -> None:
    header_end = fp.tell()
    fp.seek(0)
    scans = jpeg_scans(fp, MAX_JPEG_SCANS)
    fp.seek(header_end)  # where PIL's lazy image left it
    if scans > MAX_JPEG_SCANS:
        raise ImageProblem(
            f"refused as a possible scan bomb: the JPEG has more than {MAX_JPEG_SCANS} "
            "scans, and decoding costs a pass over the whole image for each"
        )


def jpeg_scans(fp: BinaryIO, stop_after: int) -> int:
    """How many scans (SOS segments) the JPEG that ``fp`` reads has, counting no further
    than ``stop_after + 1``. Nothing is decoded: the markers are walked as libjpeg reads
    them. A segment's body is skipped by its length (an EXIF thumbnail's scans are not
    the image's), and the bytes after it (a scan's entropy-coded data, or stray bytes)
    are searched for the next marker, up to the end of the image (EOI)."""
    buf, pos, scans = b"", 0, 0
    while scans <= stop_after:
        found = _JPEG_MARKER.search(buf, pos)
        if found is None:
            # A final 0xFF not yet passed may start a marker that the next read ends.
            tail = buf[max(pos, len(buf) - 1) :]
            chunk = fp.read(_JPEG_READ)
            if not chunk:
                return scans
            buf, pos = (tail if tail == b"\xff" else b"") + chunk, 0
            continue
        pos = found.end()
        code = buf[pos - 1]
        if code == _JPEG_EOI:
            return scans
        if code in _JPEG_WITHOUT_LENGTH:
            continue
        while len(buf) - pos < 2:
            chunk = fp.read(_JPEG_READ)
            if not chunk:
                return scans
            buf, pos = buf[pos:] + chunk, 0
        scans += code == _JPEG_SOS
        # The length counts its own two bytes; libjpeg consumes those even when it
        # says less.
        pos += max(2, int.from_bytes(buf[pos : pos + 2], "big"))
        if pos > len(buf):
            fp.seek(pos - len(buf), io.SEEK_CUR)
            buf, pos = b"", 0
    return scans


def _plain_png(head: bytes) -> ImageInfo | None:
    """What ``_open_header`` finds in a PNG laid out the plain way, without PIL: the
    signature, a 13-byte IHDR chunk whose CRC is right, a filter method of 0 and a
    bit depth and colour type in ``_PLAIN_PNG_MODES``, then IDAT, for at most as many
    pixels as both PIL and ``MAX_IMAGE_PIXELS`` allow. Those are all PIL reads of such
    a file before it answers. None for any other bytes, which PIL then reads.

    PIL's header reading costs about 40 us an image; on noise PNGs, where little else
    is left, that was a tenth of the validator's time."""
    if len(head) < _PLAIN_PNG_HEAD or not head.startswith(_PLAIN_PNG_START):
        return None
    width, height, depth, colour, _, filter_method = struct.unpack_from(">IIBBBB", head, 16)
    mode = _PLAIN_PNG_MODES.get((depth, colour))
    cap = min(MAX_IMAGE_PIXELS, _pil_pixel_cap() or MAX_IMAGE_PIXELS)
    if (
        mode is None
        or filter_method
        or not 0 < width * height <= cap
        or head[37:41] != b"IDAT"
        or zlib.crc32(head[12:29]) != int.from_bytes(head[29:33], "big")
    ):
        return None
    return ImageInfo("PNG", width, height, mode)


def _pil_pixel_cap() -> int | None:
    """PIL's ``Image.MAX_IMAGE_PIXELS`` as it stands, without importing PIL: until
    something imports it, nothing can have changed it from its default, which is
    ``MAX_IMAGE_PIXELS``."""
    pil = sys.modules.get("PIL.Image")
    return MAX_IMAGE_PIXELS if pil is None else pil.MAX_IMAGE_PIXELS


def _sniff(prefix: bytes) -> str | None:
    """The allowed format whose signature ``prefix`` starts with, if any."""
    if prefix.startswith(_PNG_SIGNATURE):
        return "PNG"
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WEBP"
    return None


def _decode_fully(source: _Source) -> None:
    """``verify()`` (checksums, structure), then a full decode on a fresh handle, as
    PIL requires after verify."""
    try:
        with source.open() as fp:
            _open_header(fp).verify()
        with source.open() as fp:
            _open_header(fp).load()
    except ImageProblem:
        raise
    except Exception as exc:
        raise ImageProblem(f"the image does not decode: {_exc_text(exc)}") from None


def _exc_text(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _inspect(source: _Source, *, deep: bool) -> tuple[ImageInfo, list[str]]:
    with source.open() as fp:
        info = _plain_png(fp.read(_PLAIN_PNG_HEAD))
        if info is None:
            fp.seek(0)
            im = _open_header(fp)
            info = ImageInfo(str(im.format), im.size[0], im.size[1], im.mode)
    if deep:
        _decode_fully(source)
    warns = []
    if info.mode not in TRAINING_MODES:
        warns.append(f"image mode {info.mode} is converted to RGB at training time")
    actual = ALLOWED_FORMATS[info.format]
    if source.declared_mime and source.declared_mime != actual:
        warns.append(f"the data: URI says {source.declared_mime} but the bytes are {info.format}")
    return info, warns


# --- the public operations -------------------------------------------------------


def check_image(
    ref: ImageRef,
    image_root: Path,
    limits: Limits,
    *,
    deep: bool = False,
    decoded: bytes | None = None,
) -> ImageCheck:
    """Check one image; never raises. ``image_root`` is as ``resolve_image_root``
    returns it (validation resolves it once, not for every image). ``decoded``, for a
    data URI, is its payload's bytes when reading the line has already checked that
    payload as strict base64 and decoded it (``jsonl.decode_shortened``): the same check
    follows, without doing that again."""
    try:
        source = _locate(ref, image_root, limits, lazy=not deep, decoded=decoded)
        info, warns = _inspect(source, deep=deep)
    except ImageProblem as exc:
        return ImageCheck(errors=(str(exc),))
    except OSError as exc:  # unreadable file: permissions, I/O errors
        return ImageCheck(errors=(f"image file cannot be read: {exc.strerror or exc}",))
    return ImageCheck(warnings=tuple(warns), info=info, sha256=source.sha256)


def open_image(
    ref: ImageRef,
    image_root: Path,
    limits: Limits | None = None,
    *,
    fetched: Path | None = None,
    line: int = 0,
) -> Image.Image:
    """The image, decoded (``load()`` done) but not converted: under the same rules
    as validation (root confinement, size cap, remote rules, format, pixel and scan
    caps). A remote image is read from ``fetched``, where the step before the run put
    it: training opens no connection. Raises ``DatasetError`` naming ``line``."""
    limits = limits or DEFAULT_LIMITS
    try:
        if ref.kind == "url" and limits.allow_remote_images and fetched is None:
            raise ImageProblem(
                "remote images are read from where the run fetched them, and it fetched none"
            )
        source = _locate(ref, _root_for(ref, image_root), limits, lazy=False, fetched=fetched)
        with source.open() as fp:
            data = io.BytesIO(fp.read())
        im = _open_header(data)
        im.load()
    except ImageProblem as exc:
        raise DatasetError(line, f"{describe(ref)}: {exc}") from None
    except Exception as exc:
        raise DatasetError(
            line, f"{describe(ref)}: the image does not decode: {_exc_text(exc)}"
        ) from None
    return im


def image_bytes(
    ref: ImageRef, image_root: Path, limits: Limits | None = None, *, line: int = 0
) -> tuple[bytes, str]:
    """The encoded bytes of an image and their MIME type, under the validation rules
    (for ``convert --embed-images``). Raises ``DatasetError`` naming ``line``."""
    limits = limits or DEFAULT_LIMITS
    try:
        source = _locate(ref, _root_for(ref, image_root), limits, lazy=False)
        with source.open() as fp:
            data = fp.read()
        im = _open_header(io.BytesIO(data))
    except ImageProblem as exc:
        raise DatasetError(line, f"{describe(ref)}: {exc}") from None
    except OSError as exc:
        raise DatasetError(
            line, f"{describe(ref)}: image file cannot be read: {exc.strerror or exc}"
        ) from None
    return data, ALLOWED_FORMATS[str(im.format)]


def _root_for(ref: ImageRef, image_root: str | Path) -> Path:
    """The root a reference resolves under: ``resolve_image_root``'s for a path; a data
    URI or URL reads nothing under it, so a missing root does not matter to them."""
    if ref.kind != "path":
        return Path(image_root)
    try:
        return resolve_image_root(image_root)
    except ImageRootError as exc:
        raise ImageProblem(str(exc)) from None
    except OSError as exc:
        raise ImageProblem(
            f"the image root {image_root} cannot be used: {exc.strerror or exc}"
        ) from None


def describe(ref: ImageRef, length: int | None = None) -> str:
    """A short name for an image in messages (data: URIs are not printed whole).
    ``length`` is the length of the data: URI that ``ref.source`` stands in for, if it
    does (``reader.iter_records(stand_ins=True)``)."""
    if ref.kind == "data":
        source = ref.source
        head = source[: source.find(",")] if "," in source else source
        return f"{head[:60]},... ({length or len(source):,} characters)"
    return ref.source if len(ref.source) <= 120 else ref.source[:117] + "..."
