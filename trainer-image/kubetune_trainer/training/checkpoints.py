"""Checkpoints that resume correctly, and finding the one to resume from."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.trainer import TRAINER_STATE_NAME

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``folder`` that was written completely.

    transformers writes trainer_state.json last, so a checkpoint without it was cut off
    mid-write (the pod was killed) and is skipped; transformers' own
    get_last_checkpoint would pick it and fail to resume."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    ]
    return max(complete)[1] if complete else None


class ResumableCheckpoints:
    """Trainer mixin: checkpoints in the model's own parameter names, without a model card.

    transformers saves checkpoints in the hub's key layout (save_original_format) but
    loads them back, on resume and for the best model, with a plain load_state_dict that
    does not rename keys; for the models whose keys it renames on load (Qwen2.5-VL,
    LLaVA and other VLMs) nothing matches and training silently restarts from the base
    weights (transformers#48805). A checkpoint is only ever read back by the Trainer,
    so it keeps the model's layout; the exported model keeps the hub's.
    PEFT adapters name their weights the same way both ways and need no change."""

    model: Any

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No README.md model card: TRL writes one into every checkpoint (about 20 ms
        each), and checkpoints are only ever read back by the Trainer."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if not isinstance(self.model, PreTrainedModel):
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            return
        # The Trainer calls self.model.save_pretrained without a way to pass arguments;
        # shadow the method on the instance for the duration of this checkpoint.
        self.model.save_pretrained = functools.partial(  # type: ignore[method-assign]
            self.model.save_pretrained, save_original_format=False
        )
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            del self.model.save_pretrained
