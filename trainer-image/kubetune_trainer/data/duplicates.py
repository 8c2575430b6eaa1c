"""Spotting exact duplicate lines in bounded memory.

A Python set of digests costs about 100 bytes an entry, which for millions of lines
breaks the validator's memory budget. This table keeps a 64-bit fingerprint and the
first line number per slot in two flat arrays (12 bytes a slot, open addressing with
linear probing, at most 3/4 full): 3,000,000 lines fit in 50 MB.

Tradeoff: fingerprints are compared, not the lines, so two different lines could
be reported as duplicates with a probability of about n**2 / 2**65 (under 1e-6 for
3 million lines). The result is only a warning, which makes that acceptable.
Beyond ``limit`` distinct lines nothing more is remembered; lookups continue.
"""

from __future__ import annotations

from array import array

DEFAULT_LIMIT = 3_000_000
_EMPTY = 0
_INITIAL_SLOTS = 1 << 12


class FingerprintTable:
    """Remembers (fingerprint, first line) pairs; ``add`` says whether it was seen."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.count = 0
        self._keys = array("q", bytes(8 * _INITIAL_SLOTS))
        self._lines = array("I", bytes(4 * _INITIAL_SLOTS))

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def add(self, fingerprint: int, line: int) -> int | None:
        """The line where ``fingerprint`` was first seen, or None (and remember it)."""
        key = self._key(fingerprint)
        keys = self._keys
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = keys[slot]
            if found == key:
                return self._lines[slot]
            if found == _EMPTY:
                break
            slot = (slot + 1) & mask
        if self.full:
            return None
        keys[slot] = key
        self._lines[slot] = min(line, 0xFFFFFFFF)
        self.count += 1
        if self.count * 4 >= len(keys) * 3:
            self._grow()
        return None

    @staticmethod
    def _key(fingerprint: int) -> int:
        # Fold into a signed 64-bit value; 0 marks an empty slot, so it moves to 1.
        key = (fingerprint + (1 << 63)) % (1 << 64) - (1 << 63)
        return key or 1

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        size = len(old_keys) * 2
        mask = size - 1
        keys = array("q", bytes(8 * size))
        lines = array("I", bytes(4 * size))
        for key, line in zip(old_keys, old_lines, strict=True):
            if key != _EMPTY:
                slot = key & mask
                while keys[slot] != _EMPTY:
                    slot = (slot + 1) & mask
                keys[slot] = key
                lines[slot] = line
        self._keys, self._lines = keys, lines
