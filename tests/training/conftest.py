"""Fixtures for the training tests (helpers that are plain functions: training.support)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from training.support import FAST_HYPERPARAMETERS, JobFactory

from kubetune_trainer.contract.job import TrainingConfig


@pytest.fixture
def job(tmp_path: Path) -> JobFactory:
    """``job(base_model, dataset, **fields)``: a TrainingConfig writing to tmp_path/out,
    metrics off; ``hyperparameters`` entries are merged over FAST_HYPERPARAMETERS."""

    def make(base_model: Path, dataset: Path, **fields: Any) -> TrainingConfig:
        hyperparameters = {**FAST_HYPERPARAMETERS, **fields.pop("hyperparameters", {})}
        return TrainingConfig.model_validate(
            {
                "baseModel": str(base_model),
                "dataset": str(dataset),
                "outputDir": str(tmp_path / "out"),
                "metricsPort": 0,
                "terminationLog": str(tmp_path / "termination-log"),
                "hyperparameters": hyperparameters,
                **fields,
            }
        )

    return make


@pytest.fixture(params=["qwen2_5_vl", "llava", "qwen2"])
def model_folder(request: pytest.FixtureRequest) -> Path:
    """Each tiny model family in turn: Qwen2.5-VL, LLaVA, and the Qwen2 causal LM."""
    folder: Path = request.getfixturevalue(f"tiny_{request.param}")
    return folder
