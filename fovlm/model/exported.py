"""The exported folder of a FoveatedVLM (written by ``fovlm export``) and how a model is rebuilt from it.

The folder holds:

- ``model.safetensors``: every tensor of the model (tied LLM embeddings stored once);
- ``config.json``: the FoveatedVLM hyperparameters plus the full LLM and DINOv2 configs, so the model rebuilds
  offline with no hub access and no training code path (no Lightning, no data pipeline), and the frame settings
  it was trained with (frame size, most frames, image replication: ``data``);
- the tokenizer (with its chat template);
- ``README.md``: a model card generated from the config.

The model class is passed in by the caller (:meth:`fovlm.model.vlm.FoveatedVLM.from_pretrained`), so the format
stands below the model. Nothing here unpickles arbitrary objects: weights are read from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, Dinov2Config, Dinov2Model

from fovlm.data.contract import FrameSettings
from fovlm.model.checkpoint import CheckpointError, CheckpointNotFoundError, load_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "fovlm"
FORMAT_VERSION = 1


Model = TypeVar("Model", bound=nn.Module)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an exported folder; raises naming the file when the folder is not an export.

    Args:
        folder: the exported folder (it must also hold ``model.safetensors``).
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    for needed in (config_path, folder / WEIGHTS_NAME):
        if not needed.is_file():
            raise CheckpointNotFoundError(f"{needed} does not exist: {folder} is not an exported fovlm folder")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err


def frame_settings(config: dict[str, Any]) -> FrameSettings:
    """The frame settings an exported model was trained with (its config's ``data``; the recipe's where absent)."""
    return FrameSettings.from_dict(config.get("data", {}))


def build_from_config(config: dict[str, Any], model_class: type[Model]) -> Model:
    """A model with random weights and the exported architecture (no download, no weights loaded).

    Args:
        config: an exported ``config.json``.
        model_class: the model to build (``FoveatedVLM``), called as ``model_class(vision, llm, query_dim=...,
            visual_scale=..., deep_query=..., num_queries=...)``; configs without ``num_queries`` hold one query per frame.
    """
    if config.get("format") != FORMAT:
        raise CheckpointError(f"not a fovlm export config (format {config.get('format')!r})")
    llm_config = config["llm_config"]
    if llm_config.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"unknown LLM model_type {llm_config.get('model_type')!r} in the exported config")
    llm_config = CONFIG_MAPPING[llm_config["model_type"]].from_dict(llm_config)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation="sdpa")
    vision = Dinov2Model(Dinov2Config.from_dict(config["vision_config"]))
    return model_class(
        vision, llm, query_dim=config["query_dim"], visual_scale=config["visual_scale"],
        deep_query=config["deep_query"], num_queries=config.get("num_queries", 1),
        question_first=config.get("question_first", False),
    )


def load_exported(path: str | Path, model_class: type[Model], device: str | torch.device = "cpu") -> Model:
    """Load an exported folder into a model in eval mode (strict: every tensor must match).

    Args:
        path: the exported folder.
        model_class: the model to build (see :func:`build_from_config`).
        device: where the model is put.
    """
    folder = Path(path)
    model = build_from_config(read_config(folder), model_class)
    load_weights(model, folder / WEIGHTS_NAME, label="exported weights")
    return model.to(device).eval()
