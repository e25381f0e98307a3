"""Sampling rule and cached decoding (tiny random Llama); the FoveatedVLM path is tested with the model."""

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from fovlm.model.generate import decode, next_token, top_p_filter
from fovlm.model.loading import tiny_llm_config


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(top_p_filter(probs.log(), 0.1)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(probs.log(), 1.0)).all()


def test_next_token_greedy_and_sampled():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert next_token(logits).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    rows = logits.repeat(500, 1)  # [1000, 3]: 500 draws per distribution in one call
    draws = next_token(rows, temperature=1.0, top_p=1.0, generator=gen).view(500, 2)
    share = (draws[:, 0] == 1).float().mean().item()
    assert share == pytest.approx(torch.softmax(logits[0], 0)[1].item(), abs=0.06)
    assert 0 < (draws[:, 0] != 1).sum() < 150  # sampling, not argmax
    nucleus = next_token(rows, temperature=1.0, top_p=0.5, generator=gen).view(500, 2)
    assert (nucleus[:, 0] == 1).all()  # the top token alone holds more than half of the mass


def test_cached_greedy_decoding_matches_full_recompute():
    llm = LlamaForCausalLM(tiny_llm_config(vocab_size=50)).eval()
    prompt = torch.tensor([[1, 7, 8, 9, 4]])
    with torch.no_grad():
        out = llm(input_ids=prompt, use_cache=True, past_key_values=DynamicCache())
        gen = decode(
            llm, out.past_key_values, prompt.shape[1], out.logits[0, -1], stop_ids=[], max_new_tokens=6
        )
        ids = prompt
        for _ in range(6):  # no cache: recompute the whole sequence for every token
            ids = torch.cat([ids, llm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert gen.token_ids == ids[0, prompt.shape[1] :].tolist() and not gen.stopped


def test_decoding_stops_at_the_stop_token():
    llm = LlamaForCausalLM(tiny_llm_config(vocab_size=50)).eval()
    with torch.no_grad():
        out = llm(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, past_key_values=DynamicCache())
        first = int(out.logits[0, -1].argmax())
        gen = decode(llm, out.past_key_values, 3, out.logits[0, -1], stop_ids=[first], max_new_tokens=5)
    assert gen.token_ids == [] and gen.stopped
