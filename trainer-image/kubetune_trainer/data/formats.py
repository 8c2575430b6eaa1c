"""Parsing one decoded JSON line, in any supported chat format, into an ``Example``.

The formats, detected per line (one file may mix them):

* placeholder style (ms-swift, Model Studio): ``messages`` with string content and a
  top-level ``images`` list; each ``<image>`` takes the next image;
* content-part style (OpenAI, Azure, Fireworks): content is a string or an array of
  ``text`` and ``image_url`` parts;
* preference pairs: either of the above plus ``rejected_response`` (and optionally
  ``rejected_images``), or ``{"input": {"messages"}, "preferred_output",
  "non_preferred_output"}``.

Parsing checks shape: types, roles, where images and weights may go, placeholder
counts. Rules about the conversation as a whole live in ``rules.py``; image files in
``images.py``.
``parse_record`` never raises: every failure comes back as a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from kubetune_trainer.data.example import Example, ImageRef, Part, Role, Turn, Weight

PLACEHOLDER: Final = "<image>"
ROLES: Final[tuple[Role, ...]] = ("system", "user", "assistant")
DETAILS: Final = ("low", "high", "auto")

# Keys some format interprets. Every other top-level key is kept verbatim in
# Example.extra, so that convert carries ids and metadata through.
INTERPRETED_KEYS: Final = frozenset(
    {
        "messages",
        "images",
        "image_details",  # kubetune's extension: content-part "detail" in placeholder style
        "rejected_response",
        "rejected_images",
        "input",
        "preferred_output",
        "non_preferred_output",
    }
)
UNSUPPORTED_MEDIA: Final = ("videos", "audios")
# Keys of hosted formats that change what a line means but that training ignores.
IGNORED_FEATURES: Final = ("tools", "functions", "parallel_tool_calls")
MESSAGE_KEYS: Final = frozenset({"role", "content", "weight"})


@dataclass(frozen=True, slots=True)
class Parsed:
    """The outcome for one line: an example, or the reason there is none."""

    example: Example | None
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class _Invalid(Exception):
    """Internal: the line cannot be parsed; ``parse_record`` turns it into an error."""


class _Slot:
    """An ``<image>`` placeholder awaiting the next entry of ``images``."""


_SLOT: Final = _Slot()
_Segment = str | ImageRef | _Slot


def json_type(value: object) -> str:
    """How a user would name a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def line_style(obj: object) -> str | None:
    """Which style a decoded line is written in: "content-parts" when any content is an
    array of parts, "placeholder" when it has an images list or an ``<image>`` tag, None
    for plain text, which both styles write alike."""
    if not isinstance(obj, dict):
        return None
    messages: list[Any] = []
    for key in ("messages", "preferred_output", "non_preferred_output", "rejected_response"):
        value = obj.get(key)
        messages += value if isinstance(value, list) else []
    if isinstance(obj.get("input"), dict) and isinstance(obj["input"].get("messages"), list):
        messages += obj["input"]["messages"]
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    if any(isinstance(c, list) for c in contents):
        return "content-parts"
    if "images" in obj or any(isinstance(c, str) and "<image>" in c for c in contents):
        return "placeholder"
    return None


def parse_record(obj: object, line: int = 0) -> Parsed:
    """Parse one JSON value from a dataset line."""
    warnings: list[str] = []
    try:
        example = _parse(obj, line, warnings)
    except _Invalid as exc:
        return Parsed(None, (str(exc),), tuple(warnings))
    return Parsed(example, (), tuple(warnings))


def _parse(obj: object, line: int, warnings: list[str]) -> Example:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {json_type(obj)}")
    extra: tuple[tuple[str, Any], ...] = ()
    if not obj.keys() <= INTERPRETED_KEYS:  # most lines hold interpreted keys only
        extra = tuple(item for item in obj.items() if item[0] not in INTERPRETED_KEYS)
        for key in UNSUPPORTED_MEDIA:
            if obj.get(key):
                raise _Invalid(f"'{key}' are not supported: kubetune trains on text and images")
        for key in IGNORED_FEATURES:
            if obj.get(key):
                warnings.append(f"'{key}' is ignored: tool calling is not trained")

    messages, rejected_message = _locate_messages(obj)
    images = _image_list(obj, "images")
    details = _detail_list(obj, len(images))
    segments = [_message_segments(msg, where, warnings) for where, msg in messages]

    slots = sum(segs.count(_SLOT) for _, segs, _ in segments)
    if slots != len(images):
        raise _Invalid(
            f"{slots} {PLACEHOLDER} placeholder{'s' * (slots != 1)} but {len(images)} "
            f"image{'s' * (len(images) != 1)} in 'images'"
        )
    if slots:
        queue = iter([ImageRef(src, det) for src, det in zip(images, details, strict=True)])
        segments = [
            (role, [next(queue) if s is _SLOT else s for s in segs], weight)
            for role, segs, weight in segments
        ]
    turns = tuple(
        Turn(role, _merge(segs, where), weight)
        for (where, _), (role, segs, weight) in zip(messages, segments, strict=True)
    )

    rejected = None
    if rejected_message is not None:
        # DPO trains on both replies of a pair (SFT on a pair file, on the chosen one), so
        # weight 0 on either contradicts the pair. Weight 1 is the default: the rejected
        # reply does not keep it, as the placeholder style writes that reply as a bare
        # string.
        where, msg = rejected_message
        role, segs, weight = _message_segments(msg, where, warnings, default_role="assistant")
        if role != "assistant":
            raise _Invalid(f"{where}: the rejected reply must be an assistant message, not {role}")
        if weight == 0 or turns[-1].weight == 0:
            field = where if weight == 0 else messages[-1][0]
            raise _Invalid(
                f"{field}.weight is 0, but both replies of a preference pair are trained on"
            )
        rejected = Turn(role, _merge(segs, where))
    elif any(t.weight == 0 for t in turns) and not any(t.learned for t in turns):
        raise _Invalid("every assistant message has weight 0: the example has nothing to learn")

    rejected_images = None
    if "rejected_images" in obj and obj["rejected_images"] is not None:
        sources = _image_list(obj, "rejected_images")
        n_images = sum(len(t.images) for t in turns)
        if len(sources) != n_images:
            raise _Invalid(
                f"'rejected_images' has {len(sources)} images but the prompt has {n_images}"
            )
        rejected_images = tuple(ImageRef(src) for src in sources)

    return Example(turns, line, rejected, rejected_images, extra)


_RawMessage = tuple[str, Any]  # (where, the JSON value), "where" names it in messages


def _locate_messages(obj: dict[str, Any]) -> tuple[list[_RawMessage], _RawMessage | None]:
    """The conversation's messages and the rejected reply, from whichever layout."""
    if "input" in obj:
        for key in ("messages", "rejected_response"):
            if key in obj:
                raise _Invalid(f"'{key}' cannot be combined with 'input'")
        inp = obj["input"]
        if not isinstance(inp, dict):
            raise _Invalid(f"'input' must be an object with 'messages', not {json_type(inp)}")
        if "preferred_output" not in obj:
            raise _Invalid("'input' needs 'preferred_output' holding the chosen reply")
        prompt = _message_array(inp.get("messages"), "input.messages", allow_empty=False)
        chosen = _single_message(obj["preferred_output"], "preferred_output")
        rejected = None
        if obj.get("non_preferred_output") is not None:
            rejected = _single_message(obj["non_preferred_output"], "non_preferred_output")
        return [*prompt, chosen], rejected

    for key in ("preferred_output", "non_preferred_output"):
        if key in obj:
            raise _Invalid(f"'{key}' belongs with 'input', not with 'messages'")
    if "messages" not in obj:
        raise _Invalid(
            "expected 'messages' (or 'input' with 'preferred_output' for preference pairs)"
        )
    messages = _message_array(obj["messages"], "messages", allow_empty=False)
    rejected = None
    if obj.get("rejected_response") is not None:
        value = obj["rejected_response"]
        if isinstance(value, str):
            rejected = ("rejected_response", {"role": "assistant", "content": value})
        elif isinstance(value, list):
            rejected = _single_message(value, "rejected_response")
        else:
            raise _Invalid(
                "'rejected_response' must be a string or an array holding one assistant "
                f"message, not {json_type(value)}"
            )
    return messages, rejected


def _message_array(value: object, where: str, *, allow_empty: bool) -> list[_RawMessage]:
    if not isinstance(value, list):
        raise _Invalid(f"'{where}' must be an array of messages, not {json_type(value)}")
    if not value and not allow_empty:
        raise _Invalid(f"'{where}' is empty")
    return [(f"{where}[{i}]", msg) for i, msg in enumerate(value)]


def _single_message(value: object, where: str) -> _RawMessage:
    if not isinstance(value, list) or len(value) != 1:
        shape = f"{len(value)} entries" if isinstance(value, list) else json_type(value)
        raise _Invalid(f"'{where}' must be an array holding one assistant message, not {shape}")
    return f"{where}[0]", value[0]


def _message_segments(
    msg: object, where: str, warnings: list[str], default_role: Role | None = None
) -> tuple[Role, list[_Segment], Weight | None]:
    if not isinstance(msg, dict):
        raise _Invalid(f"{where} must be an object with 'role' and 'content', not {json_type(msg)}")
    role = msg.get("role", default_role)
    if "role" not in msg and default_role is None:
        raise _Invalid(f"{where} has no 'role'")
    if role not in ROLES:
        raise _Invalid(f"{where}.role {_show(role)} is not one of system, user, assistant")
    if "content" not in msg:
        raise _Invalid(f"{where} has no 'content'")
    if len(msg) > 2:
        warnings.extend(f"{where}.{_cut(key)} is ignored" for key in msg if key not in MESSAGE_KEYS)
    content = msg["content"]
    if isinstance(content, str):
        segments = _split_placeholders(content)
    elif isinstance(content, list):
        segments = [_content_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
    else:
        raise _Invalid(
            f"{where}.content must be a string or an array of content parts, not {json_type(content)}"
        )
    if role != "user" and any(not isinstance(s, str) for s in segments):
        raise _Invalid(f"{where}: images belong in user turns, not in {role} turns")
    return role, segments, _weight(msg.get("weight"), where, role)


def _weight(value: object, where: str, role: Role) -> Weight | None:
    """OpenAI's per-message weight: 0 or 1 (true and false too, as JSON writers may
    spell them), on assistant messages only. Null is no weight, as pandas writes it
    for the rows of a column that only some messages fill."""
    if value is None:
        return None
    if role != "assistant":
        raise _Invalid(f"{where}.weight: only assistant messages have a weight, not {role} ones")
    if type(value) not in (int, bool) or value not in (0, 1):
        shown = _cut(repr(value)) if isinstance(value, int | float) else _show(value)
        raise _Invalid(f"{where}.weight must be 0 or 1, not {shown}")
    return 1 if value else 0


def _split_placeholders(text: str) -> list[_Segment]:
    if PLACEHOLDER not in text:
        return [text]
    pieces = text.split(PLACEHOLDER)
    segments: list[_Segment] = [pieces[0]]
    for piece in pieces[1:]:
        segments += [_SLOT, piece]
    return segments


def _content_part(part: object, where: str) -> _Segment:
    if not isinstance(part, dict):
        raise _Invalid(f"{where} must be a content-part object, not {json_type(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _Invalid(f"{where}.text must be a string, not {json_type(text)}")
        if PLACEHOLDER in text:
            raise _Invalid(
                f"{where}.text contains {PLACEHOLDER}; in content parts an image is an "
                "image_url part"
            )
        return text
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict):
            raise _Invalid(
                f"{where}.image_url must be an object with 'url', not {json_type(image)}"
            )
        url = image.get("url")
        if not isinstance(url, str) or not url:
            raise _Invalid(f"{where}.image_url.url must be a non-empty string")
        detail = image.get("detail")
        if detail is not None and detail not in DETAILS:
            raise _Invalid(
                f"{where}.image_url.detail {_show(detail)} is not one of low, high, auto"
            )
        return ImageRef(url, detail)
    if kind in ("video_url", "input_audio", "audio_url", "video", "audio"):
        raise _Invalid(
            f"{where}: {kind} parts are not supported: kubetune trains on text and images"
        )
    raise _Invalid(f"{where}.type {_show(kind)} is not one of text, image_url")


def _image_list(obj: dict[str, Any], key: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"'{key}' must be an array of image paths, URLs or data: URIs")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _Invalid(f"{key}[{i}] must be a non-empty string, not {json_type(item)}")
    return value


def _detail_list(obj: dict[str, Any], count: int) -> list[str | None]:
    value = obj.get("image_details")
    if value is None:
        return [None] * count
    if not isinstance(value, list) or len(value) != count:
        raise _Invalid(f"'image_details' must be an array with one entry per image ({count})")
    for i, item in enumerate(value):
        if item is not None and item not in DETAILS:
            raise _Invalid(f"image_details[{i}] {_show(item)} is not one of low, high, auto, null")
    return value


def _merge(segments: list[Any], where: str) -> tuple[Part, ...]:
    """Canonical parts: no empty strings and no two strings side by side, so that both
    styles write and read back the same example. Each run of strings is joined once:
    adding them up one by one would take time quadratic in a line's length."""
    if len(segments) == 1:  # the common case: one string
        only = segments[0]
        return (only,) if only else ()
    parts: list[Part] = []
    run: list[str] = []
    for seg in [*segments, None]:
        if isinstance(seg, str):
            if seg:
                run.append(seg)
            continue
        if run:
            text = "".join(run)
            # Only text content parts meet here; joined they must not spell out a
            # placeholder, or the placeholder style could not write them back.
            if len(run) > 1 and PLACEHOLDER in text:
                raise _Invalid(
                    f"{where}.content: text parts join up into {PLACEHOLDER}; "
                    "in content parts an image is an image_url part"
                )
            parts.append(text)
            run = []
        if seg is not None:
            parts.append(seg)
    return tuple(parts)


def _show(value: object) -> str:
    return _cut(repr(value) if isinstance(value, str) else json_type(value))


def _cut(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."
