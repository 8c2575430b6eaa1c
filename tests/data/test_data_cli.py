"""`kubetune validate` and `kubetune convert`: flags, output and exit codes
(0 valid, 1 invalid, 2 usage error)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from data_helpers import image_bytes, sft, write_jsonl

from kubetune_trainer.data import commands

CORPUS = Path(__file__).parent / "corpus"


def kubetune(*argv: str) -> int:
    """Run a data subcommand through the same registration the CLI uses."""
    parser = argparse.ArgumentParser(prog="kubetune")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    return write_jsonl(
        tmp_path / "d.jsonl",
        [sft("<image>one", images=["a.png"]), sft("two"), sft("three", rejected_response="no")],
    )


def test_valid_file_exits_0_with_a_summary(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kubetune("validate", str(dataset)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith(
        f"{dataset}: valid: 3 examples (2 text-only), 1 images, 0 errors, 0 warnings; sha256 "
    )


def test_invalid_file_exits_1_with_line_numbered_errors(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kubetune("validate", str(dataset), "--task", "dpo") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "line 1: dpo needs a rejected reply: 'rejected_response', or 'non_preferred_output' with 'input'",
        "line 2: dpo needs a rejected reply: 'rejected_response', or 'non_preferred_output' with 'input'",
    ]
    assert "INVALID" in out[-1]


def test_json_report(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kubetune("validate", str(dataset), "--json", "--min-examples", "4") == 1
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "valid",
        "examples",
        "images",
        "textOnlyExamples",
        "remoteImages",
        "remoteImagesSha256",
        "sha256",
        "errors",
        "warnings",
        "errorCount",
        "warningCount",
        "truncatedErrors",
        "truncatedWarnings",
    }
    assert report["errors"] == [
        {"line": 0, "message": "3 examples; at least 4 are needed (minExamples)"}
    ]


def test_limit_flags_reach_the_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sft("<image><image>", images=["a.png", "a.png"]),
            sft("<image>", images=["http://127.0.0.1/x.png"]),
            sft("c"),
            sft("<image>d", images=["a.png"]),
        ],
    )
    assert (
        kubetune("validate", str(path), "--max-images-per-example", "1", "--max-image-bytes", "10")
        == 1
    )
    out = capsys.readouterr().out
    assert "line 1: 2 images, more than the limit of 1 per example" in out
    assert "line 4: image 1 (a.png): image is" in out
    assert "more than the limit of 10 (maxImageBytes)" in out
    # the images of a line with too many are not looked at (nor fetched) one by one
    assert "line 1: image" not in out
    assert "line 2: image 1 (http://127.0.0.1/x.png): remote image URLs are not allowed" in out
    assert kubetune("validate", str(path), "--allow-remote-images") == 1
    assert "host 127.0.0.1 resolves to a loopback address" in capsys.readouterr().out
    assert kubetune("validate", str(path), "--min-examples", "1", "--max-examples", "2") == 1


def test_memory_limit_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a" * 300_000), sft("b"), sft("c")])
    assert kubetune("validate", str(path)) == 0
    capsys.readouterr()
    assert kubetune("validate", str(path), "--memory-limit", "161Mi") == 1
    assert (
        "line 1: line is longer than 209,715 bytes, the most one line may have in 161 MiB of "
        "memory; keep large images in files next to the JSONL"
    ) in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    assert (
        kubetune("convert", str(path), str(out), "--to", "placeholder", "--memory-limit", "161Mi")
        == 1
    )
    assert "line 1: line is longer than 209,715 bytes" in capsys.readouterr().err
    assert not out.exists()


def test_deep_and_image_root(capsys: pytest.CaptureFixture[str]) -> None:
    path = CORPUS / "invalid" / "image-truncated-deep.jsonl"
    assert kubetune("validate", str(path), "--image-root", str(CORPUS)) == 0
    assert kubetune("validate", str(path), "--image-root", str(CORPUS), "--deep") == 1
    assert (
        "line 3: image 1 (images/truncated.png): the image does not decode"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "{missing}"],
        ["validate", "{dataset}", "--image-root", "{missing}"],
        ["validate", "{dataset}", "--min-examples", "5", "--max-examples", "2"],
        ["validate", "{dataset}", "--max-image-bytes", "0"],
        ["convert", "{missing}", "{out}", "--to", "placeholder"],
        ["convert", "{dataset}", "{missing}/x/out.jsonl", "--to", "placeholder"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subst = {
        "missing": str(tmp_path / "missing"),
        "dataset": str(dataset),
        "out": str(tmp_path / "o.jsonl"),
    }
    assert kubetune(*(a.format(**subst) for a in argv)) == 2
    assert capsys.readouterr().err.startswith(f"kubetune {argv[0]}: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["validate"],
        ["validate", "x", "--task", "ppo"],
        ["convert", "a", "b", "--to", "sharegpt"],
        ["convert", "a", "b"],
    ],
)
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        kubetune(*argv)
    assert info.value.code == 2


def test_convert(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    assert (
        kubetune("convert", str(dataset), str(out), "--to", "content-parts", "--embed-images") == 0
    )
    assert capsys.readouterr().out == f"wrote 3 examples to {out} (content-parts)\n"
    first = json.loads(out.read_text().splitlines()[0])
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [sft("a"), "nope"])
    assert kubetune("convert", str(bad), str(out), "--to", "placeholder") == 1
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "not converted" in err


def test_the_kubetune_command_registers_them(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("kubetune_trainer.cli")
    assert cli.main(["validate", str(dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True


def test_format_restricts_every_line_to_one_style(tmp_path: Path) -> None:
    from kubetune_trainer.cli import main

    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "yo"},
        ]
    }
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in (text, text, parts, text)))
    summary = tmp_path / "summary.json"
    assert (
        main(["validate", str(path), "--format", "content-parts", "--summary-file", str(summary)])
        == 0
    )
    assert (
        main(["validate", str(path), "--format", "placeholder", "--summary-file", str(summary)])
        == 1
    )
    report = json.loads(summary.read_text())
    assert report["valid"] is False
    assert report["errors"] == [
        {
            "line": 3,
            "message": "written in the content-parts style, but the Dataset's format is placeholder",
        }
    ]


def test_summary_file_fits_a_termination_message(tmp_path: Path) -> None:
    from kubetune_trainer.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text("".join("{not json " + "x" * 600 + "\n" for _ in range(500)))
    summary = tmp_path / "summary.json"
    assert main(["validate", str(path), "--summary-file", str(summary)]) == 1
    report = json.loads(summary.read_text())
    assert len(summary.read_bytes()) <= 4096
    assert report["errorCount"] >= 500 and 1 <= len(report["errors"]) <= 20
    assert report["errors"][0]["line"] == 1


def test_summary_file_carries_the_first_warnings_after_the_errors(tmp_path: Path) -> None:
    from kubetune_trainer.cli import main

    def chat(answer: int) -> str:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"{answer}"}]
        return json.dumps({"messages": messages, "tools": [{"type": "function"}]})

    path = tmp_path / "warned.jsonl"
    path.write_text("".join(chat(i) + "\n" for i in range(30)) + "{not json\n")
    summary = tmp_path / "summary.json"
    assert main(["validate", str(path), "--summary-file", str(summary)]) == 1
    report = json.loads(summary.read_text())
    assert report["errors"] == [{"line": 31, "message": report["errors"][0]["message"]}]
    assert report["warningCount"] == 30 and len(report["warnings"]) == 20
    assert report["warnings"][0] == {
        "line": 1,
        "message": "'tools' is ignored: tool calling is not trained",
    }
    assert len(summary.read_bytes()) <= 4096


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-examples", "0"], "min_examples: Input should be greater than or equal to 1"),
        (
            ["--max-images-per-example", "10001"],
            "max_images_per_example: Input should be less than or equal to 10000",
        ),
        (["--max-image-bytes", "0"], "max_image_bytes: Input should be greater than or equal to 1"),
        (
            ["--min-examples", "5", "--max-examples", "4"],
            "Value error, minExamples must not exceed maxExamples",
        ),
    ],
)
def test_limits_out_of_bounds_are_usage_errors_worded_by_the_model(
    flags: list[str],
    message: str,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert kubetune("validate", str(dataset), *flags) == 2
    assert capsys.readouterr().err == f"kubetune validate: {message}\n"
    if flags[0] == "--max-image-bytes":
        out = tmp_path / "o.jsonl"
        assert kubetune("convert", str(dataset), str(out), "--to", "placeholder", *flags) == 2
        assert capsys.readouterr().err == f"kubetune convert: {message}\n"


def test_a_missing_file_leaves_a_summary_saying_so(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    missing = tmp_path / "missing.jsonl"
    assert kubetune("validate", str(missing), "--summary-file", str(summary)) == 2
    assert json.loads(summary.read_text()) == {
        "valid": False,
        "error": f"{missing}: No such file or directory",
    }


def test_the_validation_job_command_imports_no_pydantic(dataset: Path, tmp_path: Path) -> None:
    """The command as the operator's validation Job runs it, in a process of its own:
    pydantic (a third to a half of its start-up, see contract/limits.py) is not imported,
    and ending the process at once (cli._exit_at_once) loses none of its output."""
    summary = tmp_path / "summary.json"
    argv = [
        *("validate", str(dataset), "--task", "sft", "--json", "--summary-file", str(summary)),
        *("--min-examples", "1", "--max-examples", "100", "--max-images-per-example", "8"),
        *("--max-image-bytes", "1000000", "--allow-remote-images"),
    ]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kubetune_trainer.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "kubetune_trainer.data.validate" in imported  # -X importtime did report
    assert not {m for m in imported if m.split(".")[0] in ("pydantic", "pydantic_core")}
    assert not imported & {"kubetune_trainer.contract.job", "kubetune_trainer.contract.summaries"}
    report = json.loads(done.stdout)
    assert report["valid"] is True and report["examples"] == 3
    assert json.loads(summary.read_text()) == report

    invalid = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.cli", "validate", str(dataset), "--task", "dpo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert invalid.returncode == 1
    assert invalid.stdout.splitlines()[-1].startswith(f"{dataset}: INVALID: 3 examples")
