"""kubectl's conventions in `kubectl kubetune`: its global options before or after the
command, the namespace from the kubeconfig's context, exit codes (0 ok, 1 failed,
2 usage), `--help` with examples, and the output formats (table, json, yaml)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from kubetune_cli import main as cli
from kubetune_cli.context import Context
from kubetune_cli.output import age, duration, for_git, render, table


def kubeconfig(tmp_path: Path) -> Path:
    """Two contexts on an address where nothing listens: only what is read from the
    file is tested here."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "team-a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
            {"name": "bare", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "team-a",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def context_of(*argv: str) -> Context:
    return Context.from_args(cli.parser().parse_args([*argv, "job", "list"]))


def test_the_namespace_comes_from_the_flag_else_the_chosen_context_else_default(
    tmp_path: Path,
) -> None:
    config = str(kubeconfig(tmp_path))
    assert context_of("--kubeconfig", config).namespace == "team-a"
    assert context_of("--kubeconfig", config, "--context", "bare").namespace == "default"
    assert context_of("--kubeconfig", config, "-n", "other").namespace == "other"


def test_global_options_work_after_the_command_as_kubectl_passes_them(tmp_path: Path) -> None:
    config = str(kubeconfig(tmp_path))
    args = cli.parser().parse_args(
        ["job", "list", "--kubeconfig", config, "-n", "late", "-o", "json"]
    )
    context = Context.from_args(args)
    assert (context.namespace, context.output) == ("late", "json")
    # Given before the command, and not again after it, they are kept.
    args = cli.parser().parse_args(["-o", "yaml", "job", "list"])
    assert args.output == "yaml"


def test_the_api_client_is_made_only_when_a_command_talks_to_the_server(tmp_path: Path) -> None:
    made = []
    context = Context(namespace="x", connect=lambda: made.append(1) or "client")
    assert made == []
    assert context.api_client == "client"
    assert context.api_client == "client"
    assert made == [1]


def test_an_unknown_context_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--kubeconfig", str(kubeconfig(tmp_path)), "--context", "nope", "job", "list"])
    assert code == 1
    assert "context 'nope' not found" in capsys.readouterr().err


def test_a_server_that_does_not_answer_is_exit_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--kubeconfig", str(kubeconfig(tmp_path)), "dataset", "list"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: cannot reach the API server")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["job", "create"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["job", "create", "x", "--validation-split", "0.1", "--validation-dataset", "v"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    # A mistake the API models catch, before any cluster is needed.
    code = cli.main(["job", "create", "x", "--base-model", "m", "--dataset", "d", "--epochs", "0"])
    assert code == 2
    assert "spec.hyperparameters.epochs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["dataset", "--help"],
        ["dataset", "create", "--help"],
        ["job", "--help"],
        ["job", "create", "--help"],
    ],
)
def test_help_shows_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n" in out
    assert "kubectl kubetune " in out.split("examples:")[1]


def test_several_objects_print_as_a_list_in_json_and_as_documents_in_yaml() -> None:
    a = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "a"},
        "data": {"k": "1\n2\n"},
    }
    b = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}
    listed = json.loads(render([a, b], "json"))
    assert listed == {"apiVersion": "v1", "kind": "List", "items": [a, b]}
    assert json.loads(render([a], "json")) == a
    text = render([a, b], "yaml")
    assert list(yaml.safe_load_all(text)) == [a, b]
    assert "  k: |\n    1\n    2\n" in text  # a file in a ConfigMap reads as lines


def test_a_dry_run_manifest_names_a_namespace_only_where_one_was_given() -> None:
    manifest = {"kind": "Dataset", "metadata": {"name": "d", "namespace": "team"}}
    assert for_git(manifest, None)["metadata"] == {"name": "d"}
    assert for_git(manifest, "team")["metadata"] == {"name": "d", "namespace": "team"}


def test_tables_align_like_kubectl_get() -> None:
    assert table(("name", "phase"), [("a", "Ready"), ("longer", None)]) == (
        "NAME     PHASE\na        Ready\nlonger   <none>\n"
    )


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (5, "5s"),
        (119, "119s"),
        (120, "2m"),
        (185, "3m5s"),
        (600, "10m"),
        (3 * 3600 - 60, "179m"),
        (3 * 3600 + 600, "3h10m"),
        (9 * 3600, "9h"),
        (50 * 3600, "2d2h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
    ],
)
def test_ages_are_written_as_kubectl_writes_them(seconds: int, shown: str) -> None:
    assert duration(seconds) == shown
    now = datetime(2026, 11, 30, tzinfo=UTC)
    stamp = (now - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    assert age(stamp, now) == shown
