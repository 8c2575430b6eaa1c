"""Fixtures for the dataset tests.

The suite imports test modules with ``--import-mode=importlib`` and puts only
``tests/`` on the path; the dataset helpers live next to these tests, so this
folder goes on the path too (``import data_helpers``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
