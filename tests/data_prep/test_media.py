"""Video and image conversion: frame counts at 1 FPS, spread over long videos, sizes, image fit, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from prepkit import clip_bytes, frame_time, image_bytes

from data_prep.media import (
    MediaOptions,
    SkipItem,
    convert_images,
    convert_video,
    frames_to_array,
    tile_images,
)


def times(converted) -> list[float]:
    return [frame_time(f) for f in frames_to_array(converted.members)]


def test_ten_second_clip_gives_ten_frames_at_one_per_second():
    converted = convert_video(clip_bytes(10.0, fps=2), MediaOptions())
    assert converted.num_frames == 10 and len(converted.members) == 10
    assert converted.duration == pytest.approx(10.0, abs=0.01)
    # One frame per second, in order: frame k shows a time within second k.
    for k, t in enumerate(times(converted)):
        assert k - 0.6 <= t <= k + 1.6, (k, t)


def test_hundred_second_clip_gives_64_frames_over_the_whole_video():
    converted = convert_video(clip_bytes(100.0, fps=1), MediaOptions())
    assert converted.num_frames == 64
    ts = times(converted)
    assert ts[0] <= 2.0 and ts[-1] >= 98.0, (ts[0], ts[-1])
    steps = np.diff(ts)
    # Uniform spacing of 100/64 s (each measured to about a second), never the first 64 s only.
    assert np.all(steps > 0) and abs(float(np.mean(steps)) - 100 / 64) < 0.05


def test_sub_second_clip_gives_one_frame():
    converted = convert_video(clip_bytes(0.4, fps=5), MediaOptions())
    assert converted.num_frames == 1 and list(converted.members) == ["000.jpg"]


@pytest.mark.parametrize("size", [(1280, 720), (176, 144)])
def test_any_resolution_gives_square_frames(size):
    converted = convert_video(clip_bytes(2.0, fps=2, size=size), MediaOptions())
    frames = frames_to_array(converted.members)
    assert frames.shape == (2, 224, 224, 3)


def test_frame_size_and_quality_are_configurable():
    small = convert_video(clip_bytes(3.0, fps=2, size=(96, 64)), MediaOptions(size=64, jpeg_quality=30))
    assert frames_to_array(small.members).shape == (3, 64, 64, 3)
    high = convert_video(clip_bytes(3.0, fps=2, size=(96, 64)), MediaOptions(size=64, jpeg_quality=95))
    assert sum(map(len, high.members.values())) > sum(map(len, small.members.values()))


def test_keep_mp4_stores_the_checked_video():
    data = clip_bytes(5.0, fps=2)
    converted = convert_video(data, MediaOptions(keep_mp4=True))
    assert converted.members == {"mp4": data} and converted.num_frames == 5


@pytest.mark.parametrize("data", [b"not a video at all" * 10, b"\x00" * 4096])
def test_unreadable_video_is_a_skip(data):
    with pytest.raises(SkipItem) as err:
        convert_video(data, MediaOptions())
    assert err.value.reason == "unreadable_video"


def test_segment_of_a_video_is_sampled_within_its_bounds():
    converted = convert_video(clip_bytes(30.0, fps=2), MediaOptions(), clip=(10.0, 15.0))
    ts = times(converted)
    assert converted.num_frames == 5 and 9.4 <= ts[0] and ts[-1] <= 15.6


def test_image_crop_and_pad():
    wide = image_bytes((80, 40), (10, 200, 10))
    crop = frames_to_array(convert_images([wide], MediaOptions(size=32, image_fit="crop")).members)
    pad = frames_to_array(convert_images([wide], MediaOptions(size=32, image_fit="pad")).members)
    assert crop.shape == pad.shape == (1, 32, 32, 3)
    # Cropping fills the square with the image; padding leaves mean-coloured bands above and below.
    assert crop[0, 0, 16, 1] > 150 and pad[0, 0, 16, 1] < 150 and pad[0, 16, 16, 1] > 150


def test_several_images_become_a_grid_or_frames():
    red, blue = image_bytes((40, 40), (220, 0, 0)), image_bytes((40, 40), (0, 0, 220))
    grid = convert_images([red, blue], MediaOptions(size=64, multi_image="grid"))
    assert grid.media == "image" and grid.num_frames == 1
    frame = frames_to_array(grid.members)[0]
    assert frame[32, 16, 0] > 150 and frame[32, 48, 2] > 150  # red cell left, blue cell right
    frames = convert_images([red, blue], MediaOptions(size=64, multi_image="frames"))
    assert frames.media == "video" and frames.num_frames == 2


def test_tile_images_keeps_every_image():
    from PIL import Image

    images = [Image.new("RGB", (20, 20), (i * 50, 0, 0)) for i in range(1, 6)]
    canvas = np.asarray(tile_images(images, 96, "crop"))
    # 5 images -> 3 columns x 2 rows of 32 px cells, centred vertically (16 px bands above and below).
    centres = [int(canvas[16 + r * 32 + 16, c * 32 + 16, 0]) for r in range(2) for c in range(3)][:5]
    assert centres == [50, 100, 150, 200, 250]
    assert canvas.shape == (96, 96, 3) and tuple(canvas[5, 5]) == (124, 116, 104)
