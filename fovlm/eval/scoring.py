"""Multiple-choice scoring by mean answer-token negative log-likelihood, with shared computation.

Each option's score is the mean NLL of its answer tokens (the lettered option text and the closing end-of-turn
token: ``ROLE_ANSWER``, targets from :func:`fovlm.losses.shift_labels`); the lowest score wins
(REFERENCE.md 6.1). The options of a question differ only after a common prefix, so the prefix (visual tokens,
system turn, question) runs once and leaves an LLM KV cache; :func:`score_on_prefix` then expands that cache
to one row per option and runs only each option's own tokens. Any Hugging Face causal LM (or image-text
model, for the baseline) that takes ``input_ids`` with ``past_key_values`` works here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fovlm.eval.questions import OptionTokens
from fovlm.losses import IGNORE_INDEX, per_sample_sums, token_nll

# step(input_ids [n, L], attention_mask [n, P + L], position_ids [n, L], past_key_values) -> logits [n, L, V]
StepFn = Callable[..., Tensor]


def hf_step(model) -> StepFn:
    """A step function for a Hugging Face model that embeds ``input_ids`` itself."""

    def step(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values) -> Tensor:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        return out.logits

    return step


def score_on_prefix(
    step: StepFn, cache, prefix_length: int, last_logits: Tensor, options: OptionTokens
) -> Tensor:
    """Mean answer-token NLL of every option, continuing one shared prefix.

    Args:
        step: runs the LLM on option tokens against the cache (see :data:`StepFn`).
        cache: the prefix's KV cache (a ``DynamicCache`` for batch 1); it is expanded in place to one row per
            option, so it cannot be reused afterwards.
        prefix_length: number of positions in the cache (visual tokens plus prefix text).
        last_logits: [V] or [1, V] logits at the prefix's last position (they predict each option's first
            answer token).
        options: the question's option layout.

    Returns:
        float32 [n] mean NLL per option.
    """
    n, length = options.option_ids.shape
    device = last_logits.device
    cache.batch_repeat_interleave(n)
    attention_mask = torch.cat(
        [torch.ones(n, prefix_length, dtype=torch.long, device=device), options.option_mask.to(device)], dim=1
    )  # [n, P + L]
    position_ids = (prefix_length + torch.arange(length, device=device)).expand(n, length)  # [n, L]
    logits = step(options.option_ids.to(device), attention_mask, position_ids, cache)  # [n, L, V]
    labels = options.option_labels.to(device)  # [n, L]
    scored = labels != IGNORE_INDEX  # [n, L]
    first = token_nll(last_logits.reshape(1, -1).expand(n, -1), options.first_targets.to(device))  # [n]
    rest = token_nll(logits[scored], labels[scored])  # [N]
    sums = first + per_sample_sums(rest, scored.nonzero()[:, 0], n)  # [n]
    return sums / options.num_targets.to(device).float()


def nll_from_full_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL per row from full-sequence logits [n, S, V] and shifted labels [n, S] -> float32 [n]."""
    scored = labels != IGNORE_INDEX  # [n, S]
    nll = token_nll(logits[scored], labels[scored])  # [N]
    sums = per_sample_sums(nll, scored.nonzero()[:, 0], labels.shape[0])  # [n]
    return sums / scored.sum(dim=1).clamp_min(1).float()
