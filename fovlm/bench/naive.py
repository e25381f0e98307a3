"""The fVLM original's ways of computing, kept to measure fovlm's design choices against (never used to train).

- :func:`patch_pass_kv_twice`: each DINO layer runs as Hugging Face's ``Dinov2Layer`` (which projects K and
  V inside its attention) and K/V are projected a second time from the same normalised input for the cache.
- :func:`padded_coarse_fine_logits`: the padded layout. Frames are padded to the batch's longest clip; every
  padded frame becomes a token (the connector applied to a zero vector) that is not masked; the text of every
  sample starts after T_max visual tokens; the LLM runs with a pure causal mask over [B, T_max + S]. With
  ``encode_padding`` the padded (all-zero) frames also go through DINO and both query passes (the plainest
  padded batch); without it DINO and the query passes run on real frames only, as the fVLM original did.
- :func:`autoregressive_naive`: the autoregressive visual pass of one clip, either rebuilding the padded
  per-layer K/V buffer from the compact cache at every step (the fVLM original) or, in addition, running the LLM
  over the whole visual prefix at every step instead of one cached step.

Shapes: B samples, T_max longest clip, F real frames, S text width, Dv DINO width, Dl LLM width.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from fovlm.model.encoder import PatchCache, _split_heads


def patch_pass_kv_twice(encoder, frames: Tensor) -> PatchCache:
    """DINO patch pass with the HF layer forward plus a second K/V projection per layer for the cache."""
    x = encoder.dino.embeddings(frames)  # [n, N, D]
    keys, values = [], []
    for layer in encoder.layers:
        attn = layer.attention
        normed = layer.norm1(x)  # [n, N, D]
        keys.append(_split_heads(attn.k_proj(normed), attn.head_dim))  # [n, h, N, hd]
        values.append(_split_heads(attn.v_proj(normed), attn.head_dim))  # [n, h, N, hd]
        x = layer(x)  # [n, N, D], K and V projected again inside
    return PatchCache(features=encoder.dino.layernorm(x), keys=keys, values=values)


def _padded_tokens(model, vectors: Tensor, real: Tensor) -> Tensor:
    """Connector over per-frame vectors placed in a zero [B * T_max, Dv] buffer -> tokens [B, T_max, Dl]."""
    batch, t_max = real.shape
    flat = vectors.new_zeros(batch * t_max, vectors.shape[-1])  # [B*T_max, Dv]
    flat = flat.index_copy(0, real.flatten().nonzero().squeeze(1), vectors)
    return model.connector(flat).view(batch, t_max, -1)  # [B, T_max, Dl]


def padded_coarse_fine_logits(
    model,
    frames: Tensor,
    num_frames: Tensor,
    input_ids: Tensor,
    logits_mask: Tensor,
    encode_padding: bool = False,
) -> Tensor:
    """coarse_fine logits [N, V] on the scored text rows, with the padded layout (see module docstring)."""
    batch, t_max = len(num_frames), int(num_frames.max())
    real = torch.arange(t_max, device=num_frames.device)[None] < num_frames[:, None]  # [B, T_max]
    if encode_padding:
        padded = frames.new_zeros(batch * t_max, *frames.shape[1:])  # [B*T_max, 3, H, W]
        frames = padded.index_copy(0, real.flatten().nonzero().squeeze(1), frames)
        real = torch.ones_like(real)
    cache = model.encode_patches(frames)
    count = cache.num_frames
    coarse, _ = model.encoder.query_attend(model.q_static.expand(count, -1), cache)  # [n, Dv]
    coarse_tokens = _padded_tokens(model, coarse, real)  # [B, T_max, Dl]
    ones = torch.ones(batch, t_max, dtype=torch.long, device=frames.device)
    positions = torch.arange(t_max, device=frames.device)[None].expand(batch, -1)
    dtype = model.llm.get_input_embeddings().weight.dtype
    hidden = model.llm_hidden(coarse_tokens.to(dtype), ones, positions)  # [B, T_max, Dl]
    queries = model.query_head(hidden)  # [B, T_max, Dq]
    shifted = torch.cat([model.q_init.expand(batch, 1, -1).to(queries.dtype), queries[:, :-1]], 1)
    fine, _ = model.encoder.query_attend(shifted[real], cache)  # [n, Dv]
    fine_tokens = _padded_tokens(model, fine, real)  # [B, T_max, Dl]
    text = model.embed_text(input_ids)  # [B, S, Dl]
    embeds = torch.cat([fine_tokens.to(text.dtype), text], 1)  # [B, T_max + S, Dl]
    width = embeds.shape[1]
    hidden = model.llm_hidden(
        embeds,
        torch.ones(batch, width, dtype=torch.long, device=frames.device),
        torch.arange(width, device=frames.device)[None].expand(batch, -1),
    )
    return model.lm_head(hidden[:, t_max:][logits_mask])  # [N, V]


def _rebuilt_frame(cache: PatchCache, real: Tensor, t: int) -> PatchCache:
    """Scatter the whole compact cache into a zero padded buffer and slice frame t (the fVLM original's way,
    at every step)."""
    batch, t_max = real.shape
    index = real.flatten().nonzero().squeeze(1)

    def frame(x: Tensor) -> Tensor:
        full = x.new_zeros(batch * t_max, *x.shape[1:]).index_copy(0, index, x)  # [B*T_max, ...]
        return full.view(batch, t_max, *x.shape[1:])[:, t]  # [B, ...]

    return PatchCache(
        features=frame(cache.features),
        keys=[frame(k) for k in cache.keys],
        values=[frame(v) for v in cache.values],
    )


@torch.no_grad()
def autoregressive_naive(model, cache: PatchCache, recompute_llm: bool = False) -> Tensor:
    """Autoregressive visual pass of ONE clip (every cached frame), the fVLM original's way -> tokens [T, Dl].

    Args:
        model: a FoveatedVLM in eval mode.
        cache: patch pass of the clip's T frames.
        recompute_llm: run the LLM over all visual tokens so far at every step (no LLM KV cache) instead of one
            cached step.
    """
    frames = cache.num_frames
    real = torch.ones(1, frames, dtype=torch.bool, device=cache.features.device)
    dtype = model.llm.get_input_embeddings().weight.dtype
    kv = None if recompute_llm else DynamicCache(config=model.llm.get_decoder().config)
    query = model.q_init  # [1, Dq]
    tokens = []
    for t in range(frames):
        token, _ = model.read_frames(query, _rebuilt_frame(cache, real, t))  # [1, Dl]
        tokens.append(token.to(dtype))
        if recompute_llm:
            embeds = torch.stack(tokens, 1)  # [1, t+1, Dl]
            mask = torch.ones(1, t + 1, dtype=torch.long, device=embeds.device)
            hidden = model.llm_hidden(embeds, mask, torch.arange(t + 1, device=embeds.device)[None])[:, -1]
        else:
            mask = torch.ones(1, t + 1, dtype=torch.long, device=token.device)
            position = torch.full((1, 1), t, dtype=torch.long, device=token.device)
            hidden = model.llm_hidden(token.to(dtype)[:, None], mask, position, kv)[:, -1]
        query = model.query_head(hidden)  # [1, Dq]
    return torch.cat(tokens)
