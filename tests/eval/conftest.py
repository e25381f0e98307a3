"""Fixtures of the evaluation tests."""

import pytest
from eval_helpers import make_tiny_vlm

from fovlm.model.vlm import FoveatedVLM


@pytest.fixture
def tiny_vlm() -> FoveatedVLM:
    """A tiny random FoveatedVLM (hidden 64, 2 layers, query width 32) in eval mode."""
    return make_tiny_vlm()
