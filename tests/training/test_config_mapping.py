"""TrainingConfig -> TRL/PEFT settings, checked without training."""

from __future__ import annotations

import re

import pytest

from kubetune_trainer.contract.job import TrainingConfig
from kubetune_trainer.training.config_mapping import (
    Hardware,
    dpo_config,
    lora_config,
    model_dtype,
    sft_config,
    training_arguments,
)

CPU = Hardware(cuda=False, bf16=False)
GPU = Hardware(cuda=True, bf16=True)


def config(**fields: object) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {"baseModel": "m", "dataset": "d.jsonl", "outputDir": "/out", **fields}
    )


def test_hyperparameters_map_to_training_arguments() -> None:
    cfg = config(
        hyperparameters={
            "epochs": 5,
            "batchSize": 2,
            "learningRate": 3e-4,
            "gradientAccumulationSteps": 4,
            "warmupRatio": 0.1,
            "seed": 7,
            "loggingSteps": 3,
        },
        checkpointDir="/ckpt",
    )
    args = training_arguments(cfg, CPU, has_eval=True)
    assert args["num_train_epochs"] == 5
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 2
    assert args["learning_rate"] == 3e-4
    assert args["gradient_accumulation_steps"] == 4
    assert args["warmup_steps"] == 0.1  # below 1: a ratio of the total steps
    assert args["seed"] == args["data_seed"] == 7
    assert args["logging_steps"] == 3
    assert args["output_dir"] == "/ckpt"
    assert args["report_to"] == "none"


def test_checkpoints_default_inside_the_output_dir() -> None:
    assert training_arguments(config(), CPU, has_eval=False)["output_dir"] == "/out/checkpoints"


def test_warmup_over_the_whole_run_stays_a_ratio() -> None:
    args = training_arguments(config(hyperparameters={"warmupRatio": 1.0}), CPU, has_eval=False)
    assert 0.999 < args["warmup_steps"] < 1


def test_validation_turns_on_per_epoch_eval_and_best_model_export() -> None:
    args = training_arguments(config(), CPU, has_eval=True)
    assert args["eval_strategy"] == args["save_strategy"] == "epoch"
    assert args["load_best_model_at_end"] is True
    assert args["metric_for_best_model"] == "eval_loss"
    assert args["greater_is_better"] is False
    assert args["restore_callback_states_from_checkpoint"] is True

    no_eval = training_arguments(config(), CPU, has_eval=False)
    assert no_eval["eval_strategy"] == "no"
    assert no_eval["load_best_model_at_end"] is False
    # Still resumable: callbacks.EvalSaveSchedule checkpoints by time and saveSteps.
    assert no_eval["save_strategy"] == "no"


def test_hardware_decides_precision_and_checkpointing() -> None:
    cpu, gpu = (
        training_arguments(config(), CPU, has_eval=False),
        training_arguments(config(), GPU, has_eval=False),
    )
    assert (cpu["bf16"], cpu["use_cpu"], cpu["activation_checkpointing"]) == (False, True, False)
    assert (gpu["bf16"], gpu["use_cpu"], gpu["activation_checkpointing"]) == (True, False, True)
    assert (gpu["dataloader_num_workers"], gpu["dataloader_persistent_workers"]) == (2, True)
    assert (cpu["dataloader_num_workers"], cpu["dataloader_persistent_workers"]) == (0, False)
    assert model_dtype(config(tuning="lora"), GPU) == "bfloat16"
    assert model_dtype(config(tuning="full"), GPU) == "float32"
    assert model_dtype(config(tuning="lora"), CPU) == "float32"
    # activationCheckpointing set either way overrides the hardware's default.
    for hardware in (CPU, GPU):
        for on in (True, False):
            chosen = config(hyperparameters={"activationCheckpointing": on})
            assert (
                training_arguments(chosen, hardware, has_eval=False)["activation_checkpointing"]
                is on
            )


def test_sft_config_leaves_masking_and_truncation_to_the_collator() -> None:
    sft = sft_config(config(), CPU, has_eval=False)
    assert sft.dataset_kwargs == {"skip_prepare_dataset": True}
    assert sft.max_length is None
    assert sft.packing is False
    assert sft.assistant_only_loss is False
    assert sft.remove_unused_columns is False


def test_dpo_config_takes_beta_and_leaves_truncation_to_the_collator() -> None:
    default = dpo_config(config(method="dpo"), CPU, has_eval=True)
    assert default.beta == 0.1
    assert default.loss_type == ["sigmoid"]
    assert default.max_length is None and default.precompute_ref_log_probs is False
    assert default.remove_unused_columns is False
    assert default.metric_for_best_model == "eval_loss" and default.load_best_model_at_end
    tuned = dpo_config(config(method="dpo", hyperparameters={"beta": 0.5}), CPU, has_eval=False)
    assert tuned.beta == 0.5


def test_lora_defaults_target_the_language_model() -> None:
    targets = r"model\.language_model\..*\.(q_proj|v_proj)"
    lora = lora_config(config(tuning="lora"), targets)
    assert lora is not None
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 32, 0.05)
    assert lora.target_modules == targets
    assert lora.task_type == "CAUSAL_LM"


def test_lora_settings_and_target_modules_from_the_job() -> None:
    cfg = config(
        tuning="lora",
        hyperparameters={
            "loraRank": 16,
            "loraAlpha": 8,
            "loraDropout": 0.0,
            "targetModules": ["q_proj", "qkv"],
        },
    )
    lora = lora_config(cfg, "unused")
    assert lora is not None
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 8, 0.0)
    assert set(lora.target_modules) == {"q_proj", "qkv"}


def test_full_tuning_has_no_adapter() -> None:
    assert lora_config(config(tuning="full"), "unused") is None


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("model.language_model.layers.0.self_attn.q_proj", True),
        ("model.language_model.layers.11.mlp.down_proj", True),
        ("model.visual.blocks.0.mlp.down_proj", False),
        ("model.multi_modal_projector.linear_1", False),
        ("lm_head", False),
    ],
)
def test_default_target_regex_leaves_the_vision_tower_alone(
    tiny_qwen2_5_vl: object, name: str, matches: bool
) -> None:
    from transformers import AutoModelForImageTextToText

    from kubetune_trainer.training.models import default_lora_targets

    pattern = default_lora_targets(AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl))
    assert bool(re.fullmatch(pattern, name)) is matches


def test_batches_are_grouped_by_planned_length_unless_switched_off() -> None:
    preserve = config(preserveGeneralSkills={"enabled": True})
    for sft in (
        sft_config(config(), CPU, has_eval=True),
        sft_config(preserve, CPU, has_eval=False),
    ):
        assert sft.train_sampling_strategy == "group_by_length"
        assert sft.length_column_name == "keep"
    dpo = dpo_config(config(method="dpo"), CPU, has_eval=True)
    assert dpo.train_sampling_strategy == "group_by_length"
    assert dpo.length_column_name == "longer_keep"
    off = config(hyperparameters={"groupByLength": False})
    assert sft_config(off, CPU, has_eval=True).train_sampling_strategy == "random"
