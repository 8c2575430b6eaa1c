"""The trainer's reader API: read_examples over any mixture, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import sft, write_jsonl

from kubetune_trainer.data import DatasetError, ImageRef, read_examples


def test_read_examples_reads_a_mixture_with_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sft("<image>a", images=["x.png"]),
            "",
            sft(
                [
                    {"type": "image_url", "image_url": {"url": "y.png"}},
                    {"type": "text", "text": "b"},
                ]
            ),
            {
                "input": {"messages": [{"role": "user", "content": "c"}]},
                "preferred_output": [{"role": "assistant", "content": "good"}],
                "non_preferred_output": [{"role": "assistant", "content": "bad"}],
            },
        ],
    )
    examples = list(read_examples(path))
    assert [e.line for e in examples] == [1, 3, 4]
    assert examples[0].images == (ImageRef("x.png"),) and examples[1].images == (ImageRef("y.png"),)
    assert examples[2].rejected is not None and examples[2].rejected.text == "bad"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{", "line 3: invalid JSON"),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "line 3: the last turn must be the assistant reply",
        ),
        (sft("<image>"), "line 3: 1 <image> placeholder but 0 images"),
        # A RecursionError once: the trainer exited 1 (retry) instead of 3 (final).
        (
            json.dumps(sft("c"))[:-1] + ', "meta": ' + "[" * 400 + "]" * 400 + "}",
            "line 3: arrays and objects nest more than 64 levels deep",
        ),
    ],
)
def test_read_examples_raises_at_the_first_invalid_line(
    tmp_path: Path, bad: object, message: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a"), sft("b"), bad, "also bad"])
    seen = []
    with pytest.raises(DatasetError) as info:
        seen.extend(read_examples(path))
    assert str(info.value).startswith(message)
    assert info.value.line == 3 and len(seen) == 2


def test_the_data_package_imports_no_torch() -> None:
    code = (
        "import sys, kubetune_trainer.data, kubetune_trainer.data.commands; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
