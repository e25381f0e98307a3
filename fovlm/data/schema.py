"""The shard sample schema: what a valid sample is, for the converters that write shards and the loader.

A sample is a group of tar members sharing a key (no dots). ``KEY.json`` holds the fields below; the
frames are ``KEY.000.jpg`` ... (JPEG or PNG, temporal order) or ``KEY.mp4``; a text-only sample has no
media member.

Native JSON fields (docs/shards.md#native-json-fields):

- ``source`` (str, required): dataset name; picks the prompt, the mixing group and per-source metrics.
- ``media`` (``"video"``, ``"image"`` or ``"text"``, required): explicit, never inferred from counts.
- exactly one text form:
  ``caption`` (str; the user turn is then the per-source prompt), or
  ``messages`` (list of ``{"role", "content"}``; every assistant turn is an answer), optionally with
  ``chosen`` and ``rejected`` (str) for a preference pair, where ``messages`` are the prompt turns, or
  ``question`` / ``options`` (list of str) / ``answer`` (index) and optional ``category`` (multiple choice).
- optional ``fps``, ``duration`` (seconds, > 0), ``video_id``.
- optional ``answer_region``: ``{"box": [x0, y0, x1, y1], "from": seconds}``, where the answer is shown: a box
  in fractions of the (square, centre-cropped) frame the model sees, from ``from`` seconds on (default 0).
  Evaluation measures how much of each query's attention falls inside it (:mod:`fovlm.eval.looking`). An
  answer spread over several places (the cells to count) is ``{"spread": [[x0, y0, x1, y1], ...], "from":
  seconds}``: the places in the order the queries of a frame share them out (``lambda_look``,
  :func:`fovlm.losses.look_loss`); evaluation measures no share for it.

The layouts of fVLM's original shards (docs/shards.md#layouts-of-fvlms-original-shards) are read as well,
so existing shard sets keep working: pre-tokenized ``token_ids`` / ``loss_mask``; raw ``user`` /
``assistant``; a raw ``caption`` or a ``KEY.txt`` member; ``user`` / ``chosen_assistant`` /
``rejected_assistant`` pairs. Those layouts carry no ``media`` field; their media is taken from the members
that are present (an ``.mp4`` or several frames: a video; one frame or one image: an image, which the fVLM
original also replicated; none: text), and that is the only place where media is inferred.

Design choices: parsing is a pure function of the JSON and the member names, so the converters
(``data_prep``) validate what they write with the same code the loader uses to read; every error is a
:class:`SampleError` naming the sample key and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fovlm.data.answer_region import AnswerRegion, parse_answer_region
from fovlm.data.contract import FRAME_SETTINGS

Media = Literal["video", "image", "text"]
MEDIA_KINDS: tuple[str, ...] = ("video", "image", "text")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

MAX_FRAMES = FRAME_SETTINGS.max_frames
"""At most this many frames per video (docs/shards.md#frames); member names have 3 digits."""

FRAME_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png")
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4",)

# Member suffix of a numbered frame, as webdataset names it: everything after the key's first dot.
_FRAME_FIELD_RE = re.compile(r"^(\d{3})\.(jpg|jpeg|png)$")

# Layout names, recorded on every parsed sample so counts and tests can tell them apart.
LAYOUT_NATIVE = "native"
LAYOUT_PRETOKENIZED = "pretokenized"
LAYOUT_USER_ASSISTANT = "user_assistant"
LAYOUT_CAPTION = "caption"
LAYOUT_PREFERENCE = "preference"


class SampleError(ValueError):
    """An invalid sample; the message names the sample key and the offending field.

    ``reason`` is a short machine-readable cause (used as the skip-count key by the pipeline).
    """

    def __init__(self, key: str, field_name: str | None, message: str, reason: str = "invalid_json"):
        where = f"sample {key!r}" + (f", field {field_name!r}" if field_name else "")
        super().__init__(f"{where}: {message}")
        self.key = key
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class MultipleChoice:
    """A multiple-choice question: ``answer`` indexes ``options``."""

    question: str
    options: tuple[str, ...]
    answer: int
    category: str | None = None


@dataclass(frozen=True)
class Sample:
    """A validated sample (its JSON part; frames are decoded separately by :mod:`fovlm.data.frames`).

    Exactly one of ``caption``, ``messages`` (optionally with ``chosen``/``rejected``), ``choice`` or
    ``token_ids`` carries the text. ``messages`` never contains an empty content string.
    """

    key: str
    source: str
    media: Media
    layout: str = LAYOUT_NATIVE
    caption: str | None = None
    messages: tuple[Message, ...] = ()
    chosen: str | None = None
    rejected: str | None = None
    choice: MultipleChoice | None = None
    token_ids: tuple[int, ...] | None = None
    loss_mask: tuple[int, ...] | None = None
    fps: float | None = None
    duration: float | None = None
    video_id: str | None = None
    answer_region: AnswerRegion | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None

    @property
    def needs_frames(self) -> bool:
        return self.media != "text"

    def to_json(self) -> dict[str, Any]:
        """The native JSON form of this sample (what ``data_prep`` writes as ``KEY.json``)."""
        if self.token_ids is not None:
            raise SampleError(self.key, "token_ids", "pre-tokenized samples have no native JSON form")
        out: dict[str, Any] = {"source": self.source, "media": self.media}
        if self.caption is not None:
            out["caption"] = self.caption
        if self.messages:
            out["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        if self.chosen is not None:
            out["chosen"] = self.chosen
            out["rejected"] = self.rejected
        if self.choice is not None:
            out["question"] = self.choice.question
            out["options"] = list(self.choice.options)
            out["answer"] = self.choice.answer
            if self.choice.category is not None:
                out["category"] = self.choice.category
        for name in ("fps", "duration", "video_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.answer_region is not None:
            out["answer_region"] = self.answer_region.to_json()
        out.update(self.extra)
        return out


def validate_key(key: str) -> str:
    """Check a webdataset sample key: non-empty, no dots (webdataset splits the member name at the first
    dot), no path separators or whitespace. Returns the key."""
    if not isinstance(key, str) or not key:
        raise SampleError(str(key), "__key__", "the sample key is empty")
    if "." in key.rsplit("/", 1)[-1]:
        raise SampleError(
            key, "__key__", "sample keys must not contain dots (webdataset splits at the first dot)"
        )
    if any(c.isspace() for c in key):
        raise SampleError(key, "__key__", "sample keys must not contain whitespace")
    return key


def frame_field(index: int, ext: str = "jpg") -> str:
    """Member suffix of frame ``index``: ``frame_field(3) == "003.jpg"`` (the member is ``KEY.003.jpg``)."""
    if not 0 <= index < 1000:
        raise ValueError(f"frame index {index} does not fit the 3-digit member name")
    if ext not in FRAME_EXTENSIONS:
        raise ValueError(f"frame extension {ext!r} is not one of {FRAME_EXTENSIONS}")
    return f"{index:03d}.{ext}"


def frame_fields(member_names: Collection[str]) -> list[str]:
    """The numbered frame members among ``member_names`` (suffixes after the key), in temporal order."""
    numbered = [(int(m.group(1)), name) for name in member_names if (m := _FRAME_FIELD_RE.match(name))]
    numbered.sort()
    return [name for _, name in numbered]


def single_image_field(member_names: Collection[str]) -> str | None:
    """The un-numbered image member (``jpg``/``jpeg``/``png``), if any: fVLM's original single-image layout."""
    for ext in FRAME_EXTENSIONS:
        if ext in member_names:
            return ext
    return None


def video_field(member_names: Collection[str]) -> str | None:
    for ext in VIDEO_EXTENSIONS:
        if ext in member_names:
            return ext
    return None


def load_json(raw: bytes | str | Mapping[str, Any], key: str) -> dict[str, Any]:
    """Decode ``KEY.json`` (bytes must be UTF-8) into a dict, or raise :class:`SampleError`."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(key, "json", f"not UTF-8 ({err})", reason="invalid_json") from err
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SampleError(key, "json", f"not valid JSON ({err})", reason="invalid_json") from err
    if not isinstance(obj, dict):
        raise SampleError(
            key, "json", f"expected a JSON object, got {type(obj).__name__}", reason="invalid_json"
        )
    return obj


def _text(obj: Mapping[str, Any], name: str, key: str, *, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise SampleError(key, name, "missing", reason="missing_text")
        return None
    if not isinstance(value, str):
        raise SampleError(key, name, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise SampleError(key, name, "empty text", reason="empty_text")
    return value


def _number(obj: Mapping[str, Any], name: str, key: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SampleError(key, name, f"expected a positive finite number, got {value!r}")
    return float(value)


def _messages(value: Any, key: str, name: str = "messages") -> tuple[Message, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise SampleError(key, name, "expected a non-empty list of {role, content} turns")
    turns = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, Mapping):
            raise SampleError(key, where, f"expected an object, got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise SampleError(key, f"{where}.role", f"expected one of {CHAT_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise SampleError(
                key,
                f"{where}.content",
                f"expected a string, got {type(content).__name__}",
                reason="missing_text",
            )
        if not content.strip():
            raise SampleError(key, f"{where}.content", "empty text", reason="empty_text")
        turns.append(Message(role, content))
    if any(t.role == "system" for t in turns[1:]):
        raise SampleError(key, name, "a system turn may only come first")
    return tuple(turns)


def _check_media(obj: Mapping[str, Any], key: str) -> Media:
    media = obj.get("media")
    if media is None:
        raise SampleError(key, "media", f"missing (one of {MEDIA_KINDS}; it is never inferred)")
    if media not in MEDIA_KINDS:
        raise SampleError(key, "media", f"expected one of {MEDIA_KINDS}, got {media!r}")
    return media


def _legacy_media(member_names: Collection[str]) -> Media:
    if video_field(member_names):
        return "video"
    frames = frame_fields(member_names)
    if len(frames) > 1:
        return "video"
    if frames or single_image_field(member_names):
        return "image"
    return "text"


def _common(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    video_id = obj.get("video_id")
    if video_id is not None and not isinstance(video_id, str | int):
        raise SampleError(key, "video_id", f"expected a string, got {type(video_id).__name__}")
    return {
        "fps": _number(obj, "fps", key),
        "duration": _number(obj, "duration", key),
        "video_id": None if video_id is None else str(video_id),
        "answer_region": _answer_region(obj.get("answer_region"), key),
    }


def _answer_region(value: Any, key: str) -> AnswerRegion | None:
    try:
        return parse_answer_region(value)
    except ValueError as err:
        raise SampleError(key, "answer_region", str(err)) from None


def _source(obj: Mapping[str, Any], key: str, *, required: bool) -> str:
    source = obj.get("source")
    if source is None and not required:
        return "unknown"
    if not isinstance(source, str) or not source.strip():
        raise SampleError(key, "source", f"expected a non-empty dataset name, got {source!r}")
    return source


def _parse_native(obj: Mapping[str, Any], key: str) -> Sample:
    source = _source(obj, key, required=True)
    media = _check_media(obj, key)
    forms = [name for name in ("caption", "messages", "question") if name in obj]
    if not forms:
        raise SampleError(
            key, "caption", "no text: expected 'caption', 'messages' or 'question'", reason="missing_text"
        )
    if len(forms) > 1:
        raise SampleError(
            key, forms[1], f"only one of 'caption', 'messages', 'question' may be given, got {forms}"
        )
    common = _common(obj, key)
    if "caption" in obj:
        if "chosen" in obj or "rejected" in obj:
            raise SampleError(
                key, "chosen", "a preference pair needs 'messages' for its prompt, not 'caption'"
            )
        return Sample(key, source, media, caption=_text(obj, "caption", key), **common)
    if "question" in obj:
        question = _text(obj, "question", key)
        options = obj.get("options")
        if (
            not isinstance(options, list)
            or len(options) < 2
            or not all(isinstance(o, str) and o.strip() for o in options)
        ):
            raise SampleError(key, "options", "expected a list of at least 2 non-empty strings")
        answer = obj.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise SampleError(
                key, "answer", f"expected an index into options (0..{len(options) - 1}), got {answer!r}"
            )
        category = _text(obj, "category", key, required=False)
        return Sample(
            key, source, media, choice=MultipleChoice(question, tuple(options), answer, category), **common
        )
    messages = _messages(obj["messages"], key)
    if "chosen" in obj or "rejected" in obj:
        chosen, rejected = _text(obj, "chosen", key), _text(obj, "rejected", key)
        if messages[-1].role != "user":
            raise SampleError(
                key, "messages", "the prompt turns of a preference pair must end with a user turn"
            )
        return Sample(key, source, media, messages=messages, chosen=chosen, rejected=rejected, **common)
    if not any(m.role == "assistant" for m in messages):
        raise SampleError(key, "messages", "no assistant turn: nothing to learn", reason="missing_text")
    if messages[-1].role != "assistant":
        raise SampleError(key, "messages", "the last turn must be an assistant answer")
    return Sample(key, source, media, messages=messages, **common)


def _parse_legacy(
    obj: Mapping[str, Any], key: str, member_names: Collection[str], txt: bytes | str | None
) -> Sample:
    source = _source(obj, key, required=False)
    media = _check_media(obj, key) if "media" in obj else _legacy_media(member_names)
    common = _common(obj, key)
    if "token_ids" in obj or "loss_mask" in obj:
        ids, mask = obj.get("token_ids"), obj.get("loss_mask")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise SampleError(key, "token_ids", "expected a non-empty list of token ids")
        if not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
            raise SampleError(
                key, "loss_mask", f"expected a list of 0/1 of the same length as token_ids ({len(ids)})"
            )
        if not any(mask):
            raise SampleError(key, "loss_mask", "no token is scored", reason="empty_text")
        return Sample(
            key,
            source,
            media,
            layout=LAYOUT_PRETOKENIZED,
            token_ids=tuple(ids),
            loss_mask=tuple(int(m) for m in mask),
            **common,
        )
    user = _text(obj, "user", key, required=False) or ""
    if "chosen_assistant" in obj or "rejected_assistant" in obj:
        chosen = _text(obj, "chosen_assistant", key)
        rejected = _text(obj, "rejected_assistant", key)
        # An empty user turn means "use the per-source prompt", as in the fVLM original
        # (docs/shards.md#layouts-of-fvlms-original-shards).
        messages = (Message("user", user),) if user.strip() else ()
        return Sample(
            key,
            source,
            media,
            layout=LAYOUT_PREFERENCE,
            messages=messages,
            chosen=chosen,
            rejected=rejected,
            **common,
        )
    if "assistant" in obj:
        answer = _text(obj, "assistant", key)
        if not user.strip():
            return Sample(key, source, media, layout=LAYOUT_USER_ASSISTANT, caption=answer, **common)
        return Sample(
            key,
            source,
            media,
            layout=LAYOUT_USER_ASSISTANT,
            messages=(Message("user", user), Message("assistant", answer)),
            **common,
        )
    caption = obj.get("caption")
    if caption is None and txt is not None:
        if isinstance(txt, bytes | bytearray):
            try:
                txt = bytes(txt).decode("utf-8")
            except UnicodeDecodeError as err:
                raise SampleError(key, "txt", f"not UTF-8 ({err})", reason="invalid_text") from err
        caption = txt
    if caption is None:
        raise SampleError(
            key,
            "caption",
            "no text: expected 'caption', 'messages', 'assistant', 'token_ids' or a KEY.txt member",
            reason="missing_text",
        )
    caption = _text({"caption": caption}, "caption", key)
    return Sample(key, source, media, layout=LAYOUT_CAPTION, caption=caption.strip(), **common)


_NATIVE_MARKERS = ("messages", "question", "media")
_LEGACY_MARKERS = ("token_ids", "loss_mask", "user", "assistant", "chosen_assistant", "rejected_assistant")


def parse_sample(
    raw: bytes | str | Mapping[str, Any],
    key: str,
    member_names: Collection[str] = (),
    txt: bytes | str | None = None,
) -> Sample:
    """Parse and validate one sample's JSON.

    Args:
        raw: the ``KEY.json`` member (UTF-8 bytes, a string or an already-decoded dict).
        key: the sample key (checked: no dots).
        member_names: the sample's other member suffixes (``"000.jpg"``, ``"mp4"``, ``"txt"``...); used
            only to recognise a legacy layout's media.
        txt: the legacy ``KEY.txt`` caption, if that member exists.

    Raises:
        SampleError: naming the key and the field.
    """
    validate_key(key)
    obj = load_json(raw, key)
    legacy = any(name in obj for name in _LEGACY_MARKERS) or (
        "media" not in obj and not any(name in obj for name in _NATIVE_MARKERS)
    )
    if legacy:
        return _parse_legacy(obj, key, member_names, txt)
    return _parse_native(obj, key)
