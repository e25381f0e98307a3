"""Command line: ``python -m data_prep SOURCE --input PATH --output DIR [options]`` and
``python -m data_prep synthetic --output DIR [options]``.

Every source module (:mod:`data_prep.sources`) reads its dataset's published layout; the media and writing
options are shared. ``--workers N`` converts in N processes; re-running the same command skips the shards
that are already complete; ``DIR/manifest.json`` reports samples per source, skipped items by reason (each
listed) and the frame-count histogram.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from data_prep.media import MediaOptions
from data_prep.records import build_record
from data_prep.sources import SOURCES, source_module
from data_prep.synthetic import SyntheticConfig, generate
from data_prep.writer import write_shards


def convert(
    source: str,
    input: str | os.PathLike,
    output: str | os.PathLike,
    media: str | os.PathLike | None = None,
    options: MediaOptions | None = None,
    *,
    workers: int = 1,
    samples_per_shard: int = 1000,
    limit: int | None = None,
    item_timeout: float = 600.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert one dataset to shards under ``output``; returns the manifest (see :func:`write_shards`)."""
    module = source_module(source)
    options = options or MediaOptions()
    records = module.records(Path(input), Path(media) if media else None)
    if limit is not None:
        records = islice(records, limit)
    build = functools.partial(build_record, options=options)
    info = {"source": source, "input": str(input), "media": None if media is None else str(media)}
    return write_shards(records, output, build, options, samples_per_shard=samples_per_shard, workers=workers,
                        item_timeout=item_timeout, progress=progress, description=source, info=info)


def _media_arguments(parser: argparse.ArgumentParser, keep_mp4: bool) -> None:
    group = parser.add_argument_group("media")
    group.add_argument("--size", type=int, default=224, help="side of the square frames (default 224)")
    group.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the frames (default 90)")
    group.add_argument("--keep-mp4", action=argparse.BooleanOptionalAction, default=keep_mp4,
                       help=f"store each video's .mp4 (checked to decode) instead of its frames (default {keep_mp4})")
    group.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video (default 1)")
    group.add_argument("--max-frames", type=int, default=64, help="at most this many frames per video (default 64)")
    group.add_argument("--image-fit", choices=("crop", "pad"), default="crop",
                       help="images: cover + centre crop, or fit inside + pad with the mean colour (default crop)")
    group.add_argument("--multi-image", choices=("grid", "frames"), default="grid",
                       help="a sample with several images: one grid image, or a frame sequence (default grid)")


def _writer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("writing")
    group.add_argument("--output", required=True, type=Path, help="folder of the shard set")
    group.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="conversion processes (0: in this process; default min(8, CPUs))")
    group.add_argument("--samples-per-shard", type=int, default=1000, help="input items per shard (default 1000)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args: argparse.Namespace) -> MediaOptions:
    return MediaOptions(size=args.size, jpeg_quality=args.jpeg_quality, keep_mp4=args.keep_mp4, fps=args.fps,
                        max_frames=args.max_frames, image_fit=args.image_fit, multi_image=args.multi_image)


def _arg_docs(doc: str) -> dict[str, str]:
    """``{name: text}`` from the ``Args:`` section of a docstring (the config's documentation is the help)."""
    docs: dict[str, str] = {}
    name = None
    for line in doc.split("Args:", 1)[-1].splitlines():
        stripped = line.strip()
        head, sep, text = stripped.partition(": ")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            name, docs[head] = head, text
        elif name and stripped:
            docs[name] += " " + stripped
    return docs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="SOURCE")
    for name in SOURCES:
        doc = (source_module(name).__doc__ or "").strip()
        sub = commands.add_parser(name, help=doc.split("\n")[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--input", required=True, type=Path, help="annotation file or dataset folder")
        sub.add_argument("--media", type=Path, default=None, help="where the videos/images were extracted")
        sub.add_argument("--limit", type=int, default=None, help="convert only the first N items")
        sub.add_argument("--item-timeout", type=float, default=600.0,
                         help="seconds before an item whose worker hangs or dies is skipped (default 600)")
        _media_arguments(sub, keep_mp4=False)
        _writer_arguments(sub)
    syn = commands.add_parser("synthetic", help="the seeded synthetic demo dataset (moving shapes)",
                              description=(sys.modules["data_prep.synthetic"].__doc__ or "").strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = _arg_docs(SyntheticConfig.__doc__ or "")
    for name, value in vars(SyntheticConfig()).items():
        syn.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                         help=f"{helps.get(name, '')} (default {value})")
    syn.add_argument("--raw-dir", type=Path, default=None, help="keep the generated .mp4 files here")
    # The synthetic set keeps its .mp4s by default (smaller on disk); `make data-synthetic` stores JPEG frames
    # instead (--no-keep-mp4), which the loader reads several times faster than it decodes the small clips.
    _media_arguments(syn, keep_mp4=True)
    _writer_arguments(syn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = _options(args)
        if args.command == "synthetic":
            config = SyntheticConfig(**{name: getattr(args, name) for name in vars(SyntheticConfig())})
            summary = generate(args.output, config, options, workers=args.workers,
                               samples_per_shard=args.samples_per_shard, raw_dir=args.raw_dir,
                               progress=not args.no_progress)
            report = {k: {"samples": v["samples"], "skipped": v["skipped"]} for k, v in summary["sets"].items()}
            print(json.dumps({"output": str(args.output), "bytes": summary["bytes"], "sets": report}, indent=1))
            return 0
        manifest = convert(args.command, args.input, args.output, args.media, options, workers=args.workers,
                           samples_per_shard=args.samples_per_shard, limit=args.limit,
                           item_timeout=args.item_timeout, progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    brief = {k: manifest[k] for k in ("samples", "samples_per_source", "skipped", "frame_histogram", "run")}
    print(json.dumps({"output": str(args.output), **brief}, indent=1))
    return 0
