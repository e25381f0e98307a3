"""Where a sample's answer is shown, per frame: the times of its kept frames and which frames hold the region.

A sample's ``answer_region`` (:class:`fovlm.data.schema.AnswerRegion`) is a box and the time from which it holds.
Training with a look loss (``lambda_look``, docs/looking.md#teaching-the-queries-where-to-look) and evaluation's
attention share both need to know which of the frames the model reads were taken at or after that time. The
frame times follow the frame contract (:mod:`fovlm.data.contract`): an mp4 is sampled by
:func:`fovlm.data.frames.select_frame_times` over its ``duration``; numbered frames were taken at 1 FPS, frame i
at i + 0.5 s, thinned by :func:`fovlm.data.frames.select_frame_indices`; an image's copies all count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fovlm.data.contract import FRAME_SETTINGS
from fovlm.data.frames import select_frame_indices, select_frame_times
from fovlm.data.schema import AnswerRegion, frame_fields, video_field


def frame_times(
    members: Mapping[str, Any], media: str, count: int, max_frames: int, duration: float | None
) -> tuple[float, ...] | None:
    """Timestamps (s) of a sample's ``count`` kept frames where the sample tells them, else None.

    ``members`` are the sample's tar member names (or a mapping keyed by them); ``max_frames`` is the setting its
    frames were read with."""
    if media != "video":
        return None
    names = list(members)
    if video_field(names) is not None:
        times = select_frame_times(duration, FRAME_SETTINGS.fps, max_frames) if duration else []
        return tuple(times) if len(times) == count else None
    numbered = frame_fields(names)
    times = [i + 0.5 for i in select_frame_indices(len(numbered), max_frames)]
    return tuple(times) if len(times) == count else None


def frames_from(times: Sequence[float] | None, num_frames: int, start: float) -> torch.Tensor:
    """bool [T]: the frames taken at or after ``start`` seconds (every frame when their times are unknown)."""
    if times is None:
        return torch.ones(num_frames, dtype=torch.bool)
    if len(times) != num_frames:
        raise ValueError(f"{len(times)} frame times for {num_frames} frames")
    return torch.tensor([t >= start for t in times], dtype=torch.bool)


def region_fields(
    region: AnswerRegion | None, members: Mapping[str, Any], media: str, count: int, max_frames: int,
    duration: float | None,
) -> dict[str, Any]:
    """An encoded sample's region entries: ``region_box`` (its boxes, 4 floats each), ``region_spread`` (whether
    they are the places of a spread answer) and ``region_frames`` (bool [T], the frames that hold the region);
    empty for a sample without a region or frames."""
    if region is None or count == 0:
        return {}
    times = frame_times(members, media, count, max_frames, duration)
    return {"region_box": tuple(tuple(float(v) for v in box) for box in region.boxes),
            "region_spread": region.box is None, "region_frames": frames_from(times, count, region.start)}


def collate_regions(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch's region entries when any sample has one: ``region_box`` float [B, R, 4] (each sample's boxes, NaN
    rows past them; R the most boxes of a sample), ``region_spread`` bool [B] (boxes that are the places of a
    spread answer) and ``region_frames`` bool [F] over the batch's frames in sample order (False for samples
    without a region)."""
    if not any("region_box" in s for s in samples):
        return {}
    places = max(len(s.get("region_box", ())) for s in samples)
    boxes = torch.full((len(samples), places, 4), float("nan"))  # [B, R, 4]
    spread = torch.zeros(len(samples), dtype=torch.bool)  # [B]
    masks = []
    for i, sample in enumerate(samples):
        count = 0 if sample.get("frames") is None else sample["frames"].shape[0]
        if "region_box" in sample:
            boxes[i, : len(sample["region_box"])] = torch.tensor(sample["region_box"])
            spread[i] = sample["region_spread"]
            masks.append(sample["region_frames"])
        else:
            masks.append(torch.zeros(count, dtype=torch.bool))
    return {"region_box": boxes, "region_spread": spread, "region_frames": torch.cat(masks)}
