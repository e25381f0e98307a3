"""``fovlm fit`` and ``fovlm validate``: LightningCLI with fovlm's module, DataModules, links and checks.

    fovlm fit --config configs/stage1.yaml                        # train stage 1
    fovlm fit --config configs/stage1.yaml --ckpt_path last       # resume it after an interruption
    fovlm fit --config configs/stage2.yaml --model.init_args.init_from runs/stage1/checkpoints/best.ckpt
    fovlm fit --config configs/stage1.yaml --config configs/demo.yaml --print_config
    fovlm validate --config configs/stage2.yaml --ckpt_path runs/stage2/checkpoints/last.ckpt

Configs compose (later ``--config`` files override earlier ones) and name the LightningModule and DataModule
with ``class_path`` / ``init_args``. Design choices:

- Values that must agree are given once and linked (``link_arguments``): the model's ``llm`` (and its
  ``gguf_file``) decide the DataModule's tokenizer, so the tokenizer always matches the LLM.
- A bad config fails before the first step with a message that names the key or the path and exit code 2:
  unknown keys and wrong types are rejected by the parser; a ``init_from`` file, a shard pattern or a local
  ``llm`` / ``vision`` / tokenizer folder that does not exist is rejected by
  :meth:`FovlmCLI.before_instantiate_classes`; shards that hold no usable sample are found when the DataModule
  is set up and reported the same way (the split, its patterns and the samples skipped, by reason).
- Every run writes its fully resolved config into its log folder (``config.yaml``; a resumed run adds
  ``config-2.yaml``, ``config-3.yaml``, ... next to it instead of overwriting the first).
- Checkpoints are written atomically (:class:`fovlm.callbacks.AtomicCheckpointIO` is added to every Trainer
  that does not bring its own checkpoint writer).
- ``init_from`` (the previous stage's weights, loaded by the module) and ``--ckpt_path`` (this stage's full
  state: weights, optimizer, schedule, loop and data position, random generators) are different things. When
  both are given, the resumed state wins for the trained model (the DPO reference model is still built from
  ``init_from``), and the log says which was loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402

from fovlm.callbacks import AtomicCheckpointIO  # noqa: E402
from fovlm.data.readable import NoReadableSampleError  # noqa: E402
from fovlm.data.shards import expand_shards  # noqa: E402
from fovlm.model.loading import missing_path, tokenizer_source  # noqa: E402
from fovlm.module import FoveatedModule  # noqa: E402

SUBCOMMANDS = ("fit", "validate")
"""LightningCLI's subcommands that ``fovlm`` offers (each an entry without a target in :data:`fovlm.cli.COMMANDS`)."""


def linked_tokenizer(llm: str) -> str:
    """The DataModule's ``tokenizer`` linked from the model's ``llm`` (:func:`tokenizer_source`)."""
    return tokenizer_source(llm).name_or_path


def linked_gguf_file(llm: str, gguf_file: str | None) -> str | None:
    """The DataModule's ``gguf_file`` linked from the model's ``llm`` and ``gguf_file`` (:func:`tokenizer_source`)."""
    return tokenizer_source(llm, gguf_file).gguf_file


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config into the run's log folder without overwriting an earlier run's copy.

    The first run of a log folder writes ``config.yaml``; a resumed run (same folder) writes
    ``config-2.yaml``, then ``config-3.yaml``, so each process's exact arguments stay on record.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if not self.already_saved and trainer.log_dir is not None:
            stem, suffix = os.path.splitext(self.config_filename)
            name, index = self.config_filename, 1
            while os.path.exists(os.path.join(trainer.log_dir, name)):
                index += 1
                name = f"{stem}-{index}{suffix}"
            # Every rank must agree on the name; rank 0's view of the folder decides.
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


def _patterns(value: Any) -> list[str]:
    """The shard patterns in a config value: a string, a list of strings, or a mapping of name -> those."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _patterns(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _patterns(v)]
    return []


def _init_args(config: Any, section: str) -> dict[str, Any]:
    """A parsed config's ``SECTION.init_args`` as a plain dict (empty when absent)."""
    args = config.get(section, {}).get("init_args", {}) if config.get(section) else {}
    return dict(args) if args else {}


def _model_problems(model_args: dict[str, Any], data_args: dict[str, Any]) -> list[str]:
    """A missing ``init_from`` checkpoint; an ``llm``, ``vision`` or ``tokenizer`` naming a local folder that
    does not exist (:func:`fovlm.model.loading.missing_path`: with the make target that builds it)."""
    problems = []
    init_from = model_args.get("init_from")
    if init_from and not Path(init_from).is_file():
        problems.append(f"model.init_args.init_from: checkpoint {init_from!r} does not exist")
    llm, tokenizer = model_args.get("llm"), data_args.get("tokenizer")
    named = [
        ("model.init_args.llm", llm, "LLM folder"),
        ("model.init_args.vision", model_args.get("vision"), "DINOv2 folder"),
    ]
    if tokenizer != llm:  # linked from the LLM (for "tiny", SmolLM2's folder); one folder is named once
        key = f"data.init_args.tokenizer (linked from model.init_args.llm {llm!r})"
        named.append((key, tokenizer, "tokenizer folder"))
    for key, value, what in named:
        problem = missing_path(value, what) if isinstance(value, str) else None
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


def config_problems(config: Any) -> list[str]:
    """Paths in a parsed config that do not exist, each named with its key (empty list when all is well).

    Checked: ``model.init_args.init_from`` must be an existing file; ``model.init_args.llm``,
    ``model.init_args.vision`` and ``data.init_args.tokenizer`` must exist where they name a local path (a
    folder that a make target builds names that target); every ``data.init_args.*shards*`` pattern must match
    at least one file.
    """
    data_args = _init_args(config, "data")
    problems = _model_problems(_init_args(config, "model"), data_args)
    for key, value in data_args.items():
        if "shards" not in key:
            continue
        for pattern in _patterns(value.as_dict() if hasattr(value, "as_dict") else value):
            try:
                expand_shards(pattern)
            except FileNotFoundError as error:
                problems.append(f"data.init_args.{key}: {error}")
    return problems


class FovlmCLI(LightningCLI):
    """LightningCLI for fovlm: FoveatedModule and any fovlm DataModule in subclass mode, linked arguments,
    early path checks, atomic checkpoints and per-run config records."""

    def __init__(self, args: Sequence[str] | dict | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs["parser_kwargs"] = {"prog": "fovlm", **(kwargs.get("parser_kwargs") or {})}
        super().__init__(
            model_class=FoveatedModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            # The config is the one record of a run: hyperparameters are never silently read back from a
            # checkpoint given with --ckpt_path.
            load_from_checkpoint_support=False,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands that ``fovlm`` offers: :data:`SUBCOMMANDS`."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The LLM decides the tokenizer: the DataModule's tokenizer and GGUF file are never given separately.
        parser.link_arguments("model.init_args.llm", "data.init_args.tokenizer", compute_fn=linked_tokenizer)
        parser.link_arguments(
            ("model.init_args.llm", "model.init_args.gguf_file"), "data.init_args.gguf_file", compute_fn=linked_gguf_file
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = config_problems(config)
        if problems:
            self.parser.error("invalid configuration:\n  " + "\n  ".join(problems))

    def _run_subcommand(self, subcommand: str) -> None:
        # A split without a usable sample shows when the DataModule is set up (its shards are read then):
        # it is reported as a configuration error, like a shard pattern that matches nothing.
        try:
            super()._run_subcommand(subcommand)
        except NoReadableSampleError as error:
            self.parser.error(f"data.init_args.{error.argument}: {error}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)
