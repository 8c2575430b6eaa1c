"""preserveGeneralSkills for real: on the tiny VLM, with the same data and steps as plain
SFT, the model drifts at most half as far from its base on unrelated text prompts
(klToBase) and learns the image task as well; LoRA scores the base with the adapter
off (no second copy), full tuning against a frozen copy; the KL is its own metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from training.support import JobFactory, ModelCounter, capture_trainers, train, write_text_dataset

from kubetune_trainer.training.evaluate import evaluate
from kubetune_trainer.training.preserve import distillation_kl
from kubetune_trainer.training.sft import PreserveSkillsSFTTrainer

pytestmark = pytest.mark.training

VLM_CLASS = "Qwen2_5_VLForConditionalGeneration"
# As the learnability test: full tuning, where a model this small really learns (and
# drifts); LoRA on it barely moves either way.
HYPERPARAMETERS = {"epochs": 12, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 12}


def test_distillation_kl_is_the_kl_of_the_tempered_distributions() -> None:
    torch.manual_seed(0)
    logits, base = torch.randn(5, 11), torch.randn(5, 11)
    expected = F.kl_div(
        F.log_softmax(logits / 2, -1),
        F.log_softmax(base / 2, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    assert torch.allclose(distillation_kl(logits, base, 2.0), expected, atol=1e-6)
    assert torch.allclose(distillation_kl(base, base, 2.0), torch.zeros(5), atol=1e-6)


def test_preserve_skills_halves_the_drift_on_unrelated_prompts_and_keeps_the_task(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Any,
) -> None:
    unrelated = write_text_dataset(tmp_path / "unrelated.jsonl", 24, seed=3)
    trainers = capture_trainers(monkeypatch, "sft")

    def tuned(name: str, **fields: Any) -> tuple[dict[str, Any], ModelCounter]:
        counter = ModelCounter(VLM_CLASS)
        config = job(
            tiny_qwen2_5_vl,
            shapes_task.train,
            tuning="full",
            outputDir=str(tmp_path / name),
            hyperparameters=HYPERPARAMETERS,
            **fields,
        )
        return train(config, callbacks=[counter]), counter

    def scores(report: dict[str, Any]) -> tuple[float, float]:
        common = {"max_pixels": 3136, "max_new_tokens": 6, "batch_size": 36}
        accuracy = evaluate(
            model_path=report["outputDir"], data=str(shapes_task.held_out), **common
        )
        drift = evaluate(
            model_path=report["outputDir"],
            base_path=str(tiny_qwen2_5_vl),
            data=str(unrelated),
            **common,
        )
        return float(accuracy["accuracy"]), float(drift["klToBase"])

    plain_report, _ = tuned("plain")
    preserve_report, counter = tuned(
        "preserve", preserveGeneralSkills={"enabled": True, "lambda": 0.5, "temperature": 2.0}
    )
    plain_accuracy, plain_kl = scores(plain_report)
    preserve_accuracy, preserve_kl = scores(preserve_report)
    for name, value in {
        "plain_accuracy": plain_accuracy,
        "plain_kl": plain_kl,
        "preserve_accuracy": preserve_accuracy,
        "preserve_kl": preserve_kl,
    }.items():
        record_property(name, value)
    print(
        f"klToBase on unrelated prompts: plain SFT {plain_kl:.2f}, preserve {preserve_kl:.2f}; "
        f"task accuracy: plain {plain_accuracy:.0%}, preserve {preserve_accuracy:.0%}"
    )

    assert preserve_kl <= plain_kl / 2
    assert preserve_accuracy >= plain_accuracy - 0.1
    assert preserve_accuracy >= 0.9

    plain, preserve = trainers
    assert not isinstance(plain, PreserveSkillsSFTTrainer)
    assert isinstance(preserve, PreserveSkillsSFTTrainer)
    assert preserve.kl_weight == 0.5 and preserve.temperature == 2.0
    # Full tuning: the base is a frozen copy, one model more.
    assert counter.added == 2 and preserve.base_model is not None
    assert not any(p.requires_grad for p in preserve.base_model.parameters())
    # The KL term is its own metric; plain SFT has none.
    assert preserve_report["trainKl"] > 0 and "trainKl" not in plain_report
    assert preserve_report["steps"] == plain_report["steps"]


def test_lora_preserve_skills_scores_the_base_with_the_adapter_off(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainers = capture_trainers(monkeypatch, "sft")
    counter = ModelCounter(VLM_CLASS)
    report = train(
        job(
            tiny_qwen2_5_vl,
            shapes_task.train,
            tuning="lora",
            preserveGeneralSkills={"enabled": True, "lambda": 1.0},
            validation={"dataset": str(shapes_task.held_out)},
            hyperparameters={"epochs": 1, "batchSize": 8, "learningRate": 5e-3, "loggingSteps": 3},
        ),
        callbacks=[counter],
    )
    (trainer,) = trainers
    assert isinstance(trainer, PreserveSkillsSFTTrainer)
    assert counter.added == 1  # no second copy of the model
    assert trainer.base_model is None and isinstance(trainer.model, PeftModel)
    assert trainer.temperature == 2.0  # the default
    # The adapter starts at zero (the base itself), so the KL starts at 0 and grows.
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls and all(kl >= 0 for kl in kls) and kls[-1] > 0
    assert report["trainKl"] == pytest.approx(kls[-1])
    assert report["evalKl"] is not None and report["evalLoss"] is not None
    assert report["trainLoss"] < 6
