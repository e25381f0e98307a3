"""The record a checkpoint stores: the architecture rebuilds the model, the tokenizer's files rebuild the tokenizer."""

import io
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import TOL, random_frames

from fovlm.model.checkpoint import CheckpointError, load_state_strict
from fovlm.model.exported import build_from_config
from fovlm.model.stored import (
    STORED_KEY,
    datamodule_tokenizer_files,
    model_config,
    stored_config,
    stored_record,
    stored_tokenizer,
    tokenizer_files,
)
from fovlm.model.vlm import MODES, FoveatedVLM


def _through_torch_save(record: dict) -> dict:
    """A checkpoint holding ``record``, written and read back as checkpoints are (``weights_only=True``)."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, STORED_KEY: record}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_stored_architecture_rebuilds_the_model(tiny_vlm, tokenizer):
    checkpoint = _through_torch_save(stored_record(tiny_vlm, tokenizer_files(tokenizer)))
    config = stored_config(checkpoint)
    assert config == model_config(tiny_vlm) and json.loads(json.dumps(config)) == config  # plain JSON values
    assert config["query_dim"] == tiny_vlm.query_dim and config["vision_config"]["hidden_size"] == 64
    rebuilt = build_from_config(config, FoveatedVLM)
    load_state_strict(rebuilt, tiny_vlm.state_dict(), "test")
    rebuilt.eval()
    frames, num_frames = random_frames(3), torch.tensor([1, 2])
    ids, mask = torch.randint(3, 1000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        for mode in MODES:
            torch.testing.assert_close(rebuilt(frames, num_frames, ids, mask, mode=mode).logits,
                                       tiny_vlm(frames, num_frames, ids, mask, mode=mode).logits, **TOL)


def test_the_stored_tokenizer_is_the_saved_one(tiny_vlm, tokenizer):
    files = tokenizer_files(tokenizer)
    assert "tokenizer.json" in files and all(isinstance(data, bytes) for data in files.values())
    loaded = stored_tokenizer(_through_torch_save(stored_record(tiny_vlm, files)))
    messages = [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "A red ball rolls."}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    # A DataModule's tokenizer is what a run stores; without one there is nothing to store.
    assert datamodule_tokenizer_files(SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tokenizer))) == files
    assert datamodule_tokenizer_files(None) is None


def test_checkpoints_without_the_record_and_bad_file_names(tiny_vlm):
    assert stored_config({"state_dict": {}}) is None and stored_tokenizer({"state_dict": {}}) is None
    assert stored_tokenizer({STORED_KEY: stored_record(tiny_vlm, None)}) is None
    for name in ("../tokenizer.json", "sub/tokenizer.json", ".."):
        with pytest.raises(CheckpointError, match="last.ckpt stores a tokenizer file"):
            stored_tokenizer({STORED_KEY: {"tokenizer": {name: b"{}"}}}, "last.ckpt")
