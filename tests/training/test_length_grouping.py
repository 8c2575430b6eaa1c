"""hyperparameters.groupByLength: training batches of examples of similar planned length
(image tokens included), each example once per epoch, resumable mid-epoch; evaluation
in the dataset's order; and the loss of a batch does not depend on how far it is
padded, so grouping changes the cost of a step, not what it learns."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from training.support import (
    WORDS,
    JobFactory,
    build_trainer,
    chat,
    deal_out,
    train,
    waiting,
)
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from kubetune_trainer.training.batching import SeededLengthGroupedSampler
from kubetune_trainer.training.collate import SFTCollator
from kubetune_trainer.training.models import is_multimodal, load_model, load_processing
from kubetune_trainer.training.records import to_chat_record
from kubetune_trainer.training.sft import chat_encoder, plan_lengths

pytestmark = pytest.mark.training


def reply(rng: random.Random, longest: int) -> str:
    """1 to ``longest`` words, half of them under 12: the long tail of real answers."""
    words = min(max(int(rng.lognormvariate(2.5, 1.0)), 1), longest)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_spread_dataset(
    path: Path, n: int, *, seed: int, pairs: bool = False, longest: int = 150
) -> Path:
    """Text chats whose replies (and rejected replies, with ``pairs``) run from 1 to
    ``longest`` words."""
    rng = random.Random(seed)
    lines: list[dict[str, Any]] = []
    for _ in range(n):
        line: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": f"say {rng.choice(WORDS)}"},
                {"role": "assistant", "content": reply(rng, longest)},
            ]
        }
        if pairs:
            line["rejected_response"] = reply(rng, longest)
        lines.append(line)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def collated(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The dataset lines of each batch that SFTCollator builds from now on, in order
    (an epoch's start is marked by an empty batch when EpochMarks is a callback)."""
    batches: list[list[int]] = []
    real = SFTCollator.__call__

    def recording(self: SFTCollator, records: Any) -> dict[str, torch.Tensor]:
        batches.append([record["line"] for record in records])
        return real(self, records)

    monkeypatch.setattr(SFTCollator, "__call__", recording)
    return batches


class EpochMarks(TrainerCallback):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
        self.batches.append([])


def epochs(batches: list[list[int]]) -> list[list[list[int]]]:
    """Batches recorded with EpochMarks, split by epoch."""
    split: list[list[list[int]]] = []
    for batch in batches:
        if batch:
            split[-1].append(batch)
        else:
            split.append([])
    return split


# 23 examples in micro-batches of 3, 2 of them per optimizer step: neither divides the
# dataset, so each epoch ends with a short micro-batch and a short step.
ONCE = {"epochs": 2, "batchSize": 3, "gradientAccumulationSteps": 2, "loggingSteps": 1}


def test_each_example_is_trained_on_once_per_epoch_in_grouped_batches(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, collated: list[list[int]]
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 23, seed=1, longest=30)
    report = train(job(tiny_qwen2, data, hyperparameters=ONCE), callbacks=[EpochMarks(collated)])
    assert report["steps"] == 2 * 4
    first, second = epochs(collated)
    for epoch in (first, second):
        assert Counter(line for batch in epoch for line in batch) == Counter(range(1, 24))
        assert [len(batch) for batch in epoch] == [3] * 7 + [2]
    assert first != second  # a new order each epoch


def test_a_run_resumed_in_its_second_epoch_trains_on_exactly_the_batches_it_had_left(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, collated: list[list[int]]
) -> None:
    """transformers does not replay the epochs before the resumed one; with an order
    drawn from the process-wide RNG (transformers' own LengthGroupedSampler) the resumed
    epoch would get another order and the skipped batches would be the wrong ones."""
    data = write_spread_dataset(tmp_path / "train.jsonl", 23, seed=1, longest=30)
    hyperparameters = {**ONCE, "saveSteps": 1}
    resumed = job(tiny_qwen2, data, outputDir=str(tmp_path / "resumed"), hyperparameters=ONCE)
    step = 6  # 4 steps per epoch: the second one of the second epoch

    class KeepCheckpoint(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                shutil.copytree(
                    Path(args.output_dir, f"checkpoint-{step}"),
                    Path(resumed.effective_checkpoint_dir, f"checkpoint-{step}"),
                )

    whole = job(
        tiny_qwen2, data, outputDir=str(tmp_path / "whole"), hyperparameters=hyperparameters
    )
    train(whole, callbacks=[KeepCheckpoint()])
    uninterrupted = list(collated)
    collated.clear()
    report = train(resumed)
    assert report["resumedFrom"].endswith(f"checkpoint-{step}")
    assert len(uninterrupted) == 16 and len(collated) == 16 - 8 - 4
    assert collated == uninterrupted[-len(collated) :]


def padding_fraction(trainer: Trainer) -> float:
    """The share of the padded positions in one epoch of the trainer's training batches."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return 1 - real / padded


def test_grouped_batches_carry_far_less_padding_than_random_ones_and_off_is_random(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 240, seed=2)
    hyperparameters = {"batchSize": 4}
    grouped = build_trainer(job(tiny_qwen2, data, hyperparameters=hyperparameters))
    at_random = build_trainer(
        job(tiny_qwen2, data, hyperparameters={**hyperparameters, "groupByLength": False})
    )

    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, SeededLengthGroupedSampler)
    assert sampler.lengths == grouped.train_dataset["keep"]
    assert sampler.batch_size == 4  # one optimizer step
    assert type(at_random._get_train_sampler()) is RandomSampler  # as before the switch

    spread = padding_fraction(at_random)
    assert spread > 0.3  # the lengths really are spread
    assert padding_fraction(grouped) < spread / 3


def test_a_group_is_one_step_of_every_process_so_none_waits_long(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 400, seed=4)
    trainer = build_trainer(job(tiny_qwen2, data, hyperparameters={"batchSize": 2}))
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda _: 4))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, SeededLengthGroupedSampler)
    assert sampler.batch_size == 2 * 4
    order = list(sampler)
    groups = [sorted(order[i : i + 8]) for i in range(0, len(order), 8)]
    deal = deal_out(lambda: sampler, 2, 4)
    steps = [sorted(i for rank in deal for i in rank[step]) for step in range(len(groups))]
    assert steps == groups

    def tokens(batch: list[int]) -> int:
        return sum(sampler.lengths[i] for i in batch)

    # A group per process's step, dealt out the same way: each step's processes get
    # groups from anywhere in the length order.
    apart = deal_out(lambda: SeededLengthGroupedSampler(2, sampler.lengths, seed=0), 2, 4)
    assert waiting(apart, tokens) > 0.3
    assert waiting(deal, tokens) < waiting(apart, tokens) / 3


def test_padding_free_steps_are_dealt_to_micro_batches_of_about_even_tokens() -> None:
    rng = random.Random(3)
    lengths = [int(rng.lognormvariate(5.0, 1.0)) + 1 for _ in range(403)]
    grouped = SeededLengthGroupedSampler(16, lengths, seed=5)
    balanced = SeededLengthGroupedSampler(16, lengths, seed=5, micro_batch=4)
    order, plain = list(balanced), list(grouped)
    assert sorted(order) == list(range(403))
    # The same steps, each with its examples dealt out anew; the longest still first.
    steps = [sorted(order[i : i + 16]) for i in range(0, 403, 16)]
    assert steps == [sorted(plain[i : i + 16]) for i in range(0, 403, 16)]
    assert order[0] == max(range(403), key=lengths.__getitem__)

    def spread(order: list[int]) -> float:
        """The mean over whole steps of (most - fewest) / most tokens of a micro-batch."""
        shares = []
        for start in range(0, 400 - 15, 16):
            tokens = [
                sum(lengths[i] for i in order[b : b + 4]) for b in range(start, start + 16, 4)
            ]
            shares.append((max(tokens) - min(tokens)) / max(tokens))
        return sum(shares) / len(shares)

    assert spread(plain) > 0.2
    assert spread(order) < spread(plain) / 4


def test_only_padding_free_batches_are_balanced_by_tokens(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 40, seed=2)

    def micro_batch(**hyperparameters: Any) -> int | None:
        config = job(tiny_qwen2, data, hyperparameters={"batchSize": 4, **hyperparameters})
        sampler = build_trainer(config)._get_train_sampler()
        assert isinstance(sampler, SeededLengthGroupedSampler)
        return sampler.micro_batch

    assert micro_batch() == 4
    assert micro_batch(paddingFree=False) is None


def test_groups_are_shuffled_whole_with_the_longest_first_and_a_short_one_last() -> None:
    rng = random.Random(3)
    lengths = [int(rng.paretovariate(0.8)) for _ in range(403)]
    sampler = SeededLengthGroupedSampler(4, lengths, seed=5)
    order = list(sampler)
    assert sorted(order) == list(range(403))
    groups = [order[i : i + 4] for i in range(0, 403, 4)]
    assert max(lengths) in [lengths[i] for i in groups[0]]
    assert len(groups[-1]) == 3
    # transformers' order runs from long to short within each mega-batch (here of 25
    # groups); shuffled, the longest example of each group rises and falls at random.
    tops = [max(lengths[i] for i in group) for group in groups[1:-1]]
    falls = sum(a >= b for a, b in itertools.pairwise(tops))
    assert 0.3 < falls / (len(tops) - 1) < 0.8
    # The order is a function of (seed, epoch).
    assert list(sampler) == order
    sampler.set_epoch(1)
    again = SeededLengthGroupedSampler(4, lengths, seed=5)
    again.set_epoch(1)
    assert list(sampler) == list(again) != order


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9])
def test_a_dataset_of_a_few_groups_or_less_is_still_each_example_once(n: int) -> None:
    assert sorted(SeededLengthGroupedSampler(4, list(range(n)), seed=0)) == list(range(n))


def test_evaluation_batches_keep_the_dataset_s_order_with_grouping_on(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, collated: list[list[int]]
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 12, seed=4)
    held_out = write_spread_dataset(tmp_path / "held_out.jsonl", 14, seed=5)
    trainer = build_trainer(
        job(
            tiny_qwen2,
            data,
            validation={"dataset": str(held_out)},
            hyperparameters={"batchSize": 4},
        )
    )
    assert trainer.args.train_sampling_strategy == "group_by_length"
    eval_set = trainer.eval_dataset
    # transformers itself would group these by length, in another order.
    grouped = Trainer._get_eval_sampler(trainer, eval_set)
    assert isinstance(grouped, LengthGroupedSampler) and list(grouped) != list(range(14))
    assert isinstance(trainer._get_eval_sampler(eval_set), SequentialSampler)

    trainer.evaluate()
    lines = eval_set["line"]
    assert collated == [lines[i : i + 4] for i in range(0, 14, 4)]


def test_dpo_groups_pairs_by_their_longer_chat(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    data = write_spread_dataset(tmp_path / "train.jsonl", 16, seed=6, pairs=True)
    trainer = build_trainer(job(tiny_qwen2, data, method="dpo", hyperparameters={"batchSize": 4}))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, SeededLengthGroupedSampler)
    chosen, rejected = trainer.train_dataset["keep"], trainer.train_dataset["rejected_keep"]
    assert sampler.lengths == [max(c, r) for c, r in zip(chosen, rejected, strict=True)]
    assert sampler.lengths != chosen  # some rejected replies are the longer ones


# The VLM whose images of two sizes show in image_grid_thw, and the text-only LM.
@pytest.fixture(params=["qwen2_5_vl", "qwen2"])
def model_folder(request: pytest.FixtureRequest) -> Path:
    folder: Path = request.getfixturevalue(f"tiny_{request.param}")
    return folder


def rows(batch: dict[str, torch.Tensor], n: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The batch with only its first ``n`` rows; per-image tensors stay whole."""
    shape = batch["input_ids"].shape
    for key, value in batch.items():
        yield key, value[:n] if value.shape[:2] == shape else value


def test_a_batch_has_the_same_loss_padded_tightly_or_to_a_longer_example(
    model_folder: Path, tmp_path: Path
) -> None:
    """Two short examples (on the VLM with images of different sizes) padded to their
    own length, as in a grouped batch, and to a long example's, as in a random batch:
    the same loss and logits, within float tolerance."""
    processing = load_processing(str(model_folder), trust_remote_code=False)
    multimodal = is_multimodal(processing)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "small.png")
    Image.new("RGB", (112, 84), (0, 0, 200)).save(tmp_path / "large.png")
    short = [
        chat(1, 3, "small.png" if multimodal else None),
        chat(2, 6, "large.png" if multimodal else None),
    ]
    long = chat(3, 120)
    encoder = chat_encoder(processing, max_pixels=112 * 112)
    records = [to_chat_record(e, tmp_path, multimodal=multimodal) for e in (*short, long)]
    planned = plan_lengths(encoder, records, max_length=4096).kept
    collator = SFTCollator(encoder)

    tight = collator(planned[:2])
    padded = dict(rows(collator(planned), 2))
    width = tight["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] > 2 * width
    assert torch.equal(padded["labels"][:, :width], tight["labels"])
    assert (padded["labels"][:, width:] == -100).all()
    if multimodal:
        assert tight["image_grid_thw"].tolist() != [tight["image_grid_thw"][0].tolist()] * 2

    model = load_model(
        str(model_folder), multimodal=multimodal, trust_remote_code=False, dtype="float32"
    )
    model.eval()
    with torch.no_grad():
        grouped_out, random_out = model(**tight), model(**padded)
    torch.testing.assert_close(random_out.loss, grouped_out.loss, rtol=1e-5, atol=1e-6)
    mask = tight["attention_mask"].bool()
    torch.testing.assert_close(
        random_out.logits[:, :width][mask], grouped_out.logits[mask], rtol=1e-4, atol=1e-5
    )
