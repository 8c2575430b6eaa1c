"""Throughput and memory of `kubetune train` against a plain TRL SFTTrainer script.

    .venv/bin/python bench/train.py [--epochs N] [--per-class N] [--batch-size N] [--repeat N]

Both train the tiny Qwen2.5-VL model (hack/tiny.py) with full tuning on the
same synthetic colours x shapes data, with the same hyperparameters, each in its own
child process. Printed per run: training samples per second (examples x epochs over
the Trainer's train_runtime, the same formula for both) and the child's peak RSS
(ru_maxrss from wait4, so one child's peak never hides behind the other's). With
--repeat, the two alternate and the medians are printed: on a shared machine single
throughput figures swing with whatever else runs.

The plain script is what a TRL user writes for a VLM: the PIL images in a datasets
column, TRL's own vision collator with assistant-only loss, no checkpoints, no
validation. kubetune also decodes and resizes each image in its collator, checkpoints
every epoch and serves metrics; those costs are in its figure.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder leads sys.path, and bench/operator.py (the
# operator benchmark) would shadow the standard library's operator module. Only os
# and sys, which do not import it, come before this.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic dataset shared with the tests

MAX_PIXELS = 3136


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run a child process; return its peak RSS in bytes (fails if the child fails)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-4000:])
        raise SystemExit(f"{argv[:3]} failed with exit code {process.returncode}")
    return int(usage.ru_maxrss) * 1024  # KiB on Linux


def plain_trl(model: str, dataset: str, hyperparameters: dict[str, Any], result: str) -> None:
    """The plain TRL script, run in the child process."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    root = Path(dataset).parent
    rows = []
    for line in Path(dataset).read_text().splitlines():
        record = json.loads(line)
        user, assistant = record["messages"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user["content"].replace("<image>", "")},
                    {"role": "assistant", "content": assistant["content"]},
                ],
                "images": [Image.open(root / p).convert("RGB") for p in record["images"]],
            }
        )
    args = SFTConfig(
        output_dir=str(Path(result).parent / "plain-trl"),
        num_train_epochs=hyperparameters["epochs"],
        per_device_train_batch_size=hyperparameters["batchSize"],
        learning_rate=hyperparameters["learningRate"],
        seed=hyperparameters["seed"],
        logging_steps=hyperparameters["loggingSteps"],
        lr_scheduler_type="linear",
        warmup_steps=hyperparameters["warmupRatio"],
        assistant_only_loss=True,
        max_length=None,
        # CPU settings, as for kubetune there: fp32, no activation recomputation.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model),
    )
    runtime = trainer.train().metrics["train_runtime"]
    samples = len(rows) * hyperparameters["epochs"]
    # Measured as kubetune's report.json measures peakMemoryBytes: this process's own
    # peak, read when its work is done.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(result).write_text(json.dumps({"samplesPerSecond": samples / runtime, "peakBytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--per-class", type=int, default=16, help="examples per colour x shape class"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, alternating (medians shown)"
    )
    parser.add_argument(
        "--plain-trl", nargs=3, metavar=("MODEL", "DATA", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    hyperparameters = {
        "epochs": args.epochs,
        "batchSize": args.batch_size,
        "learningRate": 3e-3,
        "seed": 42,
        "loggingSteps": 10,
        "warmupRatio": 0.05,
        "maxPixels": MAX_PIXELS,
    }
    if args.plain_trl:
        plain_trl(*args.plain_trl[:2], hyperparameters, args.plain_trl[2])
        return

    from tiny_models import write_shapes_dataset

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    # Built in a child: Linux hands a parent's peak RSS on to children it spawns, so this
    # process must never load torch itself or it would inflate both measurements.
    model = (
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import tiny_models; print(tiny_models.tiny_model('qwen2_5_vl'))",
            ],
            env={**env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "hack")])},
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        data = write_shapes_dataset(work, args.per_class, seed=1)
        examples = len(data.read_text().splitlines())
        job = {
            "baseModel": model,
            "tuning": "full",
            "dataset": str(data),
            "hyperparameters": hyperparameters,
            "outputDir": str(work / "kubetune"),
            "metricsPort": 0,
            "terminationLog": str(work / "termination-log"),
            "resume": False,  # every repeat trains from the start
        }
        (work / "job.json").write_text(json.dumps(job))
        kubetune = str(Path(sys.executable).with_name("kubetune"))
        runs: dict[str, list[tuple[float, int, int]]] = {
            "kubetune train": [],
            "plain TRL script": [],
        }
        for _ in range(args.repeat):
            shutil.rmtree(work / "kubetune", ignore_errors=True)
            rss = run_child([kubetune, "train", "--config", str(work / "job.json")], env)
            report = json.loads((work / "kubetune" / "report.json").read_text())
            runs["kubetune train"].append(
                (report["samplesPerSecond"], report["peakMemoryBytes"], rss)
            )
            result = work / "plain.json"
            rss = run_child(
                [sys.executable, __file__, "--plain-trl", model, str(data), str(result)], env
            )
            plain = json.loads(result.read_text())
            runs["plain TRL script"].append((plain["samplesPerSecond"], plain["peakBytes"], rss))

    print(
        f"tiny qwen2_5_vl, full tuning, {examples} examples x {args.epochs} epochs, "
        f"batch {args.batch_size}, CPU threads {os.cpu_count()}, median of {args.repeat}"
    )
    print(f"{'':18s} {'samples/s':>10s} {'peak RSS':>10s} {'with exit':>10s}")
    for name, figures in runs.items():
        samples_per_second = statistics.median(f[0] for f in figures)
        peak = statistics.median(f[1] for f in figures)
        with_exit = statistics.median(f[2] for f in figures)
        print(
            f"{name:18s} {samples_per_second:10.1f} {peak / 2**20:6.0f} MiB "
            f"{with_exit / 2**20:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
