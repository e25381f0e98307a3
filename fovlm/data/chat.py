"""Chat rendering: a sample's conversation -> token ids and per-token roles, built together.

The text comes from the tokenizer's own chat template. The template is rendered for each prefix of the
conversation (``messages[:1]``, ``messages[:2]``, ...) as *text*; consecutive renderings differ by exactly
one turn, which gives each turn's text span. Inside an assistant turn the span splits into its header
(``<|im_start|>assistant\\n``: ``ROLE_TEMPLATE``), the content (``ROLE_ANSWER``), the closing end-of-turn
token (``ROLE_ANSWER``: ending the turn is learned) and what follows it (``ROLE_TEMPLATE``). Each span is
tokenized on its own and the ids and roles are appended together, so a role boundary is a token boundary by
construction (no prefix is re-tokenized and searched for). Because every span starts at a special token or
right after the header's newline, the result equals the tokenization of the whole rendering (a test checks
it with the real SmolLM2 tokenizer) and matches what generation sees after the generation prompt.

- The system prompt is "You are a helpful AI assistant." unless the sample carries its own system turn
  (it then belongs to the data); SmolLM2's template would otherwise inject its own default.
- A caption-only sample gets the per-source user prompt (docs/shards.md#per-source-prompts); a
  multiple-choice sample renders "question\\nA. option ..." and the answer "X. option".
- Truncation keeps the first ``max_length`` tokens and is reported (``Encoded.truncated``); a sample whose
  answers would be cut away entirely raises :class:`ChatError` with reason ``truncated_away``.
- Pre-tokenized samples of fVLM's original shards get their roles from their ChatML markup (so a shard
  built with an all-ones mask still trains answer-only where the head asks for it); ids without markup fall
  back to their ``loss_mask`` (1 -> answer, 0 -> user).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fovlm.data.roles import ROLE_ANSWER, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER
from fovlm.data.schema import Message, Sample

SYSTEM_PROMPT = "You are a helpful AI assistant."

SOURCE_PROMPTS: dict[str, str] = {
    "openvid": "Write a brief caption for this video.",
    "webvid": "What would be the WebVid caption for this video?",
    "vript": "Provide a detailed narration of what happens in this video.",
    "sharegpt4video": "Describe what happens in this video in detail.",
}
DEFAULT_PROMPT = "Describe this."

_ROLE_OF_TURN = {"system": ROLE_SYSTEM, "user": ROLE_USER}
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ChatError(ValueError):
    """A sample that cannot be rendered; ``reason`` is the skip-count key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Encoded:
    """Token ids and their roles (same length), and whether truncation removed tokens."""

    input_ids: list[int]
    roles: list[int]
    truncated: bool = False


def source_prompt(source: str) -> str:
    """The user prompt for a caption of ``source``: exact name, else its family before ``_``, ``-`` or ``/``
    (``vript_short`` -> vript), else "Describe this."."""
    name = source.lower()
    if name in SOURCE_PROMPTS:
        return SOURCE_PROMPTS[name]
    family = re.split(r"[_\-/]", name, maxsplit=1)[0]
    return SOURCE_PROMPTS.get(family, DEFAULT_PROMPT)


def choice_messages(question: str, options: Sequence[str], answer: int | None) -> list[dict[str, str]]:
    """A multiple-choice question as a user turn (and its answer "X. option" when ``answer`` is given)."""
    if len(options) > len(_LETTERS):
        raise ValueError(f"at most {len(_LETTERS)} options, got {len(options)}")
    user = question.rstrip() + "\n" + "\n".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(options))
    turns = [{"role": "user", "content": user}]
    if answer is not None:
        turns.append({"role": "assistant", "content": f"{_LETTERS[answer]}. {options[answer]}"})
    return turns


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def sample_messages(sample: Sample) -> list[dict[str, str]]:
    """The conversation to train on (without the system turn unless the sample has its own)."""
    if sample.caption is not None:
        return [
            {"role": "user", "content": source_prompt(sample.source)},
            {"role": "assistant", "content": sample.caption},
        ]
    if sample.choice is not None:
        c = sample.choice
        return choice_messages(c.question, c.options, c.answer)
    if sample.messages and not sample.is_preference:
        return _as_dicts(sample.messages)
    raise ChatError(f"sample {sample.key!r} has no conversation to render", "missing_text")


def preference_messages(sample: Sample) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt + chosen, prompt + rejected); an empty prompt becomes the per-source prompt."""
    if not sample.is_preference:
        raise ChatError(
            f"sample {sample.key!r} is not a preference pair (no chosen/rejected)", "missing_text"
        )
    prompt = _as_dicts(sample.messages) or [{"role": "user", "content": source_prompt(sample.source)}]
    return (
        prompt + [{"role": "assistant", "content": sample.chosen}],
        prompt + [{"role": "assistant", "content": sample.rejected}],
    )


def _with_system(messages: Sequence[Mapping[str, str]], system_prompt: str) -> list[dict[str, str]]:
    turns = [dict(m) for m in messages]
    if not turns or turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def _template(tokenizer: Any, turns: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _split_answer(turn_text: str, header: str, content: str) -> tuple[str, str]:
    """(content, tail) of an assistant turn's rendered text after its header (the template may trim the
    content)."""
    if not turn_text.startswith(header):
        raise ValueError(f"the chat template's generation prompt {header!r} does not open the assistant turn")
    body = turn_text[len(header) :]
    for candidate in (content, content.strip()):
        if candidate and body.startswith(candidate):
            return candidate, body[len(candidate) :]
    raise ValueError(f"the chat template does not reproduce the assistant content {content[:40]!r}")


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], system_prompt: str = SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """Render a conversation with the tokenizer's chat template into ``(input_ids, roles)``.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: ``{"role", "content"}`` turns; a leading system turn replaces ``system_prompt``.
        system_prompt: the system turn used when ``messages`` has none.

    Every assistant turn is an answer (``ROLE_ANSWER`` on its content and closing end-of-turn token).
    """
    turns = _with_system(messages, system_prompt)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids: list[int] = []
    roles: list[int] = []
    previous = ""
    for k, turn in enumerate(turns):
        text = _template(tokenizer, turns[: k + 1])
        if not text.startswith(previous):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        turn_text, previous = text[len(previous) :], text
        if turn["role"] != "assistant":
            piece = _tokenize(tokenizer, turn_text)
            ids += piece
            roles += [_ROLE_OF_TURN[turn["role"]]] * len(piece)
            continue
        # The header is what the template's generation prompt adds: exactly what precedes a generated answer.
        header = tokenizer.apply_chat_template(turns[:k], tokenize=False, add_generation_prompt=True)[
            len(text) - len(turn_text) :
        ]
        content, tail = _split_answer(turn_text, header, turn["content"])
        header_ids, content_ids, tail_ids = (_tokenize(tokenizer, t) for t in (header, content, tail))
        # The end-of-turn token closing the answer is scored with it: the model must learn to stop.
        closing = 1 if tail_ids and tail_ids[0] in special else 0
        ids += header_ids + content_ids + tail_ids
        roles += (
            [ROLE_TEMPLATE] * len(header_ids)
            + [ROLE_ANSWER] * (len(content_ids) + closing)
            + [ROLE_TEMPLATE] * (len(tail_ids) - closing)
        )
    return ids, roles


def truncate(ids: list[int], roles: list[int], max_length: int, key: str = "") -> Encoded:
    """Keep the first ``max_length`` tokens; raise ``ChatError("truncated_away")`` if no answer token is
    left."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    truncated = len(ids) > max_length
    ids, roles = ids[:max_length], roles[:max_length]
    if ROLE_ANSWER not in roles:
        raise ChatError(f"sample {key!r}: no answer token within max_length={max_length}", "truncated_away")
    return Encoded(ids, roles, truncated)


def encode_sample(
    tokenizer: Any, sample: Sample, max_length: int, system_prompt: str = SYSTEM_PROMPT
) -> Encoded:
    """Token ids and roles of a caption / SFT / multiple-choice / pre-tokenized sample."""
    if sample.token_ids is not None:
        ids = list(sample.token_ids)
        return truncate(ids, pretokenized_roles(tokenizer, ids, sample.loss_mask), max_length, sample.key)
    ids, roles = render_chat(tokenizer, sample_messages(sample), system_prompt)
    return truncate(ids, roles, max_length, sample.key)


def encode_preference(
    tokenizer: Any, sample: Sample, max_length: int, system_prompt: str = SYSTEM_PROMPT
) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) token ids and roles of a preference pair, each truncated on its own."""
    chosen, rejected = preference_messages(sample)
    return (
        truncate(*render_chat(tokenizer, chosen, system_prompt), max_length, sample.key),
        truncate(*render_chat(tokenizer, rejected, system_prompt), max_length, sample.key),
    )


def pretokenized_roles(tokenizer: Any, ids: Sequence[int], loss_mask: Sequence[int] | None) -> list[int]:
    """Roles of a pre-tokenized ChatML sequence, read from its markup.

    Each ``<|im_start|>ROLE\\n ... <|im_end|>`` span gets the role of its turn; in assistant turns the
    header and what follows ``<|im_end|>`` are template, the content and ``<|im_end|>`` the answer. Ids with
    no ChatML markup fall back to ``loss_mask`` (1 -> answer, 0 -> user)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tokenizer, "unk_token_id", None)
    starts = [i for i, t in enumerate(ids) if t == start]
    if start is None or start == unk or end is None or end == unk or not starts:
        if loss_mask is None:
            raise ChatError("pre-tokenized ids without chat markup and without a loss_mask", "invalid_json")
        return [ROLE_ANSWER if m else ROLE_USER for m in loss_mask]
    # Tokens before the first turn (a stray BOS) count as system context.
    roles = [ROLE_SYSTEM] * starts[0]
    bounds = starts + [len(ids)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        span = list(ids[a:b])
        header_len = _header_length(tokenizer, span)
        name = tokenizer.decode(span[1:header_len]).strip()
        if name != "assistant":
            roles += [_ROLE_OF_TURN.get(name, ROLE_USER)] * len(span)
            continue
        close = span.index(end) + 1 if end in span[header_len:] else len(span)
        roles += (
            [ROLE_TEMPLATE] * header_len
            + [ROLE_ANSWER] * (close - header_len)
            + [ROLE_TEMPLATE] * (len(span) - close)
        )
    return roles


def _header_length(tokenizer: Any, span: Sequence[int]) -> int:
    """Tokens of ``<|im_start|>ROLE\\n``: up to and including the first token whose text holds a newline."""
    for i in range(1, len(span)):
        if "\n" in tokenizer.decode([span[i]]):
            return i + 1
    return len(span)
