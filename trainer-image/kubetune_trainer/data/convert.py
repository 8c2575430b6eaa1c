"""`kubetune convert`: canonical examples out as either style, losslessly.

Writing is the inverse of ``formats.parse_record`` for every valid example:
``parse_record(to_json_record(e, style)) == e`` for both styles (the round-trip tests
hold this). Two kubetune extensions make that possible where the hosted formats
have no field: ``image_details`` carries content-part ``detail`` values in
placeholder style, and ``rejected_images`` is kept in content-part style. OpenAI's
per-message ``weight`` is written in both styles.

Output is atomic: it goes to a temporary file next to OUT that replaces OUT only
when every line converted, so a failed run never leaves a half-written OUT.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, get_args

from kubetune_trainer.contract.limits import DEFAULT_LIMITS, Limits
from kubetune_trainer.data.example import Example, ImageRef, Part, Turn
from kubetune_trainer.data.formats import PLACEHOLDER
from kubetune_trainer.data.images import image_bytes
from kubetune_trainer.data.jsonl import DEFAULT_BUDGET, LineBudget, encode_record
from kubetune_trainer.data.problems import DatasetError, Problem
from kubetune_trainer.data.reader import Record, iter_records

Style = Literal["placeholder", "content-parts"]
STYLES: Final[tuple[str, ...]] = get_args(Style)


# --- one example to one JSON object ------------------------------------------------


def to_json_record(example: Example, style: Style) -> dict[str, Any]:
    """The JSON object for one example in the given style."""
    record = _placeholder_record(example) if style == "placeholder" else _content_record(example)
    record.update(example.extra)
    return record


def _placeholder_record(example: Example) -> dict[str, Any]:
    images = example.images
    record: dict[str, Any] = {
        "messages": [_message(t, _placeholder_text(t.parts)) for t in example.turns]
    }
    if images:
        record["images"] = [img.source for img in images]
        if any(img.detail is not None for img in images):
            record["image_details"] = [img.detail for img in images]
    if example.rejected is not None:
        record["rejected_response"] = example.rejected.text
    if example.rejected_images is not None:
        record["rejected_images"] = [img.source for img in example.rejected_images]
    return record


def _placeholder_text(parts: tuple[Part, ...]) -> str:
    return "".join(PLACEHOLDER if isinstance(p, ImageRef) else p for p in parts)


def _content_record(example: Example) -> dict[str, Any]:
    messages = [_content_message(t) for t in example.turns]
    record: dict[str, Any]
    if example.rejected is None:
        record = {"messages": messages}
    else:  # the OpenAI preference layout
        record = {
            "input": {"messages": messages[:-1]},
            "preferred_output": messages[-1:],
            "non_preferred_output": [_content_message(example.rejected)],
        }
    if example.rejected_images is not None:
        record["rejected_images"] = [img.source for img in example.rejected_images]
    return record


def _content_message(turn: Turn) -> dict[str, Any]:
    if not turn.images:
        return _message(turn, turn.text)
    return _message(turn, [_content_part(p) for p in turn.parts])


def _message(turn: Turn, content: str | list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": content}
    if turn.weight is not None:
        message["weight"] = turn.weight
    return message


def _content_part(part: Part) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    image: dict[str, Any] = {"url": part.source}
    if part.detail is not None:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


# --- embedding -------------------------------------------------------------------


def embed_example_images(example: Example, image_root: Path, limits: Limits) -> Example:
    """The example with file (and, where allowed, remote) images as ``data:`` URIs.
    Raises ``DatasetError`` for an image that breaks a rule."""

    def embed(ref: ImageRef) -> ImageRef:
        if ref.kind == "data" or (ref.kind == "url" and not limits.allow_remote_images):
            return ref
        data, mime = image_bytes(ref, image_root, limits, line=example.line)
        return ImageRef(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", ref.detail)

    def embed_turn(turn: Turn) -> Turn:
        return replace(
            turn, parts=tuple(embed(p) if isinstance(p, ImageRef) else p for p in turn.parts)
        )

    rejected_images = example.rejected_images
    return replace(
        example,
        turns=tuple(embed_turn(t) for t in example.turns),
        rejected_images=None
        if rejected_images is None
        else tuple(embed(r) for r in rejected_images),
    )


# --- files -----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only if the block finishes without an
    exception; otherwise it disappears and ``path`` is untouched."""
    import tempfile  # here: `kubetune validate` imports this module, and never writes

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp:
            yield fp
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would surprise whoever reads the output
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_examples(
    examples: Iterable[Example],
    path: str | Path,
    style: Style,
    embed_images: bool = False,
    image_root: str | Path | None = None,
    limits: Limits | None = None,
    budget: LineBudget | None = None,
) -> int:
    """Write examples as JSONL in ``style``, atomically; returns how many.

    With ``embed_images``, image files under ``image_root`` (and URLs, if
    ``limits.allow_remote_images``) become ``data:`` URIs. With ``budget``, a line
    that a reader with that budget would refuse is a ``DatasetError``. A
    ``DatasetError`` leaves ``path`` as it was."""
    limits = limits or DEFAULT_LIMITS
    if embed_images and image_root is None:
        raise ValueError("embedding images needs the image_root that relative paths resolve under")
    # Not resolved here: the image-root guard (images.resolve_image_root) must see a
    # symlinked root to refuse it.
    root = Path(image_root).absolute() if image_root is not None else Path.cwd()
    count = 0
    with atomic_output(path) as fp:
        for example in examples:
            if embed_images:
                example = embed_example_images(example, root, limits)
            line = encode_record(to_json_record(example, style))
            problem = budget.problem(line) if budget is not None else None
            if problem is not None:
                raise DatasetError(example.line, f"once converted, the {problem}")
            fp.write(line + b"\n")
            count += 1
            del example, line  # not held while the next example is read
    return count


@dataclass(frozen=True, slots=True)
class ConvertResult:
    examples: int
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


class _Rejected(Exception):
    """Internal: the input had errors, so the output is discarded."""


def convert_file(
    src: str | Path,
    dst: str | Path,
    style: Style,
    *,
    embed_images: bool = False,
    image_root: str | Path | None = None,
    limits: Limits | None = None,
    budget: LineBudget = DEFAULT_BUDGET,
) -> ConvertResult:
    """Convert a dataset file. Every line is read so that all errors are reported;
    ``dst`` is written only when there are none. ``budget`` bounds the lines read
    and the lines written, so that the output can be validated with it. Raises
    ``OSError`` only for a file that cannot be read or written (a usage error)."""
    src = Path(src)
    limits = limits or DEFAULT_LIMITS
    root = Path(image_root if image_root is not None else src.parent).absolute()
    errors: list[Problem] = []
    warnings: list[Problem] = []

    def examples(fp: BinaryIO) -> Iterator[Example]:
        for item in iter_records(fp, limits=limits, budget=budget):
            if isinstance(item, Record):
                if errors:
                    continue  # keep reading to report every error, but write no more
                example = item.example
                if embed_images:
                    try:
                        example = embed_example_images(example, root, limits)
                    except DatasetError as exc:
                        errors.append(Problem(exc.line, exc.message))
                        continue
                yield example
                del item, example  # not held while the next line is read
            elif item.is_error:
                errors.append(item)
            else:
                warnings.append(item)
        if errors:
            raise _Rejected

    count = 0
    with src.open("rb") as fp:
        pending = examples(fp)
        try:
            count = write_examples(pending, dst, style, budget=budget)
        except DatasetError as exc:  # a converted line too big to read back
            errors.append(Problem(exc.line, exc.message))
            with contextlib.suppress(_Rejected):
                for _ in pending:  # only collects the remaining errors now
                    pass
        except _Rejected:
            pass
    return ConvertResult(count, tuple(errors), tuple(warnings))
