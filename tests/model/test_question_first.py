"""The question-first layout: [question ; visual tokens ; rest of the text] per sample, in every mode, equal to a
per-sample computation written out here (plain Hugging Face forwards, no cache), batched or not, at k = 1 and 2."""

import pytest
import torch
from tiny_models import QUERY_DIM, TOL, assert_shared_scoring_is_per_option_scoring, random_frames

from fovlm.data.roles import ROLE_ANSWER, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER, question_end
from fovlm.eval.questions import render_options
from fovlm.eval.scoring import question_length
from fovlm.losses import AnswerOnlyCE, selected_targets, shift_labels
from fovlm.model.generate import generate
from fovlm.model.layout import join_text, split_text
from fovlm.model.vlm import MODES, FoveatedVLM


@pytest.fixture
def vlm(tiny_dino, tiny_llm) -> FoveatedVLM:
    return FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=2, question_first=True).eval()


def tokens_of(m, queries, cache):
    z, _ = m.encoder.query_attend(queries, cache)  # [n, k, D]
    return m.visual_scale * m.dino_to_llm(z.flatten(0, 1))


def per_sample(m: FoveatedVLM, mode: str, frames: torch.Tensor, ids: torch.Tensor, p: int) -> torch.Tensor:
    """Logits predicting each text token's successor [S, V] for one sample laid out [ids[:p] ; visual ; ids[p:]]."""
    k, n, s = m.active_queries, len(frames), len(ids)
    text = m.llm.get_input_embeddings()(ids)  # [S, Dl]
    head, tail = text[:p], text[p:]

    def after_question(visual):  # hidden states at the visual positions of [head ; visual]
        return m.llm.model(inputs_embeds=torch.cat([head, visual])[None]).last_hidden_state[0, p:]

    if n == 0:
        visual = text[:0]
    else:
        cache = m.encoder.encode_patches(frames)
        coarse = tokens_of(m, m.q_static[:k].expand(n, k, -1), cache)
        if mode == "coarse_only":
            visual = coarse
        elif mode == "coarse_fine":
            made = m.llm_to_query(after_question(coarse)).view(n, k, -1)
            visual = tokens_of(m, torch.cat([m.q_init[:k][None], made[:-1]]), cache)
        else:
            steps, query = [], m.q_init[:k]
            for t in range(n):
                steps.append(tokens_of(m, query[None], cache.select(torch.tensor([t]))))
                query = m.llm_to_query(after_question(torch.cat(steps))[-k:])
            visual = torch.cat(steps)
    logits = m.llm(inputs_embeds=torch.cat([head, visual, tail])[None]).logits[0]  # [p + n*k + S - p, V]
    position = torch.arange(s) + torch.where(torch.arange(s) >= p, n * k, 0)  # sequence index of each token
    # just before the next token; the last token: itself, or the last visual token when the visual tokens follow it
    last = p + n * k - 1 if p == s and n > 0 else position[-1]
    predictor = torch.cat([position[1:] - 1, torch.tensor([last])])
    return logits[predictor]


def roles_for(lengths, question):
    """Roles of samples: system (2), user (question - 2), then template/answer tokens, right-padded."""
    width = max(lengths)
    roles = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, (n, q) in enumerate(zip(lengths, question, strict=True)):
        roles[b, :n] = ROLE_ANSWER
        roles[b, :q] = ROLE_USER
        roles[b, : min(2, q)] = ROLE_SYSTEM
        if q < n:
            roles[b, q] = ROLE_TEMPLATE
    return roles


def test_question_end_reads_the_roles():
    roles = roles_for([7, 5, 4], [3, 5, 2])
    assert question_end(roles).tolist() == [3, 5, 2]
    assert question_end(torch.tensor([[ROLE_TEMPLATE, ROLE_ANSWER]])).tolist() == [0]


def test_split_and_join_are_inverse():
    ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9], [7, 0, 0, 0, 0]])
    at = torch.tensor([2, 5, 0])
    head_ids, head_mask, tail_ids, tail_mask = split_text(ids, (ids > 0).long(), at)
    assert head_ids.tolist() == [[5, 6, 0, 0, 0], [1, 2, 3, 4, 9], [0, 0, 0, 0, 0]]
    assert tail_ids.tolist() == [[7, 8], [0, 0], [7, 0]] and tail_mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    assert join_text(head_ids, tail_ids, at, 5).tolist() == ids.tolist()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [2, 1])
def test_every_mode_equals_the_per_sample_computation(vlm, mode, k):
    vlm.use_queries(k)
    num_frames = torch.tensor([3, 0, 2, 1])
    lengths, question = [7, 5, 8, 4], [3, 5, 2, 4]
    ids = torch.randint(0, 49152, (4, 8))
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    frames = random_frames(int(num_frames.sum()))
    visual_at = question_end(roles_for(lengths, question))
    starts = torch.cumsum(num_frames, 0) - num_frames
    with torch.no_grad():
        out = vlm(frames, num_frames, ids, mask, mode=mode, visual_at=visual_at, return_coarse_logits=True,
                  return_autoregressive_logits=mode != "autoregressive")
        for b in range(4):
            own = frames[starts[b] : starts[b] + num_frames[b]]
            n = lengths[b]
            expected = per_sample(vlm, mode, own, ids[b, :n], question[b])
            torch.testing.assert_close(out.logits[b, :n], expected, **TOL)
            torch.testing.assert_close(out.coarse_logits[b, :n], per_sample(vlm, "coarse_only", own, ids[b, :n],
                                                                            question[b]), **TOL)
            if mode != "autoregressive":
                torch.testing.assert_close(out.autoregressive_logits[b, :n],
                                           per_sample(vlm, "autoregressive", own, ids[b, :n], question[b]), **TOL)


def test_zero_visual_at_is_the_visual_first_layout(vlm):
    num_frames = torch.tensor([2, 1])
    ids = torch.randint(0, 49152, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    frames = random_frames(3)
    with torch.no_grad():
        for mode in MODES:
            torch.testing.assert_close(
                vlm(frames, num_frames, ids, mask, mode=mode, visual_at=torch.zeros(2, dtype=torch.long)).logits,
                vlm(frames, num_frames, ids, mask, mode=mode).logits, **TOL)


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_forward_pair_shares_the_question(vlm, mode):
    num_frames = torch.tensor([2, 1])
    frames = random_frames(3)
    chosen = torch.randint(0, 49152, (2, 7))
    rejected = torch.cat([chosen[:, :4], torch.randint(0, 49152, (2, 2))], 1)
    at = torch.tensor([3, 4])
    ones = torch.ones_like
    with torch.no_grad():
        got_c, got_r = vlm.forward_pair(frames, num_frames, (chosen, ones(chosen), None),
                                        (rejected, ones(rejected), None), mode=mode, visual_at=at)
        want_c = vlm(frames, num_frames, chosen, ones(chosen), mode=mode, visual_at=at).logits
        want_r = vlm(frames, num_frames, rejected, ones(rejected), mode=mode, visual_at=at).logits
    torch.testing.assert_close(got_c, want_c, **TOL)
    torch.testing.assert_close(got_r, want_r, **TOL)


def test_scoring_shares_the_visual_pass_after_the_question(vlm, tokenizer):
    vlm.use_queries(2)
    frames = random_frames(3)
    options = render_options(tokenizer, "Which colour is the square?", ["red", "a green one", "blue"])
    assert 0 < question_length(vlm, options) < options.prefix_ids.shape[0]
    assert_shared_scoring_is_per_option_scoring(vlm, frames, options)


def test_generation_reads_the_question_first(vlm):
    frames = random_frames(2)
    prompt = torch.randint(0, 49152, (7,))
    with torch.no_grad():
        answer = generate(vlm, frames, prompt, stop_ids=[], max_new_tokens=2, question_len=4)
        logits = vlm(frames, torch.tensor([2]), prompt[None], torch.ones(1, 7, dtype=torch.long),
                     mode="autoregressive", visual_at=torch.tensor([4])).logits
    assert answer.token_ids[0] == int(logits[0, -1].argmax())


def test_the_loss_heads_lay_out_a_question_first_model(vlm):
    lengths, question = [7, 6], [3, 4]
    roles = roles_for(lengths, question)
    mask = (roles != 0).long()
    batch = {"frames": random_frames(3), "num_frames": torch.tensor([2, 1]),
             "input_ids": torch.randint(1, 49152, (2, 7)) * mask, "attention_mask": mask, "roles": roles,
             "source": ["a", "b"]}
    head = AnswerOnlyCE()
    with torch.no_grad():
        out = head(vlm, batch, mode="coarse_fine")
        labels = shift_labels(batch["input_ids"], roles == ROLE_ANSWER)
        logits_mask, targets, _ = selected_targets(labels)
        logits = vlm(batch["frames"], batch["num_frames"], batch["input_ids"], mask, mode="coarse_fine",
                     logits_mask=logits_mask, visual_at=torch.tensor(question)).logits
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, targets), **TOL)


def test_an_export_keeps_the_layout_and_the_queries(vlm, tokenizer, tmp_path):
    from fovlm.export import export_model
    from fovlm.model.pretrained import load_pretrained

    export_model(vlm, tokenizer, tmp_path / "out")
    loaded = load_pretrained(tmp_path / "out")
    assert (loaded.question_first, loaded.num_queries, loaded.active_queries) == (True, 2, 2)
    assert "after the question" in (tmp_path / "out" / "README.md").read_text()
