"""Text on top of the autoregressive visual pass, in either layout: the visual tokens first, or the question first
(``visual_at`` / ``question_len`` text tokens, then the frames, then the rest of the text).

The question goes into the LLM cache before the frames, so every query the LLM writes has read it; the rest of the
text continues on the cache after the frames. The hidden state that predicts the first text token after the frames
is the last visual token's (:attr:`fovlm.model.outputs.ARPrefix.head_hidden`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fovlm.model.encoder import PatchCache
from fovlm.model.layout import join_text, split_text
from fovlm.model.outputs import ARPrefix, TextInput


def autoregressive_text(
    model, cache: PatchCache, num_frames: Tensor, text: TextInput, return_attention: bool = False
) -> tuple[Tensor, list[Tensor] | None]:
    """The autoregressive mode's hidden states that predict each text position's next token [B, S, Dl], and
    with ``return_attention`` the query attention of its frame-by-frame pass (per DINO layer [F, h, k, N], in
    the graph; else None).

    Args:
        model: a :class:`fovlm.model.vlm.FoveatedVLM`.
        cache: the batch's patch pass.
        num_frames: long [B].
        text: (input_ids [B, S], attention_mask [B, S], visual_at [B] or None).
        return_attention: keep the queries' attention weights.
    """
    input_ids, attention_mask, visual_at = text
    if visual_at is None:
        prefix = model.autoregressive_prefix(cache, num_frames, return_attention)
        return model.continue_text(prefix, input_ids, attention_mask), prefix.attention
    head_ids, head_mask, tail_ids, tail_mask = split_text(input_ids, attention_mask, visual_at)
    prefix = model.autoregressive_prefix(cache, num_frames, return_attention, head=(head_ids, head_mask))
    tail = model.continue_text(prefix, tail_ids, tail_mask)  # [B, S', Dl]
    head = prefix.head_hidden if prefix.head_hidden is not None else tail[:, :0]
    return join_text(head, tail, visual_at, input_ids.shape[1]), prefix.attention


def autoregressive_prompt(
    model, cache: PatchCache, prompt_ids: Tensor, question_len: int = 0
) -> tuple[ARPrefix, Tensor]:
    """One clip's autoregressive pass with a whole prompt on its cache, ready for answers to continue it.

    Args:
        model: a :class:`fovlm.model.vlm.FoveatedVLM`.
        cache: the clip's patch pass (T frames).
        prompt_ids: long [1, P], the rendered chat up to the answer.
        question_len: prompt tokens placed before the frames (0: the frames first).

    Returns:
        (the prefix, its cache holding question, frames and prompt; the hidden state at its last position [Dl],
        which predicts the answer's first token).
    """
    num_frames = torch.tensor([cache.num_frames], device=prompt_ids.device)
    ones = torch.ones_like(prompt_ids)
    head = (prompt_ids[:, :question_len], ones[:, :question_len]) if question_len else None
    prefix = model.autoregressive_prefix(cache, num_frames, head=head)
    tail = prompt_ids[:, question_len:]
    if tail.shape[1]:
        return prefix, model.continue_text(prefix, tail, ones[:, question_len:])[0, -1]
    return prefix, prefix.head_hidden[0, -1]
