"""Frame selection (1 FPS, at most 64, uniform beyond), decoding, resize + crop, normalisation and
image replication."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from shardkit import image_bytes, mp4_bytes

from fovlm.data import frames as F
from fovlm.data.contract import IMAGENET_MEAN, IMAGENET_STD


def test_select_frame_times_rule():
    assert F.select_frame_times(0.4) == [pytest.approx(0.2)]
    assert F.select_frame_times(1.0) == [0.5]
    assert F.select_frame_times(10.7) == [k + 0.5 for k in range(10)]
    assert len(F.select_frame_times(64.0)) == 64 and F.select_frame_times(64.0)[-1] == 63.5
    long = F.select_frame_times(640.0)
    # 64 frames spread over the whole video, not its first 64 s: equal spacing, last frame near the end.
    assert len(long) == 64 and long[0] == pytest.approx(5.0) and long[-1] == pytest.approx(635.0)
    assert np.allclose(np.diff(long), 10.0)
    assert F.select_frame_times(10.0, fps=2.0) == [(k + 0.5) / 2 for k in range(20)]
    assert len(F.select_frame_times(100.0, max_frames=8)) == 8
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            F.select_frame_times(bad)


def test_select_frame_indices_thins_uniformly():
    assert F.select_frame_indices(5) == [0, 1, 2, 3, 4]
    kept = F.select_frame_indices(128, max_frames=64)
    assert kept == list(range(1, 128, 2))
    assert F.select_frame_indices(0) == []


def test_resize_cover_crop_keeps_centre():
    # A 60x30 image: left third red, middle third green, right third blue. Cover-resize to 16 makes it 32x16,
    # the centre crop keeps the middle of it: green in the centre, no squashing.
    array = np.zeros((30, 60, 3), dtype=np.uint8)
    array[:, :20, 0], array[:, 20:40, 1], array[:, 40:, 2] = 255, 255, 255
    out = F.resize_cover_crop(Image.fromarray(array), 16)
    assert out.size == (16, 16)
    centre = np.asarray(out)[8, 8]
    assert centre[1] > 200 and centre[0] < 50 and centre[2] < 50
    edge = np.asarray(out)[8, 0]
    assert edge[0] > 100  # the red third reaches into the crop at the left edge


def test_decode_image_and_png():
    jpeg = F.decode_image(image_bytes((250, 10, 10), (40, 20)), 16)
    assert jpeg.shape == (3, 16, 16) and jpeg.dtype == torch.uint8
    assert jpeg[0].float().mean() > 230 and jpeg[1].float().mean() < 30
    png = F.decode_image(image_bytes((0, 0, 255), (16, 16), fmt="PNG"), 16)
    assert torch.equal(png[2], torch.full((16, 16), 255, dtype=torch.uint8))
    gray = io.BytesIO()
    Image.new("L", (20, 20), 128).save(gray, format="PNG")
    assert F.decode_image(gray.getvalue(), 8).shape == (3, 8, 8)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", image_bytes()[:60]])
def test_decode_image_errors(data):
    with pytest.raises(F.FrameDecodeError) as info:
        F.decode_image(data, 16)
    assert info.value.reason == "bad_image"


def test_decode_video_one_frame_per_second():
    clip = mp4_bytes(12, fps=4)  # 3 s; frame i has red level 8 i
    frames = F.decode_video(clip, size=16)
    assert frames.shape == (3, 3, 16, 16)
    # Centres of each second: t = 0.5, 1.5, 2.5 s -> frames 2, 6, 10 -> red 16, 48, 80 (+- codec error).
    red = frames[:, 0, 8, 8].float()
    assert torch.allclose(red, torch.tensor([16.0, 48.0, 80.0]), atol=4)
    via_av = F._decode_video_av(clip, 16, 1.0, 64)
    assert torch.allclose(via_av[:, 0].float(), frames[:, 0].float(), atol=2)
    with pytest.raises(F.FrameDecodeError) as info:
        F.decode_video(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, 16)
    assert info.value.reason == "bad_video"


def test_sample_frames_replicates_images_not_one_frame_videos():
    img = F.sample_frames({"json": b"{}", "jpg": image_bytes(pattern=3)}, "image", size=16, image_frames=8)
    assert img.shape == (8, 3, 16, 16) and all(torch.equal(img[0], img[i]) for i in range(8))
    video = F.sample_frames({"000.jpg": image_bytes(pattern=3)}, "video", size=16)
    assert video.shape == (1, 3, 16, 16)
    short = F.sample_frames({"mp4": mp4_bytes(2, fps=4)}, "video", size=16)  # a 0.5 s clip: one frame
    assert short.shape == (1, 3, 16, 16)
    assert F.sample_frames({"000.jpg": image_bytes()}, "text") is None
    many = {f"{i:03d}.jpg": image_bytes(pattern=i + 1) for i in range(70)}
    assert F.sample_frames(many, "video", size=16, max_frames=64).shape[0] == 64
    with pytest.raises(F.FrameDecodeError) as info:
        F.sample_frames({"json": b"{}"}, "video", size=16)
    assert info.value.reason == "no_frames"
    with pytest.raises(F.FrameDecodeError) as info:
        F.sample_frames({"000.jpg": image_bytes(), "001.jpg": image_bytes()}, "image", size=16)
    assert info.value.reason == "bad_media"


def test_normalize_matches_imagenet_stats():
    frames = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = F.normalize(frames)
    expected = (torch.tensor([0.0, 128 / 255, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    assert torch.allclose(out[1, :, 1, 1], expected)


@pytest.mark.parametrize(("num_frames", "fps"), [(12, 4), (1, 4), (30, 30), (140, 2)])
def test_pyav_fallback_picks_the_same_frames_as_decord(num_frames, fps):
    clip = mp4_bytes(num_frames, fps=fps, step=1)  # red level = frame index
    via_decord = F._decode_video_decord(clip, 16, 1.0, 64)
    via_av = F._decode_video_av(clip, 16, 1.0, 64)  # streams: only the selected frames are kept
    expected = len(F.select_frame_times(num_frames / fps))
    assert via_decord.shape[0] == via_av.shape[0] == expected
    assert torch.equal(via_decord, via_av)
    if num_frames / fps > 64:
        # 64 frames spread over the whole 70 s clip: the last one (t = 69.45 s) is frame 138 (red ~135 after
        # the codec's colour conversion); keeping the first 64 s would end at frame 127 (red ~124).
        assert expected == 64 and 130 < int(via_av[-1, 0, 8, 8]) < 145
