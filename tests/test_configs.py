"""Every YAML in configs/ instantiates as it is meant to be used (offline, no training): stage configs on their own,
overlays on top of each stage config; the stage configs with the demo overlay; the recipe values of the stage
configs; the LLM -> tokenizer links; the 1.7B overlay's fully sharded strategy."""

from __future__ import annotations

import socket
import subprocess

import pytest
import torch
import yaml
from fitkit import CONFIGS, STAGE_DATA, fovlm_command, subprocess_env, synthetic_data
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy

from fovlm.callbacks import (
    AtomicCheckpointIO,
    AttentionMonitor,
    DataStats,
    Preemption,
    RandomState,
    SampleGeneration,
    SmoothedLoss,
    StageCheckpoint,
    Throughput,
)
from fovlm.cli.train import FovlmCLI
from fovlm.data.datamodules import CaptionDataModule, PreferenceDataModule, SFTDataModule
from fovlm.model.loading import SMOLLM2_FOLDER, TINY_LLM_TOKENIZER
from fovlm.module import FoveatedModule
from fovlm.strategy import FullyShardedStrategy

DATAMODULES = {1: CaptionDataModule, 2: SFTDataModule, 3: PreferenceDataModule}
LOSSES = {1: "all_text", 2: "answer_only", 3: "dpo"}
SIZES = [None, "360m", "1.7b"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


@pytest.fixture
def empty_folder(tmp_path, monkeypatch, smollm2_dir):
    """Work in an empty folder (nothing may be written by instantiation) in which `make smollm2` has run: the
    "tiny" LLM's tokenizer folder ``.cache/smollm2-135m-instruct`` must exist before anything is built."""
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / SMOLLM2_FOLDER).symlink_to(smollm2_dir.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _compose(config: str, stage: int, data, tmp_path, *overlays: str) -> list[str]:
    """``--config`` arguments of a stage config and overlays (paths under configs/), the stage's synthetic shards."""
    args = ["--config", str(CONFIGS / config)]
    for overlay in overlays:
        args += ["--config", str(CONFIGS / overlay)]
    for key, pattern in STAGE_DATA[stage].items():
        args += [f"--data.init_args.{key}", str(data / pattern)]
    if stage > 1:  # init_from must exist; instantiation does not read it
        previous = tmp_path / "previous.ckpt"
        previous.write_bytes(b"")
        args += ["--model.init_args.init_from", str(previous)]
    return args


def _args(stage: int, data, tmp_path, *overlays: str) -> list[str]:
    return _compose(f"stage{stage}.yaml", stage, data, tmp_path, *overlays)


# ---- every file the glob finds -----------------------------------------------------------------------------------
# A stage config names its LightningModule and DataModule (model.class_path); any other YAML is an overlay and is
# composed after each stage config, as `fovlm fit --config configs/stageN.yaml --config OVERLAY` does.

CONFIG_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def _stage_of(name: str) -> int | None:
    """The stage of a config naming its DataModule (by the DataModule's class), None for an overlay."""
    config = yaml.safe_load((CONFIGS / name).read_text()) or {}
    if not (config.get("model") or {}).get("class_path"):
        return None
    data_class = config["data"]["class_path"]
    stages = [s for s, cls in DATAMODULES.items() if f"{cls.__module__}.{cls.__name__}" == data_class]
    assert stages, f"{name}: no synthetic test data for {data_class} (add it to DATAMODULES and STAGE_DATA)"
    return stages[0]


STAGE_CONFIGS = {name: stage for name in CONFIG_FILES if (stage := _stage_of(name)) is not None}
OVERLAYS = [name for name in CONFIG_FILES if name not in STAGE_CONFIGS]
COMPOSITIONS = [(base, overlay) for base in STAGE_CONFIGS for overlay in [None, *OVERLAYS]]


def test_every_config_file_is_covered():
    assert {"stage1.yaml", "stage2.yaml", "stage3.yaml"} <= set(STAGE_CONFIGS)
    assert {"demo.yaml", "size/360m.yaml", "size/1.7b.yaml"} <= set(OVERLAYS)
    assert {name for pair in COMPOSITIONS for name in pair if name} == set(CONFIG_FILES)


@pytest.mark.parametrize(("config", "overlay"), COMPOSITIONS,
                         ids=[f"{b}+{o}" if o else b for b, o in COMPOSITIONS])
def test_every_config_file_instantiates(config, overlay, data, empty_folder, tmp_path, monkeypatch):
    """Model, DataModule and Trainer of each composition, with the tiny models and no network: a Trainer whose
    strategy needs a GPU (Lightning's FSDPStrategy) is built only where there is one, its strategy object everywhere."""

    def no_network(*args, **kwargs):
        raise AssertionError("a config tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    gpu_only = (FSDPStrategy,)

    class CLI(FovlmCLI):
        def instantiate_trainer(self, **kwargs):
            strategy = (self._get(self.config_init, "trainer") or {}).get("strategy")
            if isinstance(strategy, gpu_only) and not torch.cuda.is_available():
                return strategy
            return super().instantiate_trainer(**kwargs)

    stage = STAGE_CONFIGS[config]
    tiny = ["--model.init_args.llm", "tiny", "--model.init_args.vision", "tiny"]
    cli = CLI(args=_compose(config, stage, data, tmp_path, *([overlay] if overlay else [])) + tiny, run=False)
    assert isinstance(cli.model, FoveatedModule) and cli.model.model is None
    assert type(cli.datamodule) is DATAMODULES[stage] and cli.model.hparams.loss == LOSSES[stage]
    assert isinstance(cli.trainer, (Trainer, *gpu_only))
    if isinstance(cli.trainer, Trainer):
        assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not list(tmp_path.glob("runs"))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_config_instantiates_with_demo_overlay(stage, size, data, empty_folder, tmp_path):
    overlays = ([f"size/{size}.yaml"] if size else []) + ["demo.yaml"]
    cli = FovlmCLI(args=_args(stage, data, tmp_path, *overlays), run=False)
    assert isinstance(cli.model, FoveatedModule) and cli.model.model is None  # built lazily, offline
    assert type(cli.datamodule) is DATAMODULES[stage]
    assert cli.model.hparams.loss == LOSSES[stage]
    assert cli.model.hparams.llm == "tiny" and cli.datamodule.tokenizer_name == TINY_LLM_TOKENIZER
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {StageCheckpoint, LearningRateMonitor, Preemption, RandomState, SmoothedLoss, Throughput, DataStats,
            AttentionMonitor, SampleGeneration} <= kinds
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.trainer.logger.log_dir.rstrip("/") == f"runs/demo/stage{stage}"
    assert cli.trainer.max_steps <= 1000 and cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert not list(tmp_path.glob("runs"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_recipe_values(stage, data, tmp_path):
    """Without the demo overlay: the 135M recipe of docs/recipe.md#stages-at-a-glance, hub ids, tokenizer linked to the LLM."""

    class NoTrainer(FovlmCLI):
        def instantiate_trainer(self, **kwargs):
            return self._get(self.config_init, "trainer")

    cli = NoTrainer(args=_args(stage, data, tmp_path), run=False)
    hp, trainer, dm = cli.model.hparams, cli.trainer, cli.datamodule
    assert hp.llm == "HuggingFaceTB/SmolLM2-135M-Instruct" and hp.vision == "facebook/dinov2-small"
    assert dm.tokenizer_name == hp.llm  # linked, never given twice
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    expected = {
        1: (31250, 4, 8, "converging", (1e-3, 1e-5, 1e-5), 0.03),
        2: (31250, 4, 8, "cosine", (3e-5, 3e-5, 3e-5), 0.03),
        3: (2593, 8, 4, "cosine", (1e-6, 1e-6, 1e-6), 0.1),
    }[stage]
    steps, accumulate, batch, schedule, lrs, warmup = expected
    assert (trainer["max_steps"], trainer["accumulate_grad_batches"], dm.batch_size) == (steps, accumulate, batch)
    assert hp.schedule == schedule and (hp.lr_connector, hp.lr_vision, hp.lr_llm) == lrs
    assert hp.warmup_ratio == warmup
    if stage == 1:
        assert hp.target_lr == 3e-5 and dm.text_ratio == 0.14 and dm.val_shards is not None
    if stage == 3:
        assert hp.beta == 0.1 and dm.text_ratio == 0.0
    assert dm.image_frames == 8 and dm.max_frames == 64 and dm.frame_size == 224


def test_large_overlay_shards_fully_with_checkpointing(data, tmp_path):
    class NoTrainer(FovlmCLI):
        def instantiate_trainer(self, **kwargs):
            return self._get(self.config_init, "trainer")

    cli = NoTrainer(args=_args(2, data, tmp_path, "size/1.7b.yaml"), run=False)
    strategy = cli.trainer["strategy"]
    assert isinstance(strategy, FullyShardedStrategy) and strategy._save_distributed_checkpoint is False
    assert strategy._tensor_parallel_size == 1
    assert cli.model.hparams.gradient_checkpointing is True
    assert cli.model.hparams.llm == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert cli.trainer["precision"] == "bf16-mixed"


def test_print_config_of_stage1():
    result = subprocess.run(fovlm_command(["fit", "--config", str(CONFIGS / "stage1.yaml"), "--print_config"]),
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("class_path: fovlm.module.FoveatedModule", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "facebook/dinov2-small", "class_path: fovlm.data.datamodules.CaptionDataModule",
                 "class_path: fovlm.callbacks.StageCheckpoint", "TensorBoardLogger"):
        assert text in out, text
