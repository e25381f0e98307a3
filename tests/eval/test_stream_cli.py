"""``fovlm stream``: a video read one frame at a time, questions answered at their moments, clear errors."""

import json

import pytest
from eval_helpers import export_taught_model, mp4_bytes

from fovlm.cli import main as cli_main
from fovlm.eval.stream import Question, main, parse_ask


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    return export_taught_model(tmp_path_factory.mktemp("exported"), tokenizer)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    path.write_bytes(mp4_bytes(24, fps=4))  # 6 s -> frames at 0.5, 1.5, ..., 5.5 s
    return path


@pytest.mark.parametrize("cache", ["window", "full"])
def test_questions_are_answered_at_their_moments(exported, clip, tmp_path, capsys, cache):
    out = tmp_path / "answers.json"
    code = main([str(clip), "--model", str(exported), "--ask", "2:What is shown?", "--ask", "0.2:What is shown?",
                 "--ask", "60:What is shown?", "--max-new-tokens", "6", "--cache", cache, "--window-frames", "2",
                 "--evict-frames", "1", "--sink-frames", "1", "--quiet", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(a["at_s"], a["frames"], a["answer"]) for a in result["answers"]] == [
        (0.2, 0, "red"), (2.0, 2, "red"), (60.0, 6, "red")]  # the frames up to each moment
    assert result["frames"] == 6 and result["evicted"] == (2 if cache == "window" else 0)
    printed = capsys.readouterr()
    assert "[     2.0 s, 2 frames] What is shown?" in printed.out and "6 frames in" in printed.err


def test_the_fovlm_command_runs_stream(exported, clip, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["stream", str(clip), "--model", str(exported), "--ask", "3:What is shown?", "--quiet",
                  "--max-new-tokens", "4"])
    assert done.value.code == 0 and "red" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(exported, tmp_path, capsys):
    assert main([str(tmp_path / "missing.mp4"), "--model", str(exported), "--quiet"]) == 1
    assert "missing.mp4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.mp4"), "--model", str(exported), "--ask", "soon:what?"])
    assert "SECONDS:QUESTION" in capsys.readouterr().err
    assert parse_ask("12.5: Where is the cup? ") == Question(12.5, "Where is the cup?")


def test_a_live_source_faster_than_the_model_drops_the_oldest_frames_and_counts_them(exported):
    import time

    import torch

    from fovlm.data.frame_stream import LatestFrame, StreamFrame
    from fovlm.eval.stream import run_stream
    from fovlm.model.pretrained import load_exported_tokenizer, load_pretrained
    from fovlm.model.streaming import CachePolicy

    model, tokenizer = load_pretrained(exported), load_exported_tokenizer(exported)
    camera = (StreamFrame(i, i / 30, torch.full((3, 56, 56), 8 * i, dtype=torch.uint8)) for i in range(30))
    live = LatestFrame(camera, capacity=2)
    deadline = time.monotonic() + 10
    while live.received < 30 and time.monotonic() < deadline:  # the camera is done before the model reads
        time.sleep(0.01)
    result = run_stream(model, tokenizer, live, [], CachePolicy("full"), progress=False)
    assert (live.received, result["frames"], result["dropped"]) == (30, 2, 28)  # the newest two were read


def test_a_later_question_is_a_new_user_turn_without_the_system_turn(tokenizer):
    from fovlm.eval.predict import prompt_ids
    from fovlm.eval.stream import follow_up_ids

    later = follow_up_ids(tokenizer, "And now?")
    text = tokenizer.decode(later)
    assert text.startswith("<|im_start|>user") and text.endswith("<|im_start|>assistant\n") and "system" not in text
    full = prompt_ids(tokenizer, "And now?")
    assert full[-len(later):].tolist() == later.tolist()  # the same tokens as the end of the whole prompt
