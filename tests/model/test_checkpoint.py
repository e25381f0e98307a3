"""Strict weight loading from a Lightning checkpoint, a state dict or safetensors; errors name the file."""

import pytest
import torch
from safetensors.torch import save_model
from tiny_models import QUERY_DIM

from fovlm.model.checkpoint import CheckpointError, load_weights, read_model_state
from fovlm.model.vlm import FoveatedVLM


def _fresh(tiny_vlm: FoveatedVLM) -> FoveatedVLM:
    """Another model of the same architecture with different weights."""
    torch.manual_seed(11)
    model = FoveatedVLM(type(tiny_vlm.encoder.dino)(tiny_vlm.encoder.dino.config),
                        type(tiny_vlm.llm)(tiny_vlm.llm.config), query_dim=QUERY_DIM)
    return model.eval()


def _assert_same(a: FoveatedVLM, b: FoveatedVLM) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_every_format_loads_the_same_weights(tiny_vlm, tmp_path):
    lightning = {"state_dict": {f"model.{k}": v for k, v in tiny_vlm.state_dict().items()}, "epoch": 3}
    lightning["state_dict"]["reference.q_init"] = torch.zeros(1)  # another submodule's tensor: not the model's
    torch.save(lightning, tmp_path / "last.ckpt")
    torch.save(tiny_vlm.state_dict(), tmp_path / "plain.pt")
    save_model(tiny_vlm, str(tmp_path / "model.safetensors"))  # tied LLM embeddings stored once
    assert set(read_model_state(tmp_path / "last.ckpt")) == set(tiny_vlm.state_dict())
    for name in ("last.ckpt", "plain.pt", "model.safetensors"):
        model = _fresh(tiny_vlm)
        load_weights(model, tmp_path / name)
        _assert_same(tiny_vlm, model)
        assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # still tied


def test_errors_name_the_file_and_what_is_wrong(tiny_vlm, tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from checkpoint .*nope.ckpt does not exist"):
        load_weights(tiny_vlm, tmp_path / "nope.ckpt", label="init_from checkpoint")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tiny_vlm, tmp_path / "nope.ckpt")
    torch.save({"payload": CheckpointError("arbitrary object")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt cannot be read safely"):
        load_weights(tiny_vlm, tmp_path / "evil.pt")
    torch.save({"q_init": "not a tensor"}, tmp_path / "strings.pt")
    with pytest.raises(CheckpointError, match="strings.pt holds no state dict of tensors"):
        load_weights(tiny_vlm, tmp_path / "strings.pt")
    state = dict(tiny_vlm.state_dict())
    state.pop("q_init")
    state["q_static"] = torch.zeros(1, QUERY_DIM + 1)
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt does not match the model: missing \(1\): q_init; "
                                              r"unexpected \(1\): extra; shape mismatch \(1\): q_static"):
        load_weights(tiny_vlm, tmp_path / "bad.pt")


def test_a_tied_tensor_is_excused_only_when_its_twin_is_there(tiny_vlm, tmp_path):
    state = {k: v for k, v in tiny_vlm.state_dict().items() if k not in ("llm.lm_head.weight",
                                                                         "llm.model.embed_tokens.weight")}
    torch.save(state, tmp_path / "no_embeddings.pt")
    with pytest.raises(CheckpointError, match=r"missing \(2\)"):
        load_weights(_fresh(tiny_vlm), tmp_path / "no_embeddings.pt")
