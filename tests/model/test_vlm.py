"""FoveatedVLM against step-by-step computations written here with plain Hugging Face calls."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import QUERY_DIM, TOL, random_frames
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.layout import build_layout
from fovlm.model.loading import build_vlm, tiny_llm_config, tiny_vision_config
from fovlm.model.vlm import MODES, FoveatedVLM

IGNORE = -100


# ------------------------------------------------------------------------------------------------ helpers


def shifted_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """labels[b, j] = input_ids[b, j+1] where that token is real, else IGNORE; the last column is IGNORE."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    return labels


def make_text(lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random right-padded text: (input_ids [B, S], attention_mask [B, S]); padding id 2 like SmolLM2."""
    width = width or max(lengths)
    ids = torch.randint(3, 5000, (len(lengths), width))
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 2), mask


def hf_text_logits(llm, embeds: torch.Tensor) -> torch.Tensor:
    """Plain HF causal LM on one unpadded sequence of embeddings [L, Dl] -> logits [L, V]."""
    return llm(inputs_embeds=embeds[None]).logits[0]


def reference_coarse_fine(m: FoveatedVLM, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """coarse_fine for ONE sample, step by step: returns logits at its text positions [S, V]."""
    n = len(frames)
    text = m.llm.get_input_embeddings()(ids)  # [S, Dl]
    if n == 0:
        return hf_text_logits(m.llm, text)
    cache = m.encoder.encode_patches(frames)
    z_coarse, _ = m.encoder.query_attend(m.q_static.expand(n, -1), cache)
    coarse = m.visual_scale * m.dino_to_llm(z_coarse)  # [T, Dl]
    h_coarse = m.llm.model(inputs_embeds=coarse[None]).last_hidden_state[0]  # [T, Dl]
    made = m.llm_to_query(h_coarse)  # [T, Dq]
    queries = torch.cat([m.q_init, made[:-1]])  # frame t reads with the query made at t-1
    z_fine, _ = m.encoder.query_attend(queries, cache)
    fine = m.visual_scale * m.dino_to_llm(z_fine)
    return hf_text_logits(m.llm, torch.cat([fine, text]))[n:]


def reference_coarse_only(m: FoveatedVLM, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """coarse_only for ONE sample: [static tokens ; text] through the plain LM -> text logits [S, V]."""
    n = len(frames)
    text = m.llm.get_input_embeddings()(ids)
    if n == 0:
        return hf_text_logits(m.llm, text)
    z, _ = m.encoder.query_attend(m.q_static.expand(n, -1), m.encoder.encode_patches(frames))
    return hf_text_logits(m.llm, torch.cat([m.visual_scale * m.dino_to_llm(z), text]))[n:]


def reference_autoregressive(m: FoveatedVLM, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """autoregressive for ONE sample without a KV cache: the whole prefix is recomputed at every step."""
    cache = m.encoder.encode_patches(frames)
    tokens, query = [], m.q_init
    for t in range(len(frames)):
        z, _ = m.encoder.query_attend(query, cache.select(torch.tensor([t])))
        tokens.append(m.visual_scale * m.dino_to_llm(z))
        hidden = m.llm.model(inputs_embeds=torch.cat(tokens)[None]).last_hidden_state[0, -1:]  # [1, Dl]
        query = m.llm_to_query(hidden)
    text = m.llm.get_input_embeddings()(ids)
    return hf_text_logits(m.llm, torch.cat([*tokens, text]))[len(frames) :]


REFERENCES = {
    "coarse_fine": reference_coarse_fine,
    "coarse_only": reference_coarse_only,
    "autoregressive": reference_autoregressive,
}


def mixed_batch(lengths=(7, 9, 5, 6), frames=(3, 5, 0, 1)):
    """A batch: sample 0 (3 frames), a longer video, a text-only sample, a shorter video."""
    num_frames = torch.tensor(frames)
    ids, mask = make_text(list(lengths))
    return random_frames(int(num_frames.sum())), num_frames, ids, mask


# -------------------------------------------------------------------------------------------------- tests


def test_layout_places_each_sample_at_its_own_start():
    num_frames = torch.tensor([2, 0, 1])
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    layout = build_layout(num_frames, text_mask)
    assert layout.width == 4  # sample 0: 2 + 2, sample 1: 0 + 3, sample 2: 1 + 1
    assert layout.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert layout.visual_index.tolist() == [0, 1, 8]
    valid_rows = layout.text_index[layout.text_valid].tolist()
    assert valid_rows == [2, 3, 4, 5, 6, 9]


def test_one_visual_token_per_real_frame(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch()
    cache = tiny_vlm.encode_patches(frames)
    for mode in ("coarse_only", "coarse_fine"):
        assert tiny_vlm.visual_tokens(cache, num_frames, mode).tokens.shape == (9, 64)
    with torch.no_grad():
        prefix = tiny_vlm.autoregressive_prefix(cache, num_frames)
    assert prefix.tokens.shape == (9, 64)
    assert prefix.attention_mask.sum(1).tolist() == [3, 5, 0, 1]
    assert build_layout(num_frames, mask).attention_mask.sum(1).tolist() == [10, 14, 5, 7]


def test_new_parameters_init(tiny_dino, tiny_llm):
    m = FoveatedVLM(tiny_dino, tiny_llm, query_dim=384)
    for q in (m.q_static, m.q_init):
        assert q.shape == (1, 384) and 0.85 < q.std().item() < 1.15 and abs(q.mean().item()) < 0.15
    assert m.encoder.query_input_proj.bias is None
    assert m.dino_to_llm.bias is not None and m.llm_to_query.bias is not None


def test_two_random_queries_read_different_tokens(tiny_vlm):
    cache = tiny_vlm.encode_patches(random_frames(1).expand(2, -1, -1, -1))
    tokens, _ = tiny_vlm.read_frames(torch.randn(2, QUERY_DIM), cache)
    assert F.cosine_similarity(tokens[0], tokens[1], dim=0) < 0.9


@pytest.mark.parametrize("mode", MODES)
def test_text_alone_equals_plain_hf_forward(tiny_vlm, mode):
    ids, mask = make_text([6, 9, 4])
    with torch.no_grad():
        logits = tiny_vlm(random_frames(0), torch.zeros(3, dtype=torch.long), ids, mask, mode=mode).logits
        expected = tiny_vlm.llm(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_modes_equal_step_by_step_reference(tiny_vlm, mode):
    """Each mode, batched over a mixed batch, equals the per-sample computation written out in this file."""
    frames, num_frames, ids, mask = mixed_batch()
    with torch.no_grad():
        logits = tiny_vlm(frames, num_frames, ids, mask, mode=mode).logits  # [B, S, V]
        starts = torch.cumsum(num_frames, 0) - num_frames
        for b in range(len(num_frames)):
            own = frames[starts[b] : starts[b] + num_frames[b]]
            n_text = int(mask[b].sum())
            expected = REFERENCES[mode](tiny_vlm, own, ids[b, :n_text])
            torch.testing.assert_close(logits[b, :n_text], expected, **TOL)


def test_coarse_fine_loss_equals_step_by_step(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch()
    labels = shifted_labels(ids, mask)
    logits_mask = labels != IGNORE
    with torch.no_grad():
        rows = tiny_vlm(frames, num_frames, ids, mask, mode="coarse_fine", logits_mask=logits_mask).logits
        loss = F.cross_entropy(rows, labels[logits_mask])
        starts = torch.cumsum(num_frames, 0) - num_frames
        ref_logits, ref_labels = [], []
        for b in range(len(num_frames)):
            n_text = int(mask[b].sum())
            own = frames[starts[b] : starts[b] + num_frames[b]]
            ref_logits.append(reference_coarse_fine(tiny_vlm, own, ids[b, :n_text])[:-1])
            ref_labels.append(ids[b, 1:n_text])
        ref_loss = F.cross_entropy(torch.cat(ref_logits), torch.cat(ref_labels))
    assert rows.shape == (int(logits_mask.sum()), 49152)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    per_token = F.cross_entropy(rows, labels[logits_mask], reduction="none")
    ref_per_token = F.cross_entropy(torch.cat(ref_logits), torch.cat(ref_labels), reduction="none")
    torch.testing.assert_close(per_token, ref_per_token, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_batch_invariance(tiny_vlm, mode):
    """Sample 0 alone and inside a batch with a longer video, a text-only sample and a shorter video."""
    frames, num_frames, ids, mask = mixed_batch()
    labels = shifted_labels(ids, mask)
    logits_mask = labels != IGNORE
    n0, s0 = int(num_frames[0]), int(mask[0].sum())
    with torch.no_grad():
        batched = tiny_vlm(frames, num_frames, ids, mask, mode, logits_mask, return_coarse_logits=True)
        alone = tiny_vlm(
            frames[:n0], num_frames[:1], ids[:1, :s0], mask[:1, :s0], mode, logits_mask[:1, :s0], True
        )
    of_sample0 = logits_mask.nonzero()[:, 0] == 0
    for got, ref in ((batched.logits, alone.logits), (batched.coarse_logits, alone.coarse_logits)):
        torch.testing.assert_close(got[of_sample0], ref, **TOL)
        loss_batched = F.cross_entropy(got[of_sample0], labels[logits_mask][of_sample0])
        loss_alone = F.cross_entropy(ref, labels[:1, :s0][logits_mask[:1, :s0]])
        torch.testing.assert_close(loss_batched, loss_alone, **TOL)


def test_auxiliary_autoregressive_logits_equal_the_autoregressive_mode(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch()
    logits_mask = shifted_labels(ids, mask) != IGNORE
    with torch.no_grad():
        out = tiny_vlm(frames, num_frames, ids, mask, "coarse_fine", logits_mask, return_autoregressive_logits=True)
        ar = tiny_vlm(frames, num_frames, ids, mask, "autoregressive", logits_mask)
    torch.testing.assert_close(out.autoregressive_logits, ar.logits, **TOL)
    assert not torch.allclose(out.logits, ar.logits, atol=1e-3)  # a different path: the fine pass differs


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_forward_pair_equals_two_forwards_and_is_batch_invariant(tiny_vlm, mode):
    frames, num_frames, chosen_ids, chosen_mask = mixed_batch()
    rejected_ids, rejected_mask = make_text([4, 11, 3, 8])
    chosen_lm = shifted_labels(chosen_ids, chosen_mask) != IGNORE
    rejected_lm = shifted_labels(rejected_ids, rejected_mask) != IGNORE
    with torch.no_grad():
        chosen, rejected = tiny_vlm.forward_pair(
            frames,
            num_frames,
            (chosen_ids, chosen_mask, chosen_lm),
            (rejected_ids, rejected_mask, rejected_lm),
            mode,
        )
        torch.testing.assert_close(
            chosen, tiny_vlm(frames, num_frames, chosen_ids, chosen_mask, mode, chosen_lm).logits, **TOL
        )
        torch.testing.assert_close(
            rejected,
            tiny_vlm(frames, num_frames, rejected_ids, rejected_mask, mode, rejected_lm).logits,
            **TOL,
        )
        n0, sc, sr = int(num_frames[0]), int(chosen_mask[0].sum()), int(rejected_mask[0].sum())
        alone_c, alone_r = tiny_vlm.forward_pair(
            frames[:n0],
            num_frames[:1],
            (chosen_ids[:1, :sc], chosen_mask[:1, :sc], chosen_lm[:1, :sc]),
            (rejected_ids[:1, :sr], rejected_mask[:1, :sr], rejected_lm[:1, :sr]),
            mode,
        )
    torch.testing.assert_close(chosen[chosen_lm.nonzero()[:, 0] == 0], alone_c, **TOL)
    torch.testing.assert_close(rejected[rejected_lm.nonzero()[:, 0] == 0], alone_r, **TOL)


def test_autoregressive_prefix_scores_several_texts(tiny_vlm):
    """One visual prefix, two texts in turn (truncating in between) == two full autoregressive forwards."""
    frames, num_frames, ids_a, mask_a = mixed_batch()
    ids_b, mask_b = make_text([3, 5, 8, 2])
    with torch.no_grad():
        prefix = tiny_vlm.autoregressive_prefix(tiny_vlm.encode_patches(frames), num_frames)
        for ids, mask in ((ids_a, mask_a), (ids_b, mask_b)):
            prefix.truncate()
            logits = tiny_vlm.lm_head(tiny_vlm.continue_text(prefix, ids, mask))
            full = tiny_vlm(frames, num_frames, ids, mask, mode="autoregressive").logits
            torch.testing.assert_close(logits[mask.bool()], full[mask.bool()], **TOL)


def test_autoregressive_text_in_padded_chunks(tiny_vlm):
    """Text appended in two right-padded chunks == the same text, unpadded per sample, in one chunk."""
    frames, num_frames, first_ids, first_mask = mixed_batch(lengths=(2, 5, 3, 1))
    second_ids, second_mask = make_text([4, 1, 2, 3])
    first_len, second_len = first_mask.sum(1).tolist(), second_mask.sum(1).tolist()
    ids, mask = make_text([f + s for f, s in zip(first_len, second_len, strict=True)])
    for b in range(4):
        ids[b, : first_len[b] + second_len[b]] = torch.cat(
            [first_ids[b, : first_len[b]], second_ids[b, : second_len[b]]]
        )
    with torch.no_grad():
        prefix = tiny_vlm.autoregressive_prefix(tiny_vlm.encode_patches(frames), num_frames)
        first = tiny_vlm.lm_head(tiny_vlm.continue_text(prefix, first_ids, first_mask))  # [B, S1, V]
        second = tiny_vlm.lm_head(tiny_vlm.continue_text(prefix, second_ids, second_mask))  # [B, S2, V]
        full = tiny_vlm(frames, num_frames, ids, mask, mode="autoregressive").logits  # [B, S, V]
    for b in range(4):
        torch.testing.assert_close(first[b, : first_len[b]], full[b, : first_len[b]], **TOL)
        torch.testing.assert_close(
            second[b, : second_len[b]], full[b, first_len[b] : first_len[b] + second_len[b]], **TOL
        )
    assert prefix.next_positions.tolist() == [3 + 6, 5 + 6, 0 + 5, 1 + 4]


def test_autoregressive_step_feeds_one_token_per_sample(tiny_vlm):
    """Each visual step sends exactly one new token per sample to the LLM: nothing cached is recomputed."""
    frames, num_frames, _, _ = mixed_batch()
    fed = []
    hook = tiny_vlm.llm.get_decoder().register_forward_hook(
        lambda _m, _a, kwargs, _o: fed.append(
            (kwargs["inputs_embeds"].shape[:2], kwargs["past_key_values"].get_seq_length())
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            tiny_vlm.autoregressive_prefix(tiny_vlm.encode_patches(frames), num_frames)
    finally:
        hook.remove()
    assert [shape for shape, _ in fed] == [(4, 1)] * 5  # T_max = 5 steps, batch 4, one slot each
    assert [length for _, length in fed] == [1, 2, 3, 4, 5]  # the cache grows by one slot per step


def test_autoregressive_attention_is_in_frame_order(tiny_vlm):
    frames, num_frames, _, _ = mixed_batch()
    with torch.no_grad():
        cache = tiny_vlm.encode_patches(frames)
        prefix = tiny_vlm.autoregressive_prefix(cache, num_frames, return_attention=True)
        # Frame 0 of every sample is read with q_init: its token must equal a direct q_init read.
        firsts = (torch.cumsum(num_frames, 0) - num_frames)[num_frames > 0]
        direct, weights = tiny_vlm.read_frames(
            tiny_vlm.q_init.expand(len(firsts), -1), cache.select(firsts), True
        )
    torch.testing.assert_close(prefix.tokens[firsts], direct, **TOL)
    torch.testing.assert_close(prefix.attention[-1][firsts], weights[-1], **TOL)
    assert prefix.attention[0].shape == (9, 4, 1, 257)


def test_coarse_fine_gradients_reach_every_part(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch()
    labels = shifted_labels(ids, mask)
    logits_mask = labels != IGNORE
    rows = tiny_vlm.train()(frames, num_frames, ids, mask, "coarse_fine", logits_mask).logits
    F.cross_entropy(rows, labels[logits_mask]).backward()
    m = tiny_vlm
    params = {
        "q_static": m.q_static,
        "q_init": m.q_init,
        "connector": m.dino_to_llm.weight,
        "query head": m.llm_to_query.weight,
        "query_input_proj": m.encoder.query_input_proj.weight,
        "output_proj": m.encoder.output_proj.weight,
        "DINO patch embedding": m.encoder.dino.embeddings.patch_embeddings.projection.weight,
        "DINO layer 0 key": m.encoder.dino.encoder.layer[0].attention.k_proj.weight,
        "DINO layer 1 query": m.encoder.dino.encoder.layer[1].attention.q_proj.weight,
        "LLM embeddings": m.llm.get_input_embeddings().weight,
        "LLM layer 0": m.llm.model.layers[0].self_attn.q_proj.weight,
    }
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch(lengths=(5, 4, 3, 6), frames=(2, 1, 0, 1))
    labels = shifted_labels(ids, mask)
    logits_mask = labels != IGNORE
    tiny_vlm.train()

    def step():
        tiny_vlm.zero_grad()
        rows = tiny_vlm(frames, num_frames, ids, mask, "coarse_fine", logits_mask).logits
        loss = F.cross_entropy(rows, labels[logits_mask])
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in tiny_vlm.named_parameters() if p.grad is not None
        }

    loss_plain, grads_plain = step()
    tiny_vlm.set_gradient_checkpointing(llm=True, vision=True)
    assert tiny_vlm.llm.is_activation_checkpointing and tiny_vlm.encoder.patch_checkpointing
    loss_ckpt, grads_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss_plain, **TOL)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_runs(tiny_vlm, mode):
    frames, num_frames, ids, mask = mixed_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_vlm(frames, num_frames, ids, mask, mode=mode, return_coarse_logits=True)
    assert torch.isfinite(out.logits[mask.bool()].float()).all()
    assert torch.isfinite(out.coarse_logits[mask.bool()].float()).all()


@pytest.mark.parametrize("mode", MODES)
def test_bf16_llm_with_fp32_new_modules_runs(mode):
    """An LLM loaded in bf16 next to fp32 DINO and fp32 new parameters, without autocast."""
    m = build_vlm(query_dim=QUERY_DIM, dtype=torch.bfloat16).eval()
    frames, num_frames, ids, mask = mixed_batch()
    with torch.no_grad():
        out = m(frames, num_frames, ids, mask, mode=mode)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits[mask.bool()].float()).all()


def test_malformed_batches_are_rejected(tiny_vlm):
    frames, num_frames, ids, mask = mixed_batch()
    with pytest.raises(ValueError, match="sums to 9 but frames holds 8"):
        tiny_vlm(frames[:8], num_frames, ids, mask)
    with pytest.raises(ValueError, match="normalised floats"):
        tiny_vlm(frames.to(torch.uint8), num_frames, ids, mask)
    left_padded = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        tiny_vlm(frames, num_frames, ids, left_padded)
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_vlm(frames, num_frames, ids, mask, mode="fine")
    with pytest.raises(ValueError, match="padded text positions"):
        tiny_vlm(frames, num_frames, ids, mask, logits_mask=torch.ones_like(mask, dtype=torch.bool))


def test_build_vlm_tiny_and_from_folders(tmp_path):
    m = build_vlm(query_dim=16, deep_query=False)
    assert not m.encoder.deep_query and m.q_static.shape == (1, 16)
    LlamaForCausalLM(tiny_llm_config(vocab_size=300)).save_pretrained(tmp_path / "llm")
    Dinov2Model(tiny_vision_config(hidden_size=32, num_attention_heads=2)).save_pretrained(tmp_path / "vis")
    m = build_vlm(str(tmp_path / "llm"), str(tmp_path / "vis"))
    assert m.dino_to_llm.in_features == 32 and m.llm.config.vocab_size == 300


@pytest.mark.real
def test_real_smollm2_in_the_vlm(smollm2_dir, tokenizer):
    """Real SmolLM2 (width 576, GQA 9/3) inside the VLM: text-only parity with HF and batch invariance."""
    m = build_vlm(str(smollm2_dir), "tiny", query_dim=QUERY_DIM).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    real_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, S]
    ones = torch.ones_like(real_ids)
    with torch.no_grad():
        plain = m.llm(input_ids=real_ids).logits[0]
        frames, num_frames, ids, mask = mixed_batch(lengths=(5, 7, 4, 3), frames=(2, 3, 0, 1))
        alone_text = m(random_frames(0), torch.zeros(1, dtype=torch.long), real_ids, ones).logits[0]
        torch.testing.assert_close(alone_text, plain, atol=1e-4, rtol=1e-4)
        for mode in ("coarse_fine", "autoregressive"):  # the two paths with their own LLM calls
            batched = m(frames, num_frames, ids, mask, mode).logits
            alone = m(frames[:2], num_frames[:1], ids[:1, :5], mask[:1, :5], mode).logits
            torch.testing.assert_close(batched[0, :5], alone[0], atol=1e-4, rtol=1e-4)
