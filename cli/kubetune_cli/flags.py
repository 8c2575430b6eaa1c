"""Flags that each set one field of a spec, with that field's own description from
the API models as their help (the text `kubectl explain` shows: one source of truth),
and the forms the commands share for models and folders (``pvc://CLAIM/PATH``,
``s3://BUCKET/PREFIX``)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from kubetune_cli.output import Manifest, UsageError


def described(model: type[BaseModel], field: str, how: str = "") -> str:
    """A field's description from the API models, with how the flag spells the value
    where that is not plain; escaped for argparse, which formats help with %."""
    text = model.model_fields[field].description or ""
    return f"{text} {how}".strip().replace("%", "%%")


def json_name(model: type[BaseModel], field: str) -> str:
    """The field's name in YAML (its alias: camelCase, or `lambda` for lambda_)."""
    info = model.model_fields[field]
    return info.alias or to_camel(field)


@dataclass(frozen=True)
class SpecFlag:
    """One flag, one spec field: where it goes, its type, and the model field whose
    description is its help."""

    flag: str
    model: type[BaseModel]
    field: str
    path: tuple[str, ...]
    type: Callable[[str], Any] | None = str  # None: a switch that sets True
    metavar: str | None = None
    how: str = ""
    choices: tuple[str, ...] | None = None
    repeat: bool = False  # repeatable; the field takes the list
    negatable: bool = False  # --X sets true, --no-X false (a field whose default is true)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        help_text = described(self.model, self.field, self.how)
        if self.negatable:
            parser.add_argument(
                self.flag,
                dest=self.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif self.type is None:
            parser.add_argument(
                self.flag, dest=self.dest, action="store_true", default=None, help=help_text
            )
        else:
            parser.add_argument(
                self.flag,
                dest=self.dest,
                type=self.type,
                metavar=self.metavar,
                choices=self.choices,
                action="append" if self.repeat else "store",
                help=help_text,
            )


def model_flags(
    model: type[BaseModel], path: tuple[str, ...], skip: Sequence[str] = ()
) -> tuple[SpecFlag, ...]:
    """A flag per scalar (or list of strings) field of ``model``, named after the
    field (``--learning-rate`` for learning_rate), under ``path`` in the spec: the
    model's fields and the flags cannot drift apart."""
    flags = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kind, repeat = _flag_type(info.annotation)
        flag = "--" + name.rstrip("_").replace("_", "-")
        key = json_name(model, name)
        if kind is bool:
            flags.append(
                SpecFlag(flag, model, name, (*path, key), None, negatable=info.default is True)
            )
            continue
        metavar = {int: "N", float: "X", str: "VALUE"}[kind]
        how = "Repeatable." if repeat else ""
        flags.append(SpecFlag(flag, model, name, (*path, key), kind, metavar, how, repeat=repeat))
    return tuple(flags)


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """(int, float, str or bool; whether a list) of a field's annotation: Optional and
    Annotated are looked through."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if origin is list:
        inner, _ = _flag_type(args[0])
        return inner, True
    if annotation in (int, float, str, bool):
        return annotation, False
    raise TypeError(f"no flag type for {annotation!r}")


def add_flags(parser: Any, flags: Sequence[SpecFlag]) -> None:
    for flag in flags:
        flag.add_to(parser)


def spec_fields(args: argparse.Namespace, flags: Sequence[SpecFlag]) -> Manifest:
    """The spec fields the flags given set, nested as in the spec."""
    out: Manifest = {}
    for flag in flags:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        set_path(out, flag.path, value)
    return out


def set_path(into: Manifest, path: Sequence[str], value: Any) -> None:
    node = into
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def merge(into: Mapping[str, Any], fields: Mapping[str, Any]) -> Manifest:
    """``into`` with ``fields`` laid over it, maps merged key by key."""
    out = dict(into)
    for key, value in fields.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# -- models and folders ----------------------------------------------------------------


def is_location(text: str) -> bool:
    return text.startswith(("pvc://", "s3://"))


def location(text: str, what: str) -> Manifest:
    """A folder, pvc://CLAIM/PATH or s3://BUCKET/PREFIX, as a source or storage."""
    if text.startswith("pvc://"):
        claim, _, path = text.removeprefix("pvc://").partition("/")
        if not claim:
            raise UsageError(f"{what}: pvc://CLAIM/PATH needs a claim, not {text!r}")
        return {"pvc": {"claimName": claim, "path": path.strip("/")}}
    if text.startswith("s3://"):
        return {"s3": {"uri": text.rstrip("/")}}
    raise UsageError(f"{what}: a folder is pvc://CLAIM/PATH or s3://BUCKET/PREFIX, not {text!r}")


def base_model_ref(text: str, served_name: str | None = None) -> Manifest:
    """--base-model: a model id (loaded from the hub by name), or a folder on a claim or
    in S3, named by its last path segment unless ``served_name`` says otherwise."""
    if not is_location(text):
        return {"name": served_name or text}
    folder = text.rstrip("/").rsplit("/", 1)[-1]
    return {"name": served_name or folder, "source": location(text, "--base-model")}
