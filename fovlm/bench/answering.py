"""Answering sections: greedy generation after the autoregressive visual pass, and multiple-choice scoring
with a shared patch pass and prefixes against the per-option way."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fovlm.bench.inputs import synthetic_text
from fovlm.bench.measure import Env, timed
from fovlm.data.roles import ROLE_ANSWER, ROLE_TEMPLATE


@torch.no_grad()
def generation_figures(env: Env, model, frames: int, prompt_len: int, new_tokens: int, image_size: int,
                       vocab: int) -> dict[str, float]:
    """Greedy decoding after an autoregressive visual pass: decode tokens/s and the whole answer's time."""
    from fovlm.model.generate import decode

    model.eval()
    gen = torch.Generator().manual_seed(2)
    clip = torch.randn(frames, 3, image_size, image_size, generator=gen).to(env.device)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen).to(env.device)

    def prefix() -> tuple[Any, Tensor]:
        pre = model.autoregressive_prefix(model.encode_patches(clip), torch.tensor([frames], device=env.device))
        hidden = model.continue_text(pre, prompt, torch.ones_like(prompt))
        return pre.past_key_values, model.lm_head(hidden[0, -1])

    with env.autocast():
        start = env.now()
        cache, last = prefix()
        prefix_s = env.now() - start
        decode(model.llm, cache, cache.get_seq_length(), last, stop_ids=[], max_new_tokens=4)  # warm-up
        cache, last = prefix()
        start = env.now()
        result = decode(model.llm, cache, cache.get_seq_length(), last, stop_ids=[], max_new_tokens=new_tokens)
        decode_s = env.now() - start
    tokens = len(result.token_ids)
    return {"frames": frames, "prompt_tokens": prompt_len, "new_tokens": tokens, "prefix_s": prefix_s,
            "decode_s": decode_s, "tokens_per_s": tokens / decode_s, "answer_s": prefix_s + decode_s}


@torch.no_grad()
def scoring_figures(env: Env, model, frames: int, options: int, image_size: int, vocab: int,
                    naive: bool = True) -> dict[str, float]:
    """3-mode scoring of one multiple-choice question: shared patch pass and prefixes vs the per-option way."""
    from fovlm.eval.questions import split_options
    from fovlm.eval.scoring import score_question, score_question_naive

    model.eval()
    gen = torch.Generator().manual_seed(3)
    prompt_ids, prompt_roles = synthetic_text(60, 6, vocab, gen)
    prompt_ids, prompt_roles = prompt_ids[:-7], prompt_roles[:-7]  # drop the answer and its closing markup
    rows = []
    for _ in range(options):
        answer = torch.randint(3, vocab, (6,), generator=gen).tolist()
        rows.append((prompt_ids + answer + [2, 198], prompt_roles + [ROLE_ANSWER] * 7 + [ROLE_TEMPLATE]))
    layout = split_options(rows, pad_id=2)
    clip = torch.randn(frames, 3, image_size, image_size, generator=gen).to(env.device)
    with env.autocast():
        shared_s = timed(env, lambda: score_question(model, clip, layout), 1)
        out = {"frames": frames, "options": options, "shared_s": shared_s}
        if naive:
            out["naive_per_option_s"] = timed(env, lambda: score_question_naive(model, clip, layout), 1, warmup=0)
            out["ratio"] = out["naive_per_option_s"] / shared_s
    return out
