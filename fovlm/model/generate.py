"""Answer generation: greedy or sampled (temperature, top-p) decoding after the autoregressive visual pass.

The frames go through the autoregressive visual pass (q_init -> frame 0 -> one LLM step with the KV cache ->
query -> frame 1 ...), the rendered prompt (system turn, user turn, ``<|im_start|>assistant\\n``) is run on
that cache in one call, and tokens are then decoded one at a time on the same cache until the end-of-turn
token (``<|im_end|>``) or ``max_new_tokens``. Each new token costs one LLM step: nothing before it is
recomputed.

:func:`next_token` is the pure sampling rule; :func:`decode` the loop over any Hugging Face causal LM with a
cache; :func:`generate` ties it to :class:`fovlm.model.vlm.FoveatedVLM`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fovlm.model.prompt import autoregressive_prompt


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of highest-probability tokens whose mass reaches ``top_p``; others get -inf.

    Args:
        logits: [B, V] (already divided by the temperature).
        top_p: nucleus mass in (0, 1]; 1 keeps everything.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    # A token is dropped when the mass before it already reaches top_p; the most likely token always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p  # [B, V]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Choose the next token per row of ``logits`` [B, V] -> long [B].

    ``temperature == 0`` is greedy (argmax); otherwise sample from ``softmax(logits / temperature)``
    restricted to the top-p nucleus.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = top_p_filter(logits.float() / temperature, top_p)  # [B, V]
    probs = filtered.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (:func:`next_token`).

    Attributes:
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus mass for sampling.
        generator: random generator for reproducible sampling.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


GREEDY = Sampling()


@dataclass
class Generation:
    """Decoded token ids (without the stop token) and whether the stop token ended them."""

    token_ids: list[int]
    stopped: bool


@torch.no_grad()
def decode(
    llm,
    cache,
    position: int,
    last_logits: Tensor,
    stop_ids: Sequence[int],
    max_new_tokens: int = 200,
    sampling: Sampling = GREEDY,
) -> Generation:
    """Decode one sequence on a prefix cache.

    Args:
        llm: Hugging Face causal LM (takes ``input_ids``, ``position_ids`` and ``past_key_values``).
        cache: KV cache of the prefix (batch 1), extended in place.
        position: number of positions in the cache (the next token's position id).
        last_logits: [V] or [1, V] logits at the prefix's last position.
        stop_ids: token ids that end the answer (``<|im_end|>``); not included in the output.
        max_new_tokens: most tokens generated.
        sampling: how each token is chosen (greedy by default).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    logits = last_logits.reshape(1, -1)  # [1, V]
    tokens: list[int] = []
    stop = set(int(s) for s in stop_ids)
    for _ in range(max_new_tokens):
        token = next_token(logits, sampling.temperature, sampling.top_p, sampling.generator)  # [1]
        if int(token) in stop:
            return Generation(tokens, True)
        tokens.append(int(token))
        out = llm(
            input_ids=token.view(1, 1),
            position_ids=torch.tensor([[position]], device=token.device),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]  # [1, V]
        position += 1
    return Generation(tokens, False)


@torch.no_grad()
def generate(
    model,
    frames: Tensor,
    prompt_ids: Tensor,
    stop_ids: Sequence[int],
    max_new_tokens: int = 200,
    sampling: Sampling = GREEDY,
    question_len: int = 0,
) -> Generation:
    """Answer a rendered prompt about one clip: autoregressive visual pass, prompt on the cache, then decoding.

    Args:
        model: a :class:`fovlm.model.vlm.FoveatedVLM` in eval mode.
        frames: ImageNet-normalised frames [T, 3, H, W] (T may be 0 for a text-only prompt).
        prompt_ids: long [P] the rendered chat up to and including ``<|im_start|>assistant\\n``.
        stop_ids: token ids that end the answer (``<|im_end|>``).
        max_new_tokens, sampling: as in :func:`decode`.
        question_len: prompt tokens placed before the frames (a question-first model: its system and user
            turns); 0: the frames first.
    """
    ids = prompt_ids.to(frames.device)[None]  # [1, P]
    prefix, last = autoregressive_prompt(model, model.encode_patches(frames), ids, question_len)
    cache = prefix.past_key_values
    # The LLM embeds the generated ids itself: the same embedding the prompt went through (embed_text).
    return decode(model.llm, cache, cache.get_seq_length(), model.lm_head(last), stop_ids, max_new_tokens, sampling)
