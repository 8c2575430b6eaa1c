"""The API models and the trainer contract, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.api.crds import ALL
from kubetune_trainer.contract.job import Hyperparameters, TrainingConfig

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
SPECS = {info.kind: info.spec for info in ALL}


def kubetune_documents(path: Path) -> list[dict[str, object]]:
    """The kubetune objects of an example file (some also hold the ConfigMap or Secret
    they name)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if str(d["apiVersion"]).startswith("kubetune.io/")]


def test_examples_exist_for_every_kind() -> None:
    kinds = {doc["kind"] for p in EXAMPLES for doc in kubetune_documents(p)}
    assert kinds == set(SPECS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_with_the_models(path: Path) -> None:
    docs = kubetune_documents(path)
    assert docs
    for doc in docs:
        SPECS[str(doc["kind"])].model_validate(doc["spec"])


def test_hyperparameter_defaults_are_a_small_vlm_service_s() -> None:
    hp = Hyperparameters().resolved("sft", "lora")
    assert (hp.epochs, hp.batch_size, hp.learning_rate, hp.warmup_ratio) == (3, 4, 1e-4, 0.05)
    assert (hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.beta) == (8, 32, 0.05, None)
    full_dpo = Hyperparameters().resolved("dpo", "full")
    assert (full_dpo.lora_rank, full_dpo.beta) == (None, 0.1)
    assert Hyperparameters(loraRank=16).resolved("sft", "lora").lora_rank == 16


def test_training_config_is_camel_case_json_and_round_trips() -> None:
    cfg = TrainingConfig.model_validate(
        {
            "baseModel": "/models/tiny",
            "dataset": "/data/train.jsonl",
            "outputDir": "/out",
            "validation": {"split": 0.1},
            "hyperparameters": {"loraRank": 4, "maxPixels": 3136},
            "preserveGeneralSkills": {"enabled": True, "lambda": 1.0},
        }
    )
    dumped = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["hyperparameters"]["loraRank"] == 4
    assert dumped["preserveGeneralSkills"]["lambda"] == 1.0
    assert cfg.effective_checkpoint_dir == "/out/checkpoints"
    assert TrainingConfig.model_validate_json(cfg.model_dump_json(by_alias=True)) == cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tuning": "full", "hyperparameters": {"loraRank": 8}}, "tuning: lora"),
        ({"hyperparameters": {"beta": 0.2}}, "method: dpo"),
        ({"method": "dpo", "preserveGeneralSkills": {"enabled": True}}, "method: sft"),
        ({"validation": {"split": 0.1, "dataset": "/v.jsonl"}}, "exactly one"),
        ({"validation": {"split": 1.0}}, "less than 1"),
        ({"hyperparameters": {"maxPixels": 100}}, "784"),
        ({"datasetSha256": "abc"}, "pattern"),
        ({"unknownField": 1}, "Extra inputs"),
    ],
)
def test_training_config_rejects_contradictions(extra: dict[str, object], message: str) -> None:
    base = {"baseModel": "m", "dataset": "d.jsonl", "outputDir": "/out"}
    with pytest.raises(ValidationError, match=message):
        TrainingConfig.model_validate({**base, **extra})
