"""Multiple-choice questions: the record every scorer takes, prompt formatting, and the option token layout.

A question is asked the way the fVLM original asks it (docs/differences.md#evaluation), rendered by
:func:`fovlm.data.chat.choice_messages`: the user turn holds the question followed by one line per option
(``"A. ..."``), and each candidate answer is the lettered option (``"B. a red ball"``) as the assistant turn. Every option of a question therefore shares the same text
prefix (system turn, user turn, ``<|im_start|>assistant\\n``) and differs only in its answer tokens.

:func:`split_options` turns the per-option renderings into that shared prefix plus each option's own tokens,
with targets taken from :func:`fovlm.losses.shift_labels` on the full rendering, so the scorer scores exactly
the tokens training's answer-only head scores (the answer and its closing end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fovlm.data.frame_stream import SampleFrames
from fovlm.data.roles import IGNORE_INDEX, ROLE_ANSWER
from fovlm.data.schema import AnswerRegion
from fovlm.losses import shift_labels

# Options are lettered A..Z (fovlm.data.chat.choice_messages renders them).
MAX_OPTIONS = 26


@dataclass
class Question:
    """One multiple-choice question with its frames.

    Attributes:
        key: sample key (unique within the benchmark).
        benchmark: benchmark name the results are filed under.
        question: the question text (without options).
        options: the candidate answers (without letters).
        answer: index of the correct option.
        category: category for per-category accuracy (None: uncategorised).
        frames: uint8 [T, 3, H, W] frames in temporal order (single images already replicated), or a long video's
            frames read one at a time (:class:`fovlm.data.frame_stream.SampleFrames`: ``len()`` of them, each
            uint8 [3, H, W], decoded while iterated).
        media: "video" or "image".
        times: timestamps (s) of the frames when known (used by baselines that print them).
        answer_region: where the answer is shown, when the benchmark says (for the attention share).
    """

    key: str
    benchmark: str
    question: str
    options: tuple[str, ...]
    answer: int
    category: str | None
    frames: Tensor | SampleFrames
    media: str = "video"
    times: tuple[float, ...] | None = None
    answer_region: AnswerRegion | None = None

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= MAX_OPTIONS:
            raise ValueError(f"question {self.key!r}: {len(self.options)} options (2..{MAX_OPTIONS} allowed)")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"question {self.key!r}: answer {self.answer} is not an option index")
        if isinstance(self.frames, SampleFrames):
            if len(self.frames) == 0:
                raise ValueError(f"question {self.key!r}: a video without frames")
        elif self.frames.dim() != 4 or self.frames.shape[1] != 3 or self.frames.shape[0] == 0:
            raise ValueError(f"question {self.key!r}: frames must be [T>0, 3, H, W], got {tuple(self.frames.shape)}")

    @property
    def streamed(self) -> bool:
        """Whether the frames are read one at a time (a long video) rather than held as one stack."""
        return isinstance(self.frames, SampleFrames)


@dataclass
class OptionTokens:
    """The options of one question laid out for prefix sharing.

    Attributes:
        prefix_ids: long [P] text shared by every option, up to and including the token before the answer.
        first_targets: long [n] the target predicted at the prefix's last position (each option's first
            answer token).
        option_ids: long [n, L] each option's own tokens after the prefix that predict a target, right-padded.
        option_mask: long [n, L] 1 on real option tokens.
        option_labels: long [n, L] the target predicted at each option position (IGNORE_INDEX where none).
        full_ids / full_roles / full_labels: long [n, S] the whole renderings (prefix + option), right-padded,
            for scorers that run every option as a full sequence.
    """

    prefix_ids: Tensor
    first_targets: Tensor
    option_ids: Tensor
    option_mask: Tensor
    option_labels: Tensor
    full_ids: Tensor
    full_roles: Tensor
    full_labels: Tensor

    @property
    def num_options(self) -> int:
        return int(self.option_ids.shape[0])

    @property
    def num_targets(self) -> Tensor:
        """long [n]: scored tokens per option (the first answer token included)."""
        return 1 + (self.option_labels != IGNORE_INDEX).sum(dim=1)


def split_options(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0) -> OptionTokens:
    """Lay out per-option renderings ``(token ids, roles)`` as a shared prefix plus per-option tokens.

    The prefix ends right before the first ``ROLE_ANSWER`` token; it must be the same for every option (it
    is, when only the assistant turn differs). Targets come from :func:`fovlm.losses.shift_labels` with the
    answer-only score mask.
    """
    if len(rows) < 2:
        raise ValueError(f"a question needs at least 2 options, got {len(rows)}")
    n, longest = len(rows), max(len(ids) for ids, _ in rows)
    full_ids = torch.full((n, longest), pad_id, dtype=torch.long)  # [n, S]
    full_roles = torch.zeros((n, longest), dtype=torch.long)  # [n, S], ROLE_PAD = 0 on padding
    for i, (ids, roles) in enumerate(rows):
        if len(ids) != len(roles):
            raise ValueError(f"option {i}: {len(ids)} token ids but {len(roles)} roles")
        full_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        full_roles[i, : len(roles)] = torch.tensor(roles, dtype=torch.long)
    full_labels = shift_labels(full_ids, full_roles == ROLE_ANSWER)  # [n, S]

    starts = [(full_roles[i] == ROLE_ANSWER).nonzero() for i in range(n)]
    if any(s.numel() == 0 for s in starts):
        raise ValueError("every option needs at least one answer token")
    prefix_len = int(starts[0][0])
    if prefix_len == 0:
        raise ValueError("the rendering must have text before the answer")
    for i in range(1, n):
        if int(starts[i][0]) != prefix_len or not torch.equal(full_ids[i, :prefix_len], full_ids[0, :prefix_len]):
            raise ValueError(f"option {i} does not share option 0's prompt: only the answer may differ")

    # Option positions after the last scored target (the final end-of-turn token, the template's "\n") predict
    # nothing, so they are not run at all.
    scored_cols = (full_labels[:, prefix_len:] != IGNORE_INDEX).any(dim=0).nonzero()
    end = prefix_len + (int(scored_cols[-1]) + 1 if scored_cols.numel() else 0)
    option_ids = full_ids[:, prefix_len:end].clone()  # [n, L]
    option_mask = (full_roles[:, prefix_len:end] != 0).long()  # [n, L]
    option_labels = full_labels[:, prefix_len:end].clone()  # [n, L]
    first_targets = full_labels[:, prefix_len - 1].clone()  # [n]
    return OptionTokens(
        prefix_ids=full_ids[0, :prefix_len].clone(),
        first_targets=first_targets,
        option_ids=option_ids,
        option_mask=option_mask,
        option_labels=option_labels,
        full_ids=full_ids,
        full_roles=full_roles,
        full_labels=full_labels,
    )


ANSWER_FORMATS = ("letter", "text", "cloze")


def render_options(
    tokenizer, question: str, options: Sequence[str], pad_id: int | None = None, answer_format: str = "letter"
) -> OptionTokens:
    """Render each option as the answer to ``question`` with the training chat renderer and lay them out.

    Args:
        tokenizer: the model's tokenizer (chat template).
        question: question text; with ``letter`` and ``text`` the user turn lists the lettered options after it.
        options: option texts.
        pad_id: padding id (default: the tokenizer's).
        answer_format: ``"letter"`` scores the answer ``"B. option"`` (the fVLM original's protocol); ``"text"``
            scores the option text alone, for models trained to answer without letters; ``"cloze"`` asks the
            question alone (no options listed) and scores each option text as its answer, for models trained
            on plain questions only.
    """
    from fovlm.data.chat import choice_messages, render_chat

    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    rows = []
    for index in range(len(options)):
        if answer_format == "cloze":
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": options[index]}]
        else:
            messages = choice_messages(question, options, index)
        if answer_format == "text":
            messages[-1] = {"role": "assistant", "content": options[index]}
        ids, roles = render_chat(tokenizer, messages)
        rows.append((ids, roles))
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    return split_options(rows, pad_id=0 if pad is None else pad)
