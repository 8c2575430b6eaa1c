"""TrainingConfig -> TRL, PEFT and transformers settings. Pure: the hardware facts that
change the mapping come in as arguments, so every rule is tested without training.

Each method gets one function that returns its TRL config (``sft_config``,
``dpo_config``) built on the arguments every method shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peft import LoraConfig
from trl import SFTConfig

from kubetune_trainer.contract.job import TrainingConfig

if TYPE_CHECKING:
    from trl import DPOConfig

# transformers reads warmup_steps below 1 as a ratio of the total steps and 1 or more as
# a step count, so a ratio of exactly 1 (warm up for the whole run) is passed just below.
_MAX_WARMUP_RATIO = 0.999999
# The newest checkpoint (to resume from) plus the best one (kept by transformers anyway
# when load_best_model_at_end is on): disk use stays bounded on long runs.
_CHECKPOINTS_KEPT = 2


@dataclass(frozen=True)
class Hardware:
    """What the mapping needs to know about the machine it runs on."""

    cuda: bool
    bf16: bool

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def model_dtype(config: TrainingConfig, hw: Hardware) -> str:
    """LoRA keeps the frozen base in bf16 where the GPU has it (half the memory); full
    tuning keeps float32 master weights and trains under bf16 autocast."""
    return "bfloat16" if hw.bf16 and config.tuning == "lora" else "float32"


def training_arguments(config: TrainingConfig, hw: Hardware, *, has_eval: bool) -> dict[str, Any]:
    """transformers TrainingArguments shared by every method."""
    hp = config.hyperparameters
    return {
        # The Trainer's output_dir only ever holds checkpoints; the exported model,
        # report.json and loss.png go to config.output_dir.
        "output_dir": config.effective_checkpoint_dir,
        "num_train_epochs": hp.epochs,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": min(hp.warmup_ratio, _MAX_WARMUP_RATIO),
        "seed": hp.seed,
        "data_seed": hp.seed,
        # Each method names the planned-length column to group by (sft_config, dpo_config).
        "train_sampling_strategy": "group_by_length" if hp.group_by_length else "random",
        "logging_steps": hp.logging_steps,
        # Once per epoch here; every evalSteps/saveSteps as well comes from
        # callbacks.EvalSaveSchedule, since a strategy can name only one of the two.
        # Without evaluations it also decides the epoch-end checkpoints, by time.
        "eval_strategy": "epoch" if has_eval else "no",
        "save_strategy": "epoch" if has_eval else "no",
        "load_best_model_at_end": has_eval,
        "metric_for_best_model": "eval_loss" if has_eval else None,
        "greater_is_better": False if has_eval else None,
        "save_total_limit": _CHECKPOINTS_KEPT,
        # Early stopping's patience counter is resumed along with the model.
        "restore_callback_states_from_checkpoint": True,
        # Without a GPU, say so: accelerate only sets up gloo data parallelism under
        # torchrun for a CPU run it was told about.
        "use_cpu": not hw.cuda,
        "bf16": hw.bf16,
        "fp16": False,
        # On a GPU activation memory bounds the batch size; on a CPU, which only trains
        # small models, recomputing activations would just make it slower.
        "activation_checkpointing": (
            hw.cuda if hp.activation_checkpointing is None else hp.activation_checkpointing
        ),
        # Images are decoded and resized in the collator: workers keep a GPU fed.
        "dataloader_num_workers": 2 if hw.cuda else 0,
        # Otherwise they are started again for every epoch and evaluation (bench/gpu.py
        # on an H200: 0-24% more samples/s for its single-process runs).
        "dataloader_persistent_workers": hw.cuda,
        "dataloader_pin_memory": hw.cuda,
        # Records carry the chat, not model inputs; the collator needs every column.
        "remove_unused_columns": False,
        "report_to": "none",
        # callbacks.Telemetry prints one line per logging step instead of a progress bar.
        "disable_tqdm": True,
    }


def sft_config(config: TrainingConfig, hw: Hardware, *, has_eval: bool) -> SFTConfig:
    return SFTConfig(
        **training_arguments(config, hw, has_eval=has_eval),
        # Records are encoded, label-masked and truncated by collate.SFTCollator, so TRL's
        # own preparation (tokenizing, truncating, packing) stays off.
        dataset_kwargs={"skip_prepare_dataset": True},
        # A record's kept tokens, image tokens included (sft.plan_example): its padded width.
        length_column_name="keep",
        max_length=None,
        packing=False,
        assistant_only_loss=False,
    )


def dpo_config(config: TrainingConfig, hw: Hardware, *, has_eval: bool) -> DPOConfig:
    hp = config.hyperparameters.resolved(config.method, config.tuning)
    assert hp.beta is not None
    from trl import DPOConfig  # imported for DPO runs only, as runner imports DPOTrainer

    return DPOConfig(
        **training_arguments(config, hw, has_eval=has_eval),
        beta=hp.beta,
        # A pair's chats are padded together, so the longer one is the pair's width
        # (preference.plan_pair).
        length_column_name="longer_keep",
        loss_type=["sigmoid"],  # the DPO paper's loss
        # Pairs are encoded, masked to the final reply and truncated by
        # preference.PreferenceCollator; TRL's own truncation stays off.
        max_length=None,
        # Reference log-probabilities come from the frozen model (or the adapter switched
        # off) in the same step: no pass over the dataset before training starts.
        precompute_ref_log_probs=False,
    )


def lora_config(config: TrainingConfig, default_targets: str) -> LoraConfig | None:
    """The adapter settings for ``tuning: lora`` (None for full tuning). Without
    targetModules the adapters go on the language model's linear layers only."""
    if config.tuning != "lora":
        return None
    hp = config.hyperparameters.resolved(config.method, config.tuning)
    assert hp.lora_rank is not None and hp.lora_alpha is not None and hp.lora_dropout is not None
    return LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules or default_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
