"""Multiple-choice scoring of a long video in one pass over its frames, each decoded, read and dropped in turn.

:func:`score_stream` gives what :func:`fovlm.eval.scoring.score_question` gives on the same frames (every mode's
mean answer-token NLL per option), without ever holding more than one frame and its patch pass. Per frame, one
patch pass (``model.encode_patches(frame[None])``) is read by up to three streaming sessions
(:class:`fovlm.model.streaming.StreamingSession`, ``full`` cache policy), one per LLM cache, and then freed:

    coarse          the frame read with the static queries; its k tokens extend the coarse_only prefix. The
                    hidden states at those k positions, through the query head, are the next frame's fine queries
                    (the session's own next queries; frame 0's are ``q_init``): the LLM is causal, so they are the
                    ones :func:`fovlm.model.layout.shift_queries` takes from the batched coarse pass.
    fine            the frame read with those fine queries; its k tokens extend the coarse_fine prefix.
    autoregressive  the frame read with the queries the session wrote from its own previous tokens.

A question-first model's system and user turns head every cache, before the first frame. After the last frame
each cache takes the rest of the prompt, and the options are scored against it with
:func:`fovlm.eval.scoring.score_on_prefix`, as in the batched scorer. Given an answer region, the same stream
also gives each mode's attention share per frame (:func:`fovlm.eval.looking.share_in_region` of the last DINO
layer, heads averaged, over a frame's queries), from one more query pass of that mode's queries with their
attention kept; the tokens the caches read come from the query passes without it, as in the batched scorer.

The full policy holds every frame up to the LLM's ``max_position_embeddings``; a question whose frames, prompt
and answers would need more positions is a :class:`StreamTooLong` error, raised before its first frame when
the number of frames is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from fovlm.data.schema import AnswerRegion
from fovlm.eval.looking import share_in_region
from fovlm.eval.questions import OptionTokens
from fovlm.eval.scoring import question_length, score_on_prefix, vlm_step
from fovlm.model.streaming import CachePolicy, StreamFull, StreamingSession
from fovlm.model.vlm import MODES

# The session (LLM cache) whose prefix each mode scores on.
LANE_OF_MODE = {"coarse_only": "coarse", "coarse_fine": "fine", "autoregressive": "autoregressive"}


class StreamTooLong(ValueError):
    """A question whose frames, prompt and answers need more positions than the LLM has."""


@dataclass
class StreamedScores:
    """What :func:`score_stream` gives for one question.

    Attributes:
        scores: mode -> float32 [n] mean answer-token NLL per option (as :func:`~fovlm.eval.scoring.score_question`).
        num_frames: the frames read.
        shares: mode -> float32 [T] attention share inside the region on each frame (empty without a region).
    """

    scores: dict[str, Tensor]
    num_frames: int
    shares: dict[str, Tensor] = field(default_factory=dict)


def max_positions(model) -> int:
    """The LLM's position limit (0: none known)."""
    return int(getattr(model.llm.config.get_text_config(), "max_position_embeddings", 0) or 0)


def positions_needed(model, options: OptionTokens, num_frames: int) -> int:
    """Positions a cache holds at its longest: the prompt, ``num_frames`` x k visual tokens and an option."""
    return options.prefix_ids.shape[0] + num_frames * model.active_queries + options.option_ids.shape[1]


def check_positions(model, options: OptionTokens, num_frames: int) -> None:
    """Raise :class:`StreamTooLong` when ``num_frames`` frames, the prompt and the options do not fit the LLM."""
    limit, needed = max_positions(model), positions_needed(model, options, num_frames)
    if limit and needed > limit:
        raise StreamTooLong(
            f"{num_frames} frames x {model.active_queries} visual tokens, {options.prefix_ids.shape[0]} prompt and "
            f"up to {options.option_ids.shape[1]} answer tokens need {needed} positions, over the LLM's {limit}: "
            "lower --max-frames or --num-queries")


@torch.no_grad()
def score_stream(
    model,
    frames: Iterable[Tensor],
    options: OptionTokens,
    modes: Sequence[str] = MODES,
    region: AnswerRegion | None = None,
    num_frames: int | None = None,
) -> StreamedScores:
    """Mean answer-token NLL of every option in every mode, from one pass over frames that arrive one at a time.

    Args:
        model: a FoveatedVLM in eval mode.
        frames: ImageNet-normalised frames [3, H, W], in order (e.g. decoded lazily); each is dropped once read.
        options: the question's option layout (:func:`fovlm.eval.questions.render_options`).
        modes: any of "coarse_only", "coarse_fine", "autoregressive".
        region: where the answer is shown: also give each mode's attention share inside it on every frame.
        num_frames: how many frames will come, when known: the position limit is checked before the first.

    Returns:
        the scores per mode (in the order of ``modes``), the frames read and, with a region, the shares per frame.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; expected some of {MODES}")
    if num_frames is not None:
        check_positions(model, options, num_frames)
    question_len = question_length(model, options)
    head = options.prefix_ids[:question_len] if question_len else None
    lanes = [LANE_OF_MODE[mode] for mode in MODES if mode in modes]
    if "fine" in lanes and "coarse" not in lanes:
        lanes.insert(0, "coarse")  # it writes the fine queries
    sessions = {lane: StreamingSession(model, CachePolicy("full"), head) for lane in lanes}
    shares: dict[str, list[Tensor]] = {lane: [] for lane in lanes}
    count = 0
    try:
        for frame in frames:
            _read_frame(model, sessions, frame.to(model.q_init.device), region, shares)
            count += 1
    except StreamFull as err:
        raise StreamTooLong(
            f"the LLM's {max_positions(model)} positions are full after {count} frames x {model.active_queries} "
            "visual tokens: lower --max-frames or --num-queries") from err
    if count == 0:
        raise ValueError("no frame to score")
    check_positions(model, options, count)
    for lane in set(sessions) - {LANE_OF_MODE[mode] for mode in modes}:
        del sessions[lane]  # the coarse session of coarse_fine alone: its work is done
    rest = options.prefix_ids[question_len:]
    scores = {}
    for mode in modes:  # each session is dropped once its mode is scored
        scores[mode] = _score_options(model, sessions.pop(LANE_OF_MODE[mode]), rest, options)
    by_mode = {mode: torch.cat(shares[LANE_OF_MODE[mode]]) for mode in modes} if region is not None else {}
    return StreamedScores(scores, count, by_mode)


def _read_frame(
    model, sessions: dict[str, StreamingSession], frame: Tensor, region: AnswerRegion | None,
    shares: dict[str, list[Tensor]],
) -> None:
    """One frame [3, H, W] into every session from one patch pass; with a region, each session's share on it."""
    patches = model.encode_patches(frame[None])  # this frame's only patch pass
    if "fine" in sessions:  # frame t's fine queries: written at frame t - 1's coarse positions (q_init at 0)
        sessions["fine"].queries = sessions["coarse"].queries
    if "coarse" in sessions:
        sessions["coarse"].queries = model.static_queries.detach().to(sessions["coarse"].queries.dtype)
    for lane, session in sessions.items():
        if region is not None:
            _, attention = model.read_frames(session.queries, patches, return_attention=True)
            shares[lane].append(share_in_region(attention[-1], region, model.num_queries).cpu())  # last layer: [1]
        session.push(frame, patches)


def _score_options(model, session: StreamingSession, rest_ids: Tensor, options: OptionTokens) -> Tensor:
    """The rest of the prompt [P'] on a session's cache, then every option against it -> float32 [n]."""
    device = session.device
    start, length = session.length, rest_ids.shape[0]
    last = session.last_hidden
    if length:
        positions = torch.arange(start, start + length, device=device)[None]  # [1, P']
        mask = torch.ones(1, start + length, dtype=torch.long, device=device)
        embeds = model.embed_text(rest_ids.to(device)[None])  # [1, P', Dl]
        last = model.llm_hidden(embeds, mask, positions, session.cache)[0, -1]
    # score_on_prefix expands its cache to one row per option: a plain copy of the session's keys and values.
    cache = DynamicCache(config=model.llm.get_decoder().config)
    for index, layer in enumerate(session.cache.layers):
        cache.update(layer.keys, layer.values, index)
    return score_on_prefix(vlm_step(model), cache, cache.get_seq_length(), model.lm_head(last), options)
