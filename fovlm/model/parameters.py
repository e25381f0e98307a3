"""Parameter bookkeeping of a built FoveatedVLM: the three parameter groups, the no-decay set, a state fingerprint.

Pure functions of the model's modules (membership by module identity, never by name patterns).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

GROUPS = ("connector", "vision", "llm")
QUERY_VECTORS = ("q_static", "q_init")


def vision_backbone(model: nn.Module) -> nn.Module:
    """The one Dinov2Model inside ``model.encoder``."""
    from transformers import Dinov2Model

    backbones = [m for m in model.encoder.modules() if isinstance(m, Dinov2Model)]
    if len(backbones) != 1:
        raise ValueError(f"expected exactly one Dinov2Model inside model.encoder, found {len(backbones)}")
    return backbones[0]


def parameter_groups(model: nn.Module) -> dict[str, str]:
    """Map every parameter name of ``model`` (a FoveatedVLM) to ``connector``, ``vision`` or ``llm``.

    Membership is decided by module identity, not by name patterns: parameters of ``model.llm`` are LLM,
    those of the DINOv2 backbone inside ``model.encoder`` are vision, and every other parameter is new and
    belongs to the connector (so ``encoder.output_proj`` cannot end up at a backbone LR by a name typo).
    """
    llm_ids = {id(p) for p in model.llm.parameters()}
    vision_ids = {id(p) for p in vision_backbone(model).parameters()}
    groups = {}
    for name, param in model.named_parameters():
        if id(param) in llm_ids:
            groups[name] = "llm"
        elif id(param) in vision_ids:
            groups[name] = "vision"
        else:
            groups[name] = "connector"
    return groups


def no_decay_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay.

    Exactly: every parameter with at most one dimension (biases, LayerNorm/RMSNorm gains, LayerScale), every
    embedding (``nn.Embedding`` weights, which also covers a tied ``lm_head``; DINOv2's CLS token, mask token
    and position embeddings, the parameters held directly by its embeddings module), and the query vectors
    ``q_static`` / ``q_init``.
    """
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
        elif isinstance(module, Dinov2Embeddings):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
    names = set()
    for name, param in model.named_parameters():
        if param.ndim <= 1 or id(param) in embedding_ids or name in QUERY_VECTORS:
            names.add(name)
    return names


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # [numel]
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
