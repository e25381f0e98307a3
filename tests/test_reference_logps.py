"""Tests for fovlm.reference_logps and the module's ``reference_logps`` option: DPO from cached reference
log-probabilities equals DPO against the reference model (also after a resume), holds no reference model, and
refuses stale, unfinished and partial caches by name. Tiny random models, hand-built batches, CPU, fp32."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from fovlm.cli.reference_logps import build
from fovlm.data.contract import FrameSettings
from fovlm.data.roles import ROLE_ANSWER, ROLE_PAD, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER
from fovlm.module import FoveatedModule
from fovlm.reference_logps import (
    MANIFEST,
    ReferenceCacheError,
    ReferenceLogps,
    open_for_run,
    part_path,
    sample_digests,
)

TINY = {"llm": "tiny", "vision": "tiny", "query_dim": 32}
LRS = {"lr_connector": 1e-3, "lr_vision": 1e-4, "lr_llm": 1e-4, "beta": 0.1}
PAD_ID = 2


# ---------------------------------------------------------------------------------------------------------
# Preference pairs in the collate format of the data contract


def side(seed: int, answer_len: int) -> tuple[list[int], list[int]]:
    """A chat-shaped sequence: system, user, assistant header, answer + <|im_end|>, trailing newline."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 400, (6 + answer_len,), generator=g).tolist()
    ids = [1, *words[:3], 2] + [1, *words[3:6], 2] + [1, 7] + words[6:] + [2, 11]
    roles = [ROLE_SYSTEM] * 5 + [ROLE_USER] * 5 + [ROLE_TEMPLATE] * 2 + [ROLE_ANSWER] * (answer_len + 1)
    return ids, roles + [ROLE_TEMPLATE]


class Pairs(Dataset):
    """Preference pairs ``p0000 ...`` of source ``pairs`` with 2 frames each; ``shift`` changes their answers."""

    def __init__(self, count: int, shift: int = 0) -> None:
        self.count, self.shift = count, shift

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        chosen = side(i + self.shift, 3 + i % 2)
        rejected = side(500 + i, 4 + i % 2)
        rejected = (chosen[0][:12] + rejected[0][12:], chosen[1][:12] + rejected[1][12:])  # the same prompt
        g = torch.Generator().manual_seed(1000 + i)
        return {"frames": torch.randn(2, 3, 224, 224, generator=g), "chosen": chosen, "rejected": rejected,
                "source": "pairs", "key": f"p{i:04d}"}


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(samples: list[dict]) -> dict:
    batch = {"frames": torch.cat([s["frames"] for s in samples]),
             "num_frames": torch.tensor([s["frames"].shape[0] for s in samples]),
             "source": [s["source"] for s in samples], "key": [s["key"] for s in samples]}
    for name in ("chosen", "rejected"):
        batch[f"{name}_input_ids"] = pad([s[name][0] for s in samples], PAD_ID)
        batch[f"{name}_attention_mask"] = pad([[1] * len(s[name][0]) for s in samples], 0)
        batch[f"{name}_roles"] = pad([s[name][1] for s in samples], ROLE_PAD)
    return batch


def loader(pairs: Dataset) -> DataLoader:
    return DataLoader(pairs, batch_size=2, shuffle=False, collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------
# Helpers


class StepLosses(Callback):
    """The training loss of every step (one micro-batch per step)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(max_steps: int = 1, **kwargs) -> L.Trainer:
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", []))
    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, logger=False,
                     enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kwargs)


def weights(tmp_path: Path, name: str = "stage2.pt", seed: int = 7) -> Path:
    """Weights of a tiny model (the stage-2 checkpoint the reference model copies)."""
    torch.manual_seed(seed)
    module = FoveatedModule(**TINY)
    module.configure_model()
    path = tmp_path / name
    torch.save(module.model.state_dict(), path)
    return path


def cache_of(tmp_path: Path, init: Path, pairs: Dataset, name: str = "cache", **model_args) -> Path:
    """The cache of ``pairs`` for a DPO module from ``init`` (built as ``fovlm reference-logps`` builds it)."""
    out = tmp_path / name
    args = {**TINY, **LRS, "loss": "dpo", "init_from": str(init), **model_args}
    assert build(args, {"train": loader(pairs)}, trainer(), out) == out / MANIFEST
    return out


def fit_losses(module: FoveatedModule, pairs: Dataset, steps: int, **kwargs) -> list[float]:
    record = StepLosses()
    trainer(steps, callbacks=[record, *kwargs.pop("callbacks", [])]).fit(module, loader(pairs), **kwargs)
    return record.losses


# ---------------------------------------------------------------------------------------------------------
# The cache gives the online numbers


def test_cached_dpo_equals_online_dpo_over_steps_and_after_a_resume(tmp_path):
    init = weights(tmp_path)
    pairs = Pairs(6)  # 3 batches per epoch; 5 steps cross an epoch
    online = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init))
    expected = fit_losses(online, pairs, 5)
    cache = cache_of(tmp_path, init, pairs)

    cached = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    assert cached.reference_cache is None  # nothing read before the model is built
    losses = fit_losses(cached, pairs, 5)
    assert len(losses) == len(expected) == 5
    assert losses == pytest.approx(expected, abs=1e-5)
    assert expected[-1] < expected[0]  # the policy moved: later steps compare policy != reference

    # resumed from the checkpoint of step 3 (same schedule) with the cache: steps 4 and 5 as online
    ckpt = tmp_path / "ckpt"
    at_3 = ModelCheckpoint(dirpath=ckpt, filename="at-{step}", every_n_train_steps=3, save_top_k=-1)
    first = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    assert fit_losses(first, pairs, 5, callbacks=[at_3]) == pytest.approx(expected, abs=1e-5)
    stored = torch.load(ckpt / "at-step=3.ckpt", map_location="cpu", weights_only=False)
    assert stored["fovlm"]["reference_fingerprint"] == online.reference_fingerprint
    assert not any(k.startswith("reference.") for k in stored["state_dict"])
    resumed = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    assert fit_losses(resumed, pairs, 5, ckpt_path=ckpt / "at-step=3.ckpt") == pytest.approx(expected[3:], abs=1e-5)


def test_the_module_with_a_cache_holds_no_reference_model(tmp_path):
    init = weights(tmp_path)
    cache = cache_of(tmp_path, init, Pairs(2))
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    module.configure_model()
    assert module.reference is None and module.reference_cache is not None
    assert all(name.startswith("model.") for name in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())
    online = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init))
    online.configure_model()
    assert sum(p.numel() for p in online.parameters()) == 2 * sum(p.numel() for p in module.parameters())
    assert module.reference_fingerprint == online.reference_fingerprint


def test_cached_dpo_validates_from_the_val_split(tmp_path):
    init = weights(tmp_path)
    pairs = Pairs(4)
    out = tmp_path / "cache"
    args = {**TINY, **LRS, "loss": "dpo", "init_from": str(init)}
    build(args, {"train": loader(pairs), "val": loader(Pairs(2, shift=50))}, trainer(), out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert {s: info["pairs"] for s, info in manifest["splits"].items()} == {"train": 4, "val": 2}
    assert manifest["identity"]["precision"] == "32-true" and manifest["queries"] == [1]
    online = FoveatedModule(**args)
    trainer().validate(online, loader(Pairs(2, shift=50)))
    cached = FoveatedModule(**args, reference_logps=str(out))
    t = trainer()
    t.validate(cached, loader(Pairs(2, shift=50)))
    assert float(t.callback_metrics["val/loss"]) == pytest.approx(0.6931472, abs=1e-5)  # policy = reference


# ---------------------------------------------------------------------------------------------------------
# Caches that do not fit the run


def test_a_cache_of_other_reference_weights_is_stale(tmp_path):
    cache = cache_of(tmp_path, weights(tmp_path), Pairs(2))
    other = weights(tmp_path, "other.pt", seed=8)
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(other), reference_logps=str(cache))
    with pytest.raises(ReferenceCacheError, match=r"manifest\.json is stale: reference .*stage2\.pt.*other\.pt"):
        module.configure_model()


def test_a_cache_of_other_settings_is_stale_naming_the_setting(tmp_path):
    init = weights(tmp_path)
    cache = cache_of(tmp_path, init, Pairs(2))
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    module.configure_model()
    hp, fingerprint = module.hparams, module.reference_fingerprint
    with pytest.raises(ReferenceCacheError, match="stale: precision is '32-true' there but 'bf16-mixed'"):
        open_for_run(hp, fingerprint, SimpleNamespace(precision="bf16-mixed", datamodule=None))
    with pytest.raises(ReferenceCacheError, match="stale: question_first is False there but True"):
        open_for_run({**hp, "question_first": True}, fingerprint)
    with pytest.raises(ReferenceCacheError, match=r"holds k = \[1\] queries per frame, not \[2\]"):
        open_for_run({**hp, "num_queries": 2}, fingerprint)
    vocab = SimpleNamespace(get_vocab=lambda: {"a": 0}, chat_template="t", pad_token_id=0)
    datamodule = SimpleNamespace(frames=FrameSettings(), max_length=64, tokenizer=vocab, system_prompt="s")
    with pytest.raises(ReferenceCacheError, match="stale: data is None there"):  # built from plain loaders
        open_for_run(hp, fingerprint, SimpleNamespace(precision="32-true", datamodule=datamodule))


def test_a_partial_cache_names_the_missing_pair(tmp_path):
    init = weights(tmp_path)
    cache = cache_of(tmp_path, init, Pairs(4))
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    with pytest.raises(ReferenceCacheError, match=r"is partial: pair 'pairs/p0004' of the train split"):
        fit_losses(module, Pairs(6), 3)
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    with pytest.raises(ReferenceCacheError, match="holds no val split"):
        trainer().validate(module, loader(Pairs(2)))


def test_a_pair_with_other_tokens_under_the_same_key_is_stale(tmp_path):
    init = weights(tmp_path)
    cache = cache_of(tmp_path, init, Pairs(2))
    module = FoveatedModule(**TINY, **LRS, loss="dpo", init_from=str(init), reference_logps=str(cache))
    with pytest.raises(ReferenceCacheError, match=r"stale: pair 'pairs/p0000' .* other tokens or frames .*part-"):
        fit_losses(module, Pairs(2, shift=9), 1)


def test_an_unfinished_cache_is_refused_naming_the_file(tmp_path):
    init = weights(tmp_path)
    cache = cache_of(tmp_path, init, Pairs(2))
    part = cache / part_path("train", 0, 1)
    part.unlink()
    with pytest.raises(ReferenceCacheError, match=f"part file {part} of the train split is missing"):
        ReferenceLogps.open(cache)
    (cache / MANIFEST).unlink()
    with pytest.raises(ReferenceCacheError, match=r"has no manifest\.json \(an unfinished build\)"):
        ReferenceLogps.open(cache)
    with pytest.raises(ReferenceCacheError, match="does not exist"):
        ReferenceLogps.open(tmp_path / "nowhere")


def test_two_different_pairs_under_one_key_cannot_be_cached(tmp_path):
    init = weights(tmp_path)
    both = torch.utils.data.ConcatDataset([Pairs(2), Pairs(2, shift=9)])  # keys p0000, p0001 twice
    with pytest.raises(ReferenceCacheError, match="two different pairs of the train split are both named 'pairs/p0000'"):
        cache_of(tmp_path, init, both)


def test_digests_see_tokens_roles_and_frames_but_not_padding():
    batch = collate([Pairs(2)[0], Pairs(2)[1]])
    alone = collate([Pairs(2)[0]])
    assert sample_digests(batch)[0] == sample_digests(alone)[0]  # padded to the longer pair or not
    changed = dict(batch, num_frames=torch.tensor([3, 2]))
    assert sample_digests(changed)[0] != sample_digests(batch)[0]
    roles = batch["chosen_roles"].clone()
    roles[0, 0] = ROLE_USER
    assert sample_digests(dict(batch, chosen_roles=roles))[0] != sample_digests(batch)[0]


def test_reference_logps_is_only_for_dpo():
    with pytest.raises(ValueError, match="reference_logps .* not dpo"):
        FoveatedModule(**TINY, loss="answer_only", reference_logps="cache")
