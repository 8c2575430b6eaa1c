"""Plain helpers for the training tests: running jobs and writing small datasets."""

from __future__ import annotations

import gc
import importlib
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.utils.data import BatchSampler, Sampler
from transformers import PreTrainedModel, TrainerCallback

from kubetune_trainer.contract.job import TrainingConfig
from kubetune_trainer.data.example import Example, ImageRef, Turn

KUBETUNE = str(Path(sys.executable).with_name("kubetune"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Small, fast defaults: tests override what they are about.
FAST_HYPERPARAMETERS = {
    "epochs": 1,
    "batchSize": 4,
    "maxPixels": 3136,
    "loggingSteps": 2,
    "learningRate": 1e-3,
}

JobFactory = Callable[..., TrainingConfig]


def train(config: TrainingConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the job in this process; return its report.json."""
    from kubetune_trainer.training.runner import run

    assert run(config, **kwargs) == 0
    report: dict[str, Any] = json.loads((Path(config.output_dir) / "report.json").read_text())
    return report


def write_job(config: TrainingConfig, path: Path) -> Path:
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


WORDS = (
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "fish",
    "sun",
    "moon",
    "tree",
    "house",
    "car",
)


def write_text_dataset(
    path: Path, n: int, *, seed: int = 0, answer: Callable[[str], str] = lambda w: w
) -> Path:
    """Text-only chats with a system prompt: "say WORD" -> ``answer(WORD)``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = rng.choice(WORDS)
        lines.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer with one word."},
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": answer(word)},
                ]
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def with_rejected(source: Path, out: Path, choices: Sequence[str], *, seed: int) -> Path:
    """``source`` (one chat per line) as preference pairs: each final reply is the chosen
    one and a different one of ``choices``, drawn at random, the rejected one. Every
    choice is as often rejected as it is chosen (in expectation), so a model that
    ignores the prompt sits at chance."""
    rng = random.Random(seed)
    lines = []
    for line in source.read_text().splitlines():
        example = json.loads(line)
        chosen = example["messages"][-1]["content"]
        example["rejected_response"] = rng.choice([c for c in choices if c != chosen])
        lines.append(json.dumps(example))
    out.write_text("".join(line + "\n" for line in lines))
    return out


class ModelCounter(TrainerCallback):
    """Counts, when training begins, the live instances of the trained model's class
    (``models_at_start``); compare with ``models_before``, counted when created."""

    def __init__(self, model_class: str) -> None:
        self.model_class = model_class
        self.models_before = self.count()
        self.models_at_start: int | None = None

    def count(self) -> int:
        gc.collect()
        return sum(
            # The name first: isinstance on some torch objects warns of deprecation.
            type(o).__name__ == self.model_class and isinstance(o, PreTrainedModel)
            for o in gc.get_objects()
        )

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.models_at_start = self.count()

    @property
    def added(self) -> int:
        assert self.models_at_start is not None
        return self.models_at_start - self.models_before


def capture_trainers(monkeypatch: Any, method: str) -> list[Any]:
    """The trainers that the runner builds for ``method`` from now on, in a list."""
    from kubetune_trainer.training import runner

    module = importlib.import_module(runner.BUILDERS[method])
    built: list[Any] = []
    original = module.build_trainer

    def build(inputs: Any) -> Any:
        trainer, stats = original(inputs)
        built.append(trainer)
        return trainer, stats

    monkeypatch.setattr(module, "build_trainer", build)
    return built


def subset(path: Path, n: int, out: Path) -> Path:
    """The first ``n`` lines; their images stay beside ``path`` (pass imageRoot)."""
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def count_opens(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each image source is opened (decoded) from now on, by training's
    image loader."""
    from kubetune_trainer.training import images

    opened: Counter[str] = Counter()
    real = images.open_image

    def counting(ref: Any, *args: Any, **kwargs: Any) -> Image.Image:
        opened[ref.source] += 1
        return real(ref, *args, **kwargs)

    monkeypatch.setattr(images, "open_image", counting)
    return opened


def build_trainer(config: TrainingConfig) -> Any:
    """The method's trainer for ``config``, as the runner builds it, without training."""
    from kubetune_trainer.training.config_mapping import Hardware
    from kubetune_trainer.training.inputs import TrainerInputs
    from kubetune_trainer.training.models import is_multimodal, load_model, load_processing
    from kubetune_trainer.training.runner import load_builder, split_data

    processing = load_processing(config.base_model, trust_remote_code=False)
    train_examples, train_root, validation, validation_root = split_data(config)
    model = load_model(
        config.base_model,
        multimodal=is_multimodal(processing),
        trust_remote_code=False,
        dtype="float32",
    )
    trainer, _ = load_builder(config.method)(
        TrainerInputs(
            config=config,
            hardware=Hardware(cuda=False, bf16=False),
            model=model,
            processing=processing,
            train=train_examples,
            train_root=train_root,
            validation=validation,
            validation_root=validation_root,
            callbacks=[],
        )
    )
    return trainer


# -- a fixed padded batch and a model to run it through ------------------------------

CHAT_WORDS = ("red", "green", "blue", "square", "circle", "bar", "small", "large", "the", "shape")


def chat(line: int, words: int, image: str | None = None) -> Example:
    prompt: tuple[Any, ...] = ("describe this " * line,)
    if image:
        prompt = (ImageRef(image), *prompt)
    said = " ".join(CHAT_WORDS[(line * 7 + i) % len(CHAT_WORDS)] for i in range(words))
    return Example(turns=(Turn("user", prompt), Turn("assistant", (said,))), line=line)


def fixed_batch(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Three chats padded to the longest: on a VLM two with images of different sizes;
    prompt tokens (never trained) and padding in every row but the longest."""
    from kubetune_trainer.training.collate import SFTCollator
    from kubetune_trainer.training.models import is_multimodal, load_processing
    from kubetune_trainer.training.records import to_chat_record
    from kubetune_trainer.training.sft import chat_encoder, plan_lengths

    processing = load_processing(str(folder), trust_remote_code=False)
    multimodal = is_multimodal(processing)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "small.png")
    Image.new("RGB", (112, 84), (0, 0, 200)).save(tmp_path / "large.png")
    examples = [
        chat(1, 3, "small.png" if multimodal else None),
        chat(2, 40),
        chat(3, 9, "large.png" if multimodal else None),
    ]
    encoder = chat_encoder(processing, max_pixels=112 * 112)
    records = [to_chat_record(e, tmp_path, multimodal=multimodal) for e in examples]
    batch: dict[str, torch.Tensor] = SFTCollator(encoder)(
        plan_lengths(encoder, records, max_length=4096).kept
    )
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (mask == 0).any() and ((labels == -100) & (mask == 1)).any()
    return batch


def loaded(folder: Path, tuning: str, *, padding_free: bool = False) -> Any:
    """The model in float32 and eval mode, its forward patched for the trained
    positions; with LoRA adapters whose B is random; switched to packed attention with
    ``padding_free``."""
    from kubetune_trainer.training.models import (
        default_lora_targets,
        is_multimodal,
        load_model,
        load_processing,
    )
    from kubetune_trainer.training.padding_free import enable_padding_free
    from kubetune_trainer.training.trained_positions import add_trained_positions_head, patch_target

    processing = load_processing(str(folder), trust_remote_code=False)
    model = load_model(
        str(folder),
        multimodal=is_multimodal(processing),
        trust_remote_code=False,
        dtype="float32",
    )
    if padding_free:
        assert enable_padding_free(model)
    if tuning == "lora":
        # Random B (not PEFT's zeros), so that both adapter matrices get gradients.
        torch.manual_seed(0)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=default_lora_targets(model),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model.eval()  # no dropout: both passes must see the same network
    add_trained_positions_head(patch_target(model))
    return model


def gradients(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    # Parameters the loss does not reach (LLaVA's last vision layer) have none.
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    return grads


def assert_same_gradients(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, atol: float
) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=atol, msg=name)


# -- data parallelism, simulated ------------------------------------------------------

Deal = list[list[list[int]]]  # per process, its micro-batches in order


def deal_out(sampler: Callable[[], Sampler[int]], batch_size: int, processes: int) -> Deal:
    """Each process's micro-batches, as accelerate deals a sampler's batches out to the
    processes of a data-parallel run (BatchSamplerShard). Each process makes its sampler
    after seeding torch alike: accelerate synchronises the processes' RNGs at each
    epoch's start, so samplers that draw from them agree on the order too."""
    deal = []
    for rank in range(processes):
        torch.manual_seed(0)
        batches = BatchSampler(sampler(), batch_size, drop_last=False)
        deal.append(list(BatchSamplerShard(batches, processes, rank)))
    return deal


def waiting(deal: Deal, cost: Callable[[list[int]], float]) -> float:
    """The share of process time spent waiting, at each step's gradient sync, for the
    step's slowest process, a micro-batch taking ``cost(batch)``."""
    steps = list(zip(*([cost(batch) for batch in rank] for rank in deal), strict=False))
    return 1 - sum(map(sum, steps)) / sum(len(s) * max(s) for s in steps)
