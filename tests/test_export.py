"""Export round trip: a FoveatedModule checkpoint -> exported folder -> FoveatedVLM with identical logits."""

import json
import os

import lightning as L
import pytest
import torch

from fovlm.export import main, parse_args
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.pretrained import load_exported_tokenizer, load_pretrained, read_checkpoint
from fovlm.model.vlm import MODES
from fovlm.module import FoveatedModule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Lightning checkpoint of a tiny FoveatedModule whose weights differ from any fresh init."""
    torch.manual_seed(3)
    module = FoveatedModule(llm="tiny", vision="tiny", query_dim=32, loss="answer_only")
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module.model.eval()


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    return torch.randn(5, 3, 224, 224), torch.tensor([3, 2]), ids, mask


def test_export_round_trip_gives_the_checkpoint_logits(checkpoint, tmp_path, capsys):
    path, original = checkpoint
    results = {"toy": {"coarse_fine": {"accuracy": 0.75, "correct": 3, "total": 4, "per_category": {}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "export"
    assert main([str(path), str(out), "--results", str(tmp_path / "results.json")]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("tokenizer", "chat_template",
                                                                           "special_tokens"))) == [
        "README.md", "config.json", "model.safetensors", "results.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["query_dim"] == 32 and config["llm_config"]["hidden_size"] == 64
    assert config["vision_config"]["num_hidden_layers"] == 2
    assert config["data"] == {"frame_size": 224, "max_frames": 64, "image_frames": 8}
    assert "| toy | 75.0 |" in (out / "README.md").read_text()

    loaded = load_pretrained(out)
    assert type(loaded.llm) is type(original.llm)
    frames, num_frames, ids, mask = _batch()
    with torch.no_grad():
        for mode in MODES:
            expected = original(frames, num_frames, ids, mask, mode=mode).logits
            got = loaded(frames, num_frames, ids, mask, mode=mode).logits
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    tokenizer = load_exported_tokenizer(out)
    assert tokenizer.chat_template and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_loading_refuses_pickled_objects_and_incomplete_folders(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": CheckpointError("arbitrary object")}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="not an exported fovlm folder"):
        load_pretrained(tmp_path)


def test_push_to_hub_arguments(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    args = parse_args([str(path), "out", "--push-to-hub", "someone/fovlm-tiny", "--private"])
    assert (args.push_to_hub, args.private) == ("someone/fovlm-tiny", True)
    for bad in (["--push-to-hub", "no-owner"], ["--private"], ["--results", str(tmp_path / "none.json")]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args([str(path), "out", *bad])
        assert exit_info.value.code == 2
    # Offline (the tests never reach the network): the folder is written, the upload fails with its own code.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    code = main([str(path), str(tmp_path / "pushed"), "--push-to-hub", "someone/fovlm-tiny"])
    assert code == 3 and (tmp_path / "pushed" / "model.safetensors").is_file()
    assert "upload to someone/fovlm-tiny failed" in capsys.readouterr().err


def test_foveated_vlm_from_pretrained(checkpoint, tmp_path):
    from fovlm.model.vlm import FoveatedVLM

    path, original = checkpoint
    assert main([str(path), str(tmp_path / "out")]) == 0
    loaded = FoveatedVLM.from_pretrained(str(tmp_path / "out"))
    assert not loaded.training
    for (name, a), (_, b) in zip(sorted(original.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name
