"""Checkpoints that resume correctly, and finding the one to resume from."""

from __future__ import annotations

import fcntl
import functools
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedModel,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME

from kubetune_trainer.transfer import (
    FetchError,
    delete_s3,
    fetch_s3,
    s3_exists,
    s3_folders,
    upload_s3,
)

log = logging.getLogger("kubetune.train")

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


def _step(name: str) -> int:
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else -1


class CheckpointMirror(TrainerCallback):
    """Copies each checkpoint to an s3:// prefix as it is written, so that a pod on a
    fresh disk (an emptyDir after preemption) resumes where the last one stopped.
    trainer_state.json goes last: as locally, its presence marks a complete copy. Copies
    of checkpoints the Trainer has rotated away are deleted. A failed copy is logged and
    training goes on; the next checkpoint tries again."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not args.output_dir:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        try:
            upload_s3(folder, f"{self.uri}/{folder.name}", last=(TRAINER_STATE_NAME,))
            kept = {p.name for p in folder.parent.iterdir() if _CHECKPOINT.match(p.name)}
            for name in s3_folders(self.uri):
                if _CHECKPOINT.match(name) and name not in kept:
                    delete_s3(f"{self.uri}/{name}/")
        except FetchError as exc:
            log.warning("checkpoint %s not copied to %s: %s", folder.name, self.uri, exc)
            return
        log.info("checkpoint %s copied to %s", folder.name, self.uri)


def restore_checkpoint(uri: str, folder: str | Path) -> Path | None:
    """Download the latest complete checkpoint under `uri` into `folder`, unless
    `folder` has one already (another process of the run got there first); return the
    local checkpoint, or None when there is none anywhere."""
    uri, folder = uri.rstrip("/"), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".restore.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        local = latest_checkpoint(folder)
        if local is not None:
            return local
        names = sorted((n for n in s3_folders(uri) if _CHECKPOINT.match(n)), key=_step)
        for name in reversed(names):
            if not s3_exists(f"{uri}/{name}/{TRAINER_STATE_NAME}"):
                continue  # cut off mid-copy
            partial = folder / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            fetch_s3(f"{uri}/{name}/", partial)
            partial.rename(folder / name)
            return folder / name
    return None


def drop_copies(uri: str) -> None:
    """The run is done and exported: its checkpoint copies are no longer needed."""
    try:
        delete_s3(uri.rstrip("/") + "/")
    except FetchError as exc:
        log.warning("checkpoint copies under %s not removed: %s", uri, exc)
