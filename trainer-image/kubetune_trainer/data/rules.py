"""Rules about a parsed example as a whole and about the file's example count.

Pure functions from canonical values to messages; the parser has already checked
the shape of each line.
"""

from __future__ import annotations

from kubetune_trainer.contract.limits import Limits, Task
from kubetune_trainer.data.example import Example


def example_problems(example: Example, limits: Limits, task: Task | None = None) -> list[str]:
    """Why this example cannot be trained on; empty when it can.

    ``task=None`` checks only what every task needs (the trainer's reader uses it)."""
    problems: list[str] = []
    turns = example.turns
    if not turns:
        return ["the conversation is empty"]
    if not any(t.role == "user" for t in turns):
        problems.append("the conversation needs at least one user turn")
    last = turns[-1]
    if last.role != "assistant":
        problems.append(f"the last turn must be the assistant reply, not a {last.role} turn")
    elif _blank(last.text):
        problems.append("the assistant reply is empty")
    n_images = len(example.images)
    if n_images > limits.max_images_per_example:
        problems.append(
            f"{n_images} images, more than the limit of {limits.max_images_per_example} "
            "per example (maxImagesPerExample)"
        )
    if task == "dpo":
        problems.extend(_preference_problems(example))
    return problems


def _preference_problems(example: Example) -> list[str]:
    rejected = example.rejected
    if rejected is None:
        return [
            "dpo needs a rejected reply: 'rejected_response', or 'non_preferred_output' "
            "with 'input'"
        ]
    if _blank(rejected.text):
        return ["the rejected reply is empty"]
    same_images = example.rejected_images is None or [
        r.source for r in example.rejected_images
    ] == [i.source for i in example.images]
    if rejected.parts == example.chosen.parts and same_images:
        return ["the rejected reply is the same as the chosen one"]
    return []


def _blank(text: str) -> bool:
    # Not ``text.strip()``: that copies a reply that has spaces at its ends, and a
    # reply may be as long as a line.
    return not text or text.isspace()


def count_problem(examples: int, limits: Limits) -> str | None:
    """Whether the number of examples is within [minExamples, maxExamples]."""
    if examples < limits.min_examples:
        return (
            f"{examples} example{'s' * (examples != 1)}; at least {limits.min_examples} "
            "are needed (minExamples)"
        )
    if examples > limits.max_examples:
        return f"{examples:,} examples; at most {limits.max_examples:,} are allowed (maxExamples)"
    return None
