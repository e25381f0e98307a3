"""A trained FoveatedVLM ready to use: model, tokenizer and frame settings from an exported folder or a checkpoint.

An exported folder (:mod:`fovlm.model.exported`) rebuilds from its own config. A Lightning checkpoint of a
FoveatedModule rebuilds offline from the architecture it stores (:mod:`fovlm.model.stored`), with the tokenizer it
stores; one written before checkpoints stored them rebuilds from its hyperparameters (the ``llm`` and ``vision``
named parts, see :func:`fovlm.model.loading.build_vlm`, which may need those folders or the network). Either
way its weights are then loaded strictly. A checkpoint is read with ``torch.load(weights_only=True)``: nothing
here unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fovlm.data.contract import FrameSettings
from fovlm.model.checkpoint import CheckpointError, load_state_strict, model_state, read_weights_file
from fovlm.model.exported import build_from_config, frame_settings, read_config
from fovlm.model.loading import TINY, build_vlm, load_tokenizer, tokenizer_source
from fovlm.model.stored import stored_config, stored_tokenizer
from fovlm.model.vlm import FoveatedVLM


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> FoveatedVLM:
    """Load an exported folder into a FoveatedVLM in eval mode (strict: every tensor must match).

    Args:
        path: the exported folder.
        device: where the model is put.
    """
    return FoveatedVLM.from_pretrained(path, device)


def load_exported_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in an exported folder (or any tokenizer folder or id)."""
    return load_tokenizer(str(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of a FoveatedModule, read with ``weights_only=True`` (tensors and plain containers).

    Args:
        path: the ``.ckpt`` file.
    """
    checkpoint = read_weights_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict: not a Lightning checkpoint of a FoveatedModule")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> FoveatedVLM:
    """Rebuild the FoveatedVLM of a FoveatedModule checkpoint (:func:`read_checkpoint`) and load its weights.

    The backbones are built from the configs the checkpoint stores (offline, random weights until the
    checkpoint's are loaded); a checkpoint without them rebuilds its ``llm`` and ``vision`` by name.

    Args:
        checkpoint: the checkpoint's contents.
        path: its file, for error messages.
    """
    config = stored_config(checkpoint)
    if config is not None:
        model = build_from_config(config, FoveatedVLM)
    else:
        hp = checkpoint.get("hyper_parameters") or {}
        if "llm" not in hp or "vision" not in hp:
            raise CheckpointError(f"checkpoint {path} has no model hyperparameters (llm, vision)")
        model = build_vlm(
            hp["llm"], hp["vision"], gguf_file=hp.get("gguf_file"), query_dim=hp.get("query_dim", 384),
            visual_scale=hp.get("visual_scale", 0.14), deep_query=hp.get("deep_query", True),
            num_queries=hp.get("num_queries", 1), question_first=hp.get("question_first", False),
        )
    load_state_strict(model, model_state(checkpoint, path), path)
    return model.eval()


def data_settings(checkpoint: dict[str, Any]) -> FrameSettings:
    """The frame settings a checkpoint was trained with (its DataModule's hyperparameters; the recipe's where
    absent)."""
    return FrameSettings.from_dict(checkpoint.get("datamodule_hyper_parameters") or {})


def checkpoint_tokenizer(
    checkpoint: dict[str, Any], explicit: str | None = None, path: str | Path = "checkpoint"
) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint: ``explicit`` if given, else the one it stores (its DataModule's, saved with
    it), else its DataModule's by name, else its LLM's own (:func:`fovlm.model.loading.tokenizer_source`: the
    real SmolLM2 one for "tiny" and "smollm2").

    Args:
        checkpoint: the checkpoint's contents (:func:`read_checkpoint`).
        explicit: a tokenizer folder or id that overrides the checkpoint's.
        path: its file, for error messages.
    """
    if explicit:
        return load_tokenizer(explicit)
    stored = stored_tokenizer(checkpoint, path)
    if stored is not None:
        return stored
    data_hp = checkpoint.get("datamodule_hyper_parameters") or {}
    if data_hp.get("tokenizer"):
        return load_tokenizer(str(data_hp["tokenizer"]), gguf_file=data_hp.get("gguf_file"))
    hp = checkpoint.get("hyper_parameters") or {}
    return load_tokenizer(*tokenizer_source(hp.get("llm", TINY), hp.get("gguf_file"), prepare=True))


def load_any(
    path: str | Path, device: str | torch.device = "cpu", tokenizer: str | None = None
) -> tuple[FoveatedVLM, PreTrainedTokenizerBase, FrameSettings]:
    """(model, tokenizer, frame settings) from an exported folder or a Lightning checkpoint file.

    Args:
        path: an exported folder or a FoveatedModule ``.ckpt``.
        device: where the model is put.
        tokenizer: a tokenizer folder or id that overrides the model's own.
    """
    path = Path(path)
    if path.is_dir():
        model = load_pretrained(path, device)
        return model, load_exported_tokenizer(tokenizer or path), frame_settings(read_config(path))
    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).to(device)
    return model, checkpoint_tokenizer(checkpoint, tokenizer, path), data_settings(checkpoint)


def use_queries(model: FoveatedVLM, k: int | None, source: str | Path = "the model") -> None:
    """Read frames with ``k`` queries (None: all the model holds); a k the model does not hold is a
    :class:`CheckpointError` naming ``source``."""
    if k is None:
        return
    if not 1 <= k <= model.num_queries:
        raise CheckpointError(f"{source} holds 1 to {model.num_queries} queries per frame, not {k}")
    model.use_queries(k)
