"""Validation loss per source and mode, and the ``fovlm eval`` command end to end."""

import json

import pytest
import torch
import webdataset as wds
from eval_helpers import make_tiny_vlm, png_bytes, write_mcq_shard, write_sft_shard

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


def write_rejected_shard(path) -> str:
    """A multiple-choice shard none of whose samples can be asked: two broken images and one without an answer."""
    question = {"source": "toy", "media": "image", "question": "Which colour?", "options": ["red", "blue"]}
    with wds.TarWriter(str(path)) as sink:
        for i in range(2):
            sink.write({"__key__": f"broken{i}", "json": json.dumps({**question, "answer": 0}).encode(),
                        "jpg": b"not a jpeg"})
        sink.write({"__key__": "unanswered", "json": json.dumps(question).encode(), "png": png_bytes((255, 0, 0))})
    return str(path)


def _last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_benchmark_without_questions_is_a_one_line_error(tmp_path, tokenizer, capsys):
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model")
    (tmp_path / "rejected").mkdir()
    write_rejected_shard(tmp_path / "rejected" / "000000.tar")
    pattern = str(tmp_path / "rejected" / "*.tar")
    out = tmp_path / "results.json"
    code = main(["--model", str(tmp_path / "model"), "--benchmark", f"broken={pattern}", "--out", str(out)])
    line = _last_line(capsys.readouterr().err)
    assert code == 2 and not out.exists()
    assert line.startswith(f"fovlm eval: error: benchmark 'broken' ({pattern!r}) has no question to score")
    assert "bad_image: 2, invalid_json: 1; first: 000000.tar/broken0 (bad_image), 000000.tar/broken1" in line
    # A missing model is named.
    missing = str(tmp_path / "no-model")
    assert main(["--model", missing, "--benchmark", f"broken={pattern}"]) == 1
    assert missing in _last_line(capsys.readouterr().err)


def test_a_benchmark_with_some_questions_reports_its_skips(tmp_path, tokenizer, capsys):
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model")
    mcq = write_mcq_shard(tmp_path / "mcq.tar")  # two questions and a broken image
    args = ["--model", str(tmp_path / "model"), "--benchmark", f"toy={mcq}", "--modes", "coarse_only",
            "--out", str(tmp_path / "results.json")]
    assert main(args) == 0
    assert "toy: skipped samples {'bad_image': 1}" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["toy"]["coarse_only"]["total"] == 2
    # Validation shards without a readable sample are the same kind of error.
    rejected = write_rejected_shard(tmp_path / "val.tar")
    assert main([*args, "--val", rejected]) == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(f"fovlm eval: error: --val: no readable sample in the val shards ({rejected!r}: 1 file")
    assert "skipped bad_image: 2, invalid_json: 1; first: val.tar/broken0 (bad_image)" in line
