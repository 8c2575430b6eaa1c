"""`kubetune convert`: lossless round trips on real files, embedding, atomic output."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from data_helpers import image_bytes, sft, write_jsonl

from kubetune_trainer.data import (
    DatasetError,
    Example,
    ImageRef,
    Turn,
    convert_file,
    read_examples,
    validate_file,
    write_examples,
)

CORPUS = Path(__file__).parent / "corpus"
VALID = sorted((CORPUS / "valid").glob("*.jsonl"))
STYLES = ["placeholder", "content-parts"]


def without_lines(examples: list[Example]) -> list[Example]:
    return [replace(e, line=0) for e in examples]


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
@pytest.mark.parametrize("first", STYLES)
def test_round_trips_through_both_styles_lose_nothing(
    path: Path, first: str, tmp_path: Path
) -> None:
    original = without_lines(list(read_examples(path)))
    second = STYLES[1 - STYLES.index(first)]
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert convert_file(path, a, first, image_root=CORPUS).ok  # type: ignore[arg-type]
    assert convert_file(a, b, second, image_root=CORPUS).ok  # type: ignore[arg-type]
    assert convert_file(b, c, first, image_root=CORPUS).ok  # type: ignore[arg-type]
    for out in (a, b, c):
        assert without_lines(list(read_examples(out))) == original
        assert validate_file(out, image_root=CORPUS).valid
    assert a.read_bytes() == c.read_bytes()  # the same style writes the same bytes


def test_styles_look_like_the_hosted_formats(tmp_path: Path) -> None:
    ex = Example(
        turns=(
            Turn("system", ("s",)),
            Turn("user", ("a", ImageRef("x.png", "low"), "b", ImageRef("y.png"))),
            Turn("assistant", ("good",)),
        ),
        rejected=Turn("assistant", ("bad",)),
        extra=(("id", 1),),
    )
    write_examples([ex], tmp_path / "p.jsonl", "placeholder")
    write_examples([ex], tmp_path / "c.jsonl", "content-parts")
    assert json.loads((tmp_path / "p.jsonl").read_text()) == {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a<image>b<image>"},
            {"role": "assistant", "content": "good"},
        ],
        "images": ["x.png", "y.png"],
        "image_details": ["low", None],
        "rejected_response": "bad",
        "id": 1,
    }
    assert json.loads((tmp_path / "c.jsonl").read_text()) == {
        "input": {
            "messages": [
                {"role": "system", "content": "s"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"url": "x.png", "detail": "low"}},
                        {"type": "text", "text": "b"},
                        {"type": "image_url", "image_url": {"url": "y.png"}},
                    ],
                },
            ]
        },
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        "id": 1,
    }


def test_embed_images(tmp_path: Path) -> None:
    png, jpg = image_bytes("PNG"), image_bytes("JPEG")
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "b.jpg").write_bytes(jpg)
    (tmp_path / "empty").mkdir()
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            sft("<image><image>two", images=["a.png", "b.jpg"]),
            sft("<image>remote", images=["https://example.com/c.png"]),
            sft("none"),
        ],
    )
    result = convert_file(src, tmp_path / "out.jsonl", "content-parts", embed_images=True)
    assert result.ok and result.examples == 3
    out = list(read_examples(tmp_path / "out.jsonl"))
    uris = [img.source for img in out[0].images]
    assert uris == [
        "data:image/png;base64," + base64.b64encode(png).decode(),
        "data:image/jpeg;base64," + base64.b64encode(jpg).decode(),
    ]
    assert out[1].images == (ImageRef("https://example.com/c.png"),)  # URLs stay unless allowed
    # the embedded file no longer needs the image folder; only the URL is refused
    report = validate_file(tmp_path / "out.jsonl", image_root=tmp_path / "empty")
    assert [p.message for p in report.errors] == [
        "image 1 (https://example.com/c.png): remote image URLs are not allowed (allowRemoteImages is off)"
    ]


def test_invalid_input_leaves_the_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    src = write_jsonl(tmp_path / "in.jsonl", [sft("a"), "[]", sft("b"), {"messages": []}])
    result = convert_file(src, out, "placeholder")
    assert not result.ok
    assert [(p.line, p.message) for p in result.errors] == [
        (2, "expected a JSON object, got an array"),
        (4, "'messages' is empty"),
    ]
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
    ]  # no temp file left


def test_an_image_that_cannot_be_embedded_aborts(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [sft("ok"), sft("<image>x", images=["../etc.png"])])
    result = convert_file(src, tmp_path / "out.jsonl", "placeholder", embed_images=True)
    assert [(p.line, p.message) for p in result.errors] == [
        (2, "../etc.png: the path leaves the image root through '..'")
    ]
    assert not (tmp_path / "out.jsonl").exists()


def test_write_examples_is_atomic_when_the_source_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def examples() -> Iterator[Example]:
        yield from read_examples(write_jsonl(tmp_path / "in.jsonl", [sft("a"), sft("b")]))
        raise DatasetError(3, "boom")

    with pytest.raises(DatasetError, match="line 3: boom"):
        write_examples(examples(), out, "content-parts")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_write_examples_needs_a_root_to_embed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_root"):
        write_examples([], tmp_path / "x.jsonl", "placeholder", embed_images=True)
