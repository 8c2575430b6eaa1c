"""`kubetune train`'s exit code: a failure the data or the settings cause is final
(3), wherever in the run it is raised; anything else may pass on a retry (1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, EXIT_FAILED
from kubetune_trainer.data import DatasetError, read_examples
from kubetune_trainer.training.inputs import JobError
from kubetune_trainer.training.runner import outcome


class _BrokenImages(Dataset[int]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        raise DatasetError(7, "a.png: the image does not decode: broken data stream")


def test_a_dataset_error_in_a_dataloader_worker_is_final() -> None:
    """Images are opened in DataLoader workers, which hand DatasetError back as a
    RuntimeError (torch cannot rebuild a two-argument exception)."""
    with pytest.raises(RuntimeError) as caught:
        list(DataLoader(_BrokenImages(), num_workers=1))
    assert outcome(caught.value) == (
        EXIT_CANNOT_SUCCEED,
        "DatasetError: line 7: a.png: the image does not decode: broken data stream",
    )


def test_a_line_nested_too_deep_is_final(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],'
        '"meta":' + "[" * 400 + "]" * 400 + "}\n"
    )
    with pytest.raises(DatasetError) as caught:
        list(read_examples(path))
    assert outcome(caught.value) == (
        EXIT_CANNOT_SUCCEED,
        "DatasetError: line 1: arrays and objects nest more than 64 levels deep",
    )


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (JobError("no training example fits maxContextLength=16"), EXIT_CANNOT_SUCCEED),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), EXIT_FAILED),
        (RuntimeError("Caught OSError in DataLoader worker process 0."), EXIT_FAILED),
        (OSError("No space left on device"), EXIT_FAILED),
    ],
)
def test_other_failures(exc: Exception, code: int) -> None:
    assert outcome(exc) == (code, f"{type(exc).__name__}: {exc}")
