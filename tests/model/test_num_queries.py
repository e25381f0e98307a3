"""k visual tokens per frame: one query per frame reproduces the stored outputs of the one-token model, and every
mode at k > 1 equals a per-sample computation written out here (k queries per frame, query j of frame t written
at frame t-1's j-th position), batched or not, cached or not."""

from pathlib import Path

import pytest
import torch
from stored_outputs import compute_outputs, seeded_model
from tiny_models import QUERY_DIM, TOL, assert_shared_scoring_is_per_option_scoring, random_frames

from fovlm.bench import flops
from fovlm.eval.attention import query_attention_maps
from fovlm.eval.questions import render_options
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.exported import build_from_config
from fovlm.model.generate import generate
from fovlm.model.pretrained import use_queries
from fovlm.model.vlm import MODES, FoveatedVLM

STORED = Path(__file__).parent / "data" / "one_query_outputs.pt"


@pytest.fixture
def vlm_k3(tiny_dino, tiny_llm) -> FoveatedVLM:
    return FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=3).eval()


def hf_logits(m: FoveatedVLM, embeds: torch.Tensor) -> torch.Tensor:
    return m.llm(inputs_embeds=embeds[None]).logits[0]


def tokens_of(m: FoveatedVLM, queries: torch.Tensor, cache) -> torch.Tensor:
    """queries [n, k, Dq] on n cached frames -> [n * k, Dl] through the encoder and the connector."""
    z, _ = m.encoder.query_attend(queries, cache)  # [n, k, D]
    return m.visual_scale * m.dino_to_llm(z.flatten(0, 1))


def per_sample(m: FoveatedVLM, mode: str, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One sample's text logits [S, V] in ``mode`` with k = m.active_queries, without batching or a KV cache."""
    k, n = m.active_queries, len(frames)
    text = m.llm.get_input_embeddings()(ids)
    if n == 0:
        return hf_logits(m, text)
    cache = m.encoder.encode_patches(frames)
    coarse = tokens_of(m, m.q_static[:k].expand(n, k, -1), cache)  # [n*k, Dl]
    if mode == "coarse_only":
        visual = coarse
    elif mode == "coarse_fine":
        made = m.llm_to_query(m.llm.model(inputs_embeds=coarse[None]).last_hidden_state[0]).view(n, k, -1)
        queries = torch.cat([m.q_init[:k][None], made[:-1]])  # frame t reads with frame t-1's k queries
        visual = tokens_of(m, queries, cache)
    else:
        steps, query = [], m.q_init[:k]
        for t in range(n):
            steps.append(tokens_of(m, query[None], cache.select(torch.tensor([t]))))  # [k, Dl]
            hidden = m.llm.model(inputs_embeds=torch.cat(steps)[None]).last_hidden_state[0, -k:]  # [k, Dl]
            query = m.llm_to_query(hidden)
        visual = torch.cat(steps)
    return hf_logits(m, torch.cat([visual, text]))[n * k :]


def mixed_batch():
    num_frames = torch.tensor([3, 0, 2, 1])
    lengths = [6, 4, 8, 5]
    ids = torch.randint(0, 49152, (4, 8))
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    return random_frames(int(num_frames.sum())), num_frames, ids * mask, mask


def test_one_query_reproduces_the_stored_outputs():
    stored = torch.load(STORED)
    now = compute_outputs(seeded_model())
    assert now.keys() == stored.keys()
    for key, value in stored.items():
        torch.testing.assert_close(now[key], value, **TOL, msg=key)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [3, 2])
def test_every_mode_equals_the_per_sample_computation(vlm_k3, mode, k):
    vlm_k3.use_queries(k)
    frames, num_frames, ids, mask = mixed_batch()
    starts = torch.cumsum(num_frames, 0) - num_frames
    with torch.no_grad():
        logits = vlm_k3(frames, num_frames, ids, mask, mode=mode).logits  # [B, S, V]
        for b in range(len(num_frames)):
            own = frames[starts[b] : starts[b] + num_frames[b]]
            n_text = int(mask[b].sum())
            torch.testing.assert_close(logits[b, :n_text], per_sample(vlm_k3, mode, own, ids[b, :n_text]), **TOL)


def test_the_first_k_queries_are_used(tiny_dino, tiny_llm):
    """A model holding 3 queries, told to use 2, equals a 2-query model with those first 2 queries."""
    big = FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=3).eval()
    small = FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=2).eval()
    state = {k: v[:2] if k in ("q_static", "q_init") else v for k, v in big.state_dict().items()}
    small.load_state_dict(state)
    big.use_queries(2)
    frames, num_frames, ids, mask = mixed_batch()
    with torch.no_grad():
        for mode in MODES:
            torch.testing.assert_close(
                big(frames, num_frames, ids, mask, mode=mode).logits,
                small(frames, num_frames, ids, mask, mode=mode).logits, **TOL,
            )
    with pytest.raises(ValueError, match="between 1 and num_queries=3"):
        big.use_queries(4)


def test_autoregressive_cache_holds_k_positions_per_frame(vlm_k3):
    vlm_k3.use_queries(2)
    frames, num_frames, _, _ = mixed_batch()
    with torch.no_grad():
        prefix = vlm_k3.autoregressive_prefix(vlm_k3.encode_patches(frames), num_frames, return_attention=True)
    assert prefix.past_key_values.get_seq_length() == 3 * 2
    assert prefix.next_positions.tolist() == [6, 0, 4, 2]
    assert prefix.tokens.shape == (6 * 2, vlm_k3.dino_to_llm.out_features)
    assert prefix.attention[0].shape[:3] == (6, 4, 2)  # [F, h, k, N]


def test_scoring_shares_the_prefix_at_k(vlm_k3, tokenizer):
    """Multiple-choice scoring with the shared patch pass and prefix equals the per-option forwards at k = 2."""
    vlm_k3.use_queries(2)
    frames = random_frames(3)
    options = render_options(tokenizer, "What is in the clip?", ["a red square", "a green ball", "nothing"])
    assert_shared_scoring_is_per_option_scoring(vlm_k3, frames, options)


def test_generation_and_attention_maps_at_k(vlm_k3):
    vlm_k3.use_queries(2)
    frames = random_frames(2)
    prompt = torch.randint(0, 49152, (5,))
    with torch.no_grad():
        answer = generate(vlm_k3, frames, prompt, stop_ids=[], max_new_tokens=3)
        logits = vlm_k3(frames, torch.tensor([2]), prompt[None], torch.ones(1, 5, dtype=torch.long),
                        mode="autoregressive").logits
        maps = query_attention_maps(vlm_k3, frames)
    assert answer.token_ids[0] == int(logits[0, -1].argmax())
    assert {kind: tuple(m.shape[:3]) for kind, m in maps.items()} == {
        "coarse": (2, 2, 4), "fine": (2, 2, 4), "autoregressive": (2, 2, 4)}


def test_flops_count_k_tokens_per_frame(vlm_k3):
    vlm_k3.use_queries(2)
    s = flops.ModelShape.of(vlm_k3)
    assert s.num_queries == 2
    # 3 frames: one patch pass each, 2 x 3 query tokens in each of the two passes, the coarse LLM pass over 6
    # tokens and the query head on them.
    expected = 3 * flops.patch_pass(s) + 12 * flops.query_pass(s) + flops.llm_pass(s, 6) + flops.query_head(s, 6)
    assert flops.visual_forward(s, [3]) == pytest.approx(expected)
    assert flops.text_forward(s, [3], [5], 0) == pytest.approx(flops.llm_pass(s, 11))
    steps = sum(2 * flops.query_pass(s) + flops.llm_pass(s, 2, 2 * (t + 1)) + flops.query_head(s, 2) for t in range(3))
    assert flops.autoregressive(s, 3, with_patch_pass=False) == pytest.approx(steps)


def test_configs_without_num_queries_build_one_query(tiny_dino, tiny_llm):
    model = FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM)
    config = {"format": "fovlm", "llm_config": tiny_llm.config.to_dict(),
              "vision_config": tiny_dino.config.to_dict(), "query_dim": QUERY_DIM, "visual_scale": 0.14,
              "deep_query": True}
    rebuilt = build_from_config(config, FoveatedVLM)
    assert rebuilt.num_queries == 1 and rebuilt.q_static.shape == model.q_static.shape == (1, QUERY_DIM)
    rebuilt.load_state_dict(model.state_dict())  # a one-query state dict loads unchanged
    assert build_from_config({**config, "num_queries": 4}, FoveatedVLM).q_init.shape == (4, QUERY_DIM)


def test_use_queries_names_the_model_when_k_is_not_held(vlm_k3):
    use_queries(vlm_k3, None, "m")
    assert vlm_k3.active_queries == 3
    use_queries(vlm_k3, 2, "m")
    assert vlm_k3.active_queries == 2
    with pytest.raises(CheckpointError, match="runs/x.ckpt holds 1 to 3 queries per frame, not 4"):
        use_queries(vlm_k3, 4, "runs/x.ckpt")
