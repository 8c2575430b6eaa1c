"""The rules across a training job's fields are written once (kubetune_trainer.contract
.rules) and enforced twice: as CEL when the API server admits a FineTuneJob, and in
Python when the trainer reads the job.json the operator made from it. A table of cases
goes through both; they must agree on every one."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml
from kube import Kubectl
from pydantic import ValidationError

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import SPEC_RULES, FineTuneJobSpec
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_trainer.contract.rules import REQUIREMENTS, RULES, broken

pytestmark = pytest.mark.apiserver

DATA = DatasetSpec.model_validate({"source": {"pvc": {"claimName": "data", "path": "t.jsonl"}}})

# Every field a rule is about, set alone, under every method and tuning.
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "lora-rank": {"hyperparameters": {"loraRank": 16}},
    "lora-alpha": {"hyperparameters": {"loraAlpha": 8}},
    "lora-dropout": {"hyperparameters": {"loraDropout": 0.1}},
    "target-modules": {"hyperparameters": {"targetModules": ["q_proj"]}},
    "beta": {"hyperparameters": {"beta": 0.2}},
    "preserve-on": {"preserveGeneralSkills": {"enabled": True}},
    "preserve-off": {"preserveGeneralSkills": {"enabled": False, "lambda": 2}},
    "early-stop": {"earlyStopping": {"patience": 2}, "validation": {"split": 0.2}},
    "early-stop-alone": {"earlyStopping": {"patience": 2}},
}
CASES = [
    (f"{method}-{tuning}-{setting}", {"method": method, "tuning": tuning, **extra})
    for (method, tuning), (setting, extra) in itertools.product(
        itertools.product(("sft", "dpo"), ("lora", "full")), SETTINGS.items()
    )
]


def finetunejob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"name": "org/model"},
            "dataset": {"name": "train"},
            "outputModel": {"name": "out", "storage": {"pvc": {"claimName": "m", "path": "o"}}},
            **spec,
        },
    }


def trainer_accepts(body: dict[str, Any]) -> bool:
    """Whether the job.json the operator makes of this FineTuneJob would run: parsed
    (TrainingConfig checks the rules that make a job malformed) and then checked for
    what the run requires (the runner's check)."""
    spec = FineTuneJobSpec.model_validate(body["spec"])
    try:
        plan = tj.plan(
            tj.Inputs(finetunejob=body, spec=spec, dataset=DATA, dataset_sha256=None), "trainer"
        )
    except ValidationError:
        return False
    return not broken(REQUIREMENTS, plan.config)


def test_every_rule_is_in_the_crd() -> None:
    assert len(SPEC_RULES) == len(RULES)


def test_the_api_server_and_the_trainer_agree_on_every_case(kubectl: Kubectl) -> None:
    ns = kubectl.new_namespace("rules")
    bodies = {name: finetunejob(name, spec) for name, spec in CASES}
    proc = kubectl.run(
        "apply",
        "-n",
        ns,
        "--dry-run=server",
        "-o",
        "name",
        "-f",
        "-",
        input=yaml.safe_dump_all(bodies.values()),
        check=False,
    )
    admitted = {line.rsplit("/", 1)[-1] for line in proc.stdout.split()}
    refused = set(bodies) - admitted
    assert all(f'"{name}" is invalid' in proc.stderr for name in refused), proc.stderr
    trainer = {name for name, body in bodies.items() if trainer_accepts(body)}
    assert admitted == trainer, {
        "admitted, but the trainer refuses": sorted(admitted - trainer),
        "refused, but the trainer runs": sorted(trainer - admitted),
    }
    # The table exercises both outcomes of every rule.
    assert {"sft-lora-plain", "dpo-full-beta", "sft-full-preserve-off"} <= admitted
    assert {"sft-full-lora-rank", "sft-lora-beta", "dpo-lora-preserve-on"} <= refused
    assert "sft-lora-early-stop-alone" in refused and "sft-lora-early-stop" in admitted
