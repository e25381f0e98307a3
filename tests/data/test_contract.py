"""The frame contract: the recipe's values and the round trip through an exported config."""

import pytest

from fovlm.data.contract import FRAME_SETTINGS, IMAGENET_MEAN, IMAGENET_STD, FrameSettings


def test_recipe_values():
    assert FRAME_SETTINGS == FrameSettings(frame_size=224, max_frames=64, image_frames=8)
    assert FRAME_SETTINGS.fps == 1.0
    assert (FRAME_SETTINGS.mean, FRAME_SETTINGS.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_dict_round_trip():
    settings = FrameSettings(frame_size=84, max_frames=4, image_frames=4)
    assert settings.as_dict() == {"frame_size": 84, "max_frames": 4, "image_frames": 4}
    assert FrameSettings.from_dict(settings.as_dict()) == settings
    # Missing keys take the recipe's values; keys of other settings (a DataModule's hyperparameters) are ignored.
    assert FrameSettings.from_dict({"max_frames": 16, "batch_size": 8}) == FrameSettings(max_frames=16)


def test_frozen():
    with pytest.raises(AttributeError):
        FRAME_SETTINGS.frame_size = 112  # type: ignore[misc]


def test_overridden_replaces_only_given_values():
    settings = FrameSettings(frame_size=84, max_frames=4, image_frames=4)
    assert settings.overridden() == settings
    assert settings.overridden(max_frames=16) == FrameSettings(frame_size=84, max_frames=16, image_frames=4)
    assert settings.overridden(112, None, 2) == FrameSettings(frame_size=112, max_frames=4, image_frames=2)
