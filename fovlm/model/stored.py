"""What a checkpoint stores so that its model rebuilds offline: the architecture and the tokenizer's files.

A FoveatedModule names its backbones by hub id or folder (``llm``, ``vision``), and where a checkpoint is used
those may be out of reach (no network) or gone (a deleted folder), although every weight is in the checkpoint.
So each checkpoint also holds, under :data:`STORED_KEY`:

- ``config``: :func:`model_config`, the FoveatedVLM hyperparameters and the full LLM and DINOv2 configs (what an
  exported ``config.json`` holds), from which :func:`fovlm.model.exported.build_from_config` builds the model
  with random weights before the checkpoint's are loaded;
- ``tokenizer``: the files the training tokenizer writes with ``save_pretrained`` (name -> bytes: vocabulary,
  special tokens, chat template), or None for a checkpoint saved without a DataModule.

The record is plain data (strings, numbers, lists, bytes), so checkpoints are still read with
``torch.load(weights_only=True)``. Checkpoints written before it existed rebuild from their hyperparameters.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from fovlm.model.checkpoint import CheckpointError
from fovlm.model.exported import FORMAT, FORMAT_VERSION
from fovlm.model.loading import load_tokenizer
from fovlm.model.vlm import FoveatedVLM

STORED_KEY = "fovlm_model"
"""Top-level key of the stored architecture and tokenizer in a FoveatedModule checkpoint."""


def model_config(model: FoveatedVLM) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` without its weights: hyperparameters and both backbone configs, as
    JSON values (what the exported ``config.json`` holds besides the frame settings and provenance)."""
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "query_dim": model.query_dim,
        "visual_scale": model.visual_scale,
        "deep_query": model.encoder.deep_query,
        "num_queries": model.num_queries,
        "question_first": model.question_first,
        "llm_config": model.llm.config.to_dict(),
        "vision_config": model.encoder.dino.config.to_dict(),
    }
    return json.loads(json.dumps(config, default=str))


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name (a tokenizer folder's contents)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def datamodule_tokenizer_files(trainer: Any) -> dict[str, bytes] | None:
    """The files of the tokenizer of ``trainer``'s DataModule (:func:`tokenizer_files`), or None when there is no
    trainer, DataModule or loaded tokenizer."""
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    return tokenizer_files(tokenizer) if tokenizer is not None else None


def stored_record(model: FoveatedVLM, tokenizer: dict[str, bytes] | None) -> dict[str, Any]:
    """The record a checkpoint stores under :data:`STORED_KEY`.

    Args:
        model: the trained model (its architecture is stored, not its weights).
        tokenizer: the tokenizer's files (:func:`tokenizer_files`), or None when there is no tokenizer at hand.
    """
    return {"config": model_config(model), "tokenizer": tokenizer}


def stored_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The architecture a checkpoint stores (:func:`model_config`), or None for a checkpoint written without it."""
    record = checkpoint.get(STORED_KEY)
    return record.get("config") if isinstance(record, dict) else None


def stored_tokenizer(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> PreTrainedTokenizerBase | None:
    """The tokenizer a checkpoint stores, loaded from its files, or None for a checkpoint written without them.

    The files are written to a temporary folder and read from there, so the tokenizer names no folder that
    lasts (``name_or_path``); hand the tokenizer itself on.

    Args:
        checkpoint: the checkpoint's contents.
        path: its file, for error messages.
    """
    record = checkpoint.get(STORED_KEY)
    files = record.get("tokenizer") if isinstance(record, dict) else None
    if not files:
        return None
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            if not isinstance(data, bytes) or name in ("", ".", "..") or Path(name).name != name:
                raise CheckpointError(f"checkpoint {path} stores a tokenizer file that is not one: {name!r}")
            (Path(folder) / name).write_bytes(data)
        return load_tokenizer(folder)
