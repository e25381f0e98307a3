"""DPO's reference log-probabilities computed once and read back: the cache's files, what it depends on, look-ups.

The reference model of stage 3 never changes, so the log-probability it gives each pair's chosen and rejected
answer can be computed once, by ``fovlm reference-logps`` (:mod:`fovlm.cli.reference_logps`), and read back by
training (``FoveatedModule(reference_logps=DIR)``), which then neither builds nor loads a reference model
(docs/recipe.md#reference-log-probabilities-cached).

A cache is a folder:

- ``manifest.json``: the format, everything the numbers depend on (``identity``: the fingerprint of the reference
  weights, the forward mode and layout, the precision, and the data's tokenizer fingerprint, ``max_length``, frame
  settings and system prompt), the query counts k it holds (``queries``) and, per split (``train``, ``val``), its
  part files, pairs and shards. It is written last: a folder without it is an unfinished build.
- ``SPLIT/part-RRRRR-of-WWWWW.pt``: what rank R of W scored: ``names`` (``source/key`` of each pair),
  ``digests`` (a hash of the pair's token ids, roles and frame count) and ``logps`` float32 [N, len(queries), 2]
  (chosen, rejected), the numbers the online reference model gives.

A pair is looked up by split and ``source/key``; its digest ties the entry to the sample's content, so shards
rewritten under the same keys are caught at the first batch that reads them. A cache that does not fit the run
raises :class:`ReferenceCacheError`, naming the setting or the sample and the file: a stale one (other reference
weights, mode, precision, tokenizer, length or frame settings) when training starts, a partial one (a pair it
does not hold) at the batch that needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = 1
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `fovlm reference-logps` (docs/recipe.md#reference-log-probabilities-cached)"


class ReferenceCacheError(ValueError):
    """A reference log-probability cache that does not fit the run: stale, unfinished or missing a pair."""


# ---------------------------------------------------------------------------------------------------------------
# What the numbers depend on


def entry_names(batch: Mapping[str, Any]) -> list[str]:
    """The cache key of each pair of a preference batch: ``source/key``."""
    return [f"{source}/{key}" for source, key in zip(batch["source"], batch["key"], strict=True)]


def sample_digests(batch: Mapping[str, Any]) -> list[str]:
    """Per pair: a hash of both sides' token ids and roles (without padding) and of its frame count."""
    sides = {}
    for side in ("chosen", "rejected"):
        sides[side] = [batch[f"{side}_{name}"].detach().cpu() for name in ("input_ids", "roles", "attention_mask")]
    num_frames = batch["num_frames"].detach().cpu().tolist()
    digests = []
    for i, frames in enumerate(num_frames):
        digest = hashlib.blake2b(digest_size=8)
        for ids, roles, mask in sides.values():
            length = int(mask[i].sum())
            digest.update(ids[i, :length].to(torch.int64).numpy().tobytes())
            digest.update(roles[i, :length].to(torch.int64).numpy().tobytes())
        digest.update(str(int(frames)).encode())
        digests.append(digest.hexdigest())
    return digests


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary, chat template and padding id (what tokenization depends on)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(getattr(tokenizer, "pad_token_id", None)).encode())
    return digest.hexdigest()


def model_identity(hparams: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
    """What the reference model contributes: its weights' fingerprint and the forward settings outside them."""
    return {
        "reference": fingerprint,
        "mode": "coarse_only" if hparams.get("coarse_only") else "coarse_fine",
        "question_first": bool(hparams.get("question_first", False)),
        "deep_query": bool(hparams.get("deep_query", True)),
        "visual_scale": float(hparams.get("visual_scale", 0.14)),
    }


def data_identity(datamodule: Any) -> dict[str, Any] | None:
    """What the data contributes (tokenizer, ``max_length``, frame settings, system prompt), or None for loaders
    that are not a fovlm DataModule (nothing to compare). The DataModule must be set up (its tokenizer loaded)."""
    if datamodule is None or not all(hasattr(datamodule, a) for a in ("frames", "max_length", "tokenizer")):
        return None
    if datamodule.tokenizer is None:
        raise ValueError("the DataModule is not set up: its tokenizer is not loaded")
    return {
        "tokenizer": tokenizer_fingerprint(datamodule.tokenizer),
        "max_length": int(datamodule.max_length),
        "frames": dict(datamodule.frames.as_dict()),
        "system_prompt": getattr(datamodule, "system_prompt", None),
    }


def needed_queries(hparams: Mapping[str, Any]) -> list[int]:
    """Every k a run reads frames with: its ``query_budgets`` (training) and ``num_queries`` (validation)."""
    return sorted({int(hparams.get("num_queries", 1)), *map(int, hparams.get("query_budgets") or [])})


# ---------------------------------------------------------------------------------------------------------------
# Writing


def part_path(split: str, rank: int, world_size: int) -> str:
    """The part file of ``rank`` (of ``world_size``) in a split, relative to the cache folder."""
    return f"{split}/part-{rank:05d}-of-{world_size:05d}.pt"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_part(root: str | Path, split: str, rank: int, world_size: int, names: Sequence[str],
               digests: Sequence[str], logps: Tensor) -> Path:
    """Write one rank's entries of a split (``logps`` float32 [N, Q, 2]) atomically; returns the file."""
    if not len(names) == len(digests) == logps.shape[0]:
        raise ValueError(f"{len(names)} names, {len(digests)} digests and {logps.shape[0]} rows of log-probs")
    path = Path(root) / part_path(split, rank, world_size)
    payload = {"names": list(names), "digests": list(digests), "logps": logps.detach().float().cpu().contiguous()}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def write_manifest(root: str | Path, identity: Mapping[str, Any], queries: Sequence[int],
                   splits: Mapping[str, Mapping[str, Any]], init_from: str | None = None) -> Path:
    """Write ``manifest.json`` (last: it marks the cache finished). ``splits`` maps a split to its ``parts``
    (relative paths), ``pairs`` and ``shards``."""
    manifest = {"format": FORMAT, "identity": dict(identity), "queries": [int(k) for k in queries],
                "init_from": init_from, "splits": {name: dict(info) for name, info in splits.items()}}
    path = Path(root) / MANIFEST
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading


class SplitTable:
    """The entries of one split: ``source/key`` -> row of ``logps`` [N, Q, 2], its digest and its part file.

    Args:
        split: ``train`` or ``val``.
        rows: ``source/key`` -> (row, digest, part file).
        logps: float32 [N, Q, 2].
    """

    def __init__(self, split: str, rows: dict[str, tuple[int, str, str]], logps: Tensor) -> None:
        self.split = split
        self.rows = rows
        self.logps = logps


def load_split(root: Path, split: str, parts: Sequence[str]) -> SplitTable:
    """The entries of a split's part files (a pair read twice, e.g. by two ranks, is kept once).

    Raises:
        ReferenceCacheError: a part file is missing, or two different pairs share ``source/key``.
    """
    rows: dict[str, tuple[int, str, str]] = {}
    chunks: list[Tensor] = []
    count = 0
    for part in parts:
        path = root / part
        if not path.is_file():
            raise ReferenceCacheError(f"reference log-probability cache {root}: part file {path} of the {split} "
                                      f"split is missing (the cache is incomplete); {REBUILD}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        keep = []
        for i, (name, digest) in enumerate(zip(payload["names"], payload["digests"], strict=True)):
            seen = rows.get(name)
            if seen is not None and seen[1] != digest:
                raise ReferenceCacheError(
                    f"reference log-probability cache {root}: two different pairs of the {split} split are both "
                    f"named {name!r} (in {seen[2]} and {path}); give the samples distinct keys or sources")
            if seen is None:
                rows[name] = (count + len(keep), digest, str(path))
                keep.append(i)
        chunks.append(payload["logps"][keep])
        count += len(keep)
    logps = torch.cat(chunks) if chunks else torch.zeros(0, 0, 2)
    return SplitTable(split, rows, logps)


class ReferenceLogps:
    """An opened cache (:meth:`open`): its manifest, checked against a run (:meth:`check`), and a look-up per
    split (:meth:`view`).

    Args:
        root: the cache folder.
        manifest: its ``manifest.json``.
        tables: the entries per split.
    """

    def __init__(self, root: str | Path, manifest: Mapping[str, Any], tables: Mapping[str, SplitTable]) -> None:
        self.root = Path(root)
        self.manifest = dict(manifest)
        self.tables = dict(tables)
        self.queries: list[int] = [int(k) for k in manifest["queries"]]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def open(cls, root: str | Path) -> ReferenceLogps:
        """Read a finished cache: its manifest and every part file of every split."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            what = "does not exist" if not root.exists() else f"has no {MANIFEST} (an unfinished build)"
            raise ReferenceCacheError(f"reference log-probability cache {root} {what}; {REBUILD}")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ReferenceCacheError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}; "
                                      f"{REBUILD}")
        tables = {split: load_split(root, split, info["parts"]) for split, info in manifest["splits"].items()}
        return cls(root, manifest, tables)

    def check(self, expected: Mapping[str, Any], run: str = "this run") -> None:
        """Raise :class:`ReferenceCacheError` naming the first setting of ``expected`` (nested mappings are
        compared key by key) that differs from the cache's ``identity``."""
        cached = self.manifest["identity"]
        for key, value in expected.items():
            have = cached.get(key, "<absent>")
            if isinstance(value, Mapping) and isinstance(have, Mapping):
                for sub, sub_value in value.items():
                    self._compare(f"{key}.{sub}", have.get(sub, "<absent>"), sub_value, run)
            else:
                self._compare(key, have, value, run)

    def _compare(self, key: str, have: Any, value: Any, run: str) -> None:
        if have == value:
            return
        built = f" (built with init_from={self.manifest.get('init_from')!r})" if key == "reference" else ""
        raise ReferenceCacheError(f"reference log-probability cache {self.manifest_path} is stale: {key} is "
                                  f"{have!r} there{built} but {value!r} in {run}; {REBUILD}")

    def check_queries(self, queries: Sequence[int]) -> None:
        """Every k of ``queries`` must be cached."""
        missing = sorted(set(queries) - set(self.queries))
        if missing:
            raise ReferenceCacheError(f"reference log-probability cache {self.manifest_path} holds k = "
                                      f"{self.queries} queries per frame, not {missing}, which this run reads "
                                      f"frames with; {REBUILD}")

    def view(self, split: str) -> CachedReference:
        """What the DPO loss reads instead of a reference model for the batches of ``split``."""
        return CachedReference(self, split)


class CachedReference:
    """The reference log-probabilities of one split's pairs, looked up by batch (:meth:`logps`).

    Args:
        cache: the opened cache.
        split: ``train`` or ``val``.
    """

    def __init__(self, cache: ReferenceLogps, split: str) -> None:
        self.cache = cache
        self.split = split

    def logps(self, batch: Mapping[str, Any], k: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) float32 [B] of a preference batch read with k queries per frame."""
        cache = self.cache
        table = cache.tables.get(self.split)
        if table is None:
            raise ReferenceCacheError(f"reference log-probability cache {cache.root} holds no {self.split} split "
                                      f"(it holds {sorted(cache.tables)}); {REBUILD} with that split's shards")
        cache.check_queries([k])
        rows = []
        for name, digest in zip(entry_names(batch), sample_digests(batch), strict=True):
            entry = table.rows.get(name)
            if entry is None:
                raise ReferenceCacheError(
                    f"reference log-probability cache {cache.root} is partial: pair {name!r} of the {self.split} "
                    f"split is not in it ({len(table.rows)} pairs of that split are); {REBUILD} over this run's shards")
            if entry[1] != digest:
                raise ReferenceCacheError(
                    f"reference log-probability cache {cache.root} is stale: pair {name!r} of the {self.split} split "
                    f"has other tokens or frames than when {entry[2]} was written; {REBUILD}")
            rows.append(entry[0])
        values = table.logps[rows, cache.queries.index(k)]  # [B, 2]
        return values[:, 0].to(device), values[:, 1].to(device)


def open_for_run(hparams: Mapping[str, Any], fingerprint: str, trainer: Any = None) -> ReferenceLogps:
    """Open the cache of ``hparams["reference_logps"]`` and check it against a module's settings, the reference
    weights' ``fingerprint`` and, under a ``trainer``, its precision and its DataModule's data settings."""
    cache = ReferenceLogps.open(hparams["reference_logps"])
    init_from = hparams.get("init_from")
    cache.check(model_identity(hparams, fingerprint), run=f"this run (init_from={init_from!r})")
    cache.check_queries(needed_queries(hparams))
    if trainer is not None:
        cache.check({"precision": str(trainer.precision)})
        data = data_identity(getattr(trainer, "datamodule", None))
        if data is not None:
            cache.check({"data": data})
    return cache
