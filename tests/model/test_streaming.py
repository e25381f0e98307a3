"""The streaming session: frame by frame equals the offline autoregressive pass; questions leave the stream as it
was; the window policy keeps the cache bounded and its re-rotated keys sit where RoPE puts them."""

import pytest
import torch
from tiny_models import QUERY_DIM, random_frames
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fovlm.model.generate import generate
from fovlm.model.prompt import autoregressive_prompt
from fovlm.model.streaming import CachePolicy, StreamFull, StreamingSession, rotate_keys
from fovlm.model.vlm import FoveatedVLM

STOP = [2]
FULL = CachePolicy("full")


def vlm(tiny_dino, tiny_llm, k=1, question_first=False):
    return FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=k, question_first=question_first).eval()


def prompt(n=9, seed=0):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def streamed(model, frames, policy=FULL, head=None):
    session = StreamingSession(model, policy, head)
    for frame in frames:
        session.push(frame)
    return session


@pytest.mark.parametrize("k", [1, 2])
def test_full_stream_answers_as_the_offline_autoregressive_pass(tiny_dino, tiny_llm, k):
    model, frames, ids = vlm(tiny_dino, tiny_llm, k), random_frames(5), prompt()
    session = streamed(model, frames)
    with torch.no_grad():
        _, offline_last = autoregressive_prompt(model, model.encode_patches(frames), ids[None])
        torch.testing.assert_close(session._prompt(ids), offline_last, atol=1e-5, rtol=1e-5)
    session.cache.crop(-len(ids))
    offline = generate(model, frames, ids, STOP, max_new_tokens=12)
    assert session.answer(ids, STOP, max_new_tokens=12) == offline
    assert session.length == 5 * k and session.frames_seen == 5


def test_question_first_stream_keeps_its_question_before_the_frames(tiny_dino, tiny_llm):
    model, frames, ids = vlm(tiny_dino, tiny_llm, 2, question_first=True), random_frames(4), prompt(12)
    session = streamed(model, frames, head=ids[:7])
    offline = generate(model, frames, ids, STOP, max_new_tokens=10, question_len=7)
    assert session.answer(ids[7:], STOP, max_new_tokens=10) == offline
    assert session.head_len == 7 and session.length == 7 + 4 * 2


def test_a_question_does_not_disturb_the_stream(tiny_dino, tiny_llm):
    model, frames = vlm(tiny_dino, tiny_llm), random_frames(6)
    interrupted = streamed(model, frames[:3])
    first = interrupted.answer(prompt(seed=1), STOP, max_new_tokens=6)
    scores = interrupted.score(prompt(seed=2), [prompt(3, seed=3), prompt(2, seed=4)])
    assert interrupted.length == 3 and scores.shape == (2,)
    for frame in frames[3:]:
        interrupted.push(frame)
    straight = streamed(model, frames)
    assert interrupted.answer(prompt(), STOP, max_new_tokens=8) == straight.answer(prompt(), STOP, max_new_tokens=8)
    assert first.token_ids  # the tiny model never says <|im_end|> first on these ids


def test_scores_are_the_summed_option_log_probabilities(tiny_dino, tiny_llm):
    model, frames, question = vlm(tiny_dino, tiny_llm), random_frames(3), prompt(6)
    options = [prompt(3, seed=5), prompt(4, seed=6)]
    scores = streamed(model, frames).score(question, options)
    for option, score in zip(options, scores, strict=True):
        text = torch.cat([question, option])[None]
        with torch.no_grad():
            logits = model(frames, torch.tensor([3]), text, torch.ones_like(text), mode="autoregressive").logits[0]
        logprobs = logits[len(question) - 1: -1].log_softmax(-1)  # [m, V], each predicting an option token
        torch.testing.assert_close(score, logprobs.gather(1, option[:, None]).sum(), atol=1e-4, rtol=1e-5)


def test_rotated_keys_sit_where_rope_puts_them(tiny_llm):
    rotary = tiny_llm.model.rotary_emb
    keys = torch.randn(1, 3, 1, 2 * rotary.inv_freq.numel())  # [B, kv heads, 1, head_dim]

    def at(position):
        cos, sin = rotary(keys, torch.tensor([[position]]))
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    torch.testing.assert_close(rotate_keys(at(37), -30, rotary.inv_freq), at(7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate_keys(at(5), 12, rotary.inv_freq), at(17), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at(37), at(7), atol=1e-3)  # the rotation is not the identity


def test_window_keeps_the_cache_bounded_and_contiguous(tiny_dino, tiny_llm):
    model = vlm(tiny_dino, tiny_llm, 2)
    policy = CachePolicy("window", sink_frames=2, window_frames=4, evict_frames=3)
    session = StreamingSession(model, policy, head_ids=prompt(5))
    most = 5 + (2 + 4 + 3) * 2
    sizes = []
    for frame in random_frames(20, size=56):
        session.push(frame)
        assert session.length <= most
        sizes.append(session.cache_bytes())
    assert session.frames_seen == 20 and session.frames_kept + session.evicted == 20 and session.evicted >= 9
    assert session.length == 5 + session.frames_kept * 2
    assert max(sizes) == sizes[(2 + 4 + 3) - 1]  # never more than at the first full window
    assert session.answer(prompt(), STOP, max_new_tokens=4).token_ids is not None
    assert session.length == 5 + session.frames_kept * 2


def test_full_policy_stops_at_the_position_limit_or_falls_back(tiny_dino, tiny_llm):
    tiny_llm.config.max_position_embeddings = 6
    model = vlm(tiny_dino, tiny_llm, 2)
    session = streamed(model, random_frames(3, size=56))
    with pytest.raises(StreamFull, match="window"):
        session.push(random_frames(1, size=56)[0])
    window = CachePolicy("window", sink_frames=1, window_frames=1, evict_frames=1)
    session = streamed(model, random_frames(5, size=56), CachePolicy("full", fallback=window))
    assert session.policy == window and session.evicted > 0
    with pytest.raises(ValueError, match="falls back"):
        CachePolicy("window", fallback=window)
