"""FSDP2 (fovlm.model.sharding) on two gloo ranks equals one process: per-step losses, the global gradient norm and
the final weights over 20 AdamW steps (fp32 within 1e-5 but for a few elements with near-zero gradients, bf16
autocast within bf16 tolerance); gathered parameters
let ranks run different numbers of forwards (generation) without a collective."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny_models import QUERY_DIM, random_frames
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.loading import tiny_llm_config, tiny_vision_config
from fovlm.model.sharding import gathered, global_grad_norm, is_sharded, shard_units, shard_vlm
from fovlm.model.vlm import FoveatedVLM

STEPS = 20
WORLD = 2


def _model() -> FoveatedVLM:
    torch.manual_seed(0)
    dino = Dinov2Model(tiny_vision_config())
    llm = LlamaForCausalLM(tiny_llm_config())
    return FoveatedVLM(dino, llm, query_dim=QUERY_DIM).train()


def _half_batch(step: int, rank: int):
    """Rank ``rank``'s half of step ``step``: two samples with 1-3 frames (56 px) and 5-9 text tokens."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    num_frames = torch.randint(1, 4, (2,), generator=gen)
    lengths = torch.randint(5, 10, (2,), generator=gen)
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    ids = torch.randint(3, 500, mask.shape, generator=gen) * mask
    torch.manual_seed(1000 * step + rank)
    return random_frames(int(num_frames.sum()), size=56), num_frames, ids, mask


def _loss(model, half) -> torch.Tensor:
    """Next-token cross-entropy of the coarse->fine pass over each sample's text."""
    frames, num_frames, ids, mask = half
    logits = model(frames, num_frames, ids, mask, mode="coarse_fine", logits_mask=mask.bool()).logits  # [N, V]
    targets = torch.roll(ids, -1, dims=1)[mask.bool()]
    return F.cross_entropy(logits.float(), targets)


def _train(model, step_losses, rank: int | None, bf16: bool) -> list[tuple[float, float]]:
    """20 AdamW steps; per step (loss averaged over the two halves, global gradient norm)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    record = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_losses(model, step)
        loss.backward()
        if rank is not None:  # FSDP averages the ranks' gradients; the logged loss is averaged the same way
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss = loss / WORLD
        norm = global_grad_norm(p.grad for p in model.parameters() if p.grad is not None)
        record.append((float(loss.detach()), float(norm)))
        optimizer.step()
        optimizer.zero_grad()
    return record


def _worker(rank: int, port: int, out: str, bf16: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = shard_vlm(_model(), init_device_mesh("cpu", (WORLD,)))
        record = _train(model, lambda m, step: _loss(m, _half_batch(step, rank)), rank, bf16)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.eval()
        # Different numbers of forwards per rank (one frame vs three) inside gathered: no collective, no hang.
        with torch.no_grad(), gathered(model):
            torch.manual_seed(7)
            frames = random_frames(1 + 2 * rank, size=56)
            z = model.static_tokens(model.encode_patches(frames))[0]
        if rank == 0:
            torch.save({"record": record, "state": state, "tokens": z}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_run(tmp_path, bf16: bool) -> dict:
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(_free_port(), str(out), bf16), nprocs=WORLD, start_method="spawn")
    return torch.load(out, weights_only=False)


def _single_run(bf16: bool) -> tuple[list[tuple[float, float]], FoveatedVLM]:
    model = _model()

    def both_halves(m, step):
        return (_loss(m, _half_batch(step, 0)) + _loss(m, _half_batch(step, 1))) / 2

    return _train(model, both_halves, None, bf16), model


def test_shard_units_are_every_dino_and_llm_layer():
    model = _model()
    units = shard_units(model)
    assert len(units) == 4 and units[0] is model.encoder.dino.encoder.layer[0]
    assert units[2] is model.llm.model.layers[0] and not is_sharded(model)
    model.encoder.deep_query = False
    with pytest.raises(ValueError, match="shallow"):
        shard_vlm(model, mesh=None)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_two_sharded_ranks_equal_one_process(tmp_path, bf16):
    sharded = _sharded_run(tmp_path, bf16)
    record, model = _single_run(bf16)
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    losses, norms = torch.tensor(record).T
    sharded_losses, sharded_norms = torch.tensor(sharded["record"]).T
    assert losses[0] > losses[-1]  # it trains
    torch.testing.assert_close(sharded_losses, losses, **tol)
    torch.testing.assert_close(sharded_norms, norms, **tol)
    if not bf16:
        state = model.state_dict()
        assert sharded["state"].keys() == state.keys()
        for name, value in state.items():
            # AdamW steps every weight by about lr whatever its gradient's size, so an element whose gradient is
            # near zero can take the other sign's step when the two runs round it differently (all-reduce against
            # a sum in one process): such elements may differ by a fraction of lr, every other one by float noise.
            diff = (sharded["state"][name] - value).abs()
            assert float(diff.max()) < 1e-4, name
            assert int((diff > 1e-5 + 1e-5 * value.abs()).sum()) <= max(2, value.numel() // 10_000), name
        model.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            z = model.static_tokens(model.encode_patches(random_frames(1, size=56)))[0]
        torch.testing.assert_close(sharded["tokens"], z, atol=1e-5, rtol=1e-5)
