"""The PromQL that Grafana would send for the chart's dashboard, with its template
variables filled in, so a test can send every query to a real Prometheus."""

from __future__ import annotations

import re
from typing import Any

# Grafana's `$__rate_interval` is max($__interval + scrape interval, 4 x scrape interval).
# The tests' Prometheus scrapes every second and is queried at that step
# (tests/prometheus.py), so: four seconds.
RATE_INTERVAL = "4s"
# `$name` or `${name}` (Grafana's two plain forms; the dashboard uses no `${name:format}`).
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# A query variable's `label_values(selector, label)`: its values are those of `label` on
# the series `selector` matches.
_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


def substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    """`expr` with each `$var`/`${var}` replaced by its value, verbatim, as Grafana does
    for one selected value in a `=~` matcher (pass regex-escaped values where it matters),
    and `$__rate_interval` by `rate_interval`. A variable not given is an error."""
    values = {**variables, "__rate_interval": rate_interval}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels") or []))
    return out


def panels_by_row(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The dashboard's panels by the title of the row they sit in (a collapsed row holds
    its own; panels above the first row are under "")."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    row = ""
    for panel in dashboard.get("panels") or []:
        if panel.get("type") == "row":
            row = panel["title"]
            grouped[row] = list(panel.get("panels") or [])
        else:
            grouped.setdefault(row, []).append(panel)
    return grouped


def panel_queries(
    dashboard: dict[str, Any], variables: dict[str, str], rate_interval: str
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, its variables and
    `$__rate_interval` substituted (see `substitute`)."""
    return [
        (panel["title"], substitute(target["expr"], variables, rate_interval))
        for panel in _panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def variable_queries(
    dashboard: dict[str, Any], variables: dict[str, str], rate_interval: str
) -> list[tuple[str, str]]:
    """("variable NAME", selector) for every query variable whose query is a simple
    `label_values(selector, label)`: the series that offer its values, with the
    variables it depends on substituted. Apart from panel_queries, because a panel's
    queries are asked of a Prometheus that may scrape only that panel's targets."""
    queries = []
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.fullmatch(text.strip())
        if match:
            selector = substitute(match["selector"].strip(), variables, rate_interval)
            queries.append((f"variable {variable['name']}", selector))
    return queries
