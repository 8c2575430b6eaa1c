"""Write the chart's Grafana dashboard from typed code (grafana-foundation-sdk).

    .venv/bin/python hack/grafana_dashboard.py charts/kubetune/files/grafana-dashboard.json

`make dashboard` runs this; tests/monitoring/test_dashboard.py fails while the committed
JSON differs from what it writes. The trainer's metric names come from its contract
(kubetune_trainer.contract.metrics), so a rename there shows up here; the operator's and
vLLM's are written out, and that test checks the operator's against its collectors.

Every query filters on `cluster`, `namespace` and `finetunejob` (the last two as the
chart's PodMonitors label the series; `cluster` as a Prometheus external label or a
federation adds it). Each variable's All value is `.*`, which also matches a missing
label, so the dashboard works over one Prometheus that sets no `cluster` at all.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from kubetune_trainer.contract import metrics

# The SDK marks the classic dashboard model deprecated in favour of its v2 resources,
# which only Grafana 12 with the kubernetesDashboards feature reads. The chart ships the
# classic JSON model, which the Grafana sidecar provisions into every Grafana version.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import bargauge, prometheus, stat, timeseries
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as builders
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as models

UID = "kubetune-finetuning"
TITLE = "kubetune: fine-tuning"
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid="${datasource}")
CLUSTER = 'cluster=~"$cluster"'
RUN = f'{CLUSTER}, namespace=~"$namespace", finetunejob=~"$finetunejob"'
SERVERS = f'{CLUSTER}, namespace=~"$namespace"'

# The operator's metrics (kubetune_operator/observability.py), as Prometheus exposes them.
OPERATOR_OBJECTS = "kubetune_operator_objects"
RECONCILE_SECONDS_BUCKET = "kubetune_operator_reconcile_duration_seconds_bucket"
API_ERRORS_TOTAL = "kubetune_operator_api_errors_total"


def of_run(name: str) -> str:
    """The series of the selected FineTuneJobs."""
    return f"{name}{{{RUN}}}"


def query(expr: str, legend: str, ref_id: str, *, instant: bool = False) -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id)
    return target.instant() if instant else target


def graph(
    title: str, description: str, targets: list[tuple[str, str]], *, unit: str = "", width: int = 12
) -> timeseries.Panel:
    """A time series of one or more (expr, legend) queries, the last values in its legend."""
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .span(width)
        .height(8)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull"])
        )
    )
    for ref_id, (expr, legend) in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(query(expr, legend, ref_id))
    if description:
        panel = panel.description(description)
    return panel.unit(unit) if unit else panel


def latest() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def label_variable(name: str, label: str, selector: str) -> builders.QueryVariable:
    """A drop-down of `name`'s values on `selector`'s series; All is `.*`, which matches
    an absent label too."""
    values = f"label_values({selector}, {name})"
    return (
        builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(values)
        .definition(values)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
    )


def variables(dashboard: builders.Dashboard) -> builders.Dashboard:
    step = metrics.TRAIN_STEP.name
    return (
        dashboard.with_variable(
            builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(label_variable("cluster", "Cluster", step))
        .with_variable(label_variable("namespace", "Namespace", f"{step}{{{CLUSTER}}}"))
        .with_variable(
            label_variable(
                "finetunejob", "FineTuneJob", f'{step}{{{CLUSTER}, namespace=~"$namespace"}}'
            )
        )
    )


def training(dashboard: builders.Dashboard) -> builders.Dashboard:
    step, total = of_run(metrics.TRAIN_STEP.name), of_run(metrics.TRAIN_TOTAL_STEPS.name)
    progress = (
        bargauge.Panel()
        .title("Progress")
        .description("Optimizer steps done out of the run's total.")
        .datasource(DATASOURCE)
        .span(8)
        .height(5)
        .unit("percent")
        .min(0)
        .max(100)
        .reduce_options(latest())
        .with_target(query(f"100 * {step} / {total}", "{{finetunejob}}", "A", instant=True))
    )

    def figure(title: str, description: str, metric: str, unit: str) -> stat.Panel:
        panel = stat.Panel().title(title).description(description).datasource(DATASOURCE)
        panel = panel.span(8).height(5).reduce_options(latest())
        panel = panel.with_target(query(of_run(metric), "{{finetunejob}}", "A", instant=True))
        return panel.unit(unit) if unit else panel

    return (
        dashboard.with_row(builders.Row("Training"))
        .with_panel(progress)
        .with_panel(
            figure(
                "Time left", "Estimated from the steps done so far.", metrics.ETA_SECONDS.name, "s"
            )
        )
        .with_panel(figure("Epoch", metrics.EPOCH.help, metrics.EPOCH.name, ""))
        .with_panel(
            graph(
                "Training loss",
                "Averaged over each logging interval.",
                [(of_run(metrics.TRAIN_LOSS.name), "{{finetunejob}}")],
            )
        )
        .with_panel(
            graph(
                "Validation loss",
                "At each evaluation; the best checkpoint is the one exported.",
                [
                    (of_run(metrics.EVAL_LOSS.name), "{{finetunejob}}"),
                    (of_run(metrics.BEST_EVAL_LOSS.name), "{{finetunejob}} best"),
                ],
            )
        )
        .with_panel(
            graph(
                "Throughput",
                metrics.TOKENS_PER_SECOND.help,
                [(of_run(metrics.TOKENS_PER_SECOND.name), "{{finetunejob}}")],
                unit="short",
            )
        )
        .with_panel(
            graph(
                "Samples per second",
                metrics.SAMPLES_PER_SECOND.help,
                [(of_run(metrics.SAMPLES_PER_SECOND.name), "{{finetunejob}}")],
                unit="short",
            )
        )
        .with_panel(
            graph(
                "Learning rate",
                "",
                [(of_run(metrics.LEARNING_RATE.name), "{{finetunejob}}")],
                unit="sci",
            )
        )
        .with_panel(
            graph(
                "Gradient norm",
                "At the latest logging step: spikes or a steady climb warn of divergence "
                "before the loss shows it.",
                [(of_run(metrics.GRAD_NORM.name), "{{finetunejob}}")],
            )
        )
    )


def method_figures(dashboard: builders.Dashboard) -> builders.Dashboard:
    def pair(train: str, evaluation: str) -> list[tuple[str, str]]:
        return [
            (of_run(train), "{{finetunejob}} train"),
            (of_run(evaluation), "{{finetunejob}} validation"),
        ]

    return (
        dashboard.with_row(builders.Row("Method figures (DPO, preserve general skills)"))
        .with_panel(
            graph(
                "DPO reward margin",
                "beta x log-ratio, chosen minus rejected.",
                pair(metrics.TRAIN_REWARD_MARGIN.name, metrics.EVAL_REWARD_MARGIN.name),
                width=8,
            )
        )
        .with_panel(
            graph(
                "DPO preference accuracy",
                "Share of pairs whose chosen reply got the higher reward.",
                pair(metrics.TRAIN_PREFERENCE_ACCURACY.name, metrics.EVAL_PREFERENCE_ACCURACY.name),
                unit="percentunit",
                width=8,
            )
        )
        .with_panel(
            graph(
                "KL to the base model",
                "preserveGeneralSkills: mean per-token KL(base || tuned).",
                pair(metrics.TRAIN_KL.name, metrics.EVAL_KL.name),
                width=8,
            )
        )
    )


def operator(dashboard: builders.Dashboard) -> builders.Dashboard:
    # The operator's pod is in its own namespace, not the FineTuneJobs': by cluster only.
    return (
        dashboard.with_row(builders.Row("Operator"))
        .with_panel(
            graph(
                "Objects by phase",
                "",
                [(f"sum by (kind, phase) ({OPERATOR_OBJECTS}{{{CLUSTER}}})", "{{kind}} {{phase}}")],
                width=8,
            )
        )
        .with_panel(
            graph(
                "Reconcile time (p95)",
                "",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, kind) "
                        f"(rate({RECONCILE_SECONDS_BUCKET}{{{CLUSTER}}}[$__rate_interval])))",
                        "{{kind}}",
                    )
                ],
                unit="s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "API errors",
                "",
                [
                    (
                        f"sum by (status) (rate({API_ERRORS_TOTAL}{{{CLUSTER}}}[$__rate_interval]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
                width=8,
            )
        )
    )


def serving(dashboard: builders.Dashboard) -> builders.Dashboard:
    # vLLM's own names (tests/operator/test_serving_e2e.py checks a real server exports
    # each); the servers' PodMonitor adds `modeldeployment`.
    return (
        dashboard.with_row(builders.Row("Serving (vLLM)"))
        .with_panel(
            graph(
                "Requests running and waiting",
                "Requests in the server's batch and queued, per ModelDeployment.",
                [
                    (
                        f"sum by (modeldeployment) (vllm:num_requests_running{{{SERVERS}}})",
                        "{{modeldeployment}} running",
                    ),
                    (
                        f"sum by (modeldeployment) (vllm:num_requests_waiting{{{SERVERS}}})",
                        "{{modeldeployment}} waiting",
                    ),
                ],
                width=6,
            )
        )
        .with_panel(
            graph(
                "Time to first token (p95)",
                "",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, modeldeployment) "
                        f"(rate(vllm:time_to_first_token_seconds_bucket{{{SERVERS}}}"
                        "[$__rate_interval])))",
                        "{{modeldeployment}}",
                    )
                ],
                unit="s",
                width=6,
            )
        )
        .with_panel(
            graph(
                "KV-cache usage",
                "",
                [
                    (
                        f"max by (modeldeployment) (vllm:kv_cache_usage_perc{{{SERVERS}}})",
                        "{{modeldeployment}}",
                    )
                ],
                unit="percentunit",
                width=6,
            )
        )
        .with_panel(
            graph(
                "Adapters in the running batch",
                "Which adapters the server's batch serves over time (vLLM labels its request "
                "counters by base model only, so this is what it tells per adapter).",
                [
                    (
                        "count by (modeldeployment, running_lora_adapters) "
                        f'(vllm:lora_requests_info{{{SERVERS}, running_lora_adapters!=""}})',
                        "{{modeldeployment}}: {{running_lora_adapters}}",
                    )
                ],
                width=6,
            )
        )
    )


def dashboard() -> models.Dashboard:
    builder = (
        builders.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Progress, losses and method figures of FineTuneJobs, read from the trainers' "
            "/metrics; the vLLM servers of ModelDeployments; and the operator's own metrics."
        )
        .tags(["kubetune"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("")
        .version(1)
    )
    for part in (variables, training, method_figures, operator, serving):
        builder = part(builder)
    built = builder.build()
    # Grafana numbers new panels itself; fixed ids keep links to a panel and the file stable.
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def render() -> str:
    # Sorted keys: the file changes only where the dashboard does.
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard()) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: grafana_dashboard.py PATH", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
