"""The fovlm command line: bad configs fail before training with the key or path named and a non-zero exit code;
`python -m fovlm`; the run summary command."""

from __future__ import annotations

import subprocess

import pytest
from fitkit import CONFIGS, fit_args, fovlm_command, subprocess_env, synthetic_data

from fovlm.cli import gguf_for, main, summarize_run, tokenizer_for


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def test_unknown_key_is_named(data, tmp_path, capsys):
    err = _fails(fit_args(1, data, tmp_path, 4, extra=["--model.init_args.hidden_sizes", "3"]), capsys)
    assert "hidden_sizes" in err
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("trainer:\n  max_stepz: 3\n")
    err = _fails(fit_args(1, data, tmp_path, 4, extra=["--config", str(overlay)]), capsys)
    assert "max_stepz" in err
    assert not (tmp_path / "stage1").exists()  # nothing was started


def test_wrong_type_is_named(data, tmp_path, capsys):
    err = _fails(fit_args(1, data, tmp_path, 4, extra=["--model.init_args.lr_llm", "fast"]), capsys)
    assert "lr_llm" in err
    err = _fails(fit_args(1, data, tmp_path, 4, extra=["--trainer.max_steps", "many"]), capsys)
    assert "max_steps" in err
    assert not (tmp_path / "stage1").exists()


def test_missing_shards_are_named(data, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "*.tar")
    err = _fails(fit_args(1, data, tmp_path, 4, extra=["--data.init_args.text_shards", missing]), capsys)
    assert "data.init_args.text_shards" in err and missing in err
    assert not (tmp_path / "stage1").exists()


def test_missing_init_from_is_named(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stage-2 default below is relative to the working folder
    missing = str(tmp_path / "stage1" / "best.ckpt")
    err = _fails(fit_args(2, data, tmp_path, 4, extra=["--model.init_args.init_from", missing]), capsys)
    assert "model.init_args.init_from" in err and missing in err
    # The stage-2 config's own default (stage 1's best checkpoint) is checked the same way.
    err = _fails(["fit", "--config", str(CONFIGS / "stage2.yaml"), "--config", str(CONFIGS / "demo.yaml"),
                  "--data.init_args.train_shards", str(data / "sft/train/*.tar")], capsys)
    assert "model.init_args.init_from" in err and "runs/stage1/checkpoints/best.ckpt" in err
    assert not (tmp_path / "stage2").exists()


def test_console_entry_exits_non_zero_with_the_path(data, tmp_path):
    """The real process (`python -m fovlm`): exit code 2 and the message on stderr."""
    missing = str(tmp_path / "none-*.tar")
    result = subprocess.run(
        fovlm_command(fit_args(3, data, tmp_path, 4, extra=["--data.init_args.train_shards", missing,
                                                            "--model.init_args.init_from", str(tmp_path / "x")])),
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert missing in result.stderr and "data.init_args.train_shards" in result.stderr
    assert "model.init_args.init_from" in result.stderr


def test_tokenizer_follows_the_llm():
    assert tokenizer_for("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert tokenizer_for("tiny").endswith("smollm2-135m-instruct")
    assert gguf_for("models/smol", "smol.gguf") == "smol.gguf" and gguf_for("tiny", "smol.gguf") is None


def test_summary_reads_first_and_last_loss(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "stage1"
    writer = SummaryWriter(str(run))
    for step in range(10):
        writer.add_scalar("train/loss", 10.0 - step, step)
    writer.add_scalar("val/loss", 9.0, 4)
    writer.add_scalar("val/loss", 3.0, 9)
    writer.close()
    s = summarize_run(run, span=2)
    assert (s["steps"], s["first"], s["last"], s["val_first"], s["val_last"]) == (10, 9.5, 1.5, 9.0, 3.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", str(run), "--span", "2"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train/loss 9.500 -> 1.500" in out and "val/loss 9.000 -> 3.000" in out and str(run) in out
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", str(tmp_path / "empty")])
    assert exit_info.value.code == 1
