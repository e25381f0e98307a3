"""Tiny random models for the model tests (hidden 64, 2 layers; 224 px frames -> 257 DINO tokens)."""

import pytest
from tiny_models import QUERY_DIM
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.loading import tiny_llm_config, tiny_vision_config


@pytest.fixture
def tiny_dino() -> Dinov2Model:
    """A random DINOv2 (hidden 64, 2 layers, 4 heads, patch 14) in eval mode."""
    return Dinov2Model(tiny_vision_config()).eval()


@pytest.fixture
def tiny_llm() -> LlamaForCausalLM:
    """A random Llama shaped like SmolLM2 (GQA, tied embeddings, vocab 49152), hidden 64, 2 layers."""
    return LlamaForCausalLM(tiny_llm_config()).eval()


@pytest.fixture
def tiny_vlm(tiny_dino, tiny_llm):
    """A tiny FoveatedVLM in eval mode (query width 32, so that Dq, Dv and Dl all differ)."""
    from fovlm.model.vlm import FoveatedVLM

    return FoveatedVLM(tiny_dino, tiny_llm, query_dim=QUERY_DIM).eval()
