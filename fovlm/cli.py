"""The ``fovlm`` command line: one table of commands (:data:`COMMANDS`), ``fovlm --help`` lists them.

``fit`` and ``validate`` are LightningCLI's (:class:`FovlmCLI`); ``eval``, ``predict``, ``export`` and ``summary``
are fovlm's own. LightningCLI's ``test`` and ``predict`` are not offered: the LightningModule has no
``test_step`` or ``predict_step`` (benchmarks are ``fovlm eval``, answers about one file ``fovlm predict``).

    fovlm --help                                                  # every command with its one-line description
    fovlm COMMAND --help                                          # one command's options
    fovlm fit --config configs/stage1.yaml                        # train stage 1
    fovlm fit --config configs/stage1.yaml --ckpt_path last       # resume it after an interruption
    fovlm fit --config configs/stage2.yaml --model.init_args.init_from runs/stage1/checkpoints/best.ckpt
    fovlm fit --config configs/stage1.yaml --config configs/demo.yaml --print_config
    fovlm eval --model exported/fovlm-135m --benchmark mvbench='data/mvbench/*.tar'   # fovlm.eval.run
    fovlm export runs/stage3/checkpoints/last.ckpt exported/fovlm-135m                 # fovlm.export
    fovlm predict clip.mp4 --model exported/fovlm-135m --prompt "What happens?"       # fovlm.eval.predict

Configs compose (later ``--config`` files override earlier ones) and name the LightningModule and DataModule
with ``class_path`` / ``init_args``. Design choices:

- Values that must agree are given once and linked (``link_arguments``): the model's ``llm`` (and its
  ``gguf_file``) decide the DataModule's tokenizer, so the tokenizer always matches the LLM.
- A bad config fails before the first step with a message that names the key or the path and a non-zero
  exit code: unknown keys and wrong types are rejected by the parser; a ``init_from`` file or a shard pattern
  that does not exist is rejected by :meth:`FovlmCLI.before_instantiate_classes`.
- Every run writes its fully resolved config into its log folder (``config.yaml``; a resumed run adds
  ``config-2.yaml``, ``config-3.yaml``, ... next to it instead of overwriting the first).
- Checkpoints are written atomically (:class:`fovlm.callbacks.AtomicCheckpointIO` is added to every Trainer
  that does not bring its own checkpoint writer).
- ``init_from`` (the previous stage's weights, loaded by the module) and ``--ckpt_path`` (this stage's full
  state: weights, optimizer, schedule, loop and data position, random generators) are different things. When
  both are given, the resumed state wins for the trained model (the DPO reference model is still built from
  ``init_from``), and the log says which was loaded.
- A new command is one entry of :data:`COMMANDS`: its description and the function that runs it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402

from fovlm.callbacks import AtomicCheckpointIO  # noqa: E402
from fovlm.data.shards import expand_shards  # noqa: E402
from fovlm.model.loading import tokenizer_source  # noqa: E402
from fovlm.module import FoveatedModule  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One ``fovlm`` command: its one-line description and what runs it.

    ``target`` is ``"module:function"``: the function takes the arguments after the command name (``list[str]``)
    and returns an exit code (``None`` for 0); it is imported only when its command runs. Without a target the
    command is LightningCLI's subcommand of the same name, run by :class:`FovlmCLI`.
    """

    help: str
    target: str | None = None


# Every command of `fovlm`, in the order `fovlm --help` lists them.
COMMANDS: dict[str, Command] = {
    "fit": Command("train a stage from YAML configs (fovlm fit --config configs/stage1.yaml)"),
    "validate": Command("the validation loss of a config's model, or of a checkpoint with --ckpt_path"),
    # Benchmarks share a patch pass and KV caches across options and modes, which does not fit test_step.
    "eval": Command("multiple-choice benchmarks in the three modes (an export or a checkpoint)",
                    target="fovlm.eval.run:main"),
    "predict": Command("answer a prompt about a video, an image or a folder of frames",
                       target="fovlm.eval.predict:main"),
    "export": Command("a checkpoint as a Hugging Face-style folder with a model card", target="fovlm.export:main"),
    "summary": Command("first and last training loss of runs, and where their TensorBoard logs are",
                       target="fovlm.cli:summary_main"),
}


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


def config_problems(config: Any) -> list[str]:
    """Paths in a parsed config that do not exist, each named with its key (empty list when all is well).

    Checked: ``model.init_args.init_from`` must be an existing file; every ``data.init_args.*shards*`` pattern
    must match at least one file.
    """
    problems = []
    model_args = config.get("model", {}).get("init_args", {}) if config.get("model") else {}
    init_from = model_args.get("init_from") if model_args else None
    if init_from and not Path(init_from).is_file():
        problems.append(f"model.init_args.init_from: checkpoint {init_from!r} does not exist")
    data_args = config.get("data", {}).get("init_args", {}) if config.get("data") else {}
    for key, value in (dict(data_args) if data_args else {}).items():
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
        """LightningCLI's subcommands that :data:`COMMANDS` runs through LightningCLI (``fit``, ``validate``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items()
                if name in COMMANDS and COMMANDS[name].target is None}

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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def read_scalars(log_dir: str | os.PathLike, tag: str) -> dict[int, float]:
    """One scalar's values by step from every TensorBoard event file in ``log_dir`` (a resumed run's files are
    read in the order they were written, so a step logged twice keeps its latest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


def summarize_run(log_dir: str | os.PathLike, tag: str = "train/loss", span: int = 5) -> dict[str, Any]:
    """First and last value of ``tag`` in a run folder, each the mean over ``span`` logged steps (one step's loss
    is noisy), plus the validation loss at its first and last evaluation when there is one."""
    values = read_scalars(log_dir, tag)
    if not values:
        raise ValueError(f"no {tag!r} scalars in {log_dir} (is it a TensorBoard run folder of fovlm fit?)")
    steps = sorted(values)
    span = max(1, min(span, len(steps) // 2 or 1))
    summary: dict[str, Any] = {
        "log_dir": str(log_dir),
        "steps": steps[-1] + 1,
        "first": sum(values[s] for s in steps[:span]) / span,
        "last": sum(values[s] for s in steps[-span:]) / span,
        "span": span,
    }
    val = read_scalars(log_dir, "val/loss")
    if val:
        summary["val_first"], summary["val_last"] = val[min(val)], val[max(val)]
    return summary


def summary_main(argv: list[str]) -> int:
    """``fovlm summary RUN_DIR...``: each run's first and last training loss and where its TensorBoard logs are."""
    import argparse

    parser = argparse.ArgumentParser(prog="fovlm summary", description=summary_main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (the TensorBoard log folders, e.g. runs/stage1)")
    parser.add_argument("--span", type=int, default=5, help="logged steps averaged for 'first' and 'last'")
    args = parser.parse_args(argv)
    failed = 0
    for run in args.runs:
        try:
            s = summarize_run(run, span=args.span)
        except ValueError as error:
            print(f"{run}: {error}", file=sys.stderr)
            failed += 1
            continue
        line = (
            f"{Path(run).name}: {s['steps']} steps, train/loss {s['first']:.3f} -> {s['last']:.3f} "
            f"(means of the first and last {s['span']} steps)"
        )
        if "val_first" in s:
            line += f", val/loss {s['val_first']:.3f} -> {s['val_last']:.3f}"
        print(line)
    logdir = os.path.relpath(os.path.commonpath([os.path.abspath(Path(r).parent) for r in args.runs]))
    print(f"TensorBoard logs: {', '.join(args.runs)}  (view: tensorboard --logdir {logdir})")
    return 1 if failed else 0


def commands_help() -> str:
    """The text of ``fovlm --help``: usage and every command of :data:`COMMANDS` with its description."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: fovlm COMMAND [ARGS...]",
        "",
        "Foveated video vision-language models: training (LightningCLI), evaluation, prediction and export.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()),
        "",
        "fovlm COMMAND --help shows a command's options; options may come before or after positional arguments.",
    ]
    return "\n".join(lines)


def _run_target(target: str, argv: list[str]) -> int:
    module_name, function_name = target.split(":")
    function: Callable[[list[str]], int | None] = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv) or 0)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``fovlm`` console script and ``python -m fovlm``: runs the command named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(commands_help())
        sys.exit(0)
    command = COMMANDS.get(args[0])
    if command is None:
        what = "the command comes first, not the option" if args[0].startswith("-") else "unknown command"
        print(f"fovlm: error: {what} {args[0]!r}; commands: {', '.join(COMMANDS)} (fovlm --help describes them)",
              file=sys.stderr)
        sys.exit(2)
    if command.target is not None:
        sys.exit(_run_target(command.target, args[1:]))
    # With argv None LightningCLI reads sys.argv itself (passing both makes it warn).
    FovlmCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
