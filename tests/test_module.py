"""Tests for fovlm.module.FoveatedModule: parameter groups, freezing, short fits of every stage, accumulation,
init_from errors and the DPO reference model's checkpoint handling. Tiny random models, hand-built batches, CPU."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from fovlm.data.roles import ROLE_ANSWER, ROLE_PAD, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_USER
from fovlm.model.parameters import no_decay_parameters, parameter_groups
from fovlm.module import FoveatedModule
from fovlm.schedules import query_budget

PAD_ID = 2
TINY = {"llm": "tiny", "vision": "tiny", "query_dim": 32}


# ---------------------------------------------------------------------------------------------------------
# Hand-built batches in the collate format of the data contract


def render(seed: int, answer_len: int) -> tuple[list[int], list[int]]:
    """A chat-shaped token sequence: system, user, assistant header, answer + <|im_end|>, trailing newline."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 400, (3 + 3 + answer_len,), generator=g).tolist()
    ids = [1, *words[:3], 2] + [1, *words[3:6], 2] + [1, 7] + words[6:] + [2, 11]
    roles = (
        [ROLE_SYSTEM] * 5 + [ROLE_USER] * 5 + [ROLE_TEMPLATE] * 2 + [ROLE_ANSWER] * (answer_len + 1) + [ROLE_TEMPLATE]
    )
    return ids, roles


class SFTSet(Dataset):
    """Samples with ``num_frames`` random frames each and answers of ``answer_lens`` tokens."""

    def __init__(self, answer_lens, num_frames=2, sources=("caps", "vqa")):
        self.answer_lens, self.sources = list(answer_lens), sources
        self.num_frames = num_frames if isinstance(num_frames, list) else [num_frames] * len(self.answer_lens)

    def __len__(self):
        return len(self.answer_lens)

    def __getitem__(self, i):
        ids, roles = render(i, self.answer_lens[i])
        g = torch.Generator().manual_seed(1000 + i)
        return {
            "frames": torch.randn(self.num_frames[i], 3, 224, 224, generator=g),
            "input_ids": ids,
            "roles": roles,
            "source": self.sources[i % len(self.sources)],
            "key": f"s{i:04d}",
        }


def pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate_sft(samples):
    return {
        "frames": torch.cat([s["frames"] for s in samples]),  # [F, 3, 224, 224]
        "num_frames": torch.tensor([s["frames"].shape[0] for s in samples]),
        "input_ids": pad([s["input_ids"] for s in samples], PAD_ID),
        "attention_mask": pad([[1] * len(s["input_ids"]) for s in samples], 0),
        "roles": pad([s["roles"] for s in samples], ROLE_PAD),
        "source": [s["source"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class PreferenceSet(SFTSet):
    def __getitem__(self, i):
        sample = super().__getitem__(i)
        rejected_ids, rejected_roles = render(500 + i, self.answer_lens[i] + 1)
        prompt = 12  # system + user + assistant header
        sample["chosen_input_ids"], sample["chosen_roles"] = sample.pop("input_ids"), sample.pop("roles")
        sample["rejected_input_ids"] = sample["chosen_input_ids"][:prompt] + rejected_ids[prompt:]
        sample["rejected_roles"] = sample["chosen_roles"][:prompt] + rejected_roles[prompt:]
        return sample


def collate_preference(samples):
    batch = {
        "frames": torch.cat([s["frames"] for s in samples]),
        "num_frames": torch.tensor([s["frames"].shape[0] for s in samples]),
        "source": [s["source"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    for side in ("chosen", "rejected"):
        ids = [s[f"{side}_input_ids"] for s in samples]
        batch[f"{side}_input_ids"] = pad(ids, PAD_ID)
        batch[f"{side}_attention_mask"] = pad([[1] * len(r) for r in ids], 0)
        batch[f"{side}_roles"] = pad([s[f"{side}_roles"] for s in samples], ROLE_PAD)
    return batch


def loader(dataset, batch_size, collate=collate_sft):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------
# Helpers


class GradCapture(Callback):
    """Keeps the gradients seen at every optimizer step (before clipping)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        )


class ReferenceModeCheck(Callback):
    """Fails the fit if the DPO reference is ever in train mode while the policy trains."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert pl_module.model.training and not pl_module.reference.training


def trainer(tmp_path, max_steps, **kwargs):
    kwargs.setdefault("logger", CSVLogger(tmp_path, name="logs"))
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def logged_columns(trainer_) -> set[str]:
    path = Path(trainer_.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {key for row in rows for key, value in row.items() if value not in ("", None)}


def logged_series(trainer_, key) -> list[float]:
    path = Path(trainer_.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def built(**kwargs) -> FoveatedModule:
    module = FoveatedModule(**{**TINY, **kwargs})
    module.configure_model()
    return module


# ---------------------------------------------------------------------------------------------------------
# Parameter groups


def test_every_parameter_is_in_exactly_one_group_and_new_ones_are_connector():
    module = built()
    model = module.model
    groups = parameter_groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups) == sorted(names)
    for name in names:
        if name.startswith("llm."):
            assert groups[name] == "llm", name
        elif name.startswith("encoder.dino."):
            assert groups[name] == "vision", name
        else:
            assert groups[name] == "connector", name
    connector = {n for n, g in groups.items() if g == "connector"}
    assert connector == {
        "encoder.query_input_proj.weight",
        "encoder.output_proj.weight",
        "encoder.output_proj.bias",
        "dino_to_llm.weight",
        "dino_to_llm.bias",
        "llm_to_query.weight",
        "llm_to_query.bias",
        "q_static",
        "q_init",
    }

    param_groups = module.optimizer_param_groups()
    seen = [id(p) for g in param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two optimizer groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable
    by_group = {g["group"] for g in param_groups}
    assert by_group == {"connector", "vision", "llm"}
    output_proj = model.encoder.output_proj.weight
    (group,) = [g for g in param_groups if any(p is output_proj for p in g["params"])]
    assert group["group"] == "connector" and group["lr"] == module.hparams.lr_connector


def test_no_decay_set_is_exactly_1d_params_embeddings_and_query_vectors():
    module = built()
    model = module.model
    named = dict(model.named_parameters())
    expected = {n for n, p in named.items() if p.ndim == 1} | {
        "llm.model.embed_tokens.weight",  # tied with lm_head: one tensor
        "encoder.dino.embeddings.cls_token",
        "encoder.dino.embeddings.mask_token",
        "encoder.dino.embeddings.position_embeddings",
        "q_static",
        "q_init",
    }
    assert no_decay_parameters(model) == expected
    param_groups = module.optimizer_param_groups()
    ids = {id(p): n for n, p in named.items()}
    undecayed = {ids[id(p)] for g in param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {ids[id(p)] for g in param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert undecayed == expected - {"encoder.dino.embeddings.mask_token"}  # frozen: unused by the forward
    assert decayed == {n for n, p in named.items() if p.requires_grad} - expected
    assert "encoder.dino.embeddings.patch_embeddings.projection.weight" in decayed


def test_configure_model_is_idempotent_and_init_does_no_building():
    module = FoveatedModule(**TINY, init_from="/nonexistent/weights.ckpt")
    assert module.model is None  # nothing built, nothing read
    module = built()
    model = module.model
    module.configure_model()
    assert module.model is model


# ---------------------------------------------------------------------------------------------------------
# init_from


def test_init_from_missing_or_mismatched_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        built(init_from=str(missing))
    other = built(query_dim=16)
    wrong = tmp_path / "other.pt"
    torch.save(other.model.state_dict(), wrong)
    with pytest.raises(ValueError, match="other.pt.*shape mismatch.*q_static"):
        built(init_from=str(wrong))
    partial_file = tmp_path / "partial.pt"
    state = built().model.state_dict()
    state.pop("q_init")
    torch.save(state, partial_file)
    with pytest.raises(ValueError, match="partial.pt.*missing.*q_init"):
        built(init_from=str(partial_file))


def test_init_from_loads_every_weight(tmp_path):
    torch.manual_seed(3)
    source = built()
    path = tmp_path / "stage.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(4)
    target = built(init_from=str(path))
    for (name, a), b in zip(source.model.state_dict().items(), target.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------
# A few steps of every stage


def assert_changed(before, module, names):
    after = module.state_dict()
    unchanged = [n for n in names if torch.equal(before[n], after[n])]
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"


def assert_unchanged(before, module, names):
    after = module.state_dict()
    changed = [n for n in names if not torch.equal(before[n], after[n])]
    assert not changed, f"frozen parameters that changed: {changed}"


def test_stage1_all_text_converging_trains_every_parameter_and_logs(tmp_path):
    module = built(loss="all_text", schedule="converging", target_lr=3e-5, warmup_ratio=0.25, lr_connector=1e-3,
                   lr_vision=1e-5, lr_llm=1e-5)
    before = snapshot(module)
    grads = GradCapture()
    t = trainer(tmp_path, 4, callbacks=[grads], limit_val_batches=1, val_check_interval=2)
    train_set = SFTSet([5, 5, 6, 6] * 2, num_frames=[2, 0, 3, 1, 2, 2, 1, 2])  # sample 1 is text-only
    t.fit(module, loader(train_set, 2), loader(SFTSet([5, 6]), 2))

    trainable = [f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad]
    frozen = [f"model.{n}" for n, p in module.model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.encoder.dino.embeddings.mask_token"]
    no_grad = [n for n, p in module.model.named_parameters() if p.requires_grad and n not in grads.steps[0]]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    assert_changed(before, module, trainable)
    assert_unchanged(before, module, frozen)

    assert torch.isfinite(t.callback_metrics["train/loss"])
    columns = logged_columns(t)
    expected = {"train/loss", "train/loss/caps", "train/loss/vqa", "train/grad_norm", "train/empty_batches",
                "train/lr/connector", "train/lr/vision", "train/lr/llm", "val/loss", "val/loss/caps",
                "val/loss/vqa"}
    assert expected <= columns, expected - columns
    # W = 1, N = 4: the connector decays from 1e-3 to the target while the backbones rise from 1e-5 to it
    connector = logged_series(t, "train/lr/connector")
    llm = logged_series(t, "train/lr/llm")
    assert connector[0] == pytest.approx(1e-3) and connector[-1] == pytest.approx(3e-5)
    assert llm[0] == pytest.approx(1e-5) and llm[-1] == pytest.approx(3e-5)
    assert connector == sorted(connector, reverse=True) and llm == sorted(llm) and len(llm) == 4


def test_stage2_answer_only_with_frozen_vision_counts_empty_batches(tmp_path):
    module = built(loss="answer_only", schedule="cosine", warmup_ratio=0.0, lr_vision=0.0, lr_llm=1e-4)
    before = snapshot(module)
    train_set = SFTSet([4, 4, 4, 4, 4, 4])
    batches = list(loader(train_set, 2))
    # the last batch has no answer token (as when truncation cut every answer): loss 0, counted, never NaN
    batches[-1]["roles"] = torch.where(batches[-1]["roles"] == ROLE_ANSWER, ROLE_USER, batches[-1]["roles"])
    t = trainer(tmp_path, 3)
    t.fit(module, DataLoader(batches, batch_size=None))

    vision = [f"model.{n}" for n, g in parameter_groups(module.model).items() if g == "vision"]
    assert all(not module.model.get_parameter(n[len("model."):]).requires_grad for n in vision)
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(module.model.get_parameter(n[len("model."):])) in optimized for n in vision)
    assert_unchanged(before, module, vision)
    trainable = [f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad]
    assert_changed(before, module, trainable)
    assert t.callback_metrics["train/empty_batches"].item() == 1.0
    assert t.callback_metrics["train/loss"].item() == 0.0
    assert "train/lr/vision" not in logged_columns(t)


def test_lambda_ar_trains_the_autoregressive_path_and_is_refused_where_meaningless(tmp_path):
    module = built(loss="answer_only", lambda_ar=0.5)
    t = trainer(tmp_path, 1)
    t.fit(module, loader(SFTSet([4, 4], num_frames=[3, 2]), 2))
    m = t.callback_metrics
    assert m["train/loss"].item() == pytest.approx(
        m["train/loss_fine"].item() + 0.5 * m["train/loss_autoregressive"].item(), rel=1e-5)
    for kwargs, match in (({"coarse_only": True}, "coarse_only"), ({"loss": "dpo"}, "DPO"),
                          ({"gradient_checkpointing": True}, "checkpointing"), ({"lambda_ar": -1.0}, ">= 0")):
        with pytest.raises(ValueError, match=match):
            FoveatedModule(**{**TINY, "lambda_ar": 0.5, **kwargs})


def collate_with_regions(samples):
    """SFT batches whose samples say where their answer is (the top-right quarter, on every frame)."""
    batch = collate_sft(samples)
    batch["region_box"] = torch.tensor([[0.5, 0.0, 1.0, 0.5]] * len(samples))
    batch["region_frames"] = torch.ones(int(batch["num_frames"].sum()), dtype=torch.bool)
    return batch


def test_lambda_look_adds_the_look_loss_and_is_refused_where_meaningless(tmp_path):
    module = built(loss="answer_only", lambda_look=2.0)
    t = trainer(tmp_path, 1)
    t.fit(module, loader(SFTSet([4, 4], num_frames=[3, 2]), 2, collate_with_regions))
    m = t.callback_metrics
    assert m["train/loss_look"].item() > 0
    assert m["train/loss"].item() == pytest.approx(m["train/loss_fine"].item() + 2.0 * m["train/loss_look"].item(),
                                                   rel=1e-5)
    for kwargs, match in (({"coarse_only": True}, "coarse_only"), ({"loss": "dpo"}, "DPO"),
                          ({"lambda_look": -1.0}, ">= 0")):
        with pytest.raises(ValueError, match=match):
            FoveatedModule(**{**TINY, "lambda_look": 0.5, **kwargs})


def test_lambda_look_ar_adds_the_look_loss_of_the_autoregressive_pass_and_needs_that_pass(tmp_path):
    module = built(loss="answer_only", lambda_ar=0.5, lambda_look_ar=2.0)
    t = trainer(tmp_path, 1)
    t.fit(module, loader(SFTSet([4, 4], num_frames=[3, 2]), 2, collate_with_regions))
    m = t.callback_metrics
    assert m["train/loss_look_autoregressive"].item() > 0 and "train/loss_look" not in m
    assert m["train/loss"].item() == pytest.approx(
        m["train/loss_fine"].item() + 0.5 * m["train/loss_autoregressive"].item()
        + 2.0 * m["train/loss_look_autoregressive"].item(), rel=1e-5)
    for kwargs, match in (({}, "lambda_ar"), ({"lambda_ar": 0.5, "lambda_look_ar": -1.0}, ">= 0")):
        with pytest.raises(ValueError, match=match):
            FoveatedModule(**{**TINY, "lambda_look_ar": 0.5, **kwargs})


def test_coarse_only_and_lambda_coarse_train(tmp_path):
    for kwargs in ({"coarse_only": True}, {"lambda_coarse": 0.5}):
        module = built(loss="all_text", **kwargs)
        before = snapshot(module)
        t = trainer(tmp_path, 2)
        t.fit(module, loader(SFTSet([4, 4, 4, 4]), 2))
        assert torch.isfinite(t.callback_metrics["train/loss"])
        if "lambda_coarse" in kwargs:
            assert {"train/loss_fine", "train/loss_coarse"} <= set(t.callback_metrics)
        trainable = [f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad]
        frozen = [f"model.{n}" for n, p in module.model.named_parameters() if not p.requires_grad]
        assert_changed(before, module, trainable)
        assert_unchanged(before, module, frozen)
        if kwargs.get("coarse_only"):
            # the static query alone makes the visual tokens: the query head and q_init are unused, frozen
            assert set(frozen) == {"model.encoder.dino.embeddings.mask_token", "model.llm_to_query.weight",
                                   "model.llm_to_query.bias", "model.q_init"}


def stage2_weights(tmp_path) -> Path:
    torch.manual_seed(7)
    path = tmp_path / "stage2.pt"
    torch.save(built().model.state_dict(), path)
    return path


def test_stage3_dpo_trains_the_policy_and_never_touches_the_reference(tmp_path):
    init = stage2_weights(tmp_path)
    module = built(loss="dpo", beta=0.1, init_from=str(init), lr_connector=1e-3, lr_vision=1e-4, lr_llm=1e-4)
    reference = module.reference
    assert reference is not None and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    before = snapshot(module)
    assert any(k.startswith("reference.") for k in before)
    t = trainer(tmp_path, 3, limit_val_batches=1, val_check_interval=2, callbacks=[ReferenceModeCheck()])
    pairs = PreferenceSet([3, 4, 3, 4, 3, 4])
    t.fit(module, loader(pairs, 2, collate_preference), loader(pairs, 2, collate_preference))

    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in reference.parameters())
    assert not reference.training  # Lightning put the module in train mode; the reference stayed in eval
    assert_unchanged(before, module, [k for k in before if k.startswith("reference.")])
    assert_changed(before, module, [f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad])
    # the first step sees policy == reference: loss ln 2, no pair counted as won
    assert logged_series(t, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    assert logged_series(t, "train/rewards/accuracies")[0] == 0.0
    assert torch.isfinite(t.callback_metrics["train/loss"])
    columns = logged_columns(t)
    expected = {f"train/{k}" for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                        "rewards/accuracies", "logps/chosen", "logps/rejected")}
    assert expected | {"train/loss", "train/loss/caps", "train/grad_norm", "val/loss", "val/rewards/margins"} <= columns


class PolicyModeCheck(Callback):
    """Records whether every policy module trained in train mode and every reference module in eval mode."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        policy = all(m.training for m in pl_module.model.modules())
        reference = pl_module.reference is None or not any(m.training for m in pl_module.reference.modules())
        self.seen.append(policy and reference)


@pytest.mark.parametrize("loss", ["answer_only", "dpo"])
def test_the_policy_trains_in_train_mode_and_the_reference_warns_nothing(tmp_path, recwarn, loss):
    module = built(loss=loss)
    module.model.llm.eval()  # as from_pretrained leaves a pretrained backbone
    check = PolicyModeCheck()
    data = (PreferenceSet if loss == "dpo" else SFTSet)([2, 3])
    trainer(tmp_path, 2, callbacks=[check], logger=False).fit(
        module, loader(data, 2, collate_preference if loss == "dpo" else collate_sft))
    assert check.seen == [True, True]
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]


def test_dpo_reference_is_not_checkpointed_and_is_verified_on_resume(tmp_path):
    init = stage2_weights(tmp_path)
    pairs = PreferenceSet([3, 4, 3, 4])
    ckpt_dir = tmp_path / "ckpt"
    module = built(loss="dpo", init_from=str(init))
    t = trainer(tmp_path, 2, enable_checkpointing=True,
                callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2)])
    t.fit(module, loader(pairs, 2, collate_preference))
    checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    assert any(k.startswith("model.") for k in checkpoint["state_dict"])
    assert checkpoint["fovlm"]["reference_fingerprint"] == module.reference_fingerprint

    # resume: the reference is rebuilt from init_from, checked, and training continues
    resumed = FoveatedModule(**TINY, loss="dpo", init_from=str(init))
    t2 = trainer(tmp_path, 3)
    t2.fit(resumed, loader(pairs, 2, collate_preference), ckpt_path=ckpt_dir / "last.ckpt")
    assert t2.global_step == 3
    for a, b in zip(module.reference.state_dict().values(), resumed.reference.state_dict().values()):
        assert torch.equal(a, b)

    # a different init_from file would silently change the reference: refused
    state = torch.load(init, map_location="cpu")
    state["q_init"] = state["q_init"] + 1.0
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    other = FoveatedModule(**TINY, loss="dpo", init_from=str(changed))
    with pytest.raises(ValueError, match="DPO reference.*changed.pt"):
        trainer(tmp_path, 4).fit(other, loader(pairs, 2, collate_preference), ckpt_path=ckpt_dir / "last.ckpt")

    # a policy checkpoint loads as init_from of a later stage (weights only, reference keys absent)
    next_stage = built(loss="answer_only", init_from=str(ckpt_dir / "last.ckpt"))
    for name, value in next_stage.model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"model.{name}"]), name


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_micro_batch_4_equals_2_x_accumulation_2(tmp_path):
    torch.manual_seed(11)
    first = built(loss="answer_only", schedule="constant", warmup_ratio=0.0, lr_vision=1e-4, lr_llm=1e-4)
    second = built(loss="answer_only", schedule="constant", warmup_ratio=0.0, lr_vision=1e-4, lr_llm=1e-4)
    second.load_state_dict(first.state_dict())
    start = snapshot(first)
    data = SFTSet([5, 5, 5, 5])  # equal lengths: every micro-batch has the same number of scored tokens
    runs, logged = [], []
    for module, batch_size, accumulate in ((first, 4, 1), (second, 2, 2)):
        grads = GradCapture()
        t = trainer(tmp_path, 1, callbacks=[grads], accumulate_grad_batches=accumulate,
                    logger=CSVLogger(tmp_path, name=f"accumulate{accumulate}"))
        t.fit(module, loader(data, batch_size))
        runs.append((grads.steps[0], module.state_dict()))
        logged.append([logged_series(t, key) for key in ("train/loss", "train/loss/caps", "train/loss/vqa")])
    # the logged step loss covers the whole step (both micro-batches), per source too
    for series_a, series_b in zip(*logged):
        assert len(series_a) == len(series_b) == 1
        assert series_a[0] == pytest.approx(series_b[0], abs=1e-5)
    (grads_a, state_a), (grads_b, state_b) = runs
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name
    moved = 0
    for name, value in state_a.items():
        assert torch.allclose(value, state_b[name], atol=1e-5), name
        moved += not torch.equal(value, start[name])
    assert moved > 0


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    torch.manual_seed(12)
    plain = built(loss="all_text")
    checkpointed = built(loss="all_text", gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.model.encoder.patch_checkpointing and checkpointed.model.llm.is_activation_checkpointing
    captured = []
    for module in (plain, checkpointed):
        grads = GradCapture()
        trainer(tmp_path, 1, callbacks=[grads], logger=False).fit(module, loader(SFTSet([4, 4]), 2))
        captured.append(grads.steps[0])
    for name, grad in captured[0].items():
        assert torch.allclose(grad, captured[1][name], atol=1e-6), name


@pytest.mark.parametrize("loss", ["answer_only", "dpo"])
def test_packing_gives_the_same_gradients(tmp_path, loss):
    torch.manual_seed(13)
    plain = built(loss=loss)
    packed = built(loss=loss, pack_tokens=64)
    packed.load_state_dict(plain.state_dict())
    assert packed.model.pack_tokens == 64 and (loss != "dpo" or packed.reference.pack_tokens == 64)
    data = (PreferenceSet if loss == "dpo" else SFTSet)([3, 9, 1, 5], num_frames=[2, 0, 1, 3])
    captured = []
    for module in (plain, packed):
        grads = GradCapture()
        collate = collate_preference if loss == "dpo" else collate_sft
        trainer(tmp_path, 1, callbacks=[grads], logger=False).fit(module, loader(data, 4, collate))
        captured.append(grads.steps[0])
    assert captured[0].keys() == captured[1].keys()
    for name, grad in captured[0].items():
        torch.testing.assert_close(captured[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="pack_tokens"):
        FoveatedModule(**TINY, pack_tokens=0)


def test_validation_loss_is_token_weighted_over_the_whole_run_and_per_source(tmp_path):
    module = FoveatedModule(**TINY, loss="answer_only")
    data = SFTSet([3, 6, 4, 5, 2], num_frames=[1, 2, 0, 3, 2])  # uneven batches: a mean of batch means would differ
    t = trainer(tmp_path, 1, logger=False)
    metrics = t.validate(module, loader(data, 2), verbose=False)[0]

    sums, counts = {}, {}
    with torch.no_grad():
        for i in range(len(data)):
            sample = collate_sft([data[i]])
            logits = module.model(sample["frames"], sample["num_frames"], sample["input_ids"],
                                  sample["attention_mask"]).logits[0]  # [S, V], sample alone, every position
            ids, roles = sample["input_ids"][0], sample["roles"][0]
            for j in range(len(ids) - 1):
                if roles[j + 1] == ROLE_ANSWER:
                    source = sample["source"][0]
                    sums[source] = sums.get(source, 0.0) + F.cross_entropy(logits[j], ids[j + 1]).item()
                    counts[source] = counts.get(source, 0) + 1
    assert metrics["val/loss"] == pytest.approx(sum(sums.values()) / sum(counts.values()), abs=1e-5)
    for source in sums:
        assert metrics[f"val/loss/{source}"] == pytest.approx(sums[source] / counts[source], abs=1e-5)


def test_bf16_mixed_keeps_fp32_weights_and_trains(tmp_path):
    module = built(loss="all_text")
    before = snapshot(module)
    t = trainer(tmp_path, 2, precision="bf16-mixed", logger=False)
    t.fit(module, loader(SFTSet([4, 4, 4, 4]), 2))
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert not torch.equal(before["model.q_static"], module.model.q_static.detach())


def test_text_only_batch_gives_every_trainable_parameter_a_gradient(tmp_path):
    """A batch without frames still reduces every trainable parameter's gradient (DDP needs the same set)."""
    module = built(loss="all_text")
    grads = GradCapture()
    trainer(tmp_path, 1, callbacks=[grads], logger=False).fit(module, loader(SFTSet([4, 4], num_frames=0), 2))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(grads.steps[0]) == trainable
    assert torch.count_nonzero(grads.steps[0]["q_static"]) == 0
    assert torch.count_nonzero(grads.steps[0]["llm.model.embed_tokens.weight"]) > 0


def test_query_budget_is_a_pure_function_of_the_step():
    draws = [query_budget([1, 2, 4], step) for step in range(60)]
    assert draws == [query_budget([1, 2, 4], step) for step in range(60)]  # every rank, every resume
    assert set(draws) == {1, 2, 4}
    assert query_budget([3], 17) == 3


def test_a_budget_listed_several_times_is_drawn_as_often():
    draws = [query_budget([1, 2, 8, 8, 8, 8], step) for step in range(3000)]
    assert abs(draws.count(8) / len(draws) - 4 / 6) < 0.03
    assert abs(draws.count(1) / len(draws) - 1 / 6) < 0.03


def test_budget_training_draws_k_per_step_and_validates_with_all(tmp_path):
    module = built(loss="all_text", num_queries=4, query_budgets=[1, 2, 4])
    before = snapshot(module)
    data = loader(SFTSet([4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]), 2)
    t = trainer(tmp_path, 6)
    t.fit(module, data, data)
    assert logged_series(t, "train/num_queries") == [float(query_budget([1, 2, 4], s)) for s in range(6)]
    assert module.model.active_queries == 4  # the last validation ran with all K queries
    # the queries of the largest drawn budget all trained; a budget never drawn leaves its rows untouched
    drawn = max(query_budget([1, 2, 4], s) for s in range(6))
    changed = (module.model.q_static - before["model.q_static"]).abs().sum(1) > 0
    assert changed[:drawn].all()
    with pytest.raises(ValueError, match="query_budgets"):
        FoveatedModule(**{**TINY, "num_queries": 2, "query_budgets": [1, 4]})


def test_question_first_trains_every_stage_head(tmp_path):
    for loss, data in (("answer_only", loader(SFTSet([4, 4, 4, 4]), 2)),
                       ("all_text", loader(SFTSet([4, 4, 4, 4]), 2))):
        module = built(loss=loss, question_first=True, num_queries=2)
        assert module.model.question_first and module.model.num_queries == 2
        t = trainer(tmp_path, 2)
        t.fit(module, data)
        assert torch.isfinite(t.callback_metrics["train/loss"])
