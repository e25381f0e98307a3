"""``fovlm reference-logps``: the frozen DPO reference model run once over the preference shards, its log-probabilities
written to a cache that stage 3 reads instead of keeping a reference model (:mod:`fovlm.reference_logps`).

    fovlm reference-logps --config configs/stage3.yaml \\
        --model.init_args.init_from runs/stage2/checkpoints/best.ckpt --output runs/stage3/reference-logps
    fovlm fit --config configs/stage3.yaml --model.init_args.init_from runs/stage2/checkpoints/best.ckpt \\
        --model.init_args.reference_logps runs/stage3/reference-logps

It takes the training run's own configs and overrides (everything but ``--output`` and ``--splits`` is
``fovlm fit``'s), so the numbers are those the run's reference model would give: the model is built and loaded from
``init_from`` as the module builds it, the batches come from the run's DataModule, streamed and split over ranks
and loader workers as training splits them (every sample of the shards once: mixing weights and
``samples_per_epoch`` are set aside, as is ``text_ratio``), and a Trainer with the config's accelerator, devices,
nodes and precision runs it (on several devices, one part file per rank). The ``val`` split is scored too when
the config has ``val_shards``. The manifest is written last, after every part: an interrupted build leaves no
cache that training would read.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Trainer
from torch import nn

from fovlm.cli.train import FovlmCLI
from fovlm.data.shards import expand_shards
from fovlm.losses import DPO
from fovlm.model.parameters import state_fingerprint
from fovlm.module import FoveatedModule
from fovlm.reference_logps import (
    MANIFEST,
    data_identity,
    entry_names,
    load_split,
    model_identity,
    needed_queries,
    part_path,
    sample_digests,
    write_manifest,
    write_part,
)

SPLITS = ("train", "val")
# What turns a DPO module's arguments into those of the model it copies as its reference: no reference of its own,
# none of the policy's training-only settings (the reference runs the patch pass in the model's own precision).
_REFERENCE_ONLY = {"loss": "answer_only", "reference_logps": None, "patch_pass_bf16": False,
                   "gradient_checkpointing": False, "lambda_coarse": 0.0, "lambda_ar": 0.0}


def reference_model(model_args: Mapping[str, Any]) -> nn.Module:
    """The frozen reference model of a DPO module's arguments: built and loaded (``init_from``) as
    :meth:`FoveatedModule.configure_model` builds the model it copies, in eval mode, without gradients."""
    accepted = inspect.signature(FoveatedModule.__init__).parameters
    module = FoveatedModule(**{**{k: v for k, v in model_args.items() if k in accepted}, **_REFERENCE_ONLY})
    module.configure_model()
    return module.model.requires_grad_(False).eval()


class ReferenceScorer(L.LightningModule):
    """Runs the reference model over one split's preference batches (``predict``) and writes this rank's part.

    Args:
        model_args: the DPO module's arguments (the training config's ``model.init_args``).
        output: the cache folder.
    """

    def __init__(self, model_args: dict[str, Any], output: str) -> None:
        super().__init__()
        self.model_args = dict(model_args)
        self.output = output
        self.queries = needed_queries(model_args)
        self.mode = "coarse_only" if model_args.get("coarse_only") else "coarse_fine"
        self.split = "train"
        self.model: nn.Module | None = None
        self.fingerprint: str | None = None
        self.head = DPO()
        self._rows: tuple[list[str], list[str], list[torch.Tensor]] = ([], [], [])
        self._started = False

    def configure_model(self) -> None:
        """Build the reference model once (under the Trainer's precision, as training builds it)."""
        if self.model is None:
            self.model = reference_model(self.model_args)
            self.fingerprint = state_fingerprint(self.model)

    def on_predict_start(self) -> None:
        if self.global_rank == 0 and not self._started:
            (Path(self.output) / MANIFEST).unlink(missing_ok=True)  # the folder is no finished cache until the end
        self._started = True
        self._rows = ([], [], [])
        self.trainer.strategy.barrier()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Every cached k's (chosen, rejected) log-probs of the batch's pairs -> [B, Q, 2], kept on the CPU."""
        columns = []
        for k in self.queries:
            self.model.use_queries(k)
            chosen, rejected = self.head.pair_logps(self.model, batch, self.mode)
            columns.append(torch.stack([chosen, rejected], dim=1))  # [B, 2]
        names, digests, logps = self._rows
        names += entry_names(batch)
        digests += sample_digests(batch)
        logps.append(torch.stack(columns, dim=1).float().cpu())  # [B, Q, 2]

    def on_predict_end(self) -> None:
        names, digests, chunks = self._rows
        logps = torch.cat(chunks) if chunks else torch.zeros(0, len(self.queries), 2)
        write_part(self.output, self.split, self.global_rank, self.trainer.world_size, names, digests, logps)
        self.trainer.strategy.barrier()  # every rank's part is written before any rank goes on


class SplitReader(L.LightningDataModule):
    """One split of a fovlm DataModule as the predict loader, read as training reads it: per rank and worker from
    the Trainer, frames normalised on the device.

    Args:
        datamodule: the run's DataModule (a ShardDataModule).
        split: ``train`` or ``val``.
    """

    def __init__(self, datamodule: Any, split: str) -> None:
        super().__init__()
        self.inner = datamodule
        self.split = split

    def setup(self, stage: str) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup("fit" if self.split == "train" else "validate")

    def predict_dataloader(self) -> Any:
        return self.inner.train_dataloader() if self.split == "train" else self.inner.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_after_batch_transfer(batch, dataloader_idx)


def reading_datamodule(datamodule: Any) -> Any:
    """A copy of the run's DataModule that reads every sample of its shards exactly once per epoch."""
    args = {**dict(datamodule.hparams), "group_weights": None, "samples_per_epoch": None, "text_ratio": 0.0}
    return type(datamodule)(**args)


def shard_sizes(spec: Any) -> dict[str, int | None]:
    """The shards of a ``*_shards`` spec (pattern, list or ``{group: patterns}``) with their sizes in bytes
    (None for streamed ones): the shard set a split's entries were computed from."""
    if isinstance(spec, Mapping):
        patterns = [p for value in spec.values() for p in ([value] if isinstance(value, str) else value)]
    else:
        patterns = [spec] if isinstance(spec, str) else list(spec or [])
    paths = expand_shards(patterns) if patterns else []
    return {p: (os.path.getsize(p) if os.path.isfile(p) else None) for p in paths}


def build_trainer(config: Mapping[str, Any]) -> Trainer:
    """A Trainer with the run's accelerator, devices, nodes and precision (a strategy object, such as FSDP for a
    large model, gives way to the default one: the reference model only runs forward)."""
    strategy = config.get("strategy") or "auto"
    return Trainer(
        accelerator=config.get("accelerator") or "auto", devices=config.get("devices") or "auto",
        num_nodes=config.get("num_nodes") or 1, strategy=strategy if isinstance(strategy, str) else "auto",
        precision=config.get("precision"), logger=False, enable_checkpointing=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[], enable_progress_bar=bool(config.get("enable_progress_bar", True)),
    )


def build(model_args: Mapping[str, Any], sources: Mapping[str, Any], trainer: Trainer, output: str | Path,
          datamodule: Any = None) -> Path | None:
    """Score every pair of each split's source with the reference model and write the cache under ``output``.

    Args:
        model_args: the DPO module's arguments.
        sources: split (``train``, ``val``) -> its batches: a :class:`SplitReader` or any DataLoader of
            preference batches.
        trainer: runs the reference model (its precision is the cache's).
        output: the cache folder.
        datamodule: the fovlm DataModule the sources read, whose data settings and shards the manifest records
            (None: plain loaders, no data settings).

    Returns:
        the manifest (on rank 0; None on the other ranks).

    Raises:
        ReferenceCacheError: two different pairs of a split share ``source/key``.
    """
    scorer = ReferenceScorer(dict(model_args), str(output))
    infos: dict[str, dict[str, Any]] = {}
    for split, source in sources.items():
        scorer.split = split
        where = {"datamodule": source} if isinstance(source, L.LightningDataModule) else {"dataloaders": source}
        trainer.predict(scorer, return_predictions=False, **where)
        parts = [part_path(split, rank, trainer.world_size) for rank in range(trainer.world_size)]
        infos[split] = {"parts": parts, "shards": shard_sizes(getattr(datamodule, f"{split}_shards", None))}
    if trainer.global_rank != 0:
        return None
    for split, info in infos.items():
        info["pairs"] = len(load_split(Path(output), split, info["parts"]).rows)
    identity = {**model_identity(model_args, scorer.fingerprint), "precision": str(trainer.precision),
                "data": data_identity(datamodule)}
    return write_manifest(output, identity, scorer.queries, infos, init_from=model_args.get("init_from"))


class ConfigOnlyCLI(FovlmCLI):
    """The training run's config (model and DataModule instantiated, nothing built or read); no Trainer."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fovlm reference-logps", allow_abbrev=False,
        description="Run the frozen DPO reference model once over a stage-3 run's preference shards and write "
                    "each pair's chosen and rejected log-probabilities to a cache that training reads "
                    "(--model.init_args.reference_logps DIR).",
        epilog="Every other option is fovlm fit's: give the training run's --config files and overrides.",
    )
    parser.add_argument("--output", required=True, help="the cache folder (written last: its manifest.json)")
    parser.add_argument("--splits", default=None,
                        help="comma-separated, of train and val (default: train, and val when there are val_shards)")
    args, rest = parser.parse_known_args(argv)
    cli = ConfigOnlyCLI(args=rest, run=False)
    model_args = dict(cli.model.hparams)
    if model_args.get("loss") != "dpo":
        parser.error(f"model.init_args.loss is {model_args.get('loss')!r}: reference log-probabilities are DPO's "
                     "(give a stage-3 config)")
    datamodule = cli.datamodule
    if not getattr(datamodule, "preference", False):
        parser.error(f"data: {type(datamodule).__name__} does not read preference pairs")
    splits = [s for s in (args.splits or "train,val").split(",") if s]
    if args.splits is None and getattr(datamodule, "val_shards", None) is None:
        splits = ["train"]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or (splits.count("val") and datamodule.val_shards is None):
        parser.error(f"--splits: {unknown or 'val'} is not a split of this config (train, val with val_shards)")
    reader = reading_datamodule(datamodule)
    sources = {split: SplitReader(reader, split) for split in splits}
    manifest = build(model_args, sources, build_trainer(cli.config["trainer"]), args.output, reader)
    if manifest is not None:
        print(f"wrote {manifest}")
    return 0
