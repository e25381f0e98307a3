"""Attention share inside the answer's region: patch selection, per-frame shares, the frames that count, and the
three modes' queries on a model."""

import json
import math

import pytest
import torch
import webdataset as wds
from eval_helpers import png_bytes
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.data.schema import AnswerRegion
from fovlm.eval.attention import query_attention_maps
from fovlm.eval.benchmarks import BenchmarkReader
from fovlm.eval.looking import attention_shares, frames_from, region_patches, share_in_region, uniform_share
from fovlm.model.loading import tiny_llm_config, tiny_vision_config
from fovlm.model.vlm import MODES, FoveatedVLM


def test_region_patches_are_those_whose_centres_lie_inside():
    top_left = region_patches((0.0, 0.0, 0.5, 0.5), 4).view(4, 4)
    assert top_left[:2, :2].all() and top_left.sum() == 4
    right_column = region_patches((0.75, 0.0, 1.0, 1.0), 4).view(4, 4)
    assert right_column[:, 3].all() and right_column.sum() == 4
    assert region_patches((0.3, 0.3, 0.36, 0.36), 4).sum() == 0  # holds no patch centre (0.375 is outside)


def test_share_counts_the_region_patches_of_every_head_and_not_cls():
    weights = torch.zeros(1, 2, 1, 17)  # one frame, 2 heads, one query, CLS + 4 x 4 patches
    weights[0, 0, 0, 1] = 1.0  # head 0: all on the top-left patch
    weights[0, 1, 0, 0] = 1.0  # head 1: all on CLS
    assert share_in_region(weights, AnswerRegion((0.0, 0.0, 0.5, 0.5))).tolist() == [0.5]
    assert share_in_region(weights, AnswerRegion((0.5, 0.5, 1.0, 1.0))).tolist() == [0.0]
    with pytest.raises(ValueError, match="square"):
        share_in_region(torch.zeros(1, 2, 1, 16), AnswerRegion((0.0, 0.0, 1.0, 1.0)))


LEFT, RIGHT, BOTTOM = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.0, 0.5, 1.0, 1.0)


def test_a_box_is_every_querys_target_and_spread_places_are_shared_out_by_k():
    weights = torch.zeros(1, 1, 2, 17)  # one frame, one head, 2 queries, CLS + 4 x 4 patches
    weights[0, 0, 0, 1] = 1.0  # query 0: the top-left patch
    weights[0, 0, 1, 4] = 1.0  # query 1: the top-right patch
    assert share_in_region(weights, AnswerRegion(LEFT)).tolist() == [0.5]  # query 0 in, query 1 out
    spread = AnswerRegion(None, 0.0, (LEFT, RIGHT))
    assert share_in_region(weights, spread).tolist() == [1.0]  # query 0 reads LEFT, query 1 RIGHT
    assert share_in_region(weights, AnswerRegion(None, 0.0, (RIGHT, LEFT))).tolist() == [0.0]
    # K = 4 of which 2 are read: places 0 and 1 still go to queries 0 and 1, and place 2 would go to query 2
    assert share_in_region(weights, AnswerRegion(None, 0.0, (LEFT, RIGHT, BOTTOM)), 4).tolist() == [1.0]
    # K = 2: query 0 reads places 0 and 2 together (LEFT and BOTTOM), query 1 place 1
    weights[0, 0, 0] = 0.0
    weights[0, 0, 0, 15] = 1.0  # query 0 now on the bottom-right patch: in BOTTOM, not in LEFT
    assert share_in_region(weights, AnswerRegion(None, 0.0, (LEFT, RIGHT, BOTTOM)), 2).tolist() == [1.0]
    assert share_in_region(weights, spread).tolist() == [0.5]
    # a query with no place is not counted: one place, two queries (query 1 is in the top half, 0 in the bottom)
    assert share_in_region(weights, AnswerRegion(None, 0.0, ((0.0, 0.0, 1.0, 0.5),))).tolist() == [0.0]
    assert share_in_region(weights, AnswerRegion(None, 0.0, (BOTTOM,))).tolist() == [1.0]
    with pytest.raises(ValueError, match="smaller than"):
        share_in_region(weights, spread, 1)


def test_only_frames_from_the_region_start_count():
    assert frames_from([0.5, 1.5, 2.5], 3, 1.0).tolist() == [False, True, True]
    assert frames_from(None, 2, 1.0).tolist() == [True, True]
    with pytest.raises(ValueError, match="frame times"):
        frames_from([0.5], 2, 0.0)
    assert uniform_share(AnswerRegion((0.0, 0.0, 0.5, 0.5), 1.0), 16) == pytest.approx(64 / 257)


def test_shares_of_the_three_modes_on_a_model(tiny_vlm):
    torch.manual_seed(0)
    frames = torch.randn(3, 3, 224, 224)
    everywhere = attention_shares(tiny_vlm, frames, AnswerRegion((0.0, 0.0, 1.0, 1.0), 1.0), [0.5, 1.5, 2.5], MODES)
    maps = query_attention_maps(tiny_vlm, frames)
    for mode, kind in (("coarse_only", "coarse"), ("coarse_fine", "fine"), ("autoregressive", "autoregressive")):
        cls = maps[kind][1:, -1].mean(1)[:, 0].mean()  # last layer, heads averaged, frames 1 and 2
        assert everywhere[mode] == pytest.approx(1.0 - float(cls), abs=1e-5)  # all of it but CLS
    half = attention_shares(tiny_vlm, frames, AnswerRegion((0.0, 0.0, 0.5, 1.0), 0.0), None, MODES)
    assert all(0.0 < half[m] < everywhere[m] for m in MODES)
    late = attention_shares(tiny_vlm, frames, AnswerRegion((0.0, 0.0, 1.0, 1.0), 9.0), [0.5, 1.5, 2.5], MODES)
    assert all(math.isnan(v) for v in late.values())  # no frame after the start: nothing measured


def test_a_spread_answers_share_on_a_model_is_each_querys_share_in_its_places():
    torch.manual_seed(0)
    model = FoveatedVLM(Dinov2Model(tiny_vision_config()), LlamaForCausalLM(tiny_llm_config()), query_dim=32,
                        num_queries=4).eval()
    model.use_queries(2)
    frames = torch.randn(3, 3, 224, 224)
    region = AnswerRegion(None, 0.0, (LEFT, RIGHT, BOTTOM))  # K = 4: query 0 LEFT, 1 RIGHT (2 would read BOTTOM)
    shares = attention_shares(model, frames, region, None, MODES)
    visual = model.visual_tokens(model.encode_patches(frames), torch.tensor([3]), "coarse_fine", return_attention=True)
    for mode, per_layer in (("coarse_only", visual.coarse_attention), ("coarse_fine", visual.fine_attention)):
        heads = per_layer[-1].mean(1)[..., 1:]  # [T, k, G*G]
        own = [float(heads[:, j, region_patches(box, 16)].sum(-1).mean()) for j, box in enumerate((LEFT, RIGHT))]
        assert shares[mode] == pytest.approx(sum(own) / 2, abs=1e-5)
    assert 0.0 < shares["autoregressive"] < 1.0


def test_a_spread_answer_keeps_its_places_for_the_share(tmp_path):
    regions = {"one": {"box": [0.5, 0.0, 1.0, 0.5], "from": 0},
               "spread": {"spread": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], "from": 0}}
    with wds.TarWriter(str(tmp_path / "q.tar")) as sink:
        for key, region in regions.items():
            sink.write({"__key__": key, "png": png_bytes((255, 0, 0)), "json": json.dumps({
                "source": "toy", "media": "image", "question": "How many?", "options": ["one", "two"],
                "answer": 0, "answer_region": region}).encode()})
    questions = {q.key: q for q in BenchmarkReader("toy", str(tmp_path / "q.tar"))}
    assert questions["one"].answer_region == AnswerRegion((0.5, 0.0, 1.0, 0.5), 0.0)
    assert questions["spread"].answer_region == AnswerRegion(None, 0.0, (LEFT, RIGHT))
