"""The canonical example every dataset format parses into.

The trainer, the validator and `kubetune convert` consume only these types, so a
new input format is one parser, not a change everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ImageKind = Literal["path", "url", "data"]
Weight = Literal[0, 1]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image as the dataset wrote it: a file path (relative to the image root),
    an http(s) URL, or a base64 ``data:`` URI. Nothing is opened here."""

    source: str
    detail: str | None = None  # content-parts "detail" (low|high|auto), kept for lossless convert

    @property
    def kind(self) -> ImageKind:
        if self.source.startswith("data:"):
            return "data"
        if self.source.startswith(("http://", "https://")):
            return "url"
        return "path"


Part = str | ImageRef


@dataclass(frozen=True, slots=True)
class Turn:
    """One message: its role and its text and images in order.

    ``weight`` is OpenAI's per-message ``weight`` on an assistant turn as the dataset
    wrote it (None where it wrote none): 0 keeps the turn as context only."""

    role: Role
    parts: tuple[Part, ...]
    weight: Weight | None = None

    @property
    def learned(self) -> bool:
        """Whether SFT learns this turn: an assistant turn not weighted 0."""
        return self.role == "assistant" and self.weight != 0

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImageRef))


@dataclass(frozen=True, slots=True)
class Example:
    """A conversation whose last turn is the assistant reply to learn.

    For preference data, ``rejected`` is the dispreferred final assistant turn and
    ``rejected_images``, when given, replace the prompt's images in the rejected
    branch (ms-swift's ``rejected_images``).

    ``extra`` holds the top-level keys no reader interprets (an ``id``, metadata),
    in file order and verbatim, so that ``kubetune convert`` loses nothing."""

    turns: tuple[Turn, ...]
    line: int = 0
    rejected: Turn | None = None
    rejected_images: tuple[ImageRef, ...] | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def prompt(self) -> tuple[Turn, ...]:
        return self.turns[:-1]

    @property
    def chosen(self) -> Turn:
        return self.turns[-1]

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p for t in self.turns for p in t.parts if isinstance(p, ImageRef))

    @property
    def all_images(self) -> tuple[ImageRef, ...]:
        """Every image the example refers to, the rejected branch's included."""
        return self.images + (self.rejected_images or ())
