"""Attention share inside the answer's region: patch selection, per-frame shares, the frames that count, and the
three modes' queries on a model."""

import json
import math

import pytest
import torch
import webdataset as wds
from eval_helpers import png_bytes

from fovlm.data.schema import AnswerRegion
from fovlm.eval.attention import query_attention_maps
from fovlm.eval.benchmarks import BenchmarkReader
from fovlm.eval.looking import attention_shares, frames_from, region_patches, share_in_region, uniform_share
from fovlm.model.vlm import MODES


def test_region_patches_are_those_whose_centres_lie_inside():
    top_left = region_patches((0.0, 0.0, 0.5, 0.5), 4).view(4, 4)
    assert top_left[:2, :2].all() and top_left.sum() == 4
    right_column = region_patches((0.75, 0.0, 1.0, 1.0), 4).view(4, 4)
    assert right_column[:, 3].all() and right_column.sum() == 4
    assert region_patches((0.3, 0.3, 0.36, 0.36), 4).sum() == 0  # holds no patch centre (0.375 is outside)


def test_share_counts_the_region_patches_of_every_head_and_not_cls():
    weights = torch.zeros(1, 2, 17)  # one frame, 2 heads, CLS + 4 x 4 patches
    weights[0, 0, 1] = 1.0  # head 0: all on the top-left patch
    weights[0, 1, 0] = 1.0  # head 1: all on CLS
    assert share_in_region(weights, (0.0, 0.0, 0.5, 0.5)).tolist() == [0.5]
    assert share_in_region(weights, (0.5, 0.5, 1.0, 1.0)).tolist() == [0.0]
    with pytest.raises(ValueError, match="square"):
        share_in_region(torch.zeros(1, 2, 16), (0.0, 0.0, 1.0, 1.0))


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


def test_a_spread_answer_has_no_share_to_measure(tmp_path):
    regions = {"one": {"box": [0.5, 0.0, 1.0, 0.5], "from": 0},
               "spread": {"spread": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], "from": 0}}
    with wds.TarWriter(str(tmp_path / "q.tar")) as sink:
        for key, region in regions.items():
            sink.write({"__key__": key, "png": png_bytes((255, 0, 0)), "json": json.dumps({
                "source": "toy", "media": "image", "question": "How many?", "options": ["one", "two"],
                "answer": 0, "answer_region": region}).encode()})
    questions = {q.key: q for q in BenchmarkReader("toy", str(tmp_path / "q.tar"))}
    assert questions["one"].answer_region == AnswerRegion((0.5, 0.0, 1.0, 0.5), 0.0)
    assert questions["spread"].answer_region is None  # the share is measured in one box
