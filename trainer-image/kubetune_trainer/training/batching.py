"""Length-grouped training batches (hyperparameters.groupByLength) and evaluation batches
in the dataset's order.

transformers' LengthGroupedSampler does the grouping: it shuffles the examples, cuts
them into mega-batches of up to 50 optimizer steps and sorts each by length, so that
the examples of one step have similar lengths and little padding goes through the
model. Two things about it do not fit as it is:

- It draws its shuffle from the process-wide RNG, which training also draws from
  (dropout). A run resumed from a checkpoint starts the resumed epoch without replaying
  the ones before it, so that epoch gets another order, and skipping the batches the
  checkpoint had consumed skips the wrong examples: some are trained twice in that
  epoch and others not at all. Here each epoch's order comes from (seed, epoch) alone,
  as accelerate's SeedableRandomSampler does for the random order.
- Its mega-batches are a quarter of a small dataset at most (see mega_batch_mult).
- Within a mega-batch the steps run from the longest examples to the shortest, a
  length curriculum repeated every 50 steps. Here the steps are shuffled as well
  (the first, with the longest example, stays first so that running out of memory
  shows at once).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler, SequentialSampler
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import has_length


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """LengthGroupedSampler whose order in each epoch is a function of (seed, epoch),
    with its groups of ``batch_size`` (one optimizer step) in random order.

    With ``micro_batch``, for padding-free batches, whose cost is their tokens rather
    than their size times their longest example: each whole group's examples are dealt
    out to its micro-batches of that size from the longest down, in snake order, so
    that the micro-batches, and so the processes at each step, get about as many
    tokens each."""

    def __init__(
        self, batch_size: int, lengths: list[int], seed: int, micro_batch: int | None = None
    ) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0
        self.micro_batch = micro_batch

    @property
    def mega_batch_mult(self) -> int:
        """Optimizer steps per mega-batch: up to 50, as transformers has it, but with two
        mega-batches per epoch at the least where transformers wants four. Fine-tuning
        sets of a few hundred examples are common, and with four mega-batches of a few
        steps each, most batches would still mix short and long examples; two keep the
        batches random subsets of a random half of the data, drawn anew each epoch."""
        return max(1, min(len(self.lengths) // (self.batch_size * 2), 50))

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate's DataLoaderShard) before each epoch,
        the resumed one included."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = get_length_grouped_indices(
            self.lengths, self.batch_size, mega_batch_mult=self.mega_batch_mult, generator=generator
        )
        size = self.batch_size
        groups = [indices[i : i + size] for i in range(0, len(indices), size)]
        if not groups:
            return iter(())
        # A short last group stays last: anywhere else it would shift every later
        # micro-batch across two groups.
        whole = len(groups) - (len(groups[-1]) < size)
        shuffled = (
            (1 + torch.randperm(whole - 1, generator=generator)).tolist() if whole > 1 else []
        )
        order = [0, *shuffled, *range(max(whole, 1), len(groups))]
        if self.micro_batch:
            groups = [self._balanced(g) if len(g) == size else g for g in groups]
        return iter([i for g in order for i in groups[g]])

    def _balanced(self, group: list[int]) -> list[int]:
        """The group as micro-batches of ``micro_batch`` examples with about even token
        counts: the longest first, each round of dealing in the other direction."""
        assert self.micro_batch
        count = len(group) // self.micro_batch
        batches: list[list[int]] = [[] for _ in range(count)]
        longest_first = sorted(group, key=lambda i: -self.lengths[i])
        for k, index in enumerate(longest_first):
            turn, seat = divmod(k, count)
            batches[seat if turn % 2 == 0 else count - 1 - seat].append(index)
        return [i for batch in batches for i in batch]


class LengthGroupedBatches:
    """Trainer mixin: groupByLength's training sampler (SeededLengthGroupedSampler), and
    evaluation in the dataset's order whatever the training order.

    transformers groups the evaluation set by length too when training does. The
    reported eval loss is a mean of per-batch means, so which examples share a batch
    changes it; in the dataset's order it stays comparable between runs, with
    groupByLength on or off, and with a plain TRL script of the same eval batch size."""

    args: Any

    def __init__(self, *args: Any, packed_batches: bool = False, **kwargs: Any) -> None:
        """``packed_batches``: the model runs padding-free (padding_free.py), so a
        micro-batch costs its tokens, and a step's micro-batches are balanced by them."""
        super().__init__(*args, **kwargs)
        self.packed_batches = packed_batches

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        sampler = super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        if type(sampler) is LengthGroupedSampler:
            # transformers has read the lengths from the column that args names and sized
            # the groups to one process's optimizer step (batch size x gradient
            # accumulation). A group here is one step of every process: accelerate deals
            # the batches out to the processes in turn, so all of a step's micro-batches
            # then hold neighbouring lengths and no process waits long for another at the
            # step's gradient sync (with a group each, they would wait for the longest
            # of several random groups).
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(
                sampler.batch_size * self.args.world_size,
                sampler.lengths,
                seed,
                micro_batch=self.args.per_device_train_batch_size if self.packed_batches else None,
            )
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Sampler[int] | None:
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        # As transformers' own choice without grouping: across processes, accelerate
        # shards the dataset's order batch by batch.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
