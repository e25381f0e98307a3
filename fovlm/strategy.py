"""``FullyShardedStrategy``: Lightning's ``ModelParallelStrategy`` as fully sharded data parallelism (FSDP2).

Every process is a data-parallel rank (no tensor parallelism), and the model shards itself over them in
:meth:`fovlm.module.FoveatedModule.configure_model` (:func:`fovlm.model.sharding.shard_vlm`). It runs wherever
``torch.distributed`` does: NCCL on GPUs, gloo on CPUs. Checkpoints are by default one full file written by rank 0
(``last.ckpt`` / ``best.ckpt`` load as any other fovlm checkpoint: ``init_from``, ``fovlm export``, ``fovlm eval``);
``save_distributed_checkpoint: true`` writes one shard per rank into a folder instead.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process of the run."""

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """Configure the strategy.

        Args:
            save_distributed_checkpoint: False: one full checkpoint file gathered on rank 0; True: a folder with one
                shard of the weights and optimizer state per rank.
            process_group_backend: ``nccl``, ``gloo``, ...; None picks by device (NCCL on GPUs, gloo on CPUs).
            timeout: timeout of the collectives.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        """Every process is a data-parallel rank: the mesh is (nodes x processes per node, 1)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
