"""Multiple-choice scoring by mean answer-token negative log-likelihood, with shared computation.

Each option's score is the mean NLL of its answer tokens (the lettered option text and the closing end-of-turn
token: ``ROLE_ANSWER``, targets from :func:`fovlm.losses.shift_labels`); the lowest score wins
(docs/model.md#scoring-and-generation). The options of a question differ only after a common prefix, so the prefix (visual tokens,
system turn, question) runs once and leaves an LLM KV cache; :func:`score_on_prefix` then expands that cache
to one row per option and runs only each option's own tokens. Any Hugging Face causal LM (or image-text
model, for the baseline) that takes ``input_ids`` with ``past_key_values`` works here.

For :class:`fovlm.model.vlm.FoveatedVLM`, :func:`score_question` also shares the DINO patch pass between
every option and every mode (one patch pass per question); :func:`score_question_naive` is the fVLM
original's way (every option and mode with its own patch pass and full sequence), kept to check and measure
against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache

from fovlm.data.roles import IGNORE_INDEX, question_end
from fovlm.eval.questions import OptionTokens
from fovlm.losses import per_sample_sums, selected_targets, token_nll
from fovlm.model.encoder import PatchCache
from fovlm.model.layout import shift_queries
from fovlm.model.prompt import autoregressive_prompt
from fovlm.model.vlm import MODES

# step(input_ids [n, L], attention_mask [n, P + L], position_ids [n, L], past_key_values, select bool [n, L])
#   -> logits [N, V] at the selected positions (row order = select.nonzero())
StepFn = Callable[..., Tensor]


def hf_step(model) -> StepFn:
    """A step function for a Hugging Face model that embeds ``input_ids`` itself."""

    def step(
        input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values, select: Tensor
    ) -> Tensor:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        return out.logits[select]

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
    labels = options.option_labels.to(device)  # [n, L]
    scored = labels != IGNORE_INDEX  # [n, L]
    logits = step(options.option_ids.to(device), attention_mask, position_ids, cache, scored)  # [N, V]
    first = token_nll(last_logits.reshape(1, -1).expand(n, -1), options.first_targets.to(device))  # [n]
    rest = token_nll(logits, labels[scored])  # [N]
    sums = first + per_sample_sums(rest, scored.nonzero()[:, 0], n)  # [n]
    return sums / options.num_targets.to(device).float()


def nll_from_full_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL per row from full-sequence logits [n, S, V] and shifted labels [n, S] -> float32 [n]."""
    scored = labels != IGNORE_INDEX  # [n, S]
    nll = token_nll(logits[scored], labels[scored])  # [N]
    sums = per_sample_sums(nll, scored.nonzero()[:, 0], labels.shape[0])  # [n]
    return sums / scored.sum(dim=1).clamp_min(1).float()


# ---------------------------------------------------------------------------------------------------------------
# FoveatedVLM: one patch pass per question, one prefix per mode, options against the prefix cache


def vlm_step(model) -> StepFn:
    """Option tokens through the FoveatedVLM's LLM on a prefix cache; lm_head only where a target is scored."""

    def step(
        input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values, select: Tensor
    ) -> Tensor:
        hidden = model.llm_hidden(model.embed_text(input_ids), attention_mask, position_ids, past_key_values)
        return model.lm_head(hidden[select])  # [N, V]

    return step


def _prefix_on_tokens(
    model, tokens: Tensor, prefix_ids: Tensor, question_len: int = 0
) -> tuple[DynamicCache, Tensor, Tensor]:
    """LLM over [question ; visual tokens ; rest of the prefix text] for one question, with a fresh cache
    (``question_len`` 0: the visual tokens first).

    Returns:
        (cache, hidden states at the visual positions [T * k, Dl], logits at the last prefix position [V]).
    """
    visual = tokens.shape[0]
    text = model.embed_text(prefix_ids)[0]  # [P, Dl]
    embeds = torch.cat([text[:question_len], tokens.to(text.dtype), text[question_len:]])[None]  # [1, T + P, Dl]
    length = embeds.shape[1]
    cache = DynamicCache(config=model.llm.get_decoder().config)
    positions = torch.arange(length, device=embeds.device)[None]  # [1, T + P]
    mask = torch.ones(1, length, dtype=torch.long, device=embeds.device)
    hidden = model.llm_hidden(embeds, mask, positions, cache)[0]  # [T + P, Dl]
    return cache, hidden[question_len : question_len + visual], model.lm_head(hidden[-1])


def question_length(model, options: OptionTokens) -> int:
    """Prompt tokens a question-first model reads before the frames (its system and user turns); 0 otherwise."""
    if not getattr(model, "question_first", False):
        return 0
    return min(int(question_end(options.full_roles[:1])[0]), options.prefix_ids.shape[0])


@torch.no_grad()
def score_question(
    model,
    frames: Tensor,
    options: OptionTokens,
    modes: tuple[str, ...] = MODES,
    patches: PatchCache | None = None,
    score_options: Callable[..., Tensor] = score_on_prefix,
) -> dict[str, Tensor]:
    """Mean answer-token NLL of every option in every mode, sharing all the work the modes and options share.

    The DINO patch pass runs once for the question. ``coarse_only`` and ``coarse_fine`` share the static-query
    tokens, and the coarse prefix pass ([coarse tokens ; prompt], one LLM call) gives both the coarse_only
    prefix cache and, at its visual positions, the hidden states the fine queries come from (causal attention:
    they equal a pass over the visual tokens alone). ``coarse_fine`` then runs [fine tokens ; prompt] and
    ``autoregressive`` its frame-by-frame pass followed by the prompt; in each mode only the options' own tokens
    run per option, against the expanded prefix cache.

    Args:
        model: a FoveatedVLM in eval mode.
        frames: ImageNet-normalised frames [T, 3, H, W] of the question (on the model's device).
        options: the question's option layout (:func:`fovlm.eval.questions.render_options`).
        modes: any of "coarse_only", "coarse_fine", "autoregressive".
        patches: the question's patch pass when the caller already ran it (``model.encode_patches(frames)``).
        score_options: scores the options against each mode's prefix; takes :func:`score_on_prefix`'s
            arguments (the lmms-eval adapter, :mod:`fovlm.eval.lmms`, also reads the greedy tokens there).

    Returns:
        mode -> what ``score_options`` returns (by default float32 [n] mean NLL per option).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; expected some of {MODES}")
    device = frames.device
    num_frames = torch.tensor([frames.shape[0]], device=device)
    prefix_ids = options.prefix_ids.to(device)[None]  # [1, P]
    step = vlm_step(model)
    if patches is None:
        patches = model.encode_patches(frames)  # the question's only patch pass
    question_len = question_length(model, options)
    results: dict[str, Tensor] = {}
    if "coarse_only" in modes or "coarse_fine" in modes:
        coarse, _ = model.static_tokens(patches)  # [T*k, Dl]
        cache, visual_hidden, last = _prefix_on_tokens(model, coarse, prefix_ids, question_len)
        if "coarse_only" in modes:
            results["coarse_only"] = score_options(step, cache, cache.get_seq_length(), last, options)
        if "coarse_fine" in modes:
            queries = shift_queries(model.query_head(visual_hidden), num_frames, model.initial_queries)  # [T*k, Dq]
            fine, _ = model.read_frames(queries, patches)  # [T*k, Dl]
            cache, _, last = _prefix_on_tokens(model, fine, prefix_ids, question_len)
            results["coarse_fine"] = score_options(step, cache, cache.get_seq_length(), last, options)
    if "autoregressive" in modes:
        prefix, last = autoregressive_prompt(model, patches, prefix_ids, question_len)
        cache = prefix.past_key_values
        results["autoregressive"] = score_options(step, cache, cache.get_seq_length(), model.lm_head(last), options)
    return {mode: results[mode] for mode in modes}


@torch.no_grad()
def score_question_naive(
    model, frames: Tensor, options: OptionTokens, modes: tuple[str, ...] = MODES
) -> dict[str, Tensor]:
    """The fVLM original's way (docs/differences.md#evaluation), kept as the yardstick for
    :func:`score_question`.

    Per mode, every option runs as a full sequence in one batch with its own copy of the frames, so the patch
    pass runs once per option and mode and the prompt is recomputed for every option.
    """
    n = options.num_options
    device = frames.device
    input_ids = options.full_ids.to(device)  # [n, S]
    attention_mask = (options.full_roles != 0).long().to(device)  # [n, S]
    labels = options.full_labels.to(device)  # [n, S]
    logits_mask, targets, sample_index = selected_targets(labels)
    counts = logits_mask.sum(dim=1).float()  # [n]
    results = {}
    visual_at = None
    if getattr(model, "question_first", False):
        visual_at = torch.full((n,), question_length(model, options), device=device)
    for mode in modes:
        out = model(
            frames.repeat(n, 1, 1, 1), torch.full((n,), frames.shape[0], device=device),
            input_ids, attention_mask, mode=mode, logits_mask=logits_mask, visual_at=visual_at,
        )
        results[mode] = per_sample_sums(token_nll(out.logits, targets), sample_index, n) / counts
    return results
