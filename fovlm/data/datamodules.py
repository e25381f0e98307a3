"""One LightningDataModule per training stage, on a shared base that streams webdataset shards.

- ``CaptionDataModule`` (stage 1), ``SFTDataModule`` (stage 2) and ``PreferenceDataModule`` (stage 3, DPO).
  Stages 1 and 2 read the same kind of batches (token ids with roles); the loss head decides which tokens
  count (all text in stage 1, answers only in stage 2).
- The typed ``__init__`` arguments are the configuration (LightningCLI); ``__init__`` does no I/O. ``setup``
  loads the tokenizer, expands the shard patterns, indexes the shards (cached), checks that every split
  holds a sample it can use (a :class:`~fovlm.data.readable.NoReadableSampleError` names the split, its
  patterns and what was skipped, by reason) and builds the epoch plans; the loaders are built on demand.
- The training loader is a :class:`~fovlm.data.stream.ShardLoader` (torchdata ``StatefulDataLoader``):
  Lightning saves its position in checkpoints and restores it on resume; the epoch it reads is the
  Trainer's ``current_epoch``.
- ``skip_counts(split)`` returns the samples skipped (and truncated / padded) by reason so far, summed over the
  loader workers, of the training or the validation loaders (or both), for logging.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from fovlm.data.chat import SYSTEM_PROMPT
from fovlm.data.collate import Collator, SampleEncoder, normalize_frames
from fovlm.data.contract import FRAME_SETTINGS, FrameSettings
from fovlm.data.plan import EpochPlanner, PlanConfig, ShardGroup, group_counts
from fovlm.data.quiet import quiet_loaders
from fovlm.data.readable import NoReadableSampleError, find_readable
from fovlm.data.shards import ShardInfo, build_index, expand_shards
from fovlm.data.stream import ShardLoader, ShardStream

log = logging.getLogger(__name__)

ShardSpec = str | list[str] | dict[str, str | list[str]]


def _groups(spec: ShardSpec | None, prefix: str) -> list[tuple[str, list[str]]]:
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return [(str(name), expand_shards(patterns)) for name, patterns in spec.items()]
    return [(prefix, expand_shards(spec))]


def _spec_patterns(spec: ShardSpec | None, group: str | None = None) -> list[str]:
    """The shard patterns of a spec as given (of one group of a mapping when ``group`` is named)."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        chosen = [spec[group]] if group is not None else list(spec.values())
        return [p for patterns in chosen for p in _spec_patterns(patterns)]
    return [spec] if isinstance(spec, str) else [str(p) for p in spec]


class ShardDataModule(L.LightningDataModule):
    """Shared base: shards -> resumable, rank- and worker-split batches (see :mod:`fovlm.data.plan`).

    Args:
        train_shards: training shards: a pattern (glob or brace range), a list of patterns, or a mapping
            ``{group name: patterns}`` whose groups are mixed at sample level (see ``group_weights``).
        val_shards: validation shards (same forms), read in order, without mixing weights.
        text_shards: text-only shards mixed in at ``text_ratio`` of all training samples (text retention).
        text_ratio: share of text-only samples in the training stream.
        group_weights: ``{group name: weight}`` for the groups of ``train_shards`` (e.g. 55/30/15); None for
            their natural ratios, which read every sample exactly once per epoch.
        samples_per_epoch: training samples per epoch from ``train_shards`` (text retention comes on top);
            None for the groups' total.
        tokenizer: Hugging Face id or local folder of the tokenizer (with its chat template).
        gguf_file: a GGUF file inside ``tokenizer`` to read the tokenizer from.
        max_length: text tokens kept per sequence; longer samples are truncated (and counted).
        image_frames: a single image is replicated to this many identical frames.
        frame_size: frames are resized to cover, and centre-cropped to, this many pixels squared.
        max_frames: at most this many frames per video (spread uniformly over longer videos).
        batch_size: samples per batch.
        val_batch_size: samples per validation batch (default: ``batch_size``).
        max_frames_per_batch: optional frame budget per batch, so long videos come in smaller batches.
        num_workers: training loader worker processes per rank.
        val_num_workers: validation loader worker processes per rank.
        shuffle_buffer: samples held by the shuffle buffer (per worker).
        seed: seeds the shard and sample order (per epoch).
        system_prompt: system turn for samples that carry none.
        index_cache: folder for the cached shard index (default ``$FOVLM_CACHE/shard_index`` or
            ``~/.cache/fovlm/shard_index``).
        pin_memory: pin batches in page-locked memory (for GPU training).
        prefetch_factor: batches prefetched per worker (default of the DataLoader when None).

    ``frame_size``, ``max_frames`` and ``image_frames`` make up the run's frame settings (``frames``, a
    :class:`~fovlm.data.contract.FrameSettings`); their defaults are the contract's.
    """

    preference: bool = False

    def __init__(
        self,
        train_shards: ShardSpec,
        tokenizer: str,
        val_shards: ShardSpec | None = None,
        text_shards: str | list[str] | None = None,
        text_ratio: float = 0.14,
        group_weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        gguf_file: str | None = None,
        max_length: int = 1024,
        image_frames: int = FRAME_SETTINGS.image_frames,
        frame_size: int = FRAME_SETTINGS.frame_size,
        max_frames: int = FRAME_SETTINGS.max_frames,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_frames_per_batch: int | None = None,
        num_workers: int = 2,
        val_num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        system_prompt: str = SYSTEM_PROMPT,
        index_cache: str | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch sizes must be at least 1")
        if max_frames_per_batch is not None and max_frames_per_batch < 1:
            raise ValueError(f"max_frames_per_batch must be positive, got {max_frames_per_batch}")
        if not 0.0 <= text_ratio < 1.0:
            raise ValueError(f"text_ratio must be in [0, 1), got {text_ratio}")
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.text_shards = text_shards
        self.text_ratio = text_ratio
        self.group_weights = group_weights
        self.samples_per_epoch = samples_per_epoch
        self.tokenizer_name = tokenizer
        self.gguf_file = gguf_file
        self.max_length = max_length
        self.frames = FrameSettings(frame_size=frame_size, max_frames=max_frames, image_frames=image_frames)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_frames_per_batch = max_frames_per_batch
        self.num_workers = num_workers
        self.val_num_workers = val_num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.system_prompt = system_prompt
        self.index_cache = index_cache
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.tokenizer: Any = None
        self._counts: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
        self._train_planner: EpochPlanner | None = None
        self._val_planner: EpochPlanner | None = None

    @property
    def frame_size(self) -> int:
        """Frame side in pixels (``frames.frame_size``)."""
        return self.frames.frame_size

    @property
    def max_frames(self) -> int:
        """Most frames per video (``frames.max_frames``)."""
        return self.frames.max_frames

    @property
    def image_frames(self) -> int:
        """Frames an image is replicated to (``frames.image_frames``)."""
        return self.frames.image_frames

    # -- set-up ---------------------------------------------------------------------------------------------

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def load_tokenizer(self) -> Any:
        from fovlm.model.loading import load_tokenizer

        return load_tokenizer(self.tokenizer_name, self.gguf_file)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, expand and index the shards, check that each split holds a readable sample,
        build the epoch plans (idempotent).

        Raises:
            FileNotFoundError: a shard pattern matches no file.
            NoReadableSampleError: a split's shards (or a weighted group's) hold no sample the loader can use.
        """
        if self._train_planner is None and stage in (None, "fit"):
            main = _groups(self.train_shards, "train")
            if not main:
                raise ValueError("train_shards is empty")
            text = _groups(self.text_shards, "text") if self.text_ratio > 0 else []
            if self.group_weights is not None:
                unknown = set(self.group_weights) - {name for name, _ in main}
                missing = {name for name, _ in main} - set(self.group_weights)
                if unknown or missing:
                    raise ValueError(
                        f"group_weights must name every train_shards group exactly: unknown "
                        f"{sorted(unknown)}, missing {sorted(missing)}"
                    )
            weights = [None if self.group_weights is None else self.group_weights[n] for n, _ in main]
            self._train_planner = self._planner(
                main + text,
                weights + [None] * len(text),
                ["train"] * len(main) + ["text"] * len(text),
                shuffle=True,
                batch_size=self.batch_size,
            )
        if self._val_planner is None and stage in (None, "fit", "validate") and self.val_shards is not None:
            val = _groups(self.val_shards, "val")
            self._val_planner = self._planner(
                val, [None] * len(val), ["val"] * len(val), shuffle=False, batch_size=self.val_batch_size
            )
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()

    def _planner(
        self,
        groups: Sequence[tuple[str, list[str]]],
        weights: list[float | None],
        splits: list[str],
        shuffle: bool,
        batch_size: int,
    ) -> EpochPlanner:
        """The epoch plan of ``groups``, each of a split (``train``, ``text`` or ``val``); every split, and
        every weighted group, must hold a readable sample (:meth:`_check_readable`)."""
        paths = [p for _, shards in groups for p in shards]
        index = build_index(paths, self.index_cache)
        counts = self._counts["val" if "val" in splits else "train"]
        for info in index.values():
            if info.error is not None:
                counts["damaged_shard"] += 1
                log.warning("%s (its %d readable samples are kept)", info.error, info.num_samples)
        for split in dict.fromkeys(splits):
            self._check_readable(split, [g for g, s in zip(groups, splits, strict=True) if s == split], index)
        for (name, shards), weight in zip(groups, weights, strict=True):
            if weight:  # a weighted group is drawn from every epoch, whatever the others hold
                self._check_readable("train", [(name, shards)], index, group=name)
        totals = [sum(index[p].num_samples for p in shards) for _, shards in groups]
        text = [split == "text" for split in splits]
        counts = group_counts(
            totals,
            weights,
            text,
            self.text_ratio if shuffle else 0.0,
            self.samples_per_epoch if shuffle else None,
        )
        config = PlanConfig(
            batch_size=batch_size,
            seed=self.seed,
            shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer,
            max_frames_per_batch=self.max_frames_per_batch,
            frames=self.frames,
        )
        shard_groups = [ShardGroup(name, tuple(shards)) for name, shards in groups]
        return EpochPlanner(shard_groups, index, counts, config)

    def _check_readable(
        self,
        split: str,
        groups: Sequence[tuple[str, list[str]]],
        index: Mapping[str, ShardInfo],
        group: str | None = None,
    ) -> None:
        """Raise :class:`~fovlm.data.readable.NoReadableSampleError` unless a sample of ``groups`` encodes
        (the first readable one ends the check: normally the first sample read)."""
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
        paths = [p for _, shards in groups for p in shards]
        skipped = find_readable(paths, index, self._encoder())
        if skipped is not None:
            argument = f"{split}_shards"
            where = split if group is None else f"{split} group {group!r}"
            patterns = _spec_patterns(getattr(self, argument), group)
            raise NoReadableSampleError(where, argument, patterns, len(paths), skipped)

    # -- loaders -------------------------------------------------------------------------------------------

    def _encoder(self) -> SampleEncoder:
        return SampleEncoder(
            self.tokenizer, self.max_length, self.preference, self.frames, self.system_prompt
        )

    def _stream(self, planner: EpochPlanner) -> ShardStream:
        encoder = self._encoder()
        collator = Collator(self.tokenizer.pad_token_id, self.frames, self.preference, normalize=False)
        rank, world_size = self._distributed()
        return ShardStream(planner, encoder, collator, rank=rank, world_size=world_size)

    def _loader_kwargs(self, num_workers: int) -> dict[str, Any]:
        # Frames leave the workers as uint8; under a Trainer they are normalised on the device
        # (on_after_batch_transfer), otherwise by the loader in this process.
        kwargs: dict[str, Any] = {
            "num_workers": num_workers,
            "pin_memory": self.pin_memory,
            "finalize": None if self.trainer is not None else normalize_frames,
        }
        if num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def _trainer_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> ShardLoader:
        if self._train_planner is None:
            self.setup("fit")
        assert self._train_planner is not None
        epoch_fn = self._trainer_epoch if self.trainer is not None else None
        quiet_loaders()  # library warnings that do not concern the user (fovlm.data.quiet)
        return ShardLoader(
            self._stream(self._train_planner),
            epoch_fn=epoch_fn,
            counts=self._counts["train"],
            **self._loader_kwargs(self.num_workers),
        )

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            quiet_loaders(empty_list=True)  # no validation: Lightning is given no loader
            return []
        if self._val_planner is None:
            self.setup("validate")
        assert self._val_planner is not None
        # Validation reads the same order every time: epoch 0 of an unshuffled plan.
        quiet_loaders()
        return ShardLoader(
            self._stream(self._val_planner),
            epoch_fn=lambda: 0,
            counts=self._counts["val"],
            **self._loader_kwargs(self.val_num_workers),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise the uint8 frames on the device they were moved to (4x less host-to-device traffic)."""
        return normalize_frames(batch) if isinstance(batch, dict) else batch

    def skip_counts(self, split: str | None = None) -> dict[str, int]:
        """Samples skipped so far by reason (and ``truncated`` / ``padded`` samples), summed over all loader
        workers of this process: of ``split`` (``"train"`` or ``"val"``), or of both (None)."""
        if split is not None:
            return dict(self._counts[split])
        return dict(sum(self._counts.values(), Counter()))


class CaptionDataModule(ShardDataModule):
    """Stage 1: caption pre-training (video captions with their per-source prompts, plus text retention).

    Same arguments as :class:`ShardDataModule`; captions are short, so ``max_length`` defaults to 512.
    """

    def __init__(self, max_length: int = 512, **kwargs: Any):
        super().__init__(max_length=max_length, **kwargs)


class SFTDataModule(ShardDataModule):
    """Stage 2: supervised fine-tuning (captions, multi-turn conversations, images x8, text retention).

    Same arguments as :class:`ShardDataModule`.
    """


class PreferenceDataModule(ShardDataModule):
    """Stage 3: preference pairs for DPO (``messages`` + ``chosen`` / ``rejected``); no text retention by
    default.

    Same arguments as :class:`ShardDataModule`; ``text_ratio`` defaults to 0.
    """

    preference = True

    def __init__(self, text_ratio: float = 0.0, **kwargs: Any):
        super().__init__(text_ratio=text_ratio, **kwargs)
