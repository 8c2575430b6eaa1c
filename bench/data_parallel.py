"""How evenly a training step's work falls on the processes of a data-parallel run.

    .venv/bin/python bench/data_parallel.py [--examples N] [--batch-size B] [--processes W ...]

At each optimizer step the processes sync their gradients, so every process waits for
the slowest. The training samplers decide which examples each process gets; this
benchmark deals one epoch of the realistic shape's examples (bench/realistic_shape.py:
answers of 3 to about 450 words, images of 28 to 448 px, some text only) out to W
processes exactly as a run does (kubetune's planned lengths, image tokens included,
and accelerate's BatchSamplerShard), and prints for each sampler:

- waiting: the share of process time spent waiting for a step's slowest process,
  counting a micro-batch's time as its tokens (padding-free batches, kubetune's SFT
  default) and as its size times its longest example (padded batches);
- padding: the share of padded positions in the padded batches.

Nothing trains: the figures are counts over the batches, the same on any machine.
The samplers: a random order (plain TRL's default), transformers' group_by_length
(LengthGroupedSampler), transformers' batch_rebalance (BatchRebalanceSampler, which
varies the micro-batch size to balance cost), kubetune's grouping with one group per
process's step (what kubetune did before 2026-12-01), and kubetune's grouping now, one
group per step of every process: for padded batches the step's examples in length
order, for padding-free ones (kubetune's SFT default) dealt out to micro-batches of
about even tokens.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder leads sys.path, and bench/operator.py would shadow
# the standard library's operator module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "hack")]
sys.path.append(_HERE)  # last, for the reason above

import realistic_shape  # noqa: E402
from accelerate.data_loader import SeedableRandomSampler  # noqa: E402
from training.support import Deal, build_trainer, deal_out, waiting  # noqa: E402
from transformers.trainer_pt_utils import (  # noqa: E402
    BatchRebalanceSampler,
    LengthGroupedSampler,
)

from kubetune_trainer.contract.job import TrainingConfig  # noqa: E402
from kubetune_trainer.training.batching import SeededLengthGroupedSampler  # noqa: E402

SEED = 42


def planned_lengths(work: Path, examples: int) -> list[int]:
    """The realistic shape's examples as kubetune's SFT trainer plans them: the tokens
    each keeps, image tokens included."""
    model = realistic_shape.build_model(work / "model", "cpu", "cpu")
    data = realistic_shape.write_dataset(work, examples, seed=1, name="train.jsonl")
    config = TrainingConfig.model_validate(
        {
            "baseModel": str(model),
            "dataset": str(data),
            "outputDir": str(work / "out"),
            "metricsPort": 0,
            "hyperparameters": {"maxPixels": realistic_shape.MAX_PIXELS},
        }
    )
    lengths: list[int] = build_trainer(config).train_dataset["keep"]
    return lengths


def samplers(
    lengths: list[int], batch_size: int, processes: int
) -> Iterable[tuple[str, Callable[[], Deal]]]:
    n = len(lengths)
    step = batch_size * processes
    yield (
        "random order (plain TRL)",
        lambda: deal_out(
            lambda: SeedableRandomSampler(range(n), data_seed=SEED), batch_size, processes
        ),
    )
    yield (
        "transformers group_by_length",
        lambda: deal_out(
            lambda: LengthGroupedSampler(batch_size, lengths=lengths), batch_size, processes
        ),
    )
    yield (
        "transformers batch_rebalance",
        lambda: [
            list(
                BatchRebalanceSampler(
                    lengths, step, processes, 1, seed=SEED, rank=rank, drop_last=False
                )
            )
            for rank in range(processes)
        ],
    )
    yield (
        "kubetune, a group per process (before)",
        lambda: deal_out(
            lambda: SeededLengthGroupedSampler(batch_size, lengths, SEED), batch_size, processes
        ),
    )
    yield (
        "kubetune, a group per step, padded (now)",
        lambda: deal_out(
            lambda: SeededLengthGroupedSampler(step, lengths, SEED), batch_size, processes
        ),
    )
    yield (
        "kubetune, a group per step, padding-free (now)",
        lambda: deal_out(
            lambda: SeededLengthGroupedSampler(step, lengths, SEED, micro_batch=batch_size),
            batch_size,
            processes,
        ),
    )


def padding(deal: Deal, lengths: Sequence[int]) -> float:
    batches = [batch for rank in deal for batch in rank]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-parallel-") as tmp:
        lengths = planned_lengths(Path(tmp), args.examples)
    print(
        f"realistic shape: {len(lengths)} examples of {min(lengths)} to {max(lengths)} "
        f"tokens (median {sorted(lengths)[len(lengths) // 2]}), batch {args.batch_size} "
        "per process, one epoch"
    )
    for processes in args.processes:
        print(f"\n{processes} processes{'':36s} waiting: padding-free  padded   padding")
        figures = {}
        for name, make in samplers(lengths, args.batch_size, processes):
            deal = make()
            dealt = sorted(i for rank in deal for batch in rank for i in batch)
            assert set(dealt) == set(range(len(lengths))), name  # every example dealt
            figures[name] = (
                waiting(deal, lambda b: sum(lengths[i] for i in b)),
                waiting(deal, lambda b: len(b) * max(lengths[i] for i in b)),
                padding(deal, lengths),
            )
            free, padded, pad = figures[name]
            print(f"  {name:48s} {free:17.1%} {padded:8.1%} {pad:9.1%}")
        free = figures["kubetune, a group per step, padding-free (now)"][0]
        padded = figures["kubetune, a group per step, padded (now)"][1]
        base = figures["random order (plain TRL)"]
        print(
            f"{processes} processes: waiting padding-free {free:.1%} against plain TRL's "
            f"{base[0]:.1%}, padded {padded:.1%} against {base[1]:.1%}"
        )


if __name__ == "__main__":
    main()
