"""Callbacks: what a short fit writes to TensorBoard, the smoothed loss, data counts over two ranks, throughput
windows, the atomic writer."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from fitkit import fit_args, read_events, synthetic_data
from lightning.pytorch.loggers import Logger

from fovlm.callbacks import AtomicCheckpointIO, DataStats, SmoothedLoss, atomic_torch_save, batch_counts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(out, format="JPEG")
    return out.getvalue()


def _bad_shard(path, samples: list[dict]) -> str:
    """A shard of samples the loader skips; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_tensorboard_holds_scalars_images_and_text(data, tmp_path):
    """A short stage-1 fit logs losses, smoothed loss, LR, throughput, data counts, attention entropies and maps,
    and a generated answer; the events are read back from the files. A sample without text among the training
    shards and two without JSON among the validation shards are counted apart, by split."""
    from fovlm.cli import main

    no_text = {"__key__": "no_text", "json": json.dumps({"source": "openvid", "media": "video"}).encode(),
               "000.jpg": _jpeg()}
    train_bad = _bad_shard(tmp_path / "bad" / "train.tar", [no_text])
    val_bad = _bad_shard(tmp_path / "bad" / "val.tar", [{"__key__": f"no_json_{i}", "000.jpg": _jpeg()} for i in (0, 1)])
    out = tmp_path / "runs"
    main(fit_args(1, data, out, steps=8, every=4, extra=[
        "--trainer.val_check_interval", "4",
        "--data.init_args.train_shards", json.dumps([str(data / "caption/train/*.tar"), train_bad]),
        "--data.init_args.val_shards", json.dumps([str(data / "caption/val/*.tar"), val_bad]),
    ]))
    run = out / "stage1"
    events = read_events(run)
    scalars = events["scalars"]
    for tag in ("train/loss", "train/loss_smooth", "train/grad_norm", "val/loss", "perf/samples_per_s",
                "perf/frames_per_s", "perf/tokens_per_s", "data/skipped/train", "data/skipped/val",
                "attention/entropy_coarse", "attention/entropy_fine"):
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
    assert any(tag.startswith("lr-") for tag in scalars), sorted(scalars)
    assert sorted(scalars["train/loss"]) == list(range(8))  # one value per optimizer step
    # Directly written values share Lightning's step axis: after steps 4 and 8 -> logged at 3 and 7.
    assert sorted(scalars["attention/entropy_coarse"]) == [3, 7]
    # Entropy over 1 CLS + 4x4 patches: positive and at most uniform.
    for kind in ("coarse", "fine"):
        values = list(scalars[f"attention/entropy_{kind}"].values())
        assert values and all(0 < v <= math.log(17) + 1e-4 for v in values)
    for tag in ("perf/samples_per_s", "perf/frames_per_s", "perf/tokens_per_s"):
        assert all(v > 0 for v in scalars[tag].values())
    assert "attention/maps" in events["images"]
    assert any(t.startswith("samples/generation") for t in events["texts"]), events["texts"]
    # The resolved config of the run and its checkpoints.
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    # Data counts: each validation run (after steps 4 and 8, not the sanity check) skips its two samples, and
    # neither split's reasons leak into the other's; training counts are cumulative (8 steps pass the first epoch).
    assert list(scalars["data/skipped/val"].values()) == [2.0, 2.0]
    assert list(scalars["data/missing_json/val"].values()) == [2.0, 2.0]
    assert sorted(scalars["data/skipped/train"]) == [1, 3, 5, 7]  # every 2 optimizer steps
    train_skipped = [scalars["data/skipped/train"][step] for step in (1, 3, 5, 7)]
    assert train_skipped == sorted(train_skipped) and train_skipped[-1] >= 1
    assert train_skipped[-1] == scalars["data/missing_text/train"][7]
    assert "data/missing_json/train" not in scalars and "data/missing_text/val" not in scalars
    # The checkpoint carries the run's training counts, as last logged.
    (stats,) = [state for name, state in ckpt["callbacks"].items() if name.startswith("DataStats")]
    assert stats["train"]["missing_text"] == train_skipped[-1]


class _Regression(pl.LightningModule):
    """A linear regression that keeps every micro-batch loss its training step returns."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _MemoryLogger(Logger):
    """Keeps every logged metric as {name: {step: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = float(value)


def test_smoothed_loss_is_a_bias_corrected_ema(tmp_path):
    """A real fit with gradient accumulation: each logged ``train/loss_smooth`` is the bias-corrected exponential
    moving average, weight 2 / (window + 1), of the per-step means of the training step's micro-batch losses."""
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) + 1.0), batch_size=4)
    module, logger, window, accumulate = _Regression(), _MemoryLogger(), 3, 2
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=accumulate, logger=logger,
        log_every_n_steps=1, callbacks=[SmoothedLoss(window=window)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)

    assert len(module.losses) == 6 * accumulate
    step_losses = [sum(module.losses[i : i + accumulate]) / accumulate for i in range(0, len(module.losses), accumulate)]
    assert len(set(step_losses)) == len(step_losses)  # distinct per-step losses, so the weighting is tested
    # Closed form: sum_i (1 - a)^(n - i) x_i / sum_i (1 - a)^(n - i) over the steps so far.
    decay = 1 - 2 / (window + 1)
    expected = [
        sum(decay ** (n - i) * step_losses[i] for i in range(n + 1)) / sum(decay ** (n - i) for i in range(n + 1))
        for n in range(len(step_losses))
    ]
    logged = logger.metrics["train/loss_smooth"]
    assert sorted(logged) == list(range(6))  # one value per optimizer step
    assert [logged[step] for step in sorted(logged)] == pytest.approx(expected, rel=1e-5)
    assert expected[0] == pytest.approx(step_losses[0])  # bias-corrected: the first value is the first step's loss
    with pytest.raises(ValueError):
        SmoothedLoss(window=0)


class _CountingData:
    """Stands in for a DataModule: this rank's skip counts by split, as ``skip_counts(split)`` reports them."""

    def __init__(self, train: dict[str, int], val: dict[str, int]) -> None:
        self.counts = {"train": train, "val": val}

    def skip_counts(self, split: str) -> dict[str, int]:
        return dict(self.counts[split])


# Each rank's training counts: the reasons differ between ranks; both indexed the same damaged shard.
RANK_TRAIN = [{"bad_image": 1, "truncated": 2, "damaged_shard": 1}, {"bad_video": 3, "damaged_shard": 1}]


def _rank_logs_data_counts(rank: int, rendezvous: str, out: str) -> None:
    """One of two gloo ranks driving DataStats through a resumed run's step, a sanity check and a validation run;
    writes what it logged (rank 0 only logs) and what it would save."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        logger = _MemoryLogger()
        # The validation split's counts so far include reads outside validation runs (the monitors'), and a
        # damaged validation shard that every rank indexed; its loader counts the current run apart.
        data = _CountingData(dict(RANK_TRAIN[rank]), {"missing_json": 5, "damaged_shard": 1})
        trainer = SimpleNamespace(
            datamodule=data, val_dataloaders=SimpleNamespace(iteration_counts={"missing_json": 1}),
            is_global_zero=rank == 0, loggers=[logger], sanity_checking=True, global_step=0,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=4)),
        )
        stats = DataStats(every_n_steps=1)
        stats.load_state_dict({"train": {"bad_image": 5}})  # the same checkpoint on every rank
        stats.setup(trainer, None, "fit")
        stats.on_validation_epoch_end(trainer, None)  # the sanity check: not logged
        trainer.sanity_checking = False
        stats.on_train_batch_start(trainer, None, None, 0)
        trainer.global_step = 1
        stats.on_train_batch_end(trainer, None, None, None, 0)
        # The validation run reads one sample without JSON on each rank, and rank 1 repeats one to even out.
        trainer.val_dataloaders.iteration_counts = {"missing_json": 1, **({"padded": 1} if rank == 1 else {})}
        stats.on_validation_epoch_end(trainer, None)
        record = {"logged": {k: v[4] for k, v in logger.metrics.items()}, "saved": stats.state_dict()}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_counts_are_summed_over_two_gloo_ranks(tmp_path):
    """Two processes over gloo: rank 0 logs every rank's counts added up (a damaged shard once), training and
    validation apart; both ranks save the same run-wide training totals."""
    import torch.multiprocessing as mp

    # Forked, the ranks start with this process's imports (spawned, each would import the test module again).
    mp.start_processes(_rank_logs_data_counts, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train = {"bad_image": 6, "bad_video": 3, "damaged_shard": 1, "truncated": 2}
    assert ranks[0]["logged"] == {
        **{f"data/{reason}/train": float(n) for reason, n in train.items()},
        "data/skipped/train": 10.0,  # truncated samples are counted, not skipped
        "data/missing_json/val": 2.0,  # one per rank in this validation run alone
        "data/padded/val": 1.0,
        "data/damaged_shard/val": 1.0,
        "data/skipped/val": 3.0,
    }
    assert ranks[1]["logged"] == {}
    assert ranks[0]["saved"] == ranks[1]["saved"] == {"train": train}


def test_batch_counts_caption_and_preference():
    caption = {"num_frames": torch.tensor([3, 0, 2]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])}
    assert batch_counts(caption) == (3, 5, 6)
    pair = {"num_frames": torch.tensor([1, 1]), "chosen_attention_mask": torch.ones(2, 4),
            "rejected_attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])}
    assert batch_counts(pair) == (2, 2, 11)


def test_atomic_save_replaces_and_cleans(tmp_path):
    path = tmp_path / "ck" / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    (path.parent / ".last.ckpt.stale.tmp").write_bytes(b"half")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    """SIGKILL while the new checkpoint is half written: the previous file is intact and loads."""
    path = tmp_path / "last.ckpt"
    script = f"""
import os, signal, io, torch
from fovlm.callbacks import AtomicCheckpointIO
io_ = AtomicCheckpointIO()
io_.save_checkpoint({{"step": 1, "w": torch.arange(1000)}}, {str(path)!r})
real_save = torch.save
def dying_save(obj, f, *a, **k):
    buf = io.BytesIO(); real_save(obj, buf, *a, **k)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
io_.save_checkpoint({{"step": 2, "w": torch.arange(1000)}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert torch.load(path, weights_only=True)["step"] == 1
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1  # the half-written file, never renamed



def test_preemption_handles_every_stop_signal_and_leaves_slurm_requeue_to_lightning():
    import os
    import signal
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from fovlm.callbacks import Preemption

    def trainer_on(environment):
        return SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=environment))

    names = ("SIGTERM", "SIGINT", "SIGUSR1")
    before = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in names}
    for first in names:
        callback = Preemption()
        callback._install(trainer_on(LightningEnvironment()))
        try:
            os.kill(os.getpid(), getattr(signal, first))
            assert callback.requested == first
            for name in names:  # later signals (e.g. during the save) are counted, the first request stays
                os.kill(os.getpid(), getattr(signal, name))
            assert callback.requested == first and callback.repeated == len(names)
        finally:
            callback._restore()
        assert {s: signal.getsignal(s) for s in before} == before

    callback = Preemption()
    callback._install(trainer_on(SLURMEnvironment(auto_requeue=True)))
    try:
        assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]  # Lightning's HPC save + requeue
        assert signal.getsignal(signal.SIGTERM) == callback._handler
        assert signal.getsignal(signal.SIGINT) == callback._handler
    finally:
        callback._restore()
    with pytest.raises(ValueError, match="SIGNOPE"):
        Preemption(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="SIGHUP"):  # loader workers would die of it: not a stop signal
        Preemption(signals=["SIGHUP"])


def test_the_fixed_validation_sample_is_normalised_as_training_batches_are(data, smollm2_dir):
    """Monitors read the validation sample as the model sees a batch: ImageNet-normalised floats, not the
    loader's uint8 frames."""
    from fovlm.callbacks import AttentionMonitor
    from fovlm.data.datamodules import CaptionDataModule

    datamodule = CaptionDataModule(train_shards=str(data / "caption/train/*.tar"),
                                   val_shards=str(data / "caption/val/*.tar"), tokenizer=str(smollm2_dir),
                                   frame_size=56, batch_size=2, num_workers=0)
    datamodule.setup("fit")
    # Under a Trainer the loader leaves frames uint8 (they are normalised after the transfer to the device).
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    assert next(iter(datamodule.val_dataloader()))["frames"].dtype == torch.uint8
    sample = AttentionMonitor(every_n_steps=1)._val_sample(SimpleNamespace(datamodule=datamodule))
    assert sample["frames"].dtype == torch.float32 and sample["frames"].min() < 0
