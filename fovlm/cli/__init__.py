"""The ``fovlm`` command line: one table of commands (:data:`COMMANDS`); ``fovlm --help`` lists them.

``fit`` and ``validate`` are LightningCLI's (:class:`fovlm.cli.train.FovlmCLI`); ``eval``, ``predict``,
``stream``, ``export``, ``summary`` and ``reference-logps`` are fovlm's own. LightningCLI's ``test`` and ``predict`` are not offered: the
LightningModule has no ``test_step`` or ``predict_step`` (benchmarks are ``fovlm eval``, answers about one file
``fovlm predict``). A command's code is imported only when it runs, so ``fovlm --help`` is quick.

    fovlm --help                                                  # every command with its one-line description
    fovlm COMMAND --help                                          # one command's options
    fovlm fit --config configs/stage1.yaml                        # train stage 1
    fovlm fit --config configs/stage1.yaml --ckpt_path last       # resume it after an interruption
    fovlm fit --config configs/stage2.yaml --model.init_args.init_from runs/stage1/checkpoints/best.ckpt
    fovlm fit --config configs/stage1.yaml --config configs/demo.yaml --print_config
    fovlm eval --model exported/fovlm-135m --benchmark mvbench='data/mvbench/*.tar'   # fovlm.eval.run
    fovlm export runs/stage3/checkpoints/last.ckpt exported/fovlm-135m                 # fovlm.export
    fovlm reference-logps --config configs/stage3.yaml --output runs/stage3/reference-logps   # fovlm.cli.reference_logps
    fovlm predict clip.mp4 --model exported/fovlm-135m --prompt "What happens?"       # fovlm.eval.predict
    fovlm stream long.mp4 --model exported/fovlm-135m --ask "90:What is on the table?"   # fovlm.eval.stream

A new command is one entry of :data:`COMMANDS`: its description and the function that runs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``fovlm`` command: its one-line description and what runs it.

    ``target`` is ``"module:function"``: the function takes the arguments after the command name (``list[str]``)
    and returns an exit code (``None`` for 0); it is imported only when its command runs. Without a target the
    command is LightningCLI's subcommand of the same name (one of :data:`fovlm.cli.train.SUBCOMMANDS`).
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
    "stream": Command("questions answered at their moments of a long video read one frame at a time",
                      target="fovlm.eval.stream:main"),
    "export": Command("a checkpoint as a Hugging Face-style folder with a model card", target="fovlm.export:main"),
    "summary": Command("first and last training loss of runs, and where their TensorBoard logs are",
                       target="fovlm.cli.summary:main"),
    "reference-logps": Command("the DPO reference model's log-probabilities over a stage-3 run's shards, cached for fit",
                               target="fovlm.cli.reference_logps:main"),
}


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
    from fovlm.cli.train import FovlmCLI

    # With argv None LightningCLI reads sys.argv itself (passing both makes it warn).
    FovlmCLI(args=None if argv is None else args)

