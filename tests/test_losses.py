"""Tests for fovlm.losses: shift convention, cross-entropy, sequence log-probs, DPO and the loss heads."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fovlm.data.roles import IGNORE_INDEX, ROLE_ANSWER, ROLE_PAD, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER
from fovlm.losses import (
    DPO,
    AllTextCE,
    AnswerOnlyCE,
    box_patches,
    build_loss_head,
    dpo_loss,
    look_loss,
    selected_targets,
    sequence_logps,
    shift_labels,
    token_cross_entropy,
    visual_positions,
)

S, U, T, A, P = ROLE_SYSTEM, ROLE_USER, ROLE_TEMPLATE, ROLE_ANSWER, ROLE_PAD


def test_role_constants_match_the_contract():
    assert (IGNORE_INDEX, ROLE_PAD, ROLE_SYSTEM, ROLE_USER, ROLE_TEMPLATE, ROLE_ANSWER) == (-100, 0, 1, 2, 3, 4)


def test_shift_labels_by_hand():
    input_ids = torch.tensor([[1, 7, 8, 9, 2], [1, 5, 6, 0, 0]])
    score = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labels = shift_labels(input_ids, score)
    # position j holds token j+1 when token j+1 is scored; the last column never has a target
    expected = torch.tensor([[7, -100, 9, 2, -100], [5, 6, -100, -100, -100]])
    assert torch.equal(labels, expected)


def test_cross_entropy_equals_hand_worked_example():
    ln2, ln3, ln4 = math.log(2), math.log(3), math.log(4)
    # row 0 uniform over 3 classes: NLL ln 3 whatever the target
    # row 1 logits [ln 2, 0, 0] -> probs [1/2, 1/4, 1/4]: target 0 costs ln 2, target 2 costs ln 4
    logits = torch.tensor([[0.0, 0.0, 0.0], [ln2, 0.0, 0.0], [ln2, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([1, 0, 2])
    loss, n = token_cross_entropy(logits, targets)
    assert n == 3
    assert loss.item() == pytest.approx((ln3 + ln2 + ln4) / 3, abs=1e-6)


def test_cross_entropy_without_scored_tokens_is_zero_with_a_graph():
    logits = torch.randn(0, 11, requires_grad=True)
    loss, n = token_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert n == 0
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 11)


def test_sequence_logps_match_a_naive_loop():
    torch.manual_seed(1)
    labels = torch.tensor([[5, -100, 3, 2, -100], [-100, -100, -100, -100, -100], [4, 4, -100, 1, -100]])
    logits_mask, targets, sample_index = selected_targets(labels)
    full = torch.randn(3, 5, 7, dtype=torch.float64)  # [B, S, V]
    rows = full[logits_mask]  # [N, V], the model's row order
    got = sequence_logps(rows, targets, sample_index, batch_size=3)
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for j in range(5):
            if labels[b, j] != IGNORE_INDEX:
                expected[b] += torch.log_softmax(full[b, j], -1)[labels[b, j]]
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert got[1].item() == 0.0  # a sequence with no scored token contributes nothing


# ---------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_equal_policy_and_reference_gives_ln2_and_accuracy_0():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    rejected = torch.tensor([-10.0, -7.0, -41.0])
    loss, losses, metrics = dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert metrics["rewards/accuracies"].item() == 0.0
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["logps/chosen"].item() == pytest.approx(logps.mean().item())
    assert metrics["logps/rejected"].item() == pytest.approx(rejected.mean().item())


def test_dpo_positive_margin_is_below_ln2_with_accuracy_1_and_matches_formula():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-30.0, -25.0])
    rc, rr = torch.tensor([-12.0, -21.0]), torch.tensor([-28.0, -24.0])
    beta = 0.1
    loss, _, metrics = dpo_loss(pc, pr, rc, rr, beta)
    margins = beta * ((pc - rc) - (pr - rr))  # [0.4, 0.2]
    assert loss.item() < math.log(2)
    assert loss.item() == pytest.approx(-F.logsigmoid(margins).mean().item(), abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["rewards/chosen"].item() == pytest.approx((beta * (pc - rc)).mean().item())
    assert metrics["rewards/rejected"].item() == pytest.approx((beta * (pr - rr)).mean().item())
    assert metrics["rewards/margins"].item() == pytest.approx(margins.mean().item())


def test_dpo_beta_scales_the_rewards():
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0])
    _, _, m1 = dpo_loss(pc, pr, rc, rr, beta=0.1)
    _, _, m3 = dpo_loss(pc, pr, rc, rr, beta=0.3)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m3[key].item() == pytest.approx(3 * m1[key].item())
    assert m3["logps/chosen"].item() == m1["logps/chosen"].item()


# ---------------------------------------------------------------------------------------------------------
# Loss heads on a small stand-in model with the FoveatedVLM call signature (next token from the current one)


class BigramVLM(nn.Module):
    def __init__(self, vocab: int = 16):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.coarse_table = nn.Embedding(vocab, vocab)
        self.ar_table = nn.Embedding(vocab, vocab)
        self.calls = []

    def forward(self, frames, num_frames, input_ids, attention_mask, mode="coarse_fine", logits_mask=None,
                return_coarse_logits=False, return_autoregressive_logits=False, visual_at=None):
        self.calls.append(mode)
        logits = self.table(input_ids)  # [B, S, V]
        coarse = self.coarse_table(input_ids) if return_coarse_logits else None
        ar = self.ar_table(input_ids) if return_autoregressive_logits else None
        if logits_mask is not None:
            logits = logits[logits_mask]
            coarse = coarse[logits_mask] if coarse is not None else None
            ar = ar[logits_mask] if ar is not None else None
        return SimpleNamespace(logits=logits, coarse_logits=coarse, autoregressive_logits=ar)

    def forward_pair(self, frames, num_frames, chosen, rejected, mode="coarse_fine", visual_at=None):
        return tuple(
            self(frames, num_frames, ids, att, mode=mode, logits_mask=lm).logits for ids, att, lm in (chosen, rejected)
        )


# system turn, user turn, assistant header (template), answer + <|im_end|>, trailing "\n" (template), padding
ROLES = torch.tensor([[S, S, S, U, U, U, T, T, A, A, A, T, P, P]])
IDS = torch.tensor([[1, 3, 2, 1, 4, 2, 1, 5, 9, 10, 2, 11, 0, 0]])


def sft_batch():
    return {
        "frames": torch.zeros(0, 3, 224, 224),
        "num_frames": torch.zeros(1, dtype=torch.long),
        "input_ids": IDS,
        "attention_mask": (ROLES != P).long(),
        "roles": ROLES,
        "source": ["x"],
        "key": ["k"],
    }


def scored_tokens(head):
    labels = shift_labels(IDS, head.score_mask(ROLES))
    return [j + 1 for j in range(IDS.shape[1]) if labels[0, j] != IGNORE_INDEX]  # indices of target tokens


def test_answer_only_head_scores_the_answer_and_its_im_end_only():
    assert scored_tokens(AnswerOnlyCE()) == [8, 9, 10]  # "9 10" and <|im_end|>, nothing of system/user/template


def test_all_text_head_scores_every_text_token_but_the_first():
    assert scored_tokens(AllTextCE()) == list(range(1, 12))  # all real tokens after token 0, no padding


@pytest.mark.parametrize("head", [AllTextCE(), AnswerOnlyCE()])
def test_ce_head_equals_mean_token_nll_of_its_targets(head):
    model = BigramVLM()
    out = head(model, sft_batch())
    full = model.table(IDS)[0]  # [S, V]
    targets = scored_tokens(head)
    expected = torch.stack([F.cross_entropy(full[t - 1], IDS[0, t]) for t in targets]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.num_scored == len(targets)
    assert out.sample_weight.tolist() == [len(targets)]
    assert out.sample_loss.item() == pytest.approx(expected.item() * len(targets), abs=1e-5)


def test_ce_head_adds_the_weighted_coarse_loss_and_reports_both_parts():
    model = BigramVLM()
    out = AnswerOnlyCE()(model, sft_batch(), lambda_coarse=0.5)
    fine, coarse = out.metrics["loss_fine"], out.metrics["loss_coarse"]
    assert coarse.item() != fine.item()
    assert out.loss.item() == pytest.approx(fine.item() + 0.5 * coarse.item(), abs=1e-6)


def test_ce_head_adds_both_weighted_auxiliary_losses():
    model = BigramVLM()
    out = AnswerOnlyCE()(model, sft_batch(), lambda_coarse=0.5, lambda_ar=0.25)
    fine, coarse, ar = (out.metrics[f"loss_{k}"] for k in ("fine", "coarse", "autoregressive"))
    assert len({fine.item(), coarse.item(), ar.item()}) == 3
    assert out.loss.item() == pytest.approx(fine.item() + 0.5 * coarse.item() + 0.25 * ar.item(), abs=1e-6)
    only_ar = AnswerOnlyCE()(model, sft_batch(), lambda_ar=0.25)
    assert "loss_coarse" not in only_ar.metrics
    assert only_ar.loss.item() == pytest.approx(fine.item() + 0.25 * ar.item(), abs=1e-6)


def test_ce_head_passes_the_mode_through():
    model = BigramVLM()
    AllTextCE()(model, sft_batch(), mode="coarse_only")
    assert model.calls == ["coarse_only"]


def test_ce_head_on_a_batch_without_answers_gives_zero_and_counts_it():
    batch = sft_batch()
    batch["roles"] = torch.where(ROLES == A, torch.full_like(ROLES, U), ROLES)
    model = BigramVLM()
    out = AnswerOnlyCE()(model, batch)
    assert out.num_scored == 0 and out.loss.item() == 0.0
    out.loss.backward()  # still a graph: backward must run
    assert torch.count_nonzero(model.table.weight.grad) == 0


def preference_batch():
    # two pairs; chosen and rejected answers use disjoint tokens so one step can move them apart
    prompt = [1, 3, 2, 1, 4, 2, 1, 5]
    prompt_roles = [S, S, S, U, U, U, T, T]
    chosen = torch.tensor([prompt + [9, 10, 2, 11], prompt + [9, 9, 2, 11]])
    rejected = torch.tensor([prompt + [12, 13, 2, 11], prompt + [13, 12, 2, 11]])
    roles = torch.tensor([prompt_roles + [A, A, A, T]] * 2)
    return {
        "frames": torch.zeros(0, 3, 224, 224),
        "num_frames": torch.zeros(2, dtype=torch.long),
        "chosen_input_ids": chosen,
        "chosen_attention_mask": torch.ones_like(chosen),
        "chosen_roles": roles,
        "rejected_input_ids": rejected,
        "rejected_attention_mask": torch.ones_like(rejected),
        "rejected_roles": roles.clone(),
        "source": ["p", "p"],
        "key": ["a", "b"],
    }


def pair_logps(model, batch):
    head = DPO()
    out = []
    for side in ("chosen", "rejected"):
        labels = shift_labels(batch[f"{side}_input_ids"], head.score_mask(batch[f"{side}_roles"]))
        logits_mask, targets, index = selected_targets(labels)
        logits = model.table(batch[f"{side}_input_ids"])[logits_mask]
        out.append(sequence_logps(logits, targets, index, 2))
    return out


def test_dpo_head_at_the_reference_gives_ln2_and_one_step_moves_chosen_up_rejected_down():
    torch.manual_seed(0)
    policy, reference = BigramVLM(), BigramVLM()
    reference.load_state_dict(policy.state_dict())
    batch = preference_batch()
    head = DPO(beta=0.1)
    out = head(policy, batch, reference=reference)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0
    assert out.num_scored == 12  # 3 answer targets per sequence, 4 sequences

    before_chosen, before_rejected = (x.detach() for x in pair_logps(policy, batch))
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    optimizer.step()
    after_chosen, after_rejected = (x.detach() for x in pair_logps(policy, batch))
    assert torch.all(after_chosen > before_chosen)
    assert torch.all(after_rejected < before_rejected)

    out2 = head(policy, batch, reference=reference)
    assert out2.loss.item() < math.log(2)
    assert out2.metrics["rewards/accuracies"].item() == 1.0
    assert out2.metrics["rewards/chosen"].item() > 0 > out2.metrics["rewards/rejected"].item()


def test_dpo_head_needs_a_reference_passes_the_mode_and_refuses_a_coarse_loss():
    with pytest.raises(ValueError, match="reference"):
        DPO()(BigramVLM(), preference_batch())
    policy, reference = BigramVLM(), BigramVLM()
    DPO()(policy, preference_batch(), reference=reference, mode="coarse_only")
    assert policy.calls == reference.calls == ["coarse_only", "coarse_only"]
    with pytest.raises(ValueError, match="lambda_coarse"):
        DPO()(BigramVLM(), preference_batch(), reference=BigramVLM(), lambda_coarse=0.5)
    with pytest.raises(ValueError, match="lambda_ar"):
        DPO()(BigramVLM(), preference_batch(), reference=BigramVLM(), lambda_ar=0.5)
    with pytest.raises(ValueError, match="beta"):
        DPO(beta=0.0)


def test_build_loss_head_by_name():
    assert isinstance(build_loss_head("all_text"), AllTextCE)
    assert isinstance(build_loss_head("answer_only"), AnswerOnlyCE)
    assert build_loss_head("dpo", beta=0.25).beta == 0.25
    with pytest.raises(ValueError, match="text_ce_all"):
        build_loss_head("text_ce_all")


@pytest.mark.real
def test_heads_on_a_real_smollm2_rendering(tokenizer):
    from fovlm.data.chat import render_chat

    messages = [
        {"role": "user", "content": "What colour is the ball?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And the box?"},
        {"role": "assistant", "content": "Red, with a lid."},
    ]
    ids, roles = render_chat(tokenizer, messages)
    ids_t, roles_t = torch.tensor([ids]), torch.tensor([roles])

    answer = shift_labels(ids_t, AnswerOnlyCE().score_mask(roles_t))[0]
    targets = answer[answer != IGNORE_INDEX].tolist()
    # both answers with their closing <|im_end|>; nothing of the system or user turns or assistant headers
    assert tokenizer.decode(targets) == "Blue.<|im_end|>Red, with a lid.<|im_end|>"

    every = shift_labels(ids_t, AllTextCE().score_mask(roles_t))[0]
    assert every[:-1].tolist() == ids[1:] and every[-1].item() == IGNORE_INDEX
    assert tokenizer.decode(ids[:1]) == "<|im_start|>"  # token 0, never a target


# ---------------------------------------------------------------------------------------------------------------
# the look loss


def test_box_patches_by_hand():
    inside = box_patches(torch.tensor([[1 / 3, 0.0, 2 / 3, 1 / 3]]), 6)  # row 1, column 2 of a 3 x 3 grid
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(inside[0], expected.flatten())


def test_look_loss_counts_the_written_queries_on_the_frames_that_hold_the_region():
    grid, heads, k = 4, 2, 2
    keys = 1 + grid * grid
    num_frames = torch.tensor([3, 2, 2])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [float("nan")] * 4])
    inside = box_patches(boxes[:2], grid)  # [2, 16], 4 patches each
    attention = torch.full((7, heads, k, keys), 1 / keys)  # uniform everywhere
    # sample 0, frame 1: every query all on its region; frame 2 does not hold the region (by region_frames)
    attention[1] = 0.0
    attention[1, :, :, 1:][:, :, inside[0]] = 1 / 4
    region_frames = torch.tensor([True, True, False, True, True, True, True])
    loss, counted = look_loss(attention, num_frames, boxes, region_frames)
    # counted: sample 0 frame 1 (share 1) and sample 1 frame 1 (uniform, share 4/17); first frames and the
    # region-less sample are not
    assert counted == 2 * k
    assert loss.item() == pytest.approx(-math.log(4 / keys) / 2, rel=1e-5)
    none, zero = look_loss(attention, num_frames, boxes, torch.zeros(7, dtype=torch.bool))
    assert zero == 0 and none.item() == 0.0


def test_look_loss_shares_a_spread_answers_places_out_over_the_queries():
    keys = 10  # 1 CLS + one patch per cell of a 3 x 3 grid
    cells = [[c / 3, r / 3, (c + 1) / 3, (r + 1) / 3] for r in range(3) for c in range(3)]
    nan = [float("nan")] * 4
    # sample 0: the nine cells, spread; sample 1: one box (the centre cell), padded; 2 frames each
    boxes = torch.tensor([cells, [cells[4]] + [nan] * 8])
    spread, num_frames = torch.tensor([True, False]), torch.tensor([2, 2])
    region_frames = torch.ones(4, dtype=torch.bool)
    attention = torch.full((4, 1, 2, keys), 1 / keys)  # [F, h, k = 2, N], uniform
    attention[1, 0, 0] = 0.0
    attention[1, 0, 0, 1 + 8] = 1.0  # sample 0, query 0 on cell 8: one of its places (0 and 8 with K = 8)
    loss, counted = look_loss(attention, num_frames, boxes, region_frames, spread, spread_over=8)
    # readings: sample 0's queries 0 (share 1) and 1 (cell 1: 1/10), sample 1's queries 0 and 1 (cell 4: 1/10)
    assert counted == 4
    assert loss.item() == pytest.approx(3 * math.log(keys) / 4, rel=1e-5)
    # with K = 2, query 0 would read the even cells: five of them, 1/2 of a uniform query
    uniform = torch.full((4, 1, 2, keys), 1 / keys)
    loss, counted = look_loss(uniform, num_frames, boxes, region_frames, spread, spread_over=2)
    assert counted == 4
    assert loss.item() == pytest.approx((-math.log(5 / keys) - math.log(4 / keys) - 2 * math.log(1 / keys)) / 4,
                                        rel=1e-5)
    # more queries than places: the queries without a place are not counted
    three = torch.tensor([cells[:3]])
    wide = torch.full((2, 1, 8, keys), 1 / keys)
    assert look_loss(wide, torch.tensor([2]), three, torch.ones(2, dtype=torch.bool), torch.tensor([True]))[1] == 3
    with pytest.raises(ValueError, match="spread_over"):
        look_loss(wide, torch.tensor([2]), three, torch.ones(2, dtype=torch.bool), torch.tensor([True]), 4)


def test_look_loss_trains_the_query_head_through_the_written_queries():
    from transformers import Dinov2Model, LlamaForCausalLM

    from fovlm.model.loading import tiny_llm_config, tiny_vision_config
    from fovlm.model.vlm import FoveatedVLM

    model = FoveatedVLM(Dinov2Model(tiny_vision_config(image_size=56)), LlamaForCausalLM(tiny_llm_config()),
                        query_dim=32, num_queries=2)
    batch = sft_batch()
    batch.update(frames=torch.randn(3, 3, 56, 56), num_frames=torch.tensor([3]),
                 region_box=torch.tensor([[0.5, 0.0, 1.0, 0.5]]), region_frames=torch.ones(3, dtype=torch.bool))
    with_look = AnswerOnlyCE()(model, batch, lambda_look=0.5)
    without = AnswerOnlyCE()(model, batch)
    assert "loss_look" in with_look.metrics and "loss_look" not in without.metrics
    torch.testing.assert_close(with_look.loss, without.loss + 0.5 * with_look.metrics["loss_look"])
    out = model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                return_fine_attention=True)
    look, counted = look_loss(out.fine_attention[-1], batch["num_frames"], batch["region_box"], batch["region_frames"])
    assert counted == 2 * 2 and look.item() == pytest.approx(with_look.metrics["loss_look"].item(), rel=1e-5)
    look.backward()
    assert model.llm_to_query.weight.grad.abs().sum() > 0  # the written queries' head learns where to look
    # the first frame, read by q_init rather than a written query, is not counted
    assert model.q_init.grad is None or model.q_init.grad.abs().sum() == 0
    # a spread answer's places are shared out by the model's num_queries (2), not by the budget in use (1):
    # the one query reads the left half, and the right half is left to a second query
    model.use_queries(1)
    batch.update(region_box=torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]]),
                 region_spread=torch.tensor([True]))
    spread = AnswerOnlyCE()(model, batch, lambda_look=0.5).metrics["loss_look"]
    out = model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                return_fine_attention=True)
    left, counted = look_loss(out.fine_attention[-1], batch["num_frames"], batch["region_box"][:, :1],
                              batch["region_frames"])
    assert counted == 2 and spread.item() == pytest.approx(left.item(), rel=1e-5)


@pytest.mark.parametrize("question_first", [False, True])
def test_the_autoregressive_look_loss_is_taken_on_the_queries_the_autoregressive_pass_writes(question_first):
    from transformers import Dinov2Model, LlamaForCausalLM

    from fovlm.model.loading import tiny_llm_config, tiny_vision_config
    from fovlm.model.vlm import FoveatedVLM

    torch.manual_seed(0)
    model = FoveatedVLM(Dinov2Model(tiny_vision_config(image_size=56)), LlamaForCausalLM(tiny_llm_config()),
                        query_dim=32, num_queries=2, question_first=question_first)
    batch = sft_batch()
    batch.update(frames=torch.randn(3, 3, 56, 56), num_frames=torch.tensor([3]),
                 region_box=torch.tensor([[0.5, 0.0, 1.0, 0.5]]), region_frames=torch.ones(3, dtype=torch.bool))
    with_look = AnswerOnlyCE()(model, batch, lambda_ar=0.5, lambda_look_ar=0.3)
    without = AnswerOnlyCE()(model, batch, lambda_ar=0.5)
    assert "loss_look" not in with_look.metrics and "loss_look_autoregressive" not in without.metrics
    ar_look = with_look.metrics["loss_look_autoregressive"]
    torch.testing.assert_close(with_look.loss, without.loss + 0.3 * ar_look)
    # the same loss on the attention of true frame-by-frame inference, taken apart from the loss head
    head = None
    if question_first:
        visual_at = int(visual_positions(model, batch["roles"])[0])
        head = (batch["input_ids"][:, :visual_at], batch["attention_mask"][:, :visual_at])
    prefix = model.autoregressive_prefix(model.encode_patches(batch["frames"]), batch["num_frames"],
                                         return_attention=True, head=head)
    look, counted = look_loss(prefix.attention[-1], batch["num_frames"], batch["region_box"], batch["region_frames"])
    assert counted == 2 * 2 and look.item() == pytest.approx(ar_look.item(), rel=1e-5)
    # ... which are other queries than the coarse -> fine pass's
    fine = AnswerOnlyCE()(model, batch, lambda_look=0.3).metrics["loss_look"]
    assert abs(fine.item() - ar_look.item()) > 1e-4
    out = model(batch["frames"], batch["num_frames"], batch["input_ids"], batch["attention_mask"],
                mode="autoregressive", visual_at=visual_positions(model, batch["roles"]),
                return_autoregressive_attention=True)
    torch.testing.assert_close(out.autoregressive_attention[-1], prefix.attention[-1])
    look.backward()
    assert model.llm_to_query.weight.grad.abs().sum() > 0
    # no autoregressive pass (lambda_ar = 0 in coarse_fine), no autoregressive look loss
    assert "loss_look_autoregressive" not in AnswerOnlyCE()(model, batch, lambda_look_ar=0.3).metrics
