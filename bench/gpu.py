"""`kubetune train` and `kubetune evaluate` on a CUDA GPU: the path a cluster's GPU pod
takes (bf16, activation checkpointing, dataloader workers, NCCL), which the CPU tests
cannot reach.

    python bench/gpu.py [--out DIR]

Builds the tiny models, then trains each run in its own process on the GPU and scores
the result on held-out data with `kubetune evaluate --json`:

- full SFT of the tiny Qwen2.5-VL on the colours x shapes task (fp32 master weights
  under bf16 autocast), and of the tiny LLaVA;
- LoRA SFT of the tiny Qwen2.5-VL (bf16 base), with and without preserveGeneralSkills;
- LoRA SFT of the tiny causal LM on a text-only task;
- full DPO of the tiny Qwen2.5-VL on the preference version of the shapes task;
- full SFT under `torchrun` (NCCL) with a validation split.

Prints one line per run (samples/s, peak GPU memory, final train loss, held-out score
of the tuned model and of its base) and exits 1 if any run failed or a full SFT or DPO
run stayed under 80% on held-out data. The CPU tests hold 90% in float32; under bf16
autocast a 0.2M-parameter model loses a few points (full DPO: 89% on an H200).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The tiny models (tests/tiny_models.py, which imports hack/tiny.py) and task data
# shared with the tests.
sys.path[:0] = [str(REPO / "tests"), str(REPO / "hack")]

CLI = [sys.executable, "-m", "kubetune_trainer.cli"]
MAX_PIXELS = 3136
# The CPU tests' settings for these tasks (tests/training/test_learnability.py, test_dpo.py).
FULL_SFT = {"epochs": 12, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 12}
LORA_SFT = {"epochs": 12, "batchSize": 8, "learningRate": 5e-3, "loggingSteps": 12}
FULL_DPO = {"epochs": 6, "batchSize": 8, "learningRate": 2e-3, "loggingSteps": 6}


@dataclass
class Run:
    name: str
    model: Path
    data: Path
    held_out: Path
    fields: dict[str, Any]
    hyperparameters: dict[str, Any]
    torchrun: bool = False
    must_learn: bool = False
    result: dict[str, Any] = field(default_factory=dict)


def train(run: Run, work: Path) -> dict[str, Any]:
    out = work / run.name
    job = {
        "baseModel": str(run.model),
        "dataset": str(run.data),
        "outputDir": str(out),
        "metricsPort": 0,
        "terminationLog": str(work / f"{run.name}.termination-log"),
        "resume": False,
        "hyperparameters": {"maxPixels": MAX_PIXELS, **run.hyperparameters},
        **run.fields,
    }
    config = work / f"{run.name}.json"
    config.write_text(json.dumps(job))
    command = [*CLI, "train", "--config", str(config)]
    if run.torchrun:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "kubetune_trainer.cli",
            "train",
            "--config",
            str(config),
        ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"train exited {done.returncode}:\n{done.stderr[-4000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def evaluate(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    output = report["outputDir"]
    if run.fields.get("tuning", "lora") == "lora":
        target = ["--model", str(run.model), "--adapter", output]
    else:
        target = ["--model", output, "--base", str(run.model)]
    done = subprocess.run(
        [
            *CLI,
            "evaluate",
            *target,
            "--data",
            str(run.held_out),
            "--json",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "36",
            "--max-pixels",
            str(MAX_PIXELS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"evaluate exited {done.returncode}:\n{done.stderr[-4000:]}")
    scores: dict[str, Any] = json.loads(done.stdout)
    return scores


def score(scores: dict[str, Any]) -> tuple[str, float, float]:
    """The figure that says whether the run learnt: preference accuracy for DPO data,
    exact match otherwise."""
    key = "preferenceAccuracy" if "preferenceAccuracy" in scores else "accuracy"
    return key, float(scores[key]), float(scores["base"][key])


def runs(work: Path) -> list[Run]:
    from tiny_models import COLOURS, SHAPES, tiny_model, write_shapes_dataset
    from training.support import with_rejected, write_text_dataset

    data = work / "data"
    train_set = write_shapes_dataset(data, 16, seed=1, name="train.jsonl")
    held_out = write_shapes_dataset(data, 6, seed=2, name="held_out.jsonl")
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    dpo_train = with_rejected(
        write_shapes_dataset(data, 8, seed=1, name="sft-pairs.jsonl"),
        data / "pairs.jsonl",
        classes,
        seed=1,
    )
    dpo_held_out = with_rejected(held_out, data / "pairs-held-out.jsonl", classes, seed=2)
    text_train = write_text_dataset(data / "text.jsonl", 64, seed=1, answer=str.upper)
    text_held_out = write_text_dataset(data / "text-held-out.jsonl", 24, seed=2, answer=str.upper)

    vlm, llava, llm = (tiny_model(f) for f in ("qwen2_5_vl", "llava", "qwen2"))
    full = {"tuning": "full"}
    return [
        Run("vlm-full", vlm, train_set, held_out, full, FULL_SFT, must_learn=True),
        Run("llava-full", llava, train_set, held_out, full, FULL_SFT, must_learn=True),
        Run("vlm-lora", vlm, train_set, held_out, {"tuning": "lora"}, LORA_SFT),
        Run(
            "vlm-lora-preserve",
            vlm,
            train_set,
            held_out,
            {"tuning": "lora", "preserveGeneralSkills": {"enabled": True}},
            LORA_SFT,
        ),
        Run("llm-lora", llm, text_train, text_held_out, {"tuning": "lora"}, LORA_SFT),
        Run(
            "vlm-dpo-full",
            vlm,
            dpo_train,
            dpo_held_out,
            {"method": "dpo", "tuning": "full"},
            FULL_DPO,
            must_learn=True,
        ),
        Run(
            "vlm-full-torchrun",
            vlm,
            train_set,
            held_out,
            {"tuning": "full", "validation": {"split": 0.25}},
            {**FULL_SFT, "epochs": 2},
            torchrun=True,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="keep outputs and reports here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark checks the GPU path", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        failed = []
        header = f"{'run':18s} {'samples/s':>9s} {'GPU MiB':>8s} {'loss':>7s}  held-out (base)"
        lines = []
        for run in runs(work):
            try:
                report = train(run, work)
                key, tuned, base = score(evaluate(run, report))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failed.append(run.name)
                print(f"{run.name}: FAILED\n{exc}", file=sys.stderr)
                continue
            gpu = (report.get("peakGpuMemoryBytes") or 0) / 2**20
            line = (
                f"{run.name:18s} {report['samplesPerSecond']:9.1f} {gpu:8.0f} "
                f"{report['trainLoss']:7.3f}  {key} {tuned:.0%} ({base:.0%})"
            )
            if report.get("evalLoss") is not None:
                line += f", eval loss {report['evalLoss']:.3f}"
            lines.append(line)
            print(line, flush=True)
            if run.must_learn and tuned < 0.8:
                failed.append(run.name)
        print("\n" + header + "\n" + "\n".join(lines))
        if failed:
            print(f"failed or did not learn: {', '.join(failed)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
