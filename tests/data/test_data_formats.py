"""Parsing every format into the canonical example, and the property that no input
makes the parser raise."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import Example, ImageRef, Turn, parse_record
from kubetune_trainer.data.convert import to_json_record
from kubetune_trainer.data.formats import PLACEHOLDER
from kubetune_trainer.data.jsonl import encode_record
from kubetune_trainer.data.reader import Record, iter_records
from kubetune_trainer.data.rules import example_problems

RED = ImageRef("images/red.png")


def parse(obj: Any) -> Example:
    parsed = parse_record(obj, line=7)
    assert parsed.errors == (), parsed.errors
    assert parsed.example is not None
    return parsed.example


# --- placeholder style ---------------------------------------------------------


def test_placeholders_take_the_images_in_order_across_turns() -> None:
    ex = parse(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "a<image>b<image>"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "<image>c"},
                {"role": "assistant", "content": "done"},
            ],
            "images": ["1.png", "https://x.test/2.jpg", "data:image/png;base64,AAAA"],
        }
    )
    assert ex.line == 7
    assert ex.turns == (
        Turn("system", ("sys",)),
        Turn("user", ("a", ImageRef("1.png"), "b", ImageRef("https://x.test/2.jpg"))),
        Turn("assistant", ("ok",)),
        Turn("user", (ImageRef("data:image/png;base64,AAAA"), "c")),
        Turn("assistant", ("done",)),
    )
    assert [i.kind for i in ex.images] == ["path", "url", "data"]
    assert ex.chosen.text == "done" and ex.rejected is None


def test_text_only_example_has_no_image_parts() -> None:
    ex = parse(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    assert ex.images == () and all(isinstance(p, str) for t in ex.turns for p in t.parts)


def test_placeholder_count_must_match_images() -> None:
    parsed = parse_record(
        {
            "messages": [
                {"role": "user", "content": "<image>"},
                {"role": "assistant", "content": "x"},
            ]
        }
    )
    assert parsed.example is None
    assert parsed.errors == ("1 <image> placeholder but 0 images in 'images'",)


def test_image_details_extension_sets_detail() -> None:
    ex = parse(
        {
            "messages": [
                {"role": "user", "content": "<image><image>"},
                {"role": "assistant", "content": "x"},
            ],
            "images": ["a.png", "b.png"],
            "image_details": [None, "high"],
        }
    )
    assert ex.images == (ImageRef("a.png"), ImageRef("b.png", "high"))


# --- content-part style ----------------------------------------------------------


def test_content_parts_keep_order_and_detail_in_any_user_turn() -> None:
    ex = parse(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "seen"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "b.png"}},
                        {"type": "text", "text": "and"},
                        {"type": "text", "text": " this"},
                    ],
                },
                {"role": "assistant", "content": "both"},
            ]
        }
    )
    assert ex.turns[0].parts == ("look", ImageRef("a.png", "low"))
    assert ex.turns[1].parts == ("seen",)
    # adjacent text parts join: chat templates render them back to back anyway
    assert ex.turns[2].parts == (ImageRef("b.png"), "and this")


def test_empty_text_is_dropped() -> None:
    ex = parse(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": ""},
                        {"type": "image_url", "image_url": {"url": "a.png"}},
                    ],
                },
                {"role": "assistant", "content": "x"},
            ]
        }
    )
    assert ex.turns[0].parts == (ImageRef("a.png"),)


# --- preference pairs ------------------------------------------------------------


def test_ms_swift_rejected_response_string_and_message_forms() -> None:
    base = {
        "messages": [
            {"role": "user", "content": "<image>q"},
            {"role": "assistant", "content": "good"},
        ],
        "images": ["a.png"],
    }
    a = parse({**base, "rejected_response": "bad"})
    b = parse({**base, "rejected_response": [{"role": "assistant", "content": "bad"}]})
    assert a.rejected == b.rejected == Turn("assistant", ("bad",))
    c = parse({**base, "rejected_response": "bad", "rejected_images": ["b.png"]})
    assert c.rejected_images == (ImageRef("b.png"),)
    assert c.all_images == (ImageRef("a.png"), ImageRef("b.png"))


def test_openai_preference_turns_are_input_plus_preferred() -> None:
    ex = parse(
        {
            "input": {
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
            },
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        }
    )
    assert ex.turns == (Turn("system", ("s",)), Turn("user", ("q",)), Turn("assistant", ("good",)))
    assert ex.rejected == Turn("assistant", ("bad",))
    assert ex.prompt == ex.turns[:2] and ex.chosen.text == "good"


def test_dpo_rules() -> None:
    limits = DatasetLimits()
    base = {
        "messages": [
            {"role": "user", "content": "<image>q"},
            {"role": "assistant", "content": "same"},
        ],
        "images": ["a.png"],
    }
    same = parse({**base, "rejected_response": "same"})
    assert example_problems(same, limits, "dpo") == [
        "the rejected reply is the same as the chosen one"
    ]
    assert example_problems(same, limits, "sft") == []
    # the same text with other images is a real (image-level) preference pair
    other_images = parse({**base, "rejected_response": "same", "rejected_images": ["b.png"]})
    assert example_problems(other_images, limits, "dpo") == []


# --- extra keys and warnings -----------------------------------------------------


def test_unknown_top_level_keys_are_kept_verbatim() -> None:
    parsed = parse_record(
        {
            "id": 3,
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "meta": {"src": ["x"]},
        }
    )
    assert parsed.example is not None
    assert parsed.example.extra == (("id", 3), ("meta", {"src": ["x"]}))
    assert parsed.warnings == ()


def test_ignored_features_warn() -> None:
    parsed = parse_record(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "name": "bot", "weight": 1},
            ],
            "tools": [{"type": "function"}],
        }
    )
    assert parsed.example is not None
    assert parsed.warnings == (
        "'tools' is ignored: tool calling is not trained",
        "messages[1].name is ignored",
    )


def test_empty_media_lists_are_not_errors() -> None:
    ex = parse(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "videos": [],
            "audios": None,
        }
    )
    assert ex.extra == (("videos", []), ("audios", None))


# --- properties ------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
keys = st.sampled_from(
    [
        "messages",
        "images",
        "image_details",
        "rejected_response",
        "rejected_images",
        "input",
        "preferred_output",
        "non_preferred_output",
        "videos",
        "role",
        "content",
        "type",
        "text",
        "image_url",
        "url",
        "detail",
        "weight",
        "tools",
    ]
) | st.text(max_size=6)
json_values = st.recursive(
    json_scalars
    | st.sampled_from(
        ["user", "assistant", "system", "text", "image_url", "<image>", "low", "a.png", 0, 1]
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=400, deadline=None)
def test_parser_never_raises_on_any_json(value: Any) -> None:
    parsed = parse_record(value, line=1)
    assert (parsed.example is None) == bool(parsed.errors)
    if parsed.example is not None:
        example_problems(parsed.example, DatasetLimits(), "dpo")  # must not raise either


@st.composite
def image_refs(draw: st.DrawFn, detail: bool = True) -> ImageRef:
    source = draw(
        st.sampled_from(
            ["a.png", "dir/b c.jpg", "https://x.test/i.png", "data:image/png;base64,AAAA"]
        )
        | st.text(min_size=1, max_size=8)
    )
    return ImageRef(
        source, draw(st.sampled_from([None, "low", "high", "auto"])) if detail else None
    )


texts = st.text(max_size=10).filter(lambda t: PLACEHOLDER not in t) | st.sampled_from(
    ["<", "image>", "<image", "e>", " "]
)


@st.composite
def parts(draw: st.DrawFn, images: bool) -> tuple[Any, ...]:
    items = draw(st.lists(image_refs() | texts if images else texts, max_size=5))
    merged: list[Any] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += item
                continue
        merged.append(item)
    text = "".join(p if isinstance(p, str) else "\0" for p in merged)
    from hypothesis import assume

    assume(PLACEHOLDER not in text)
    return tuple(merged)


@st.composite
def examples(draw: st.DrawFn) -> Example:
    """Canonical examples: images only in user turns, weights only on assistant turns,
    a text-only rejected reply, and a reply to learn."""
    weights = st.sampled_from([None, 0, 1])
    turns = [
        Turn(
            role,
            draw(parts(images=role == "user")),
            draw(weights) if role == "assistant" else None,
        )
        for role in draw(
            st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=5)
        )
    ]
    rejected = draw(st.none() | parts(images=False).map(lambda p: Turn("assistant", p)))
    learned = rejected is None and any(t.learned for t in turns)
    final = draw(weights if learned else st.sampled_from([None, 1]))
    turns.append(Turn("assistant", draw(parts(images=False)), final))
    n_images = sum(len(t.images) for t in turns)
    rejected_images = draw(
        st.none()
        | st.lists(image_refs(detail=False), min_size=n_images, max_size=n_images).map(tuple)
    )
    extra = draw(
        st.dictionaries(
            st.text(max_size=5).filter(
                lambda k: (
                    k
                    not in {
                        "messages",
                        "images",
                        "image_details",
                        "rejected_response",
                        "rejected_images",
                        "input",
                        "preferred_output",
                        "non_preferred_output",
                        "videos",
                        "audios",
                    }
                )
            ),
            json_values,
            max_size=3,
        )
    )
    return Example(tuple(turns), 0, rejected, rejected_images, tuple(extra.items()))


@given(examples(), st.sampled_from(["placeholder", "content-parts"]))
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_write_then_read_is_lossless(example: Example, style: Any) -> None:
    items = list(iter_records(io.BytesIO(encode_record(to_json_record(example, style)) + b"\n")))
    records = [i for i in items if isinstance(i, Record)]
    assert len(records) == 1, items
    assert replace(records[0].example, line=0) == example


def test_integers_beyond_64_bits_in_metadata_keep_their_digits() -> None:
    line = b'{"id": 123456789012345678901234567890, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    (item,) = iter_records(io.BytesIO(line))
    assert isinstance(item, Record)
    assert item.example.extra == (("id", 123456789012345678901234567890),)


@st.composite
def mutated_records(draw: st.DrawFn) -> Any:
    """A valid record with one value somewhere inside replaced by arbitrary JSON."""
    record = json.loads(
        json.dumps(
            to_json_record(
                draw(examples()), draw(st.sampled_from(["placeholder", "content-parts"]))
            )
        )
    )
    containers: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict | list):
            containers.append(node)
            for child in node.values() if isinstance(node, dict) else node:
                walk(child)

    walk(record)
    target = draw(st.sampled_from(containers))
    if isinstance(target, dict) and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
    elif isinstance(target, list) and target:
        target[draw(st.integers(0, len(target) - 1))] = draw(json_values)
    return record


@given(mutated_records())
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_parser_never_raises_on_damaged_records(record: Any) -> None:
    parsed = parse_record(record, line=3)
    assert (parsed.example is None) == bool(parsed.errors)
