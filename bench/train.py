"""Throughput and memory of `kubetune train` against a plain TRL SFTTrainer script.

    .venv/bin/python bench/train.py [--shape tiny|realistic] [--gpu] [--repeat N]

Both train the same model on the same data with the same hyperparameters and seed,
each in its own child process, alternating; with --repeat the medians are printed (on
a shared machine single figures swing with whatever else runs).

- ``--shape tiny`` (the default): the tiny Qwen2.5-VL (hack/tiny.py), full tuning, on
  the colours x shapes data whose examples all have the same length: per-step overhead.
- ``--shape realistic``: a Qwen2.5-VL with a real model's architecture (about 32M
  parameters on a CPU; with --gpu the 3B configuration in bf16) and data with the
  length and image-size spread of real VLM fine-tuning data (bench/realistic_shape.py),
  LoRA on the language model, a held-out set scored after each epoch.

Printed per run, measured the same way in both children by one TrainerCallback
(Meter): trained (non-padding) tokens per second and samples per second over the
training time (the Trainer's loop, evaluations left out), the share of padding in
the positions the language model computes (none with paddingFree), the child's peak
RSS (and peak GPU memory), the final train loss (the Trainer's mean over the run) and
the last eval loss. On a GPU also the model FLOPs utilisation against the bf16 peak
(--peak-tflops).

The plain script is what a TRL user writes for a VLM: the PIL images in a datasets
column, TRL's own vision collator with assistant-only loss, no checkpoints. kubetune
also decodes and resizes each image in its collator, checkpoints every epoch and
serves metrics; those costs are in its figures.
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
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic dataset shared with the tests

sys.path.insert(0, str(REPO / "hack"))  # tiny.py, which builds the models

TINY_MAX_PIXELS = 3136
# Plain TRL's adapters on the same layers as kubetune's default targets
# (training/models.py default_lora_targets): every linear layer of the language model.
LANGUAGE_LINEAR_LAYERS = (
    r"model\.language_model\..*\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"
)


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run a child process; return its peak RSS in bytes (fails if the child fails)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-4000:])
        raise SystemExit(f"{argv[:4]} failed with exit code {process.returncode}")
    return int(usage.ru_maxrss) * 1024  # KiB on Linux


def meter() -> Any:
    """A TrainerCallback that counts what the model is given while it trains (a forward
    pre-hook: the same count whichever collator built the batch), the positions its
    language model computes (a pre-hook on the token embedding: the padded batch's, or
    a padding-free batch's real tokens only), and times the training loop without its
    evaluations."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.figures: dict[str, float] = {
                "samples": 0,
                "tokens": 0,
                "paddedTokens": 0,
                "imagePatches": 0,
                "evalSeconds": 0.0,
            }
            self.started = 0.0

        def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.figures["samples"] += ids.shape[0]
            self.figures["tokens"] += int(mask.sum())
            grid = kwargs.get("image_grid_thw")
            if grid is not None:
                self.figures["imagePatches"] += int(grid.prod(dim=-1).sum())

        def count_positions(self, module: Any, args: Any) -> None:
            if module.training:
                self.figures["paddedTokens"] += args[0].numel()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            model.register_forward_pre_hook(self.count, with_kwargs=True)
            model.get_input_embeddings().register_forward_pre_hook(self.count_positions)
            parameters = dict(model.named_parameters())
            self.figures["visionParameters"] = sum(
                p.numel() for name, p in parameters.items() if ".visual." in name
            )
            self.figures["parameters"] = sum(p.numel() for p in parameters.values())
            self.figures["trainableParameters"] = sum(
                p.numel() for p in parameters.values() if p.requires_grad
            )
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.started = time.perf_counter()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            metrics = kwargs["metrics"]
            self.figures["evalLoss"] = metrics["eval_loss"]
            self.figures["evalSeconds"] += metrics["eval_runtime"]

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if "train_loss" in kwargs["logs"]:
                self.figures["trainLoss"] = kwargs["logs"]["train_loss"]

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            elapsed = time.perf_counter() - self.started
            self.figures["trainSeconds"] = elapsed - self.figures["evalSeconds"]
            if torch.cuda.is_available():
                self.figures["peakGpuBytes"] = torch.cuda.max_memory_allocated()

    return Meter()


def finish(figures: dict[str, float], result: str) -> None:
    # This process's own peak, read when its work is done, as report.json's
    # peakMemoryBytes is.
    figures["peakBytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(result).write_text(json.dumps(figures))


def kubetune_child(spec: dict[str, Any], result: str) -> None:
    """`kubetune train` as the CLI runs it (runner.run), with the Meter added."""
    from kubetune_trainer.contract.job import TrainingConfig
    from kubetune_trainer.training import runner

    counter = meter()
    code = runner.run(TrainingConfig.model_validate(spec["job"]), callbacks=[counter])
    if code != 0:
        raise SystemExit(f"kubetune train exited {code}")
    finish(counter.figures, result)


def _trl_rows(path: str) -> list[dict[str, Any]]:
    from PIL import Image

    root = Path(path).parent
    rows = []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        user, assistant = record["messages"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user["content"].replace("<image>", "")},
                    {"role": "assistant", "content": assistant["content"]},
                ],
                "images": [Image.open(root / p).convert("RGB") for p in record.get("images", [])],
            }
        )
    return rows


def trl_child(spec: dict[str, Any], result: str) -> None:
    """The plain TRL script."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    job, hp = spec["job"], spec["job"]["hyperparameters"]
    cuda = torch.cuda.is_available()
    lora = job.get("tuning", "lora") == "lora"
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=hp["loraRank"],
            lora_alpha=hp["loraAlpha"],
            lora_dropout=hp["loraDropout"],
            target_modules=LANGUAGE_LINEAR_LAYERS,
            task_type="CAUSAL_LM",
        )
    held_out = job.get("validation", {}).get("dataset")
    args = SFTConfig(
        output_dir=str(Path(result).parent / "plain-trl"),
        num_train_epochs=hp["epochs"],
        per_device_train_batch_size=hp["batchSize"],
        per_device_eval_batch_size=hp["batchSize"],
        learning_rate=hp["learningRate"],
        seed=hp["seed"],
        logging_steps=hp["loggingSteps"],
        lr_scheduler_type="linear",
        warmup_steps=hp["warmupRatio"],
        assistant_only_loss=True,
        max_length=None,
        eval_strategy="epoch" if held_out else "no",
        bf16=cuda,
        # TRL's default on a GPU; on a CPU, as kubetune there, no recomputation.
        gradient_checkpointing=cuda,
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    processor = AutoProcessor.from_pretrained(job["baseModel"])
    # The processor resizes each image to within maxPixels, as kubetune's collator does.
    processor.image_processor.max_pixels = hp["maxPixels"]
    processor.image_processor.size["longest_edge"] = hp["maxPixels"]
    counter = meter()
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(
            job["baseModel"], dtype=torch.bfloat16 if cuda and lora else torch.float32
        ),
        args=args,
        train_dataset=Dataset.from_list(_trl_rows(job["dataset"])),
        eval_dataset=Dataset.from_list(_trl_rows(held_out)) if held_out else None,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[counter],
    )
    trainer.train()
    finish(counter.figures, result)


def _build_model(env: dict[str, str], work: Path, args: argparse.Namespace) -> str:
    """The model's folder, built in a child: Linux hands a parent's peak RSS on to the
    children it spawns, so this process never loads torch itself."""
    if args.shape == "tiny":
        code = "import tiny_models; print(tiny_models.tiny_model('qwen2_5_vl'))"
    else:
        size, device = ("3b", "cuda") if args.gpu else ("cpu", "cpu")
        # bench/ goes last on the path: its operator.py must not shadow the standard one.
        code = (
            f"import sys; sys.path.append({_HERE!r}); import realistic_shape; "
            f"print(realistic_shape.build_model({str(work / 'model')!r}, {size!r}, {device!r}))"
        )
    path = [str(REPO / "tests"), str(REPO / "hack"), env.get("PYTHONPATH", "")]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the model failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def _job(args: argparse.Namespace, work: Path, model: str) -> tuple[dict[str, Any], str]:
    """The job.json both children train from, and a line saying what it is."""
    common = {
        "baseModel": model,
        "outputDir": str(work / "kubetune"),
        "metricsPort": 0,
        "terminationLog": str(work / "termination-log"),
        "resume": False,  # every repeat trains from the start
    }
    if args.shape == "tiny":
        from tiny_models import write_shapes_dataset

        data = write_shapes_dataset(work, args.per_class, seed=1)
        examples = len(data.read_text().splitlines())
        epochs = args.epochs or 4
        job = {
            **common,
            "tuning": "full",
            "dataset": str(data),
            "hyperparameters": {
                "epochs": epochs,
                "batchSize": args.batch_size,
                "learningRate": 3e-3,
                "seed": 42,
                "loggingSteps": 10,
                "warmupRatio": 0.05,
                "maxPixels": TINY_MAX_PIXELS,
            },
        }
        return job, (
            f"tiny qwen2_5_vl, full tuning, {examples} examples x {epochs} epochs, "
            f"batch {args.batch_size}"
        )
    sys.path.append(_HERE)  # last, for the reason above
    import realistic_shape

    examples = args.examples or (2000 if args.gpu else 160)
    held_out = max(16, examples // 8)
    epochs = args.epochs or (1 if args.gpu else 2)
    train = realistic_shape.write_dataset(work, examples, seed=1, name="train.jsonl")
    validation = realistic_shape.write_dataset(work, held_out, seed=2, name="held-out.jsonl")
    job = {
        **common,
        "tuning": "lora",
        "dataset": str(train),
        "validation": {"dataset": str(validation)},
        "hyperparameters": {
            "epochs": epochs,
            "batchSize": args.batch_size,
            "learningRate": 2e-4 if args.gpu else 1e-3,
            "loraRank": 16,
            "loraAlpha": 32,
            "loraDropout": 0.05,
            "seed": 42,
            "loggingSteps": 10,
            "warmupRatio": 0.05,
            "maxPixels": realistic_shape.MAX_PIXELS,
        },
    }
    size = "Qwen2.5-VL-3B configuration, bf16" if args.gpu else "Qwen2.5-VL-style, 32M, fp32"
    return job, (
        f"realistic shape: {size}, LoRA r16 on the language model, {examples} examples "
        f"(+{held_out} held out) x {epochs} epochs, batch {args.batch_size}"
    )


def _flops_per_second(figures: dict[str, float], lora: bool) -> float:
    """Model FLOPs done per second of training: 2 per parameter per token forward, and
    backward 2 more for the activations' gradients plus (full tuning) 2 for the weights'.
    Frozen, the vision tower gets no backward pass under LoRA. Attention's own
    sequence-squared term is left out (a few percent at these lengths)."""
    vision = figures["visionParameters"]
    language = figures["parameters"] - vision
    per_token = (4 if lora else 6) * language
    per_patch = (2 if lora else 6) * vision / 4  # four patches merge into one token
    work = per_token * figures["tokens"] + per_patch * figures["imagePatches"]
    return work / figures["trainSeconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("tiny", "realistic"), default="tiny")
    parser.add_argument(
        "--gpu", action="store_true", help="realistic shape on a CUDA GPU: the 3B configuration"
    )
    parser.add_argument("--epochs", type=int, help="default: tiny 4, realistic 2 (GPU 1)")
    parser.add_argument(
        "--per-class", type=int, default=16, help="tiny: examples per colour x shape class"
    )
    parser.add_argument(
        "--examples", type=int, help="realistic: training examples (default 160, GPU 2000)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, alternating (medians shown)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the GPU's dense bf16 peak, for MFU (default: H100/H200 SXM, 989)",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="SWITCH",
        help="also run kubetune with this boolean hyperparameter off (e.g. groupByLength)",
    )
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.child:
        kind, spec, result = args.child
        child = {"kubetune": kubetune_child, "trl": trl_child}[kind]
        child(json.loads(Path(spec).read_text()), result)
        return

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO / "tests"), str(REPO / "hack"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    # Run name -> (child, what it prints as); each --without switch adds a kubetune run
    # with that measure off, so each measure's share shows on its own.
    names = {"kubetune": ("kubetune", "kubetune train"), "trl": ("trl", "plain TRL script")}
    for switch in args.without:
        names[f"kubetune-no-{switch}"] = ("kubetune", f"  {switch} off")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        model = _build_model(env, work, args)
        job, title = _job(args, work, model)
        for name in names:
            switch = name.removeprefix("kubetune-no-") if name.startswith("kubetune-no-") else None
            hp = {**job["hyperparameters"], **({switch: False} if switch else {})}
            (work / f"{name}.spec.json").write_text(
                json.dumps({"job": {**job, "hyperparameters": hp}})
            )
        for _ in range(args.repeat):
            for name, (child, _) in names.items():
                shutil.rmtree(work / "kubetune", ignore_errors=True)
                result = work / f"{name}.json"
                spec = work / f"{name}.spec.json"
                rss = run_child(
                    [sys.executable, __file__, "--child", child, str(spec), str(result)], env
                )
                figures = json.loads(result.read_text())
                figures["peakBytesWithExit"] = rss
                runs[name].append(figures)
                if args.out:  # as it goes: a run cut short still leaves its figures
                    args.out.write_text(json.dumps({"title": title, "runs": runs}))

    lora = job["tuning"] == "lora"
    print(f"{title}; CPU threads {os.cpu_count()}; median of {args.repeat}")
    # The first column fits the longest run name (a --without switch's).
    width = max(17, *(len(label) for _, label in names.values()))
    header = (
        f"{'':{width}s} {'tokens/s':>9s} {'samples/s':>9s} {'padding':>7s} {'peak RSS':>9s}"
        f" {'peak GPU':>9s} {'MFU':>6s} {'train loss':>10s} {'eval loss':>9s}"
    )
    print(header)
    medians: dict[str, dict[str, float]] = {}
    for kind, figures in runs.items():

        def median(key: str, figures: list[dict[str, float]] = figures) -> float:
            return statistics.median(f.get(key, math.nan) for f in figures)

        seconds = median("trainSeconds")
        m = {
            "tokensPerSecond": statistics.median(f["tokens"] / f["trainSeconds"] for f in figures),
            "samplesPerSecond": statistics.median(
                f["samples"] / f["trainSeconds"] for f in figures
            ),
            "padding": median("paddedTokens") and 1 - median("tokens") / median("paddedTokens"),
            "peakBytes": median("peakBytes"),
            "peakGpuBytes": median("peakGpuBytes"),
            "mfu": statistics.median(
                _flops_per_second(f, lora) / (args.peak_tflops * 1e12) for f in figures
            ),
            "trainLoss": median("trainLoss"),
            "evalLoss": median("evalLoss"),
            "trainSeconds": seconds,
        }
        medians[kind] = m
        gpu = m["peakGpuBytes"]
        mfu = f"{m['mfu']:.1%}" if args.gpu else ""
        print(
            f"{names[kind][1]:{width}s} {m['tokensPerSecond']:9.0f} {m['samplesPerSecond']:9.2f}"
            f" {m['padding']:7.1%} {m['peakBytes'] / 2**20:5.0f} MiB"
            f" {'' if math.isnan(gpu) else f'{gpu / 2**30:5.1f} GiB':>9s}"
            f" {mfu:>6s} {m['trainLoss']:10.4f}"
            f" {m['evalLoss']:9.4f}"
        )
    ours, theirs = medians["kubetune"], medians["trl"]
    if args.out:
        args.out.write_text(json.dumps({"title": title, "medians": medians, "runs": runs}))
    evaluated = not math.isnan(theirs["evalLoss"])
    delta = (ours["evalLoss"] - theirs["evalLoss"]) / theirs["evalLoss"] if evaluated else 0.0
    print(
        f"{args.shape}: tokens/s ratio {ours['tokensPerSecond'] / theirs['tokensPerSecond']:.2f}, "
        f"memory ratio {ours['peakBytes'] / theirs['peakBytes']:.2f}, "
        f"eval loss Δ {f'{delta:+.1%}' if evaluated else 'n/a (no held-out set)'}"
    )


if __name__ == "__main__":
    main()
