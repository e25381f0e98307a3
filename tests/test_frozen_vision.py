"""Frozen-vision mode (``lr_vision: 0``): the DINOv2 patch pass keeps nothing for backward, and the query path
still gets exactly the gradients it would get with DINOv2 trainable but left out of the optimizer."""

import torch
from test_module import SFTSet, collate_sft

from fovlm.model.parameters import parameter_groups
from fovlm.module import FoveatedModule

TINY = {"llm": "tiny", "vision": "tiny", "query_dim": 32, "loss": "answer_only", "lambda_coarse": 0.5}


def _built(lr_vision: float) -> FoveatedModule:
    module = FoveatedModule(**TINY, lr_vision=lr_vision)
    module.configure_model()
    return module


def _saved_by_patch_pass(module: FoveatedModule, frames: torch.Tensor) -> int:
    saved = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.model.encode_patches(frames)
    return len(saved)


def test_frozen_patch_pass_saves_nothing_for_backward():
    frames = collate_sft([SFTSet([3])[0]])["frames"]
    assert _saved_by_patch_pass(_built(lr_vision=0.0), frames) == 0
    assert _saved_by_patch_pass(_built(lr_vision=1e-5), frames) > 0  # trained: the same pass keeps activations


def test_query_path_gradients_equal_those_of_a_trainable_but_unoptimised_backbone():
    torch.manual_seed(3)
    frozen = _built(lr_vision=0.0)
    trainable = _built(lr_vision=0.0)
    trainable.load_state_dict(frozen.state_dict())
    groups = parameter_groups(trainable.model)
    for name, param in trainable.model.named_parameters():
        if groups[name] == "vision" and name != "encoder.dino.embeddings.mask_token":
            param.requires_grad_(True)  # DINOv2 in the graph, as if trained, yet no optimizer would step it
    batch = collate_sft([SFTSet([3, 5], num_frames=[2, 3])[i] for i in range(2)])
    grads = []
    for module in (frozen, trainable):
        out = module.loss_head(module.model, batch, mode="coarse_fine", lambda_coarse=0.5)
        out.loss.backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.grad is not None})
    trained = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert trained and all(groups[n] != "vision" for n in trained)
    assert set(grads[0]) == trained
    assert any(groups[n] == "vision" for n in grads[1])  # the backbone really was in the second graph
    for name in trained:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
    assert torch.count_nonzero(grads[0]["encoder.query_input_proj.weight"]) > 0  # through the cached K/V


def test_patch_pass_in_bf16_hands_float32_keys_and_values_to_the_query_passes():
    module = FoveatedModule(**TINY, lr_vision=0.0, patch_pass_bf16=True)
    module.configure_model()
    encoder = module.model.encoder
    assert encoder.patch_dtype == torch.bfloat16
    frames = collate_sft([SFTSet([3])[0]])["frames"]
    with torch.no_grad():
        fast = encoder.encode_patches(frames)
        encoder.patch_dtype = None
        exact = encoder.encode_patches(frames)
    for a, b in zip([fast.features, *fast.keys, *fast.values], [exact.features, *exact.keys, *exact.values]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # bf16 keeps about 3 significant digits
    assert not torch.equal(fast.keys[-1], exact.keys[-1])
    encoder.patch_dtype = torch.bfloat16
    batch = collate_sft([SFTSet([3, 5], num_frames=[2, 3])[i] for i in range(2)])
    out = module.loss_head(module.model, batch, mode="coarse_fine", lambda_coarse=0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and module.model.encoder.query_input_proj.weight.grad.dtype == torch.float32
