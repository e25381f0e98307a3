"""What the FoveatedVLM's passes return: visual tokens, the autoregressive prefix, and text logits.

Shapes: B samples, F real frames, k visual tokens per frame, Dl LLM width, h DINO heads, N DINO tokens per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.cache_utils import Cache

TextInput = tuple[Tensor, Tensor, "Tensor | None"]
"""(input_ids [B, S], attention_mask [B, S], visual_at [B] or None): a batch's text and where its visual tokens go."""


@dataclass
class VisualTokens:
    """The visual token embeddings of a batch (frame order) and, on request, the query attention weights.

    Attributes:
        coarse: [F * k, Dl] tokens read with q_static (frame-major).
        fine: [F * k, Dl] tokens read with the shifted LLM queries (coarse_fine), None in coarse_only.
        coarse_attention / fine_attention: per DINO layer [F, h, k, N] (float32, in the graph), when asked for.
    """

    coarse: Tensor
    fine: Tensor | None = None
    coarse_attention: list[Tensor] | None = None
    fine_attention: list[Tensor] | None = None

    @property
    def tokens(self) -> Tensor:
        """The tokens the LLM reads with the text: fine if present, else coarse. [F * k, Dl]."""
        return self.fine if self.fine is not None else self.coarse


@dataclass
class ARPrefix:
    """The autoregressive visual pass of a batch, with the state needed to continue text on it.

    ``FoveatedVLM.continue_text`` appends right-padded text (a prompt, an option, generated tokens) to the cache
    and advances ``attention_mask`` and ``next_positions``, so it can be called again for the next chunk. Padded
    slots stay masked and do not advance a sample's positions. ``truncate()`` returns to the visual prefix, so
    several texts (answer options) can be scored on one visual pass.

    Attributes:
        past_key_values: LLM KV cache; its first T_max * k slots are the visual steps (k per frame; slots beyond
            a sample's own T_i * k masked).
        visual_mask: long [B, T_max * k], 1 on each sample's real visual slots.
        num_frames: long [B], T_i.
        tokens: [F * k, Dl] the visual tokens, frame order.
        attention: per DINO layer [F, h, k, N] (float32, in the graph) when asked for, else None.
        attention_mask: long [B, cache length], the key mask for the next chunk (starts as ``visual_mask``).
        next_positions: long [B], the position of each sample's next token (starts after the visual slots).
        head_hidden: with a question-first head (text before the frames, at the cache's start), the hidden states
            that predict each head position's next text token [B, P, Dl] (for its last token: the last visual
            token's), else None.
    """

    past_key_values: Cache
    visual_mask: Tensor
    num_frames: Tensor
    tokens: Tensor
    attention: list[Tensor] | None = None
    head_hidden: Tensor | None = None
    attention_mask: Tensor = field(init=False)
    next_positions: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.attention_mask = self.visual_mask
        self.next_positions = self.visual_mask.sum(1)

    @property
    def length(self) -> int:
        """Number of visual slots T_max * k in the cache."""
        return self.visual_mask.shape[1]

    def advance(self, attention_mask: Tensor) -> None:
        """Record that a chunk with this text mask [B, S] was appended to the cache."""
        self.attention_mask = torch.cat([self.attention_mask, attention_mask.long()], 1)
        self.next_positions = self.next_positions + attention_mask.long().sum(1)

    def truncate(self) -> None:
        """Drop everything appended after the visual slots, so that another text can be scored on the prefix."""
        extra = self.past_key_values.get_seq_length() - self.length
        if extra > 0:
            self.past_key_values.crop(-extra)  # a negative count removes that many trailing tokens
        self.attention_mask, self.next_positions = self.visual_mask, self.visual_mask.sum(1)


@dataclass
class VLMOutput:
    """Logits over text positions: [N, V] for the rows of ``logits_mask`` or [B, S, V] without a mask; the
    optional ``coarse_logits`` / ``autoregressive_logits`` are the same rows in those modes; ``fine_attention``
    and ``autoregressive_attention``, when asked for, are the attention of the queries the LLM wrote in the
    coarse -> fine and the autoregressive pass, per DINO layer [F, h, k, N]."""

    logits: Tensor
    coarse_logits: Tensor | None = None
    autoregressive_logits: Tensor | None = None
    fine_attention: list[Tensor] | None = None
    autoregressive_attention: list[Tensor] | None = None
