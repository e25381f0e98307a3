"""``fovlm predict`` on an mp4, a png and a folder of frames; clear errors on bad files."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import export_taught_model, mp4_bytes, png_bytes

from fovlm.cli import main as cli_main
from fovlm.eval.predict import answer, load_media, main
from fovlm.model.pretrained import load_exported_tokenizer, load_pretrained


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A tiny model taught to answer "red" to any question about any clip (LLM side only, a few steps)."""
    return export_taught_model(tmp_path_factory.mktemp("exported"), tokenizer)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "clip.mp4").write_bytes(mp4_bytes(12, fps=4))  # 3 s -> 3 frames at 1 FPS
    (folder / "photo.png").write_bytes(png_bytes((200, 40, 40)))
    frames = folder / "frames"
    frames.mkdir()
    for t in range(5):
        (frames / f"{t:03d}.png").write_bytes(png_bytes((0, 40 * t, 0)))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("hello")
    return folder


def test_frames_follow_the_training_rules(media):
    clip, kind = load_media(media / "clip.mp4")
    assert kind == "video" and clip.shape == (3, 3, 224, 224) and clip.dtype == torch.uint8
    assert clip[0, 1].float().mean() < clip[2, 1].float().mean()  # temporal order kept
    photo, kind = load_media(media / "photo.png")
    assert kind == "image" and photo.shape == (8, 3, 224, 224)
    folder, kind = load_media(media / "frames")
    assert kind == "video" and folder.shape[0] == 5


def test_a_video_is_read_one_frame_at_a_time_with_the_training_rule(media):
    from fovlm.data.contract import FRAME_SETTINGS
    from fovlm.eval.predict import media_frames

    settings = FRAME_SETTINGS.overridden(max_frames=2)  # the 3 s clip: 2 frames spread over it
    frames = media_frames(media / "clip.mp4", settings)
    assert not isinstance(frames, torch.Tensor)  # a generator: nothing decoded yet
    streamed = torch.stack(list(frames))
    torch.testing.assert_close(streamed, load_media(media / "clip.mp4", max_frames=2)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["clip.mp4", "photo.png", "frames"])
def test_predict_prints_the_models_answer(exported, media, capsys, name):
    code = main([str(media / name), "--model", str(exported), "--prompt", "What is shown?", "--max-new-tokens", "6"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "red"  # what the model was taught, then <|im_end|> stopped it


def test_sampling_is_reproducible_with_a_seed(exported, media):
    model, tokenizer = load_pretrained(exported), load_exported_tokenizer(exported)
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    first = answer(model, tokenizer, media / "photo.png", "Describe it.", seed=7, **kwargs)
    assert answer(model, tokenizer, media / "photo.png", "Describe it.", seed=7, **kwargs) == first


@pytest.mark.parametrize("name,message", [
    ("broken.mp4", "cannot decode video"), ("broken.png", "cannot decode image"),
    ("notes.txt", "unsupported file type"), ("missing.mp4", "does not exist"),
])
def test_bad_media_gives_a_clear_error_and_a_nonzero_exit(exported, media, capsys, name, message):
    code = main([str(media / name), "--model", str(exported), "--prompt", "What is shown?"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("fovlm predict: error:") and name in err and message in err


def test_fovlm_command_dispatches_predict_on_a_media_path(exported, media, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(media / "photo.png"), "--model", str(exported), "--prompt", "What is shown?"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "red"


@pytest.mark.slow
def test_fovlm_process_exits_nonzero_on_a_corrupt_file(exported, media):
    """The installed console script, as a user runs it: a message naming the file and a non-zero exit code."""
    fovlm = Path(sys.executable).with_name("fovlm")
    done = subprocess.run([str(fovlm), "predict", str(media / "broken.mp4"), "--model", str(exported), "--prompt",
                           "Hi"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "fovlm predict: error:" in done.stderr and "broken.mp4" in done.stderr and "Traceback" not in done.stderr

