"""A checkpoint is self-contained: once its backbones' folders are gone (and the hub is offline), ``fovlm export``
and ``fovlm eval`` rebuild its model from the configs and tokenizer it stores, with the logits it was saved with;
a checkpoint written without them still loads by name while the folders exist."""

import json
import os
import shutil

import pytest
import torch
import webdataset as wds
from fitkit import fit_args, synthetic_data
from tiny_models import random_frames
from transformers import Dinov2Model, LlamaForCausalLM

from fovlm.model.loading import load_tokenizer, tiny_llm_config, tiny_vision_config
from fovlm.model.pretrained import load_any, load_pretrained, model_from_checkpoint, read_checkpoint
from fovlm.model.stored import STORED_KEY
from fovlm.model.vlm import MODES

MESSAGES = [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "A red ball rolls."}]


def _backbone_folders(root, tokenizer) -> tuple[str, str]:
    """A random tiny LLM (with the SmolLM2 tokenizer beside it, as a hub LLM holds its own) and a random tiny
    DINOv2, each saved as a folder that training names."""
    llm, vision = root / "llm", root / "vision"
    LlamaForCausalLM(tiny_llm_config()).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    Dinov2Model(tiny_vision_config()).save_pretrained(vision)
    return str(llm), str(vision)


def _logits(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    frames, num_frames = random_frames(3, size=56), torch.tensor([1, 2])
    ids, mask = torch.randint(3, 1000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        return {mode: model(frames, num_frames, ids, mask, mode=mode).logits for mode in MODES}


def _mcq_shard(path) -> str:
    """One image question in the multiple-choice shard format."""
    question = {"source": "toy", "media": "image", "question": "What colour is it?", "options": ["red", "blue"],
                "answer": 0, "category": "colour"}
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "q0", "json": json.dumps(question).encode(), "000.jpg": _jpeg()})
    return str(path)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.slow
def test_export_and_eval_need_nothing_but_the_checkpoint(tmp_path_factory, tmp_path, tokenizer, capsys):
    from fovlm.cli import main as fovlm
    from fovlm.eval.run import main as evaluate
    from fovlm.export import main as export

    data = synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")
    llm, vision = _backbone_folders(tmp_path / "backbones", tokenizer)
    fovlm(fit_args(1, data, tmp_path / "runs", steps=2, extra=[
        "--model.init_args.llm", llm, "--model.init_args.vision", vision,
        "--model.init_args.vision_init_range", "null", "--data.init_args.frame_size", "56",
    ]))
    path = tmp_path / "runs" / "stage1" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(path)
    assert checkpoint["hyper_parameters"]["llm"] == llm and set(checkpoint[STORED_KEY]["tokenizer"])
    # The model as saved, rebuilt the way checkpoints without the stored record are: from the folders by name.
    legacy = {key: value for key, value in checkpoint.items() if key != STORED_KEY}
    saved = _logits(model_from_checkpoint(legacy, path))
    chat = load_tokenizer(llm).apply_chat_template(MESSAGES)

    shutil.rmtree(tmp_path / "backbones")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_from_checkpoint(legacy, path)
    model, loaded_tokenizer, frames = load_any(path)  # what fovlm eval, predict and stream load
    for mode, logits in _logits(model).items():
        torch.testing.assert_close(logits, saved[mode], atol=0, rtol=0)
    assert loaded_tokenizer.apply_chat_template(MESSAGES) == chat and frames.frame_size == 56

    assert export([str(path), str(tmp_path / "export")]) == 0
    exported = _logits(load_pretrained(tmp_path / "export"))
    for mode, logits in exported.items():
        torch.testing.assert_close(logits, saved[mode], atol=0, rtol=0)
    assert load_tokenizer(str(tmp_path / "export")).apply_chat_template(MESSAGES) == chat

    mcq = _mcq_shard(tmp_path / "mcq.tar")
    code = evaluate(["--model", str(path), "--benchmark", f"toy={mcq}", "--val", str(data / "caption/val/*.tar"),
                     "--modes", "coarse_only", "--out", str(tmp_path / "results.json"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["toy"]["coarse_only"]["total"] == 1 and results["val_loss"]["coarse_only"]
