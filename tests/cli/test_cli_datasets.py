"""`dataset create | list | get`, the pure parts: local validation with the validation
Job's own messages, the images a file names, where the data goes (ConfigMap, S3, or a
refusal that says what to do), the manifests, and what counts as the same data."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tiny_models import write_shapes_dataset

from kubetune_cli import datasets
from kubetune_cli.datasets import (
    ANNOTATION_CONTENT,
    CONFIGMAP_LIMIT,
    LocalData,
    Placement,
    choose_placement,
    configmap_key,
    configmap_name,
    content_digest,
    dataset_manifest,
    difference,
    embedded,
    source_for,
    uploads,
    verdict,
)
from kubetune_cli.output import CommandError, UsageError
from kubetune_cli.stores import PlatformDefaults, S3Prefix
from kubetune_trainer.cli import main as kubetune
from kubetune_trainer.data.validate import validate_file

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def create_args(path: Path, **given: Any) -> argparse.Namespace:
    values = {"file": str(path), "task": None, "format": None, "deep": None, **given}
    return argparse.Namespace(**values)


def write_bad(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.jsonl"
    lines = [
        json.dumps(GOOD),
        '{"messages": [{"role": "user", "content": "hi"}]}',
        json.dumps(GOOD),
        "{not json",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def noise_dataset(folder: Path, images: int, side: int) -> Path:
    """Images of random noise, which PNG cannot shrink: ``side``² x 3 bytes each."""
    rng = random.Random(7)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        pixels = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
        Image.frombytes("RGB", (side, side), pixels).save(folder / "img" / f"{i}.png")
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What is it?"},
                    {"role": "assistant", "content": f"noise {i}"},
                ],
                "images": [f"img/{i}.png"],
            }
        )
    path = folder / "noise.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_local_validation_reports_what_kubetune_validate_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_bad(tmp_path)
    report, data = datasets.validate_locally(create_args(bad))
    assert not report.valid
    mine = list(report.plain_lines(str(bad)))
    assert kubetune(["validate", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines() == mine
    assert any(line.startswith("line 2: ") for line in mine)
    assert any(line.startswith("line 4: ") for line in mine)
    assert data.images == {}


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        datasets.validate_locally(create_args(tmp_path / "none.jsonl"))


def test_the_images_named_by_relative_path_are_found_beside_the_file(tmp_path: Path) -> None:
    path = write_shapes_dataset(tmp_path / "laptop", 1, seed=1, name="shapes.jsonl")
    report, data = datasets.validate_locally(create_args(path))
    assert report.valid
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    named = {line["images"][0] for line in lines}
    assert set(data.images) == named
    assert all(data.images[key] == (tmp_path / "laptop" / key).resolve() for key in named)
    assert data.sha256 == report.sha256
    assert data.unplaceable == ()


def test_an_absolute_image_path_in_the_folder_is_valid_but_cannot_go_to_s3(tmp_path: Path) -> None:
    path = write_shapes_dataset(tmp_path, 1, seed=1, name="shapes.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["images"] = [str(tmp_path / lines[0]["images"][0])]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report, data = datasets.validate_locally(create_args(path))
    assert report.valid
    assert data.unplaceable == (lines[0]["images"][0],)


def test_the_digest_follows_the_data_not_the_folder_it_sits_in(tmp_path: Path) -> None:
    one = write_shapes_dataset(tmp_path / "a", 1, seed=1, name="d.jsonl")
    two = write_shapes_dataset(tmp_path / "b", 1, seed=1, name="d.jsonl")
    _, a = datasets.validate_locally(create_args(one))
    _, b = datasets.validate_locally(create_args(two))
    assert a.digest == b.digest
    # One pixel of one image changes it.
    image = next(iter(b.images.values()))
    picture = Image.open(image).convert("RGB")
    picture.putpixel((0, 0), (1, 2, 3))
    picture.save(image)
    _, changed = datasets.validate_locally(create_args(two))
    assert changed.sha256 == b.sha256 and changed.digest != b.digest
    # So does the path an image is named by.
    moved = {f"x/{k}": v for k, v in a.image_sha256.items()}
    assert content_digest(a.sha256, moved) != a.digest


def test_a_small_dataset_is_embedded_and_validates_as_it_was(tmp_path: Path) -> None:
    path = write_shapes_dataset(tmp_path, 2, seed=3, name="shapes.jsonl")
    _, data = datasets.validate_locally(create_args(path))
    text = embedded(data, "auto")
    assert text is not None and len(text) < CONFIGMAP_LIMIT
    assert "images/" not in text and text.count("data:image/png;base64,") == 12
    # Alone in a folder, with nothing beside it: it holds everything.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "data.jsonl").write_text(text)
    report = validate_file(alone / "data.jsonl")
    assert report.valid and report.examples == 12 and report.images == 12
    # In the style asked for.
    assert '"images":["data:image/png' in (embedded(data, "placeholder") or "")


def test_a_dataset_too_big_for_a_configmap_is_not_embedded(tmp_path: Path) -> None:
    path = noise_dataset(tmp_path, 3, 360)  # 3 x ~390 KB of noise, 4/3 of that embedded
    _, data = datasets.validate_locally(create_args(path))
    assert data.size > 1_100_000
    assert embedded(data, "auto") is None


def test_where_the_data_goes() -> None:
    store = PlatformDefaults(
        dataset_store="s3://platform/datasets",
        model_store_endpoint="http://minio:9000",
        source="kubetune-system/kubetune-defaults",
    )
    fits = {"endpoint": None, "secret": None, "size": 1000}
    assert choose_placement(None, True, store, **fits).kind == "configmap"
    assert choose_placement("configmap", True, None, **fits).kind == "configmap"
    big = {**fits, "size": 5 << 20}
    chosen = choose_placement(None, False, store, **big)
    assert chosen == Placement("s3", S3Prefix("platform", "datasets"), "http://minio:9000")
    mine = choose_placement("s3://mine/p/", False, store, **{**big, "secret": "creds"})
    assert mine == Placement("s3", S3Prefix("mine", "p"), None, "creds")
    # The endpoint: --s3-endpoint, else the platform's for its store, else this machine's.
    here = {**big, "env_endpoint": "http://laptop:9000"}
    assert choose_placement(None, False, store, **here).endpoint == "http://minio:9000"
    assert choose_placement("s3://m", False, store, **here).endpoint == "http://laptop:9000"
    given = {**here, "endpoint": "http://given:1"}
    assert choose_placement(None, False, store, **given).endpoint == "http://given:1"
    assert choose_placement("s3://m", False, store, **given).endpoint == "http://given:1"
    no_endpoint = PlatformDefaults(dataset_store="s3://platform/d", source="x/y")
    assert choose_placement(None, False, no_endpoint, **here).endpoint == "http://laptop:9000"
    with pytest.raises(CommandError, match=r"does not fit in a ConfigMap \(5.00 MiB"):
        choose_placement("configmap", False, store, **big)
    with pytest.raises(CommandError, match="--to s3://BUCKET/PREFIX"):
        choose_placement(None, False, None, **big)
    with pytest.raises(CommandError, match="names no datasetStore"):
        choose_placement(None, False, PlatformDefaults(source="ns/cm"), **big)


def test_a_pvc_store_is_refused_with_what_to_do_instead() -> None:
    store = PlatformDefaults(dataset_store="pvc://datasets/uploads", source="ns/defaults")
    big = {"endpoint": None, "secret": None, "size": 5 << 20}
    with pytest.raises(CommandError) as refused:
        choose_placement(None, False, store, **big)
    message = str(refused.value)
    assert "pvc://datasets/uploads (the platform's dataset store, ns/defaults)" in message
    assert "cannot write from outside the cluster" in message
    assert "--to s3://BUCKET/PREFIX" in message and "claim 'datasets'" in message
    with pytest.raises(CommandError, match="cannot write from outside"):
        choose_placement("pvc://c/p", False, None, **big)


def data_of(tmp_path: Path) -> LocalData:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    return LocalData(path, "f" * 64, {"img/a.png": image}, {"img/a.png": "e" * 64})


def test_the_s3_folder_holds_the_digest_and_the_file_goes_last(tmp_path: Path) -> None:
    data = data_of(tmp_path)
    placement = Placement("s3", S3Prefix("b", "up"), "http://s3:9000", "creds")
    source = source_for(placement, data, "team", "shapes", "train.jsonl")
    folder = f"up/team/shapes/{data.digest[:16]}"
    assert source == {
        "s3": {
            "uri": f"s3://b/{folder}/train.jsonl",
            "endpoint": "http://s3:9000",
            "secretRef": {"name": "creds"},
        }
    }
    sent = uploads(data, datasets.s3_folder(placement, "team", "shapes", data.digest))
    assert [u.key for u in sent] == [f"{folder}/img/a.png", f"{folder}/train.jsonl"]


def test_configmap_names_and_keys() -> None:
    assert configmap_key(Path("/x/shapes.jsonl")) == "shapes.jsonl"
    assert configmap_key(Path("/x/my data.jsonl")) == "data.jsonl"
    long = configmap_name("d" * 253, "a" * 64)
    assert len(long) == 253 and long.endswith("-" + "a" * 16)


def test_the_dataset_manifest_is_checked_by_the_api_models(tmp_path: Path) -> None:
    data = data_of(tmp_path)
    source = source_for(Placement("configmap"), data, "team", "shapes", "train.jsonl")
    manifest = dataset_manifest("shapes", "team", source, {"task": "dpo"}, data)
    assert manifest["spec"] == {
        "source": {"configMap": {"name": f"shapes-{data.digest[:16]}", "key": "train.jsonl"}},
        "task": "dpo",
    }
    assert manifest["metadata"]["annotations"][ANNOTATION_CONTENT] == data.digest
    with pytest.raises(UsageError, match="Dataset 'Shapes'"):
        dataset_manifest("Shapes", "team", source, {}, data)
    with pytest.raises(UsageError, match="queueName"):
        dataset_manifest("shapes", "team", source, {"queueName": "Not A Name"}, data)


def test_the_same_data_and_spec_is_no_change_whatever_the_server_filled_in(
    tmp_path: Path,
) -> None:
    data = data_of(tmp_path)
    source = source_for(Placement("configmap"), data, "team", "shapes", "train.jsonl")
    desired = dataset_manifest("shapes", "team", source, {}, data)
    stored = json.loads(json.dumps(desired))
    # What the CRD's schema defaults add on the way in.
    stored["spec"] |= {"format": "auto", "task": "sft", "deep": False, "limits": {"minExamples": 3}}
    stored["metadata"]["annotations"]["other"] = "kept"
    assert difference(stored, desired) is None

    stored["spec"]["task"] = "dpo"
    assert difference(stored, desired) == "its spec differs in task"
    other = LocalData(data.path, "0" * 64, data.images, data.image_sha256)
    changed = dataset_manifest("shapes", "team", source, {}, other)
    assert "it holds other data (train.jsonl, sha256 " + "f" * 64 in (
        difference(desired, changed) or ""
    )
    by_hand = {"metadata": {"name": "shapes"}, "spec": desired["spec"]}
    assert difference(by_hand, desired) == "it was not made from a file by this client"


def test_waiting_ends_on_ready_or_invalid_for_the_current_generation() -> None:
    def at(phase: str, observed: int) -> dict[str, Any]:
        return {
            "metadata": {"generation": 2},
            "status": {"phase": phase, "observedGeneration": observed},
        }

    assert verdict(at("Ready", 1)) is None  # the previous spec's verdict
    assert verdict(at("Validating", 2)) is None
    assert verdict(at("Ready", 2)) is True
    assert verdict(at("Invalid", 2)) is False
    assert verdict(at("Failed", 2)) is False


def test_get_and_list_show_phase_counts_and_problems_by_line() -> None:
    dataset = {
        "metadata": {"name": "bad", "namespace": "team", "creationTimestamp": None},
        "spec": {"source": {"s3": {"uri": "s3://b/k/bad.jsonl"}}, "task": "sft"},
        "status": {
            "phase": "Invalid",
            "examples": 3,
            "images": 0,
            "errorCount": 25,
            "warningCount": 1,
            "errors": [{"line": 2, "message": "no assistant turn"}],
            "warnings": [{"line": 3, "message": "exact duplicate of line 1"}],
        },
    }
    shown = datasets.describe(dataset)
    assert "Phase:" in shown and "Invalid" in shown
    assert "Source:" in shown and "s3://b/k/bad.jsonl" in shown
    assert "Errors (first 1):\n  line 2: no assistant turn\n" in shown
    assert "Warnings:\n  line 3: exact duplicate of line 1\n" in shown
    rows = datasets.list_rows([dataset]).splitlines()
    assert rows[0].split() == [
        "NAME",
        "PHASE",
        "EXAMPLES",
        "IMAGES",
        "ERRORS",
        "WARNINGS",
        "TASK",
        "AGE",
    ]
    assert rows[1].split() == ["bad", "Invalid", "3", "0", "25", "1", "sft", "<unknown>"]
