"""Writes the dataset test corpus: images/, valid/*.jsonl, invalid/*.jsonl and
manifest.json (what each invalid file must produce, on which line).

Run it after changing a case: ``.venv/bin/python tests/data/corpus/generate.py``.
The outputs are committed, so that the corpus is real files a reviewer can open.
Image paths in the JSONL files are relative to this folder (the tests pass it as
the image root).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from data_helpers import data_uri, image_bytes, png_header_only  # noqa: E402

from kubetune_trainer.data.jsonl import RESERVED_MEMORY  # noqa: E402


def write_images() -> None:
    images = HERE / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    files = {
        "red.png": image_bytes("PNG", (16, 12)),
        "rgba.png": image_bytes("PNG", (10, 10), "RGBA"),
        "gray.png": image_bytes("PNG", (10, 10), "L"),
        "photo.jpg": image_bytes("JPEG", (24, 16)),
        "cmyk.jpg": image_bytes("JPEG", (12, 12), "CMYK"),
        "pic.webp": image_bytes("WEBP", (20, 10)),
        "anim.gif": image_bytes("GIF", (8, 8), "P"),
        "pic.bmp": image_bytes("BMP", (8, 8)),
        "pic.tiff": image_bytes("TIFF", (8, 8)),
        "not-an-image.png": b"this is text, not an image\n" * 4,
        "header-cut.png": image_bytes("PNG", (16, 12))[:20],
        "bomb.png": png_header_only(60_000, 60_000),
        "bomb-small.png": png_header_only(10_000, 9_500),
        "big.png": _noisy_png(),
    }
    files["truncated.png"] = _noisy_png()[:-300]  # the header is intact, the pixels are not
    for name, data in files.items():
        (images / name).write_bytes(data)
    # A symlink that points outside the image root (this folder).
    os.symlink("../../data_helpers.py", images / "escape.png")


def _noisy_png() -> bytes:
    import io
    import random

    from PIL import Image

    rng = random.Random(3)
    im = Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3)))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# --- lines ----------------------------------------------------------------------


def good(i: int) -> dict[str, Any]:
    """Distinct valid lines in the three layouts, cycling."""
    if i % 3 == 0:
        return {
            "messages": [
                {"role": "user", "content": f"<image>What colour is picture {i}?"},
                {"role": "assistant", "content": "Red."},
            ],
            "images": ["images/red.png"],
        }
    if i % 3 == 1:
        return {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Describe photo {i}."},
                        {
                            "type": "image_url",
                            "image_url": {"url": "images/photo.jpg", "detail": "low"},
                        },
                    ],
                },
                {"role": "assistant", "content": "A small photo."},
            ]
        }
    return {
        "messages": [
            {"role": "user", "content": f"Say {i}."},
            {"role": "assistant", "content": str(i)},
        ]
    }


def good_dpo(i: int) -> dict[str, Any]:
    if i % 2:
        return {
            "input": {"messages": [{"role": "user", "content": f"Greet person {i}."}]},
            "preferred_output": [{"role": "assistant", "content": f"Hello, person {i}!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        }
    return {
        "messages": [
            {"role": "user", "content": f"<image>Is picture {i} red?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["images/red.png"],
        "rejected_response": "No.",
    }


def sft(user: Any, reply: Any = "Sure.", **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
        **extra,
    }


def with_image(source: str) -> dict[str, Any]:
    return sft("<image>What is this?", "A picture.", images=[source])


@dataclass
class Case:
    name: str
    lines: list[Any]
    line: int
    message: str
    severity: str = "error"
    task: str = "sft"
    deep: bool = False
    limits: dict[str, Any] = field(default_factory=dict)
    memory_limit: int | None = None


def around(bad: Any, at: int = 3, total: int = 5, make: Any = good) -> list[Any]:
    """``total`` lines with ``bad`` as line ``at`` and valid lines elsewhere."""
    lines: list[Any] = [make(i) for i in range(total - 1)]
    lines.insert(at - 1, bad)
    return lines


def cases() -> list[Case]:
    c: list[Case] = []

    def add(name: str, bad: Any, message: str, at: int = 3, **kw: Any) -> None:
        make = good_dpo if kw.get("task") == "dpo" else good
        c.append(Case(name, around(bad, at, make=make), at, message, **kw))

    # one UTF-8 JSON object per line
    add("json-truncated", '{"messages": [{"role": "user"', "invalid JSON", at=1)
    add("json-not-object", "[1, 2, 3]", "expected a JSON object, got an array")
    add("json-string", '"hello"', "expected a JSON object, got a string")
    # 880 bytes: a RecursionError once, and the trainer's exit 1 (retry).
    add(
        "json-nested-400-levels",
        '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],'
        '"meta":' + "[" * 400 + "]" * 400 + "}",
        "arrays and objects nest more than 64 levels deep",
    )
    add("json-trailing-garbage", json.dumps(good(9)) + " x", "invalid JSON", at=5)
    add("json-nan", '{"messages": [], "score": NaN}', "invalid JSON")
    add("utf8-invalid", b'{"messages": "caf\xe9"}', "not valid UTF-8", at=2)
    add(
        "utf8-lone-surrogate",
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "lone UTF-16 surrogate",
    )
    # layout and types
    add("no-messages", {"conversation": []}, "expected 'messages'")
    add("messages-not-array", {"messages": "hi"}, "'messages' must be an array")
    add("messages-empty", {"messages": []}, "'messages' is empty")
    add("message-not-object", {"messages": ["hi", "there"]}, "messages[0] must be an object")
    add(
        "role-unknown",
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "messages[0].role 'tool' is not one of system, user, assistant",
    )
    add(
        "role-missing",
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "y"}]},
        "messages[0] has no 'role'",
    )
    add(
        "content-missing",
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
        "messages[0] has no 'content'",
    )
    add(
        "content-number",
        sft(42),
        "messages[0].content must be a string or an array of content parts, not a number",
    )
    add(
        "content-null-reply",
        sft("hi", None),
        "messages[1].content must be a string or an array of content parts, not null",
    )
    add(
        "part-unknown-type",
        sft([{"type": "file", "file": "a.pdf"}]),
        "messages[0].content[0].type 'file' is not one of text, image_url",
    )
    add(
        "part-audio",
        sft([{"type": "input_audio", "input_audio": {}}]),
        "input_audio parts are not supported",
    )
    add(
        "part-text-not-string",
        sft([{"type": "text", "text": ["a"]}]),
        "messages[0].content[0].text must be a string",
    )
    add(
        "part-image-url-string",
        sft([{"type": "image_url", "image_url": "images/red.png"}]),
        "image_url must be an object",
    )
    add(
        "part-detail-bad",
        sft([{"type": "image_url", "image_url": {"url": "images/red.png", "detail": "ultra"}}]),
        "detail 'ultra' is not one of low, high, auto",
    )
    add(
        "part-text-spells-placeholder",
        sft([{"type": "text", "text": "look <image>"}]),
        "contains <image>",
    )
    add(
        "images-not-strings",
        sft("<image>x", images=[{"path": "images/red.png"}]),
        "images[0] must be a non-empty string",
    )
    add(
        "image-details-bad",
        sft("<image>x", images=["images/red.png"], image_details=["max"]),
        "image_details[0] 'max' is not one of",
    )
    add("videos", sft("<video>x", videos=["v.mp4"]), "'videos' are not supported")
    add("audios", sft("<audio>x", audios=["a.wav"]), "'audios' are not supported")
    # conversation rules
    add(
        "no-user-turn",
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        "at least one user turn",
    )
    add(
        "last-turn-user",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        "the last turn must be the assistant reply, not a user turn",
    )
    add("reply-empty", sft("hi", "  "), "the assistant reply is empty")
    # placeholders and image positions
    add(
        "placeholders-more",
        sft("<image><image>compare", images=["images/red.png"]),
        "2 <image> placeholders but 1 image in 'images'",
    )
    add(
        "placeholders-none",
        sft("what is it?", images=["images/red.png"]),
        "0 <image> placeholders but 1 image",
    )
    add(
        "placeholder-in-assistant",
        {
            "messages": [
                {"role": "user", "content": "draw"},
                {"role": "assistant", "content": "<image>"},
            ],
            "images": ["images/red.png"],
        },
        "messages[1]: images belong in user turns, not in assistant turns",
    )
    add(
        "image-part-in-system",
        {
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": "images/red.png"}}],
                },
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
            ]
        },
        "messages[0]: images belong in user turns, not in system turns",
    )
    add(
        "too-many-images",
        sft("<image><image><image>three", images=["images/red.png"] * 3),
        "3 images, more than the limit of 2",
        limits={"maxImagesPerExample": 2},
    )
    # images
    add(
        "image-too-big",
        with_image("images/big.png"),
        "more than the limit of 5,000 (maxImageBytes)",
        limits={"maxImageBytes": 5000},
    )
    add(
        "image-data-too-big",
        with_image(data_uri(_noisy_png())),
        "more than the limit of 5,000",
        limits={"maxImageBytes": 5000},
    )
    add(
        "image-gif",
        with_image("images/anim.gif"),
        "GIF images are not supported; use JPEG, PNG or WEBP",
    )
    add("image-bmp", with_image("images/pic.bmp"), "BMP images are not supported")
    add("image-tiff", with_image("images/pic.tiff"), "TIFF images are not supported")
    add("image-not-an-image", with_image("images/not-an-image.png"), "not a recognisable image")
    add("image-header-cut", with_image("images/header-cut.png"), "the image does not open")
    add(
        "image-truncated-deep",
        with_image("images/truncated.png"),
        "the image does not decode",
        deep=True,
    )
    add("image-missing", with_image("images/nope.png"), "image file not found")
    add("image-directory", with_image("images"), "not a regular file")
    add("image-bomb", with_image("images/bomb.png"), "decompression bomb")
    add("image-bomb-small", with_image("images/bomb-small.png"), "decompression bomb")
    add(
        "image-mode-gray",
        with_image("images/gray.png"),
        "image mode L is converted to RGB",
        severity="warning",
    )
    add(
        "image-mode-cmyk",
        with_image("images/cmyk.jpg"),
        "image mode CMYK is converted to RGB",
        severity="warning",
    )
    add(
        "base64-bad-char",
        with_image("data:image/png;base64,iVBO!w0K"),
        "invalid base64: unexpected character '!'",
    )
    add("base64-bad-length", with_image("data:image/png;base64,iVBORw0KG"), "not a multiple of 4")
    add(
        "base64-inner-padding",
        with_image("data:image/png;base64,iV==Rw0K"),
        "misplaced '=' padding",
    )
    add("data-uri-not-base64", with_image("data:image/png,rawbytes"), "';base64' is missing")
    add(
        "data-uri-mime-mismatch",
        with_image(data_uri(image_bytes("PNG"), "image/jpeg")),
        "says image/jpeg but the bytes are PNG",
        severity="warning",
    )
    add(
        "data-uri-gif",
        with_image(data_uri(image_bytes("GIF", (4, 4), "P"), "image/gif")),
        "GIF images are not supported",
    )
    # paths stay under the image root
    add("path-dotdot", with_image("../data_helpers.py"), "leaves the image root through '..'")
    add(
        "path-dotdot-inside-first",
        with_image("images/../../corpus/../data_helpers.py"),
        "leaves the image root",
    )
    add("path-absolute", with_image("/etc/passwd"), "absolute path outside the image root")
    add("path-symlink-out", with_image("images/escape.png"), "resolves outside the image root")
    add("path-file-url", with_image("file:///etc/passwd"), "file: URLs are not supported")
    add("path-s3-url", with_image("s3://bucket/a.png"), "s3: URLs are not supported")
    # remote images
    add("remote-off", with_image("https://example.com/a.png"), "remote image URLs are not allowed")
    add(
        "remote-loopback",
        with_image("http://127.0.0.1:8080/a.png"),
        "host 127.0.0.1 resolves to a loopback address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-loopback-v6",
        with_image("http://[::1]/a.png"),
        "a loopback address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-mapped-v6",
        with_image("http://[::ffff:10.0.0.1]/a.png"),
        "a private address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-private",
        with_image("http://10.1.2.3/a.png"),
        "host 10.1.2.3 resolves to a private address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-link-local",
        with_image("http://169.254.10.10/a.png"),
        "a link-local address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-metadata-ip",
        with_image("http://169.254.169.254/latest/meta-data/"),
        "a cloud metadata address",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-metadata-host",
        with_image("http://metadata.google.internal/computeMetadata/v1/"),
        "is a cloud metadata service",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-bad-ipv6",
        with_image("http://[/x.png"),
        "remote image refused: not a valid URL",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-bad-host",
        with_image("http://exa\u2028mple.com/x.png"),
        "is not valid",
        limits={"allowRemoteImages": True},
    )
    add(
        "remote-credentials",
        with_image("http://user:pw@93.184.216.34/a.png"),
        "credentials",
        limits={"allowRemoteImages": True},
    )
    # preference pairs
    add("dpo-missing-rejected", good(2), "dpo needs a rejected reply", task="dpo")
    add(
        "dpo-empty-rejected",
        sft("hi", "hello", rejected_response=""),
        "the rejected reply is empty",
        task="dpo",
    )
    add(
        "dpo-same-as-chosen",
        sft("hi", "hello", rejected_response=[{"role": "assistant", "content": "hello"}]),
        "the same as the chosen one",
        task="dpo",
    )
    add(
        "dpo-openai-same",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
            "non_preferred_output": [{"role": "assistant", "content": "a"}],
        },
        "the same as the chosen one",
        task="dpo",
    )
    add(
        "dpo-rejected-number",
        sft("hi", "hello", rejected_response=3),
        "'rejected_response' must be a string or an array",
        task="dpo",
    )
    add(
        "dpo-rejected-user-role",
        sft("hi", "hello", rejected_response=[{"role": "user", "content": "no"}]),
        "the rejected reply must be an assistant message",
        task="dpo",
    )
    add(
        "dpo-rejected-placeholder",
        sft("hi", "hello", rejected_response="<image>"),
        "rejected_response: images belong in user turns",
        task="dpo",
    )
    add(
        "dpo-rejected-images-count",
        sft(
            "<image>hi",
            "hello",
            images=["images/red.png"],
            rejected_images=["images/red.png", "images/rgba.png"],
            rejected_response="no",
        ),
        "'rejected_images' has 2 images but the prompt has 1",
        task="dpo",
    )
    add(
        "dpo-rejected-image-missing",
        sft(
            "<image>hi",
            "hello",
            images=["images/red.png"],
            rejected_images=["images/gone.png"],
            rejected_response="no",
        ),
        "rejected image 1 (images/gone.png): image file not found",
        task="dpo",
    )
    add(
        "dpo-input-no-preferred",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "non_preferred_output": [{"role": "assistant", "content": "a"}],
        },
        "'input' needs 'preferred_output'",
        task="dpo",
    )
    add(
        "dpo-two-non-preferred",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
            "non_preferred_output": [
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
        },
        "must be an array holding one assistant message, not 2 entries",
        task="dpo",
    )
    add(
        "dpo-input-not-object",
        {"input": [], "preferred_output": []},
        "'input' must be an object",
        task="dpo",
    )
    add(
        "dpo-messages-and-input",
        {"messages": [], "input": {"messages": []}},
        "'messages' cannot be combined with 'input'",
        task="dpo",
    )
    add(
        "dpo-preferred-with-messages",
        sft("q", "a", preferred_output=[{"role": "assistant", "content": "a"}]),
        "'preferred_output' belongs with 'input'",
        task="dpo",
    )
    # file-level rules
    c.append(Case("blank-line", around("   ", at=2), 2, "blank line skipped", severity="warning"))
    c.append(
        Case(
            "duplicate",
            [good(0), good(1), good(2), good(1)],
            4,
            "exact duplicate of line 2",
            severity="warning",
        )
    )
    c.append(
        Case(
            "line-too-long",
            around(good(100) | {"padding": "x" * 3000}, at=4),
            4,
            "line is longer than 3,000 bytes, the most one line may have in",
            memory_limit=RESERVED_MEMORY + 15_000,  # 15,000 bytes for a line: 3,000 ASCII bytes
        )
    )
    c.append(
        Case(
            "line-too-many-values",
            around(good(100) | {"padding": [{}] * 2000}, at=2),
            2,
            "line holds about 4,0",
            memory_limit=RESERVED_MEMORY + 100_000,
        )
    )
    c.append(
        Case(
            "too-few-examples",
            [good(0), good(1)],
            0,
            "2 examples; at least 3 are needed (minExamples)",
        )
    )
    c.append(
        Case(
            "too-many-examples",
            [good(i) for i in range(5)],
            0,
            "5 examples; at most 4 are allowed (maxExamples)",
            limits={"maxExamples": 4},
        )
    )
    return c


def valid_files() -> dict[str, list[Any]]:
    text = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {
            "messages": [
                {"role": "system", "content": "Terse."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ],
            "id": "t-3",
        },
    ]
    placeholder = [
        {
            "messages": [
                {"role": "user", "content": "<image>What colour?"},
                {"role": "assistant", "content": "Red."},
            ],
            "images": ["images/red.png"],
        },
        {
            "messages": [
                {"role": "system", "content": "You compare images."},
                {"role": "user", "content": "<image> vs <image>: which is wider?"},
                {"role": "assistant", "content": "The second."},
            ],
            "images": ["images/photo.jpg", "images/pic.webp"],
        },
        {
            "messages": [
                {"role": "user", "content": "First: <image>"},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "And <image>?"},
                {"role": "assistant", "content": "Transparent-ish."},
            ],
            "images": ["images/red.png", "images/rgba.png"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Embedded."},
                {"role": "assistant", "content": "Yes."},
            ],
            "images": [data_uri(image_bytes("PNG", (5, 5)))],
        },
        {
            "messages": [
                {"role": "user", "content": "No picture here."},
                {"role": "assistant", "content": "Right."},
            ]
        },
    ]
    content_parts = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "images/photo.jpg"}},
                    ],
                },
                {"role": "assistant", "content": "A photo."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": data_uri(image_bytes("JPEG", (6, 6)), "image/jpeg"),
                                "detail": "high",
                            },
                        },
                        {"type": "text", "text": "Nice?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Very."}]},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "images/red.png", "detail": "auto"},
                        }
                    ],
                },
                {"role": "assistant", "content": "Red."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "And now?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "images/pic.webp", "detail": "low"},
                        },
                    ],
                },
                {"role": "assistant", "content": "Greenish."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Plain text is fine too."},
                {"role": "assistant", "content": "Indeed."},
            ]
        },
    ]
    preference_placeholder = [
        {
            "messages": [
                {"role": "user", "content": "<image>Colour?"},
                {"role": "assistant", "content": "Red."},
            ],
            "images": ["images/red.png"],
            "rejected_response": "Blue.",
        },
        {
            "messages": [
                {"role": "system", "content": "Be polite."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "rejected_response": [{"role": "assistant", "content": "What."}],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Describe."},
                {"role": "assistant", "content": "A red square."},
            ],
            "images": ["images/red.png"],
            "rejected_images": ["images/rgba.png"],
            "rejected_response": "A red square.",
        },
    ]
    preference_openai = [
        {
            "input": {"messages": [{"role": "user", "content": "Write a haiku."}]},
            "preferred_output": [{"role": "assistant", "content": "Leaves fall softly down"}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        },
        {
            "input": {
                "messages": [
                    {"role": "system", "content": "Art critic."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Rate it."},
                            {"type": "image_url", "image_url": {"url": "images/photo.jpg"}},
                        ],
                    },
                ]
            },
            "preferred_output": [{"role": "assistant", "content": "7/10, nice light."}],
            "non_preferred_output": [{"role": "assistant", "content": "Bad."}],
        },
        {
            "input": {
                "messages": [
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "times 3?"},
                ]
            },
            "preferred_output": [{"role": "assistant", "content": "12"}],
            "non_preferred_output": [{"role": "assistant", "content": "7"}],
            "id": 3,
        },
    ]
    mixed = [
        *placeholder[:2],
        *content_parts[:2],
        text[0],
        preference_placeholder[0],
        preference_openai[1],
    ]
    return {
        "text-only.jsonl": text,
        "placeholder.jsonl": placeholder,
        "content-parts.jsonl": content_parts,
        "preference-placeholder.jsonl": preference_placeholder,
        "preference-openai.jsonl": preference_openai,
        "mixed.jsonl": mixed,
    }


def encode(record: Any) -> bytes:
    if isinstance(record, bytes):
        return record
    if isinstance(record, str):
        return record.encode("utf-8")
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def main() -> None:
    write_images()
    for folder in ("valid", "invalid"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
        (HERE / folder).mkdir()
    for name, records in valid_files().items():
        (HERE / "valid" / name).write_bytes(b"".join(encode(r) + b"\n" for r in records))
    # A BOM and CRLF line endings are accepted.
    bom = valid_files()["mixed.jsonl"]
    (HERE / "valid" / "bom-crlf.jsonl").write_bytes(
        b"\xef\xbb\xbf" + b"".join(encode(r) + b"\r\n" for r in bom)
    )
    manifest = []
    for case in cases():
        file = f"{case.name}.jsonl"
        (HERE / "invalid" / file).write_bytes(b"".join(encode(r) + b"\n" for r in case.lines))
        entry = asdict(case)
        del entry["lines"], entry["name"]
        manifest.append({"file": file, **entry})
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} invalid files, {len(valid_files()) + 1} valid files")


if __name__ == "__main__":
    main()
