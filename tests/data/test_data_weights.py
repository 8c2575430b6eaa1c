"""OpenAI's per-message ``weight``: 0 or 1 on assistant messages, kept through convert
in both styles; anything else is an error on its line that names the field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import Turn, parse_record
from kubetune_trainer.data.convert import STYLES, Style, embed_example_images, to_json_record
from kubetune_trainer.data.jsonl import encode_record
from kubetune_trainer.data.problems import Problem
from kubetune_trainer.data.reader import Record, iter_records


def chat(first: Any = None, second: Any = None, *, user: Any = None) -> dict[str, Any]:
    """Two user/assistant exchanges; each argument, when not None, is a weight."""

    def message(role: str, content: str, weight: Any) -> dict[str, Any]:
        return {"role": role, "content": content} | ({} if weight is None else {"weight": weight})

    return {
        "messages": [
            message("user", "q1", user),
            message("assistant", "a1", first),
            {"role": "user", "content": "q2"},
            message("assistant", "a2", second),
        ]
    }


def errors(obj: Any) -> tuple[str, ...]:
    parsed = parse_record(obj, line=4)
    assert parsed.example is None
    return parsed.errors


@pytest.mark.parametrize(("written", "kept"), [(0, 0), (1, 1), (False, 0), (True, 1), (None, None)])
def test_assistant_weights_of_0_and_1_are_kept(written: Any, kept: Any) -> None:
    parsed = parse_record(chat(first=written, second=1))
    assert parsed.errors == parsed.warnings == ()
    assert parsed.example is not None
    first, second = parsed.example.turns[1], parsed.example.turns[3]
    assert (first.weight, second.weight) == (kept, 1)
    assert first.learned is (kept != 0) and second.learned


def test_a_weight_0_turn_is_context_the_example_still_holds() -> None:
    parsed = parse_record(chat(first=0))
    assert parsed.example is not None
    assert parsed.example.turns[1] == Turn("assistant", ("a1",), 0)
    assert [t.learned for t in parsed.example.turns] == [False, False, False, True]


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (0.5, "0.5"),
        (1.0, "1.0"),
        (2, "2"),
        (-1, "-1"),
        ("1", "'1'"),
        ([1], "an array"),
        ({"value": 1}, "an object"),
    ],
)
def test_other_weights_are_errors_naming_the_field(weight: Any, shown: str) -> None:
    assert errors(chat(first=weight)) == (f"messages[1].weight must be 0 or 1, not {shown}",)


def test_only_assistant_messages_take_a_weight() -> None:
    assert errors(chat(user=1)) == (
        "messages[0].weight: only assistant messages have a weight, not user ones",
    )
    system = {"messages": [{"role": "system", "content": "s", "weight": 0}, *chat()["messages"]]}
    assert errors(system) == (
        "messages[0].weight: only assistant messages have a weight, not system ones",
    )


def test_an_example_with_nothing_to_learn_is_an_error() -> None:
    assert errors(chat(first=0, second=0)) == (
        "every assistant message has weight 0: the example has nothing to learn",
    )
    assert parse_record(chat(first=1, second=0)).example is not None


def test_errors_come_with_their_line() -> None:
    good, bad = encode_record(chat()), encode_record(chat(second="0"))
    items = list(iter_records(io.BytesIO(good + b"\n" + bad + b"\n")))
    assert isinstance(items[0], Record)
    assert items[1:] == [Problem(2, "messages[3].weight must be 0 or 1, not '0'")]


def openai_pair(prompt_weight: Any, chosen_weight: Any, rejected_weight: Any) -> dict[str, Any]:
    def reply(text: str, weight: Any) -> list[dict[str, Any]]:
        return [
            {"role": "assistant", "content": text} | ({} if weight is None else {"weight": weight})
        ]

    return {
        "input": {"messages": chat(first=prompt_weight)["messages"][:3]},
        "preferred_output": reply("good", chosen_weight),
        "non_preferred_output": reply("bad", rejected_weight),
    }


def test_the_replies_of_a_preference_pair_are_never_weight_0() -> None:
    assert errors(openai_pair(None, 0, None)) == (
        "preferred_output[0].weight is 0, but both replies of a preference pair are trained on",
    )
    assert errors(openai_pair(None, None, 0)) == (
        "non_preferred_output[0].weight is 0, but both replies of a preference pair are trained on",
    )
    swift = {**chat(second=0), "rejected_response": "bad"}
    assert errors(swift) == (
        "messages[3].weight is 0, but both replies of a preference pair are trained on",
    )


def test_a_pair_keeps_its_prompt_weights_and_its_chosen_weight_1() -> None:
    parsed = parse_record(openai_pair(0, 1, 1))
    assert parsed.errors == ()
    example = parsed.example
    assert example is not None
    assert [t.weight for t in example.turns] == [None, 0, None, 1]
    # The rejected reply's weight 1 is the default, which it does not keep.
    assert example.rejected == Turn("assistant", ("bad",))


@pytest.mark.parametrize("style", STYLES)
def test_convert_writes_weights_in_both_styles(style: Style) -> None:
    line = chat(first=0, second=1)
    line["messages"][0]["content"] = "<image>q1"
    line["images"] = ["a.png"]
    example = parse_record(line).example
    assert example is not None
    record = to_json_record(example, style)
    assert [m.get("weight") for m in record["messages"]] == [None, 0, None, 1]
    assert parse_record(record).example == example


def test_embedding_images_keeps_the_weights(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    line = chat(first=0, second=1)
    line["messages"][0]["content"] = "<image>q1"
    line["images"] = ["a.png"]
    example = parse_record(line).example
    assert example is not None
    embedded = embed_example_images(example, tmp_path, DatasetLimits())
    assert embedded.images[0].kind == "data"
    assert [t.weight for t in embedded.turns] == [None, 0, None, 1]
