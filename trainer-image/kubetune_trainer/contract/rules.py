"""Rules across the fields of a training job, written once as data.

Each rule has two forms made from the same data: a CEL expression that the
FineTuneJob CRD carries (`kubectl apply` refuses a spec that breaks it), and a Python
check on a parsed model (``TrainingConfig`` when the trainer reads job.json, or a
``FineTuneJobSpec``: both spell the fields the same way). tests/api/test_rules.py runs
a table of cases through the real API server and through the Python check, and fails
where they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel


def _camel(path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(to_camel(part) for part in path)


def _value(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


@dataclass(frozen=True)
class AppliesOnly:
    """``field`` may be set only when ``when`` equals ``value``. With ``flag``, the
    field counts as set only while that boolean in it is true (preserveGeneralSkills
    with enabled: false says nothing). A job that breaks one is malformed."""

    field: tuple[str, ...]
    when: str
    value: str
    flag: str | None = None

    @property
    def message(self) -> str:
        return f"{'.'.join(_camel(self.field))} applies only to {to_camel(self.when)}: {self.value}"

    def cel(self) -> str:
        camel = _camel(self.field)
        unset = [f"!has(self.{'.'.join(camel[: i + 1])})" for i in range(len(camel))]
        if self.flag is not None:
            unset.append(f"!self.{'.'.join(camel)}.{to_camel(self.flag)}")
        return " || ".join([f"self.{to_camel(self.when)} == '{self.value}'", *unset])

    def broken_by(self, job: Any) -> bool:
        if _value(job, (self.when,)) == self.value:
            return False
        value = _value(job, self.field)
        if self.flag is not None:
            return bool(getattr(value, self.flag, False))
        return value is not None


@dataclass(frozen=True)
class Requires:
    """``field`` needs ``needed`` to be set. A job that breaks one is well formed but
    cannot succeed as written."""

    field: str
    needed: str
    message: str

    def cel(self) -> str:
        return f"has(self.{to_camel(self.needed)}) || !has(self.{to_camel(self.field)})"

    def broken_by(self, job: Any) -> bool:
        return _value(job, (self.field,)) is not None and _value(job, (self.needed,)) is None


Rule = AppliesOnly | Requires

APPLICABILITY: tuple[AppliesOnly, ...] = (
    *(
        AppliesOnly(("hyperparameters", name), "tuning", "lora")
        for name in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
    ),
    AppliesOnly(("hyperparameters", "beta"), "method", "dpo"),
    AppliesOnly(("preserve_general_skills",), "method", "sft", flag="enabled"),
)
REQUIREMENTS: tuple[Requires, ...] = (
    Requires(
        "early_stopping",
        "validation",
        "earlyStopping needs validation data (validation.dataset or validation.split)",
    ),
)
RULES: tuple[Rule, ...] = (*APPLICABILITY, *REQUIREMENTS)


def cel_rule(rule: Rule) -> dict[str, str]:
    """The rule as an ``x-kubernetes-validations`` entry on the FineTuneJob spec."""
    path = _camel(rule.field) if isinstance(rule, AppliesOnly) else (to_camel(rule.field),)
    return {"rule": rule.cel(), "message": rule.message, "fieldPath": "." + ".".join(path)}


def broken(rules: tuple[Rule, ...], job: Any) -> list[str]:
    """The messages of the rules ``job`` breaks."""
    return [rule.message for rule in rules if rule.broken_by(job)]
