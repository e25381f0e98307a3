"""Attention overlays: patch-grid reduction, entropy, and the PNG sheet."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fovlm.eval.attention import (
    attention_entropy,
    overlay,
    patch_grid,
    query_attention_maps,
    save_attention_png,
)


def test_patch_grid_drops_cls_and_places_patches_row_major():
    weights = torch.zeros(2, 3, 257)  # [L, H, K]
    weights[-1, :, 1 + 5 * 16 + 7] = 1.0  # last layer: every head on row 5, column 7
    weights[0, :, 0] = 1.0  # first layer: on CLS
    grid = patch_grid(weights)
    assert grid.shape == (16, 16) and grid[5, 7] == 1.0 and grid.sum() == pytest.approx(1.0)
    assert patch_grid(weights, layer=None)[5, 7] == pytest.approx(1.0)  # CLS share renormalised away
    with pytest.raises(ValueError, match="square"):
        patch_grid(torch.ones(12))


def test_entropy_uniform_and_peaked():
    assert float(attention_entropy(torch.full((257,), 1 / 257))) == pytest.approx(math.log(257), abs=1e-4)
    peaked = torch.zeros(257)
    peaked[3] = 1
    assert float(attention_entropy(peaked)) < 1e-6


def test_overlay_highlights_the_attended_patch():
    frame = torch.zeros(3, 224, 224)  # normalised zeros: a mid-grey frame
    grid = torch.zeros(16, 16)
    grid[2, 9] = 1.0
    image = np.asarray(overlay(frame, grid)).astype(int)
    hot = image[2 * 14 + 7, 9 * 14 + 7]
    cold = image[12 * 14 + 7, 3 * 14 + 7]
    assert hot.sum() > cold.sum() + 200


def test_sheet_png_has_a_row_per_query_kind(tmp_path):
    frames = [torch.randn(3, 224, 224) for _ in range(3)]
    maps = {kind: torch.softmax(torch.randn(3, 2, 4, 257), -1) for kind in ("coarse", "fine", "autoregressive")}
    path = save_attention_png(tmp_path / "a" / "maps.png", frames, maps, cell=64)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (110 + 3 * 64, 18 + 3 * (64 + 18))
    with pytest.raises(ValueError, match="frames"):
        save_attention_png(tmp_path / "b.png", frames[:2], maps)


def test_query_maps_of_a_model_have_one_row_per_frame(tiny_vlm, tmp_path):
    frames = torch.randn(3, 3, 224, 224)
    maps = query_attention_maps(tiny_vlm, frames)
    assert list(maps) == ["coarse", "fine", "autoregressive"]
    for weights in maps.values():
        assert weights.shape == (3, 2, 4, 257)  # frames, tiny DINO layers, heads, keys
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 4))
    # the coarse (static) query is the same vector on every frame, the others differ from it after frame 0
    assert not torch.allclose(maps["coarse"][1], maps["fine"][1])
    save_attention_png(tmp_path / "maps.png", list(frames), maps, cell=48)
    assert (tmp_path / "maps.png").stat().st_size > 0


def test_query_maps_of_some_kinds_are_those_of_all_kinds(tiny_vlm):
    frames = torch.randn(2, 3, 224, 224)
    everything = query_attention_maps(tiny_vlm, frames)
    for kinds in (("coarse", "fine"), ("fine",), ("autoregressive", "coarse")):
        some = query_attention_maps(tiny_vlm, frames, kinds=kinds)
        assert list(some) == [kind for kind in everything if kind in kinds]  # in the order of all kinds
        for kind, weights in some.items():
            torch.testing.assert_close(weights, everything[kind])
    with pytest.raises(ValueError, match="static"):
        query_attention_maps(tiny_vlm, frames, kinds=("static",))


def test_frames_are_drawn_from_uint8_or_normalised_tensors():
    from fovlm.data.frames import normalize
    from fovlm.eval.attention import frame_to_image

    frame = torch.zeros(3, 4, 4, dtype=torch.uint8)
    frame[2] = 200  # blue
    for version in (frame, normalize(frame)):
        pixel = np.asarray(frame_to_image(version))[1, 1]
        assert abs(int(pixel[2]) - 200) <= 1 and pixel[0] == 0

