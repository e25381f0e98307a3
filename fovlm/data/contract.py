"""The frame contract: how frames reach the model, the same in shard conversion, training, evaluation and export.

A video is sampled at ``FrameSettings.fps`` (1 frame per second), at most ``max_frames`` frames (spread
uniformly over longer videos); a single image is replicated to ``image_frames`` identical frames; every frame
is resized to cover ``frame_size`` pixels squared and centre-cropped, then normalised with the ImageNet mean
and standard deviation DINOv2 was trained with. :data:`FRAME_SETTINGS` holds the recipe's values; a run may
choose its own ``frame_size``, ``max_frames`` and ``image_frames`` (the DataModules' arguments), which an
exported model stores (:meth:`FrameSettings.as_dict`) so inference reads frames the way training did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel (RGB) mean of ImageNet, subtracted from frames scaled to [0, 1]."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel (RGB) standard deviation of ImageNet, dividing frames after the mean is subtracted."""


@dataclass(frozen=True)
class FrameSettings:
    """The frame settings of a run.

    Args:
        frame_size: frames are resized to cover, and centre-cropped to, this many pixels squared.
        max_frames: at most this many frames per video (spread uniformly over longer videos).
        image_frames: a single image is replicated to this many identical frames.

    ``fps`` (frames sampled per second of video), ``mean`` and ``std`` (the normalisation) are the same for
    every run.
    """

    frame_size: int = 224
    max_frames: int = 64
    image_frames: int = 8

    fps: ClassVar[float] = 1.0
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def as_dict(self) -> dict[str, Any]:
        """The settings a run chooses, by argument name: ``{"frame_size", "max_frames", "image_frames"}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FrameSettings:
        """Settings from a mapping holding some of :meth:`as_dict`'s keys (e.g. an exported config's ``data``
        or a DataModule's hyperparameters): missing keys take the recipe's values, other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def overridden(
        self, frame_size: int | None = None, max_frames: int | None = None, image_frames: int | None = None
    ) -> FrameSettings:
        """These settings with each value that is given (not None) replaced, e.g. by command-line options."""
        given = {"frame_size": frame_size, "max_frames": max_frames, "image_frames": image_frames}
        return replace(self, **{name: value for name, value in given.items() if value is not None})


FRAME_SETTINGS = FrameSettings()
"""The recipe's frame settings: 224 px, at most 64 frames per video, images x8 (and 1 FPS, ImageNet stats)."""
