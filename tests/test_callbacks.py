"""Callbacks: what a short fit writes to TensorBoard, the smoothed loss, throughput windows, the atomic writer."""

from __future__ import annotations

import math
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from fitkit import fit_args, read_events, synthetic_data
from lightning.pytorch.loggers import Logger

from fovlm.callbacks import AtomicCheckpointIO, SmoothedLoss, atomic_torch_save, batch_counts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


def test_tensorboard_holds_scalars_images_and_text(data, tmp_path):
    """A short stage-1 fit logs losses, smoothed loss, LR, throughput, data counts, attention entropies and maps,
    and a generated answer; the events are read back from the files."""
    from fovlm.cli import main

    out = tmp_path / "runs"
    main(fit_args(1, data, out, steps=8, every=4, extra=["--trainer.val_check_interval", "4"]))
    run = out / "stage1"
    events = read_events(run)
    scalars = events["scalars"]
    for tag in ("train/loss", "train/loss_smooth", "train/grad_norm", "val/loss", "perf/samples_per_s",
                "perf/frames_per_s", "perf/tokens_per_s", "data/skipped", "attention/entropy_coarse",
                "attention/entropy_fine"):
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
    from types import SimpleNamespace

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
