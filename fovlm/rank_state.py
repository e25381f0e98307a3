"""Per-rank state in a checkpoint that one rank writes.

Lightning calls every ``state_dict`` on all ranks when it saves, but writes the file from global rank 0 only, and
on resume hands each rank that same file. State that differs between ranks (a rank's position in its share of
the data, its random generators) must therefore be gathered into the checkpoint and picked out again by rank:

    saved = gather_by_rank(local_state)      # on every rank, during the save
    local_state = pick_rank(saved, "data")    # on every rank, on resume

Without a process group (one process) nothing is exchanged and the record holds one entry.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

RANKS_KEY = "by_rank"
"""Key of the per-rank list in a gathered record (``{"world_size": W, "by_rank": [state_0, ..., state_W-1]}``)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_by_rank(state: Any) -> dict[str, Any]:
    """Every rank's ``state``, in rank order (a collective call under a process group: all ranks must call it)."""
    rank, world_size = _world()
    if world_size == 1:
        return {"world_size": 1, RANKS_KEY: [state]}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return {"world_size": world_size, RANKS_KEY: gathered}


def is_gathered(saved: Any) -> bool:
    """Whether ``saved`` is a record made by :func:`gather_by_rank` (older checkpoints hold one rank's state)."""
    return isinstance(saved, dict) and RANKS_KEY in saved and "world_size" in saved


def pick_rank(saved: dict[str, Any], what: str) -> Any:
    """This rank's entry of a gathered record. A run resumed on a different number of ranks cannot continue each
    rank's own share, so that is an error naming ``what`` and both world sizes."""
    rank, world_size = _world()
    if int(saved["world_size"]) != world_size:
        raise ValueError(
            f"the checkpoint's {what} was saved by {saved['world_size']} ranks, but this run has {world_size}: "
            "resume with the same number of processes, or start a new run from its weights (init_from)"
        )
    return saved[RANKS_KEY][rank]
