"""Tests for fovlm.data.regions: the frames that hold a sample's answer region, through encoding and collation."""

import json

import pytest
import torch
from shardkit import caption_sample, mp4_bytes

from fovlm.data.collate import SampleEncoder, collate
from fovlm.data.contract import FrameSettings
from fovlm.data.regions import collate_regions, frame_times, frames_from


def _members(sample):
    return {k: (json.dumps(v).encode() if k == "json" else v) for k, v in sample.items() if k != "__key__"}


def test_frame_times_follow_the_frame_contract():
    numbered = {f"{i:03d}.jpg": b"" for i in range(6)}
    assert frame_times(numbered, "video", 6, 64, None) == (0.5, 1.5, 2.5, 3.5, 4.5, 5.5)
    assert frame_times(numbered, "video", 3, 3, None) == (1.5, 3.5, 5.5)  # thinned as the frames were
    assert frame_times({"mp4": b""}, "video", 4, 64, 4.0) == (0.5, 1.5, 2.5, 3.5)
    assert frame_times({"mp4": b""}, "video", 4, 64, None) is None  # no duration: unknown, every frame counts
    assert frame_times({"jpg": b""}, "image", 8, 64, None) is None
    assert frames_from((0.5, 1.5, 2.5), 3, 1.0).tolist() == [False, True, True]
    assert frames_from(None, 2, 5.0).tolist() == [True, True]
    with pytest.raises(ValueError, match="2 frame times for 3 frames"):
        frames_from((0.5, 1.5), 3, 0.0)


def test_encoded_samples_carry_their_region_into_the_batch(tokenizer):
    encoder = SampleEncoder(tokenizer, max_length=64, frames=FrameSettings(frame_size=28))
    ringed = caption_sample("a", "a red square", frames=3)
    ringed["json"]["answer_region"] = {"box": [0.5, 0.0, 1.0, 0.5], "from": 1.0}
    plain = caption_sample("b", "a blue circle", frames=2)
    video = {"__key__": "c", "json": {"source": "x", "media": "video", "caption": "c", "duration": 4.0,
                                      "answer_region": {"box": [0.0, 0.0, 0.5, 1.0], "from": 2.0}},
             "mp4": mp4_bytes(16, fps=4)}
    samples = [encoder(s["__key__"], _members(s)) for s in (ringed, plain, video)]
    batch = collate(samples, tokenizer.pad_token_id, frame_size=28)
    assert batch["num_frames"].tolist() == [3, 2, 4]
    torch.testing.assert_close(batch["region_box"][0], torch.tensor([[0.5, 0.0, 1.0, 0.5]]))
    assert batch["region_box"][1].isnan().all() and not batch["region_spread"].any()
    # frames at 0.5, 1.5, 2.5 s from 1 s on; none of the region-less sample; the mp4's at 0.5 ... 3.5 s from 2 s
    assert batch["region_frames"].tolist() == [False, True, True, False, False, False, False, True, True]
    assert collate_regions(samples[1:2]) == {}
    assert "region_box" not in collate(samples[1:2], tokenizer.pad_token_id, frame_size=28)


def test_a_spread_answers_places_pad_the_batch_boxes(tokenizer):
    encoder = SampleEncoder(tokenizer, max_length=64, frames=FrameSettings(frame_size=28))
    counted = caption_sample("a", "three red shapes", frames=2)
    counted["json"]["answer_region"] = {"spread": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], "from": 0.0}
    one = caption_sample("b", "a blue circle", frames=2)
    one["json"]["answer_region"] = {"box": [0.0, 0.0, 0.5, 0.5], "from": 0.0}
    batch = collate([encoder(s["__key__"], _members(s)) for s in (counted, one)], tokenizer.pad_token_id,
                    frame_size=28)
    assert batch["region_box"].shape == (2, 2, 4) and batch["region_spread"].tolist() == [True, False]
    torch.testing.assert_close(batch["region_box"][0, 1], torch.tensor([0.5, 0.0, 1.0, 1.0]))
    assert batch["region_box"][1, 1].isnan().all() and batch["region_frames"].all()
