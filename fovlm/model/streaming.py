"""A streaming session: frames arrive one at a time, questions at any moment, memory bounded by a cache policy.

Per frame (:meth:`StreamingSession.push`): the patch pass of that frame alone, the query pass with the k queries
the LLM wrote after the previous frame (``q_init`` for the first), and one cached LLM step that appends the
frame's k visual tokens and writes the next frame's queries. The frame's patch keys and values are dropped as
soon as its query pass is done, so a stream holds one frame's patch cache at a time; what grows is the LLM's KV
cache (k positions per frame), kept in buffers reserved for the positions the policy can reach (:mod:`fovlm.model.stream_cache`).

A question (:meth:`StreamingSession.answer`, :meth:`StreamingSession.score`) runs its prompt and answer on top of
the cache and then crops them off again, so the stream goes on from the state it had. With the ``full`` policy
a streamed answer is the offline autoregressive answer on the same frames (:func:`fovlm.model.generate.generate`).

Cache policies (:class:`CachePolicy`):
    full    everything is kept, up to the LLM's ``max_position_embeddings`` (SmolLM2: 8,192 positions); past
            them the session raises :class:`StreamFull`, or switches to ``window`` if given one to fall back to.
    window  the text before the frames (a question-first model's standing question), the first
            ``sink_frames`` frames (attention sinks, as in StreamingLLM) and the most recent ``window_frames``
            frames. When ``evict_frames`` more have arrived, the oldest of them are dropped at once and every
            later key is rotated back by the dropped positions (RoPE rotations compose), so the model always
            sees one contiguous sequence; dropping in blocks keeps the number of re-rotations per key small.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fovlm.model.encoder import PatchCache
from fovlm.model.generate import GREEDY, Generation, Sampling, decode
from fovlm.model.stream_cache import growing_cache

log = logging.getLogger(__name__)

POLICIES = ("full", "window")


#: Positions a window cache reserves beyond its frames, for a question and its answer.
ANSWER_ROOM = 512


class StreamFull(RuntimeError):
    """The ``full`` cache policy reached the LLM's position limit."""


@dataclass(frozen=True)
class CachePolicy:
    """What the LLM cache keeps as frames stream in.

    Attributes:
        kind: ``full`` or ``window``.
        sink_frames: (window) first frames always kept.
        window_frames: (window) most recent frames always kept.
        evict_frames: (window) frames dropped at once when this many more than ``window_frames`` have arrived.
        fallback: (full) the policy that takes over at the position limit; None: :class:`StreamFull` is raised.
    """

    kind: str = "window"
    sink_frames: int = 4
    window_frames: int = 512
    evict_frames: int = 128
    fallback: CachePolicy | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown cache policy {self.kind!r}; expected one of {POLICIES}")
        if self.fallback is not None and (self.kind != "full" or self.fallback.kind != "window"):
            raise ValueError("only the full policy falls back, and only to a window policy")
        if self.sink_frames < 0 or self.window_frames < 1 or self.evict_frames < 1:
            raise ValueError("sink_frames must be >= 0, window_frames and evict_frames >= 1, got "
                             f"{self.sink_frames}, {self.window_frames}, {self.evict_frames}")


def rotate_keys(keys: Tensor, shift: int, inv_freq: Tensor) -> Tensor:
    """RoPE keys [..., L, hd] rotated as if each sat ``shift`` positions later (negative: earlier).

    Llama's rotate-half convention: a key at position p is k * cos(p w) + rotate_half(k) * sin(p w), and
    rotations add, so rotating by ``shift`` moves it to p + shift exactly (up to the cache dtype's rounding; the
    rotation itself is computed in float32).
    """
    angle = shift * inv_freq.float().to(keys.device)  # [hd / 2]
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()  # [hd]
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], -1)
    return (k * cos + rotated * sin).to(keys.dtype)


class StreamingSession:
    """One stream of frames through a :class:`fovlm.model.vlm.FoveatedVLM` in eval mode (batch 1).

    Args:
        model: the model; its ``active_queries`` k visual tokens per frame.
        policy: the cache policy (``window`` by default).
        head_ids: long [P], text placed before every frame (a question-first model's system and user turn);
            always kept. None: the frames come first.
    """

    def __init__(self, model, policy: CachePolicy | None = None, head_ids: Tensor | None = None) -> None:
        self.model = model
        self.policy = policy or CachePolicy()
        self.k = model.active_queries
        self.device = model.q_init.device
        self.max_positions = int(getattr(model.llm.config.get_text_config(), "max_position_embeddings", 0) or 0)
        self.cache = growing_cache(self._capacity(0 if head_ids is None else len(head_ids)))
        self.queries = model.initial_queries.detach()  # [k, Dq]
        self.frames_seen = 0  # frames pushed in all
        self.frames_kept = 0  # frames in the cache now
        self.evicted = 0  # frames dropped by the window policy
        self.head_len = 0
        self.last_hidden: Tensor | None = None  # the hidden state that predicts the next text token [Dl]
        if head_ids is not None and len(head_ids):
            hidden = self._extend(self.model.embed_text(head_ids.to(self.device)[None]))
            self.head_len, self.last_hidden = len(head_ids), hidden[-1]

    # ------------------------------------------------------------------------------------------------ state

    def _capacity(self, head_len: int) -> int:
        """Positions the LLM cache reserves: the position limit for ``full``, the window and a question's room
        for ``window`` (an answer past it grows the buffers)."""
        policy = self.policy
        if policy.kind == "full" and self.max_positions:
            return self.max_positions
        if policy.kind == "full":
            return 0
        frames = policy.sink_frames + policy.window_frames + policy.evict_frames
        return head_len + frames * self.k + ANSWER_ROOM

    @property
    def length(self) -> int:
        """Positions in the LLM cache (head text and kept frames; nothing of a finished answer)."""
        return self.cache.get_seq_length()

    def cache_bytes(self) -> int:
        """Bytes held by the LLM cache's keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    def _extend(self, embeds: Tensor) -> Tensor:
        """Run embeddings [1, n, Dl] on the cache at the next n positions -> hidden states [n, Dl]."""
        start, n = self.length, embeds.shape[1]
        positions = torch.arange(start, start + n, device=self.device)[None]
        mask = torch.ones(1, start + n, dtype=torch.long, device=self.device)
        embeds = embeds.to(self.model.llm.get_input_embeddings().weight.dtype)
        return self.model.llm_hidden(embeds, mask, positions, self.cache)[0]

    # ---------------------------------------------------------------------------------------------- frames

    @torch.no_grad()
    def push(self, frame: Tensor, patches: PatchCache | None = None) -> None:
        """Read one ImageNet-normalised frame [3, H, W]: patch pass, query pass, k visual tokens into the cache.
        ``patches``: the frame's patch pass when the caller already ran it (several sessions reading one frame)."""
        self._make_room()
        if patches is None:
            patches = self.model.encode_patches(frame.to(self.device)[None])  # one frame's patch cache
        tokens, _ = self.model.read_frames(self.queries, patches)  # [k, Dl]
        del patches  # freed here: only the LLM cache grows with the stream
        hidden = self._extend(tokens[None])  # [k, Dl]
        self.queries = self.model.query_head(hidden).to(self.queries.dtype)  # [k, Dq], the next frame's
        self.last_hidden = hidden[-1]
        self.frames_seen += 1
        self.frames_kept += 1

    def _make_room(self) -> None:
        """Apply the cache policy before a frame's k positions are added."""
        policy = self.policy
        if policy.kind == "full":
            if self.max_positions and self.length + self.k > self.max_positions:
                if policy.fallback is None:
                    raise StreamFull(
                        f"the full cache holds {self.max_positions} positions ({self.frames_kept} frames of {self.k}"
                        f" tokens after {self.head_len} of text): use the window cache policy for longer streams")
                log.warning("full cache at %d positions: the window policy takes over", self.length)
                self.policy = policy.fallback
                self._make_room()
            return
        if self.frames_kept < policy.sink_frames + policy.window_frames + policy.evict_frames:
            return
        self._drop(policy.sink_frames, policy.evict_frames)

    def _drop(self, first: int, count: int) -> None:
        """Drop ``count`` frames after the first ``first`` kept ones; later keys move back by their positions."""
        start = self.head_len + first * self.k
        stop = start + count * self.k
        inv_freq = self.model.llm.get_decoder().rotary_emb.inv_freq
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.remove(start, stop, rotate_keys(layer.keys[..., stop:, :], start - stop, inv_freq))
        self.frames_kept -= count
        self.evicted += count

    # -------------------------------------------------------------------------------------------- questions

    def _prompt(self, prompt_ids: Tensor) -> Tensor:
        """Run a prompt [P] on the cache -> the hidden state that predicts the token after it [Dl]."""
        if not len(prompt_ids):
            if self.last_hidden is None:
                raise ValueError("an empty prompt on an empty stream: nothing predicts the first token")
            return self.last_hidden
        return self._extend(self.model.embed_text(prompt_ids.to(self.device)[None]))[-1]

    @torch.no_grad()
    def answer(self, prompt_ids: Tensor, stop_ids: Sequence[int], max_new_tokens: int = 200,
               sampling: Sampling = GREEDY) -> Generation:
        """Answer a rendered prompt [P] (the chat up to ``<|im_start|>assistant\\n``) from the frames so far; the
        cache is left as it was."""
        start = self.length
        try:
            last = self._prompt(prompt_ids)
            return decode(self.model.llm, self.cache, self.length, self.model.lm_head(last), stop_ids,
                          max_new_tokens, sampling)
        finally:
            self.cache.crop(start - self.length)

    @torch.no_grad()
    def score(self, prompt_ids: Tensor, options: Sequence[Tensor]) -> Tensor:
        """Summed log-probability of each option's tokens after a prompt [P], from the frames so far -> [n]; the
        cache is left as it was."""
        start = self.length
        scores = []
        try:
            last = self._prompt(prompt_ids)
            after_prompt = self.length
            for option in options:
                option = option.to(self.device)
                hidden = self._extend(self.model.embed_text(option[None]))  # [m, Dl]
                predictors = torch.cat([last[None], hidden[:-1]])  # the state before each option token
                logprobs = self.model.lm_head(predictors).float().log_softmax(-1)  # [m, V]
                scores.append(logprobs.gather(1, option[:, None]).sum())
                self.cache.crop(after_prompt - self.length)
        finally:
            self.cache.crop(start - self.length)
        return torch.stack(scores)
