"""A Dataset's limits, written once as data; the task a dataset is for; how much of a
termination message Kubernetes keeps.

``job.DatasetLimits``, the pydantic model that the CRDs, job.json and the operator
use, is made from ``LIMITS``. This module imports no pydantic so that
``kubetune validate`` can read its flags by the same entries without it: importing
pydantic and building its first models was over half of the command's start-up, and
the start-up over a quarter of its time on 300 MB of embedded images (0.3 of 1.1 s).
``checked_limits`` only accepts what is certainly valid; anything else goes to
``DatasetLimits``, which judges it and words the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final, Literal, Protocol, cast

Task = Literal["sft", "dpo"]

TERMINATION_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Limit:
    """One field of ``DatasetLimits``: its default, bounds (inclusive) and description."""

    default: int | bool
    description: str
    ge: int | None = None
    le: int | None = None

    def allows(self, value: object) -> bool:
        """Whether pydantic would accept ``value`` as it is: exact types only, so that
        nothing it would coerce or refuse passes here."""
        if isinstance(self.default, bool):
            return type(value) is bool
        return (
            type(value) is int
            and (self.ge is None or value >= self.ge)
            and (self.le is None or value <= self.le)
        )


LIMITS: Final[dict[str, Limit]] = {
    "min_examples": Limit(3, "Fewest examples accepted.", ge=1),
    "max_examples": Limit(3_000_000, "Most examples accepted.", ge=1),
    "max_images_per_example": Limit(64, "Most images in one example.", ge=0, le=10_000),
    "max_image_bytes": Limit(
        10 * 1024 * 1024,
        "Largest encoded image, in bytes (files, downloads and data: URIs).",
        ge=1,
    ),
    "allow_remote_images": Limit(
        False,
        "Allow http(s) image URLs. Even then, loopback, link-local, private and cloud "
        "metadata addresses are refused.",
    ),
}
"""``DatasetLimits``' fields by their Python names, in its order."""


def count_bounds_problem(min_examples: int, max_examples: int) -> str | None:
    """The one rule across the limits (``DatasetLimits`` raises it as its error)."""
    if min_examples > max_examples:
        return "minExamples must not exceed maxExamples"
    return None


class Limits(Protocol):
    """What reading a dataset needs of its limits: a ``DatasetLimits``, or the values
    ``checked_limits`` accepted."""

    @property
    def min_examples(self) -> int: ...
    @property
    def max_examples(self) -> int: ...
    @property
    def max_images_per_example(self) -> int: ...
    @property
    def max_image_bytes(self) -> int: ...
    @property
    def allow_remote_images(self) -> bool: ...


def checked_limits(given: dict[str, object]) -> Limits | None:
    """The limits with ``given`` (by Python name) over the defaults, when every value is
    one that ``DatasetLimits`` accepts unchanged; None when it might not, for
    ``DatasetLimits`` to decide."""
    if any(name not in LIMITS or not LIMITS[name].allows(v) for name, v in given.items()):
        return None
    values = {name: given.get(name, limit.default) for name, limit in LIMITS.items()}
    # The types were checked just above, each against its field's default.
    limits = cast(Limits, SimpleNamespace(**values))
    if count_bounds_problem(limits.min_examples, limits.max_examples):
        return None
    return limits


DEFAULT_LIMITS: Final[Limits] = cast(
    Limits, SimpleNamespace(**{name: limit.default for name, limit in LIMITS.items()})
)
"""``DatasetLimits()``'s values, for readers given none."""
