"""Packing: samples share LLM rows, each attending only to itself; every output equals the one-row-per-sample layout."""

import pytest
import torch
from tiny_models import QUERY_DIM, TOL, random_frames

from fovlm.model.layout import build_layout
from fovlm.model.packing import first_fit_decreasing, one_per_row, padding_share, positions, tightest
from fovlm.model.vlm import FoveatedVLM


def test_first_fit_decreasing_places_every_sample_without_overlap():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (40,), generator=gen)
    placement = first_fit_decreasing(lengths, 100)
    assert placement.width <= 100
    used = torch.zeros(placement.rows, placement.width, dtype=torch.long)
    for r, o, n in zip(placement.row.tolist(), placement.offset.tolist(), lengths.tolist(), strict=True):
        assert o + n <= placement.width
        used[r, o: o + n] += 1
    assert used.max() == 1  # no two samples share a position
    assert placement.rows == -(-int(lengths.sum()) // 100)  # this mix packs into the fewest rows possible
    again = first_fit_decreasing(lengths, 100)
    assert torch.equal(again.row, placement.row) and torch.equal(again.offset, placement.offset)  # deterministic


def test_rows_are_at_least_the_longest_sample():
    placement = first_fit_decreasing(torch.tensor([5, 3, 2]), 1)
    assert (placement.rows, placement.width) == (2, 5)
    assert placement.row.tolist() == [0, 1, 1] and placement.offset.tolist() == [0, 0, 3]
    assert positions(placement, torch.tensor([5, 3, 2])).tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert padding_share(torch.tensor([5, 3, 2]), 1) == 0.0
    assert padding_share(torch.tensor([5, 3, 2]), None) == pytest.approx(1 - 10 / 15)
    assert one_per_row(torch.tensor([5, 3, 2])).rows == 3


def test_padding_after_a_rows_last_sample_continues_its_positions():
    lengths = torch.tensor([4, 2, 3])
    placement = first_fit_decreasing(lengths, 6)  # [4, 2] and [3]: the fullest row sets the width
    assert positions(placement, lengths).tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]


def test_tightest_packing_pads_least_within_the_budget():
    lengths = torch.tensor([4, 3, 2])
    assert (tightest(lengths, 1).rows, tightest(lengths, 1).width) == (3, 4)  # the longest sample's width
    assert (tightest(lengths, 7).rows, tightest(lengths, 7).width) == (2, 5)  # [4] and [3, 2]: 1 pad of 10
    assert (tightest(lengths, 9).rows, tightest(lengths, 9).width) == (1, 9)  # no padding
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        lengths = torch.randint(1, 300, (16,), generator=gen)
        best = tightest(lengths, 600)
        assert best.width <= 600
        assert best.rows * best.width <= min(first_fit_decreasing(lengths, w).rows * first_fit_decreasing(lengths, w).width
                                             for w in (300, 400, 600))


def test_packed_layout_indexes_each_sample_in_its_own_slot():
    num_frames, text_mask = torch.tensor([2, 0, 1]), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    plain = build_layout(num_frames, text_mask, torch.tensor([1, 0, 0]))
    packed = build_layout(num_frames, text_mask, torch.tensor([1, 0, 0]), pack_tokens=7)
    # lengths 4, 3, 2: sample 0 alone in row 0, samples 1 and 2 in row 1 (5 wide: one padded position)
    assert (plain.rows, plain.width, packed.rows, packed.width) == (3, 4, 2, 5)
    assert packed.attention_mask is None and plain.attention_mask is not None
    assert packed.visual_index.tolist() == [1, 2, 8]  # sample 0: [text, 2 visual, text]; sample 2 at row 1, col 3
    assert packed.text_index[packed.text_valid].tolist() == [0, 3, 5, 6, 7, 9]
    taken = torch.cat([packed.visual_index, packed.text_index[packed.text_valid]])
    assert len(set(taken.tolist())) == len(taken)  # no two tokens in one slot


def batch(vocab: int = 49152):
    """Mixed lengths: long and short clips, a text-only sample, a one-frame sample with a long text."""
    gen = torch.Generator().manual_seed(3)
    num_frames = torch.tensor([3, 0, 1, 2, 1, 4])
    lengths = torch.tensor([7, 12, 3, 20, 5, 2])
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen) * mask
    visual_at = torch.tensor([2, 0, 1, 5, 3, 0])
    return random_frames(int(num_frames.sum())), num_frames, ids, mask, visual_at


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("question_first", [False, True])
@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_packed_logits_equal_unpacked(tiny_dino, tiny_llm, k, question_first, mode):
    model = FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=k).eval()
    frames, num_frames, ids, mask, visual_at = batch()
    at = visual_at if question_first else None
    with torch.no_grad():
        plain = model(frames, num_frames, ids, mask, mode=mode, logits_mask=mask.bool(), visual_at=at,
                      return_coarse_logits=True)
        for pack_tokens in (1, 64):
            model.use_packing(pack_tokens)
            packed = model(frames, num_frames, ids, mask, mode=mode, logits_mask=mask.bool(), visual_at=at,
                           return_coarse_logits=True)
            torch.testing.assert_close(packed.logits, plain.logits, **TOL)
            torch.testing.assert_close(packed.coarse_logits, plain.coarse_logits, **TOL)
    lengths = num_frames * k + mask.sum(1)
    assert padding_share(lengths, 1) < padding_share(lengths, None)  # the batch really was packed


def test_packed_gradients_equal_unpacked(tiny_dino, tiny_llm):
    model = FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM, num_queries=2).train()
    frames, num_frames, ids, mask, visual_at = batch()
    grads = []
    for pack_tokens in (None, 1):
        model.use_packing(pack_tokens)
        model.zero_grad(set_to_none=True)
        out = model(frames, num_frames, ids, mask, logits_mask=mask.bool(), visual_at=visual_at)
        out.logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_dpo_pair_equals_unpacked(tiny_vlm):
    frames, num_frames, ids, mask, _ = batch()
    rejected_ids, rejected_mask = ids[:, :9].flip(0), mask[:, :9].flip(0)
    rejected_mask[rejected_mask.sum(1) == 0, 0] = 1
    chosen, rejected = (ids, mask, mask.bool()), (rejected_ids, rejected_mask, rejected_mask.bool())
    with torch.no_grad():
        plain = tiny_vlm.forward_pair(frames, num_frames, chosen, rejected)
        tiny_vlm.use_packing(1)
        packed = tiny_vlm.forward_pair(frames, num_frames, chosen, rejected)
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_packing_must_be_positive(tiny_vlm):
    with pytest.raises(ValueError, match="pack_tokens"):
        tiny_vlm.use_packing(0)
