"""A FoveatedVLM's weights from a file, loaded strictly: a Lightning checkpoint, a state dict or safetensors.

Files are read without unpickling arbitrary objects: ``.safetensors`` with safetensors, everything else with
``torch.load(weights_only=True)`` (tensors and plain containers only). A Lightning checkpoint of a
FoveatedModule keeps the model's tensors under ``state_dict`` with a ``model.`` prefix; other top-level keys
(optimizer state, hyperparameters) and other prefixes (the DPO reference model) are not the model's.

A strict load accepts a file only when it holds every tensor of the model, nothing else, each with the model's
shape. Tied tensors (the LLM's input and output embeddings) may be stored once, as safetensors stores them.
Every error names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODEL_PREFIX = "model."
"""Prefix of the FoveatedVLM's tensors in the state dict of a FoveatedModule checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint or exported folder that cannot be used; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint or exported file that does not exist."""


def read_weights_file(path: str | Path, label: str = "checkpoint") -> Any:
    """The contents of a weights file: a dict of tensors from ``.safetensors``, else what ``torch.load`` reads
    with ``weights_only=True``.

    Args:
        path: the file.
        label: what the file is, for error messages (``"checkpoint"``, ``"init_from checkpoint"``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{label} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{label} {path} cannot be read safely (weights_only): {error}") from error


def model_state(contents: Any, path: str | Path, label: str = "checkpoint") -> dict[str, Tensor]:
    """The FoveatedVLM state dict in a weights file's contents (:func:`read_weights_file`).

    A Lightning checkpoint gives its ``state_dict`` entries under ``model.``, without the prefix; a plain dict
    of tensors is the state dict itself.

    Args:
        contents: what the file holds.
        path: the file, for error messages.
        label: what the file is, for error messages.
    """
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict):
        contents = {
            key[len(MODEL_PREFIX):]: value
            for key, value in contents["state_dict"].items()
            if key.startswith(MODEL_PREFIX)
        }
    if not isinstance(contents, dict) or not all(isinstance(v, Tensor) for v in contents.values()):
        raise CheckpointError(f"{label} {path} holds no state dict of tensors")
    return contents


def read_model_state(path: str | Path, label: str = "checkpoint") -> dict[str, Tensor]:
    """The FoveatedVLM state dict stored in a Lightning checkpoint, a ``torch.save`` state dict or safetensors.

    Args:
        path: the file.
        label: what the file is, for error messages.
    """
    return model_state(read_weights_file(path, label), path, label)


def tied_aliases(model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Parameter names of ``model`` absent from ``state`` that share their tensor with a name ``state`` holds."""
    params = dict(model.named_parameters(remove_duplicate=False))
    by_tensor: dict[int, set[str]] = {}
    for name, param in params.items():
        by_tensor.setdefault(id(param), set()).add(name)
    return {
        name
        for name, param in params.items()
        if name not in state and any(other in state for other in by_tensor[id(param)] - {name})
    }


def mismatches(model: nn.Module, state: dict[str, Tensor]) -> dict[str, list[str]]:
    """What keeps ``state`` from loading strictly into ``model``: missing, unexpected and differently shaped
    tensors (each list sorted; all empty when it fits)."""
    expected = model.state_dict()
    return {
        "missing": sorted(set(expected) - set(state) - tied_aliases(model, state)),
        "unexpected": sorted(set(state) - set(expected)),
        "shape mismatch": sorted(
            f"{key} {tuple(state[key].shape)} vs model {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state and state[key].shape != value.shape
        ),
    }


def load_state_strict(
    model: nn.Module, state: dict[str, Tensor], path: str | Path, label: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` when it fits exactly (:func:`mismatches`), else raise naming the file.

    Args:
        model: the model to fill.
        state: its state dict, as read from ``path``.
        path: the file, for error messages.
        label: what the file is, for error messages.
    """
    problems = {kind: items for kind, items in mismatches(model, state).items() if items}
    if problems:
        parts = [
            f"{kind} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for kind, items in problems.items()
        ]
        raise CheckpointError(f"{label} {path} does not match the model: " + "; ".join(parts))
    # Every tensor is there with its shape; a tied alias stored once is filled through its twin.
    model.load_state_dict(state, strict=False)


def load_weights(model: nn.Module, path: str | Path, label: str = "checkpoint") -> None:
    """Load a weights file (Lightning checkpoint, state dict or safetensors) into ``model`` strictly.

    Args:
        model: the FoveatedVLM to fill.
        path: the file.
        label: what the file is, for error messages.
    """
    load_state_strict(model, read_model_state(path, label), path, label)
