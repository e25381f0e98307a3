"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for a :class:`FoveatedVLM`.

The units are the DINO layers (:class:`fovlm.model.encoder.FoveatedLayer`, whose forward runs both the patch pass and
the query passes) and the LLM's decoder layers; the model itself is the root unit and holds the rest (embeddings,
connector, query head, static and initial queries, final norms). A unit's parameters are gathered when its forward
runs and freed after it, its gradients reduce-scattered in backward; the root's are gathered for every forward
method the training step calls (``forward`` and ``forward_pair``).

What runs outside those forwards (a monitor's attention maps or generated answer) reads parameters directly, so it
runs inside :func:`gathered`, which gathers every unit once and keeps them whole until it exits. Every rank must
enter it together: gathering is a collective.

Gradients of sharded parameters are sharded tensors; :func:`global_grad_norm` is the norm of the whole gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

#: Methods of FoveatedVLM that a training or validation step calls from outside the model.
FORWARD_METHODS = ("forward_pair",)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_vlm` shards on their own: every DINO layer, then every LLM decoder layer."""
    return [*model.encoder.layers, *model.llm.get_decoder().layers]


def shard_vlm(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard ``model`` (a FoveatedVLM) in place over ``mesh``'s ranks and return it.

    Args:
        model: the model, built and loaded (its weights are split across the ranks, not re-initialised).
        mesh: a one-dimensional device mesh of the data-parallel ranks.
        mp_policy: FSDP2 mixed precision (parameter and reduction dtypes); None keeps the parameters' dtype.
    """
    if not model.encoder.deep_query:
        raise ValueError("sharding needs the deep query pass: the shallow ablation reads the last DINO layer's "
                         "projections outside the layer's forward")
    # A DINO layer's patch pass returns its keys and values as views of the projections (split into heads); nothing
    # writes to them in place, which is what FSDP2's warning about views is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPFoveatedLayer\) returned a view tensor")
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for unit in shard_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of a strategy's device mesh (Lightning's ``ModelParallelStrategy`` names its
    dimensions ``data_parallel`` and ``tensor_parallel``); fovlm shards over data-parallel ranks only."""
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        return mesh
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"fovlm shards over data-parallel ranks only; the device mesh has tensor_parallel_size "
                         f"{mesh['tensor_parallel'].size()} (set the strategy's tensor_parallel_size to 1)")
    return mesh["data_parallel"]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or any module in it) is sharded with FSDP2."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter of a sharded ``model`` whole inside the block (a no-op for an unsharded model).

    The units stay gathered across every forward inside, so code that runs a different number of forwards on each
    rank (generation stopping early on one) does no collective there. Every rank enters and leaves together.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's defaults: the root keeps its parameters from forward to backward, the other units free them.
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def _square_sum(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Sum of the squares of every element, accumulated in float64 (float32 loses about 1e-5 relative over the
    millions of elements of an embedding's gradient)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total = total + torch.linalg.vector_norm(t, dtype=torch.float64).square()
    return total


def global_grad_norm(grads: Iterable[Tensor]) -> Tensor:
    """The 2-norm of the whole gradient (float64, the same on every rank): a sharded gradient counts each rank's
    shard once (squares summed locally, then over the ranks), a plain one as it is."""
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    total = _square_sum([g for g in grads if not isinstance(g, DTensor)], device)
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if sharded:
        local = _square_sum([g.to_local() for g in sharded], device)
        dist.all_reduce(local, group=sharded[0].device_mesh.get_group())
        total = total + local
    return total.sqrt()
