"""Validation loss per source and mode, and the ``fovlm eval`` command end to end."""

import json

import pytest
import torch
from eval_helpers import make_tiny_vlm, write_mcq_shard, write_sft_shard

from fovlm.data.chat import render_chat
from fovlm.data.roles import ROLE_ANSWER
from fovlm.eval.run import main, validation_losses
from fovlm.export import export_model
from fovlm.model.vlm import MODES


def _sample(tokenizer, question, reply):
    ids, roles = render_chat(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": reply}])
    return torch.tensor(ids), torch.tensor(roles)


def test_validation_loss_per_source_equals_a_hand_computation(tiny_vlm, tokenizer):
    samples = [_sample(tokenizer, "What colour?", "Red."), _sample(tokenizer, "Which way does it go?", "Left, fast.")]
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    roles = torch.zeros(2, width, dtype=torch.long)
    for i, (ids, r) in enumerate(samples):
        input_ids[i, : len(ids)], roles[i, : len(r)] = ids, r
    frames, num_frames = torch.randn(5, 3, 224, 224), torch.tensor([2, 3])
    batch = {"frames": frames, "num_frames": num_frames, "input_ids": input_ids,
             "attention_mask": (roles != 0).long(), "roles": roles, "source": ["alpha", "beta"]}
    losses = validation_losses(tiny_vlm, [batch]).compute()["val_loss"]
    assert set(losses) == set(MODES)
    for mode in MODES:
        for i, source in enumerate(("alpha", "beta")):
            ids, r = samples[i]
            frames_i = frames[:2] if i == 0 else frames[2:]
            with torch.no_grad():
                logits = tiny_vlm(frames_i, num_frames[i : i + 1], ids[None], torch.ones(1, len(ids), dtype=torch.long),
                                  mode=mode).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            answer = (r == ROLE_ANSWER).nonzero().flatten().tolist()
            hand = -sum(float(logp[j - 1, ids[j]]) for j in answer) / len(answer)
            assert losses[mode][source] == pytest.approx(hand, rel=1e-5)


@pytest.mark.slow
def test_fovlm_eval_command(tmp_path, tokenizer, capsys):
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model")
    mcq = write_mcq_shard(tmp_path / "mcq.tar")
    sft = write_sft_shard(tmp_path / "sft.tar")
    out = tmp_path / "results.json"
    code = main(["--model", str(tmp_path / "model"), "--benchmark", f"toy={mcq}", "--val", sft, "--out", str(out),
                 "--tensorboard", str(tmp_path / "tb"), "--per-category", "--attention-examples", "3",
                 "--attention-dir", str(tmp_path / "looks")])
    assert code == 0
    results = json.loads(out.read_text())
    assert all(results["toy"][mode]["total"] == 2 for mode in MODES)
    assert set(results["toy"]["coarse_fine"]["per_category"]) == {"colour", "motion"}
    for mode in MODES:  # only the video question says where its answer is
        per_category = results["toy"][mode]["per_category"]
        assert 0 < per_category["motion"]["attention_share"] < 1 and "attention_share" not in per_category["colour"]
    assert set(results["val_loss"]["autoregressive"]) == {"alpha", "beta"}
    captured = capsys.readouterr()
    assert "multiple-choice accuracy" in captured.out and "skipped samples {'bad_image': 1}" in captured.err
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "looks").iterdir()] == ["toy_vid0.png"]  # the one question with a region
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "model"), "--benchmark", "no-equals-sign"])
