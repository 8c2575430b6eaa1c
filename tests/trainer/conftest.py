"""The fetch tests use the dataset tests' loopback web server
(``tests/data/local_web.py``), so that folder goes on the path too."""

from __future__ import annotations

import sys
from pathlib import Path

DATA_TESTS = str(Path(__file__).resolve().parent.parent / "data")
if DATA_TESTS not in sys.path:
    sys.path.insert(0, DATA_TESTS)
