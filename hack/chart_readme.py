"""Write the table of values in charts/kubetune/README.md from values.yaml's comments.

    .venv/bin/python hack/chart_readme.py

values.yaml follows helm-docs' convention (github.com/norwoodj/helm-docs): a comment
block that starts with `# --` documents the key right below it, and its value becomes
one row of the table; a key without one is walked into. This writes the same table
helm-docs would (its default sort, types and JSON defaults), between the README's
markers; the prose around them is written by hand. helm-docs itself is a Go build of
a minute or more on CI's cold cache, for what this does in a page. PyYAML drops
comments (and ruamel.yaml, which keeps them, is not a dependency), so the comments
are read line by line: values.yaml is block-style YAML, where a key's path follows
from its indentation. What helm-docs would read otherwise, or not at all, is refused:
a `# --` block away from a key, a continuation line that starts with `--` (helm-docs
takes it for a new description), a value nobody documented.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "kubetune"
BEGIN = "<!-- Begin of the text hack/chart_readme.py writes from Chart.yaml and values.yaml. -->"
END = "<!-- End of the written text. -->"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?: |$)")
_COMMENT = re.compile(r"^ *#(?P<text>.*)$")


class ValuesError(ValueError):
    pass


def descriptions(text: str) -> dict[str, str]:
    """Each documented key's dotted path and its description."""
    found: dict[str, str] = {}
    parents: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        comment = _COMMENT.match(line)
        if comment:
            words = comment["text"].strip()
            if words == "--" or words.startswith("-- "):
                if pending is not None:
                    raise ValuesError(f"line {number}: a second `# --` before any key")
                pending = [words[2:].strip()]
            elif pending is not None:
                if words.startswith("--"):
                    raise ValuesError(
                        f"line {number}: helm-docs reads a comment line that starts with "
                        "`--` as a new description: wrap the line elsewhere"
                    )
                pending.append(words)
            continue
        key = _KEY.match(line)
        if key:
            indent = len(key["indent"])
            while parents and parents[-1][0] >= indent:
                parents.pop()
            parents.append((indent, key["key"]))
            if pending is not None:
                found[".".join(k for _, k in parents)] = " ".join(w for w in pending if w)
        elif pending is not None:
            raise ValuesError(f"line {number}: a `# --` comment must stand right above a key")
        pending = None
    return found


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    raise ValuesError(f"a value of type {type(value).__name__}: give it a default")


def rows(values: dict[str, Any], described: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every documented key, sorted by key."""
    table: list[tuple[str, str, str, str]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            path = f"{prefix}{name}"
            if path in described:
                default = json.dumps(value, separators=(",", ":"), sort_keys=True)
                table.append((path, _type(value), f"`{default}`", described[path]))
            elif isinstance(value, dict) and value:
                walk(value, f"{path}.")
            else:
                raise ValuesError(f"{path} has no `# --` comment")

    walk(values, "")
    unreached = described.keys() - {row[0] for row in table}
    if unreached:
        raise ValuesError(f"documented inside a documented value: {sorted(unreached)}")
    return sorted(table)


def generated(chart: Path = CHART) -> str:
    """The text between the README's markers."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    text = (chart / "values.yaml").read_text()
    lines = [
        f"Chart version {meta['version']}, kubetune {meta['appVersion']}; "
        f"Kubernetes `{meta['kubeVersion']}`.",
        "",
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for row in rows(yaml.safe_load(text), descriptions(text)):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(readme: str, chart: Path = CHART) -> str:
    """The README with its generated part replaced."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValuesError(f"the README has lost its markers: {BEGIN} ... {END}")
    return f"{readme[: start + len(BEGIN)]}\n{generated(chart)}\n{readme[end:]}"


def main() -> int:
    path = CHART / "README.md"
    try:
        path.write_text(render(path.read_text()))
    except ValuesError as e:
        print(f"chart_readme: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
