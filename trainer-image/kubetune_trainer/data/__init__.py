"""Datasets: read every supported chat-JSONL format into one canonical example type,
validate files before any GPU is spent, and convert between the formats.

This package imports no torch, so that ``kubetune validate`` (a Dataset's validation
Job) and ``kubetune convert`` start fast and work without it.
The stable API for the trainer is ``read_examples``, ``open_image`` and
``write_examples``; validation is ``validate_file``.
"""

from kubetune_trainer.data.convert import (
    STYLES,
    Style,
    convert_file,
    to_json_record,
    write_examples,
)
from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.data.formats import parse_record
from kubetune_trainer.data.images import check_image, image_bytes, open_image
from kubetune_trainer.data.problems import DatasetError, Problem
from kubetune_trainer.data.reader import read_examples
from kubetune_trainer.data.validate import ValidationReport, validate_file

__all__ = [
    "STYLES",
    "DatasetError",
    "Example",
    "ImageRef",
    "Problem",
    "Style",
    "Turn",
    "ValidationReport",
    "check_image",
    "convert_file",
    "image_bytes",
    "open_image",
    "parse_record",
    "read_examples",
    "to_json_record",
    "validate_file",
    "write_examples",
]
