"""Labels: every assistant turn not weighted 0 and nothing else; overlong examples are
truncated without cutting image tokens, or dropped."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from kubetune_trainer.data import DatasetError
from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.training.collate import (
    IGNORE_INDEX,
    SFTCollator,
    assistant_labels,
    keep_length,
    learned_tokens,
    without_tokens,
)
from kubetune_trainer.training.inputs import Plan
from kubetune_trainer.training.models import (
    image_token_ids,
    is_multimodal,
    load_processing,
    tokenizer_of,
)
from kubetune_trainer.training.records import to_chat_record
from kubetune_trainer.training.sft import chat_encoder, plan_lengths


def multi_turn(image: bool) -> Example:
    first_user: tuple[Any, ...] = (
        (ImageRef("square.png"), "What is this?") if image else ("What is this?",)
    )
    return Example(
        turns=(
            Turn("system", ("Answer briefly.",)),
            Turn("user", first_user),
            Turn("assistant", ("red square",)),
            Turn("user", ("Sure?",)),
            Turn("assistant", ("yes",)),
        ),
        line=1,
    )


def first_reply_as_context(example: Example) -> Example:
    """The example with its first assistant turn weighted 0."""
    first = next(i for i, t in enumerate(example.turns) if t.role == "assistant")
    turns = list(example.turns)
    turns[first] = replace(turns[first], weight=0)
    return replace(example, turns=tuple(turns))


def short_chat() -> Example:
    return Example(turns=(Turn("user", ("hi",)), Turn("assistant", ("hello",))), line=2)


@pytest.fixture(params=["qwen2_5_vl", "llava", "qwen2"])
def processing(request: pytest.FixtureRequest) -> Any:
    return load_processing(
        str(request.getfixturevalue(f"tiny_{request.param}")), trust_remote_code=False
    )


def records(processing: Any, root: Path, *examples: Example) -> list[dict[str, Any]]:
    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "square.png")
    return [to_chat_record(e, root, multimodal=is_multimodal(processing)) for e in examples]


def cut_and_dropped(plan: Plan[Any]) -> tuple[int, int]:
    return plan.truncated, plan.dropped


def test_loss_is_on_every_assistant_turn_and_nothing_else(processing: Any, tmp_path: Path) -> None:
    multimodal = is_multimodal(processing)
    batch_records = records(processing, tmp_path, multi_turn(image=multimodal), short_chat())
    batch = SFTCollator(chat_encoder(processing, max_pixels=3136))(batch_records)
    tokenizer = tokenizer_of(processing)
    labels, input_ids = batch["labels"], batch["input_ids"]

    def learned(row: int) -> list[int]:
        return [int(t) for t in labels[row] if t != IGNORE_INDEX]

    # Only the two replies (and the end-of-turn tokens that teach the model to stop).
    assert tokenizer.decode(learned(0), skip_special_tokens=True).split() == [
        "red",
        "square",
        "yes",
    ]
    assert tokenizer.decode(learned(1), skip_special_tokens=True).split() == ["hello"]
    assert tokenizer.convert_tokens_to_ids(tokenizer.eos_token) in learned(0)
    # Labelled tokens are the inputs themselves; image and padding positions never are.
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], input_ids[labelled])
    assert not labelled[batch["attention_mask"] == 0].any()
    for token in image_token_ids(processing):
        assert not labelled[input_ids == token].any()
    if multimodal:
        assert set(image_token_ids(processing)) & set(input_ids[0].tolist())


def test_final_turn_only_labels_the_last_reply() -> None:
    input_ids = torch.arange(8).repeat(2, 1)
    assistant = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0]])
    attention = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    labels = assistant_labels(input_ids, assistant, attention, final_turn_only=True)
    assert labels[0].tolist() == [IGNORE_INDEX] * 5 + [5, 6, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX] * 2 + [2, 3, 4] + [IGNORE_INDEX] * 3


def test_untrained_turns_lose_every_label() -> None:
    input_ids = torch.arange(8).repeat(2, 1)
    assistant = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 0, 0]])
    attention = torch.ones_like(assistant)
    labels = assistant_labels(input_ids, assistant, attention, untrained=[[0], [1, 2]])
    assert labels[0].tolist() == [IGNORE_INDEX] * 5 + [5, 6, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX, 1] + [IGNORE_INDEX] * 6
    # The final turn is still the last one, learned or not.
    final = assistant_labels(
        input_ids, assistant, attention, final_turn_only=True, untrained=[[1], [0]]
    )
    assert final[0].tolist() == [IGNORE_INDEX] * 8
    assert final[1].tolist() == [IGNORE_INDEX] * 5 + [5, IGNORE_INDEX, IGNORE_INDEX]


def test_a_weight_0_turn_is_context_with_every_label_ignored(
    processing: Any, tmp_path: Path
) -> None:
    multimodal = is_multimodal(processing)
    encoder = chat_encoder(processing, max_pixels=3136)
    weighted, plain = first_reply_as_context(multi_turn(multimodal)), multi_turn(multimodal)
    kept = plan_lengths(encoder, records(processing, tmp_path, weighted, plain), 4096).kept
    batch = SFTCollator(encoder)(kept)
    labels, input_ids = batch["labels"], batch["input_ids"]
    tokenizer = tokenizer_of(processing)

    # The weight changes no input: the first reply stays, as context for the next turn.
    assert torch.equal(input_ids[0], input_ids[1])
    learned, learned_plain = labels[0] != IGNORE_INDEX, labels[1] != IGNORE_INDEX
    # Every label of the weight-0 reply is ignored, and only those.
    only_plain = learned_plain & ~learned
    assert tokenizer.decode(input_ids[1][only_plain], skip_special_tokens=True).split() == [
        "red",
        "square",
    ]
    assert not (learned & ~learned_plain).any()
    assert tokenizer.decode(input_ids[0][learned], skip_special_tokens=True).split() == ["yes"]
    # Trained tokens count the labels, so not the weight-0 reply.
    assert [learned_tokens(r) for r in kept] == [int(learned.sum()), int(learned_plain.sum())]
    # Batches from planned tokens label the same tokens as the processor's batches.
    fresh = SFTCollator(encoder)([without_tokens(r) for r in kept])
    assert torch.equal(fresh["labels"], labels)


def test_truncation_that_leaves_only_weight_0_turns_drops_the_example(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    processing = load_processing(str(tiny_qwen2), trust_remote_code=False)
    encoder = chat_encoder(processing, max_pixels=3136)
    weighted = records(processing, tmp_path, first_reply_as_context(multi_turn(False)))
    (whole,) = plan_lengths(encoder, weighted, 4096).kept
    before_last_reply = whole["keep"] - learned_tokens(whole)
    assert cut_and_dropped(plan_lengths(encoder, weighted, before_last_reply)) == (0, 1)
    plain = records(processing, tmp_path, multi_turn(False))
    assert cut_and_dropped(plan_lengths(encoder, plain, before_last_reply)) == (1, 0)


def test_weights_need_a_template_that_marks_each_turn_apart(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    processing = load_processing(str(tiny_qwen2), trust_remote_code=False)
    encoder = chat_encoder(processing, max_pixels=3136)
    # One generation block around every reply: two replies in a row become one run.
    encoder.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    replies = Example(
        turns=(
            Turn("user", ("hi",)),
            Turn("assistant", ("hello",), 0),
            Turn("assistant", ("there",)),
        ),
        line=5,
    )
    with pytest.raises(DatasetError, match="line 5: the chat template marks 1 assistant turns"):
        plan_lengths(encoder, records(processing, tmp_path, replies), 4096)
    # Without a weight 0 the turns need not be told apart.
    unweighted = replace(replies, turns=tuple(replace(t, weight=None) for t in replies.turns))
    assert cut_and_dropped(
        plan_lengths(encoder, records(processing, tmp_path, unweighted), 4096)
    ) == (0, 0)


@pytest.mark.parametrize(
    ("ids", "mask", "limit", "keep"),
    [
        ([1, 2, 3], [0, 1, 1], 8, 3),  # fits
        ([9, 9, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1, 1], 5, 5),  # cut after the image tokens
        ([1, 9, 9, 2, 3], [0, 0, 0, 1, 1], 2, None),  # the cut would split the image
        ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], 3, None),  # nothing of the reply would be left
    ],
)
def test_keep_length(ids: list[int], mask: list[int], limit: int, keep: int | None) -> None:
    assert keep_length(ids, mask, {9}, limit) == keep


def test_overlong_examples_are_truncated_after_the_image_or_dropped(
    tiny_qwen2_5_vl: Path, tmp_path: Path
) -> None:
    processing = load_processing(str(tiny_qwen2_5_vl), trust_remote_code=False)
    encoder = chat_encoder(processing, max_pixels=3136)
    # Text before the image puts its tokens past the whole of the short chat.
    long_reply = Example(
        turns=(
            Turn(
                "user",
                ("Look at this picture, please. " * 4, ImageRef("square.png"), "Describe it."),
            ),
            Turn("assistant", ("red " * 40,)),
        ),
        line=1,
    )
    recs = records(processing, tmp_path, long_reply, short_chat())
    ids = encoder.encode(recs[:1])["input_ids"][0].tolist()
    full = len(ids)
    image_end = max(i for i, t in enumerate(ids) if t in encoder.image_token_ids)
    assert len(encoder.encode(recs[1:])["input_ids"][0]) < image_end

    plan = plan_lengths(encoder, recs, max_length=full - 10)
    kept = plan.kept
    assert cut_and_dropped(plan) == (1, 0)
    # The only image example was truncated: nothing showed that this processor's image
    # batches are its tokens plus its image processor's output, so batches are encoded.
    assert encoder.reuse_tokens is False
    assert kept[0]["keep"] == full - 10
    batch = SFTCollator(encoder)(kept)
    assert batch["input_ids"].shape[1] == full - 10
    assert (batch["labels"][0] != IGNORE_INDEX).any()
    assert batch["attention_mask"][1].sum() < full - 10  # the short chat is padding-masked, not cut

    plan = plan_lengths(encoder, recs, max_length=image_end)
    kept = plan.kept
    assert cut_and_dropped(plan) == (0, 1)
    assert json.loads(kept[0]["messages"])[-1]["content"][0]["text"] == "hello"


def test_batches_from_planned_tokens_equal_the_processors(processing: Any, tmp_path: Path) -> None:
    """The collator pads the tokens that planning encoded instead of encoding each batch
    again; the batch must be the one the processor itself builds, images included."""
    multimodal = is_multimodal(processing)
    encoder = chat_encoder(processing, max_pixels=3136)
    recs = records(processing, tmp_path, multi_turn(multimodal), short_chat(), multi_turn(False))
    kept = plan_lengths(encoder, recs, max_length=4096).kept
    assert encoder.reuse_tokens is True
    reused = SFTCollator(encoder)(kept)
    fresh = SFTCollator(encoder)([without_tokens(r) for r in kept])
    assert reused.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(reused[key], value), key
    if multimodal:
        assert "pixel_values" in reused


def test_planned_tokens_are_not_reused_where_they_differ_from_the_processors(
    processing: Any, tmp_path: Path
) -> None:
    encoder = chat_encoder(processing, max_pixels=3136)
    encoder.pad_token_id += 1  # padding that is not the tokenizer's: batches would differ
    recs = records(processing, tmp_path, multi_turn(is_multimodal(processing)), short_chat())
    kept = plan_lengths(encoder, recs, max_length=4096).kept
    assert encoder.reuse_tokens is False
    batch = SFTCollator(encoder)(kept)
    assert batch["input_ids"][1, -1] == tokenizer_of(processing).pad_token_id
