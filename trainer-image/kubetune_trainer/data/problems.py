"""What reading and validation find: line-numbered problems, and the one exception
the readers raise.

Validation never raises for bad data; it returns ``Problem`` values. Only the
convenience readers the trainer uses (which assume a validated file) raise
``DatasetError``, and its message still names the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]

FILE_LINE = 0
"""The line number of problems that concern the whole file (the example count)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding. ``line`` is 1-based, or ``FILE_LINE`` for the file as a whole."""

    line: int
    message: str
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line != FILE_LINE else "file"
        tag = "warning: " if self.severity == "warning" else ""
        return f"{where}: {tag}{self.message}"


class DatasetError(ValueError):
    """A dataset line (or image) that cannot be used; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(str(Problem(line, message)))
