"""The fovlm command line: one table of commands listed by `fovlm --help`, each with its own `--help`; bad configs
fail before training with the key or path named and a non-zero exit code; `python -m fovlm`; the run summary
command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fitkit import CONFIGS, fit_args, fovlm_command, subprocess_env, synthetic_data

from fovlm.cli import COMMANDS, main
from fovlm.cli.summary import summarize_run
from fovlm.cli.train import SUBCOMMANDS, FovlmCLI, linked_gguf_file, linked_tokenizer

# The commands `fovlm --help` must offer (COMMANDS may grow; these may not go missing).
EXPECTED_COMMANDS = {"fit", "validate", "eval", "predict", "export", "summary"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def _exit(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``fovlm ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("args", [["--help"], ["-h"], []], ids=["--help", "-h", "alone"])
def test_help_lists_every_command(args, capsys):
    code, out, _ = _exit(args, capsys)
    assert code == 0 and out.startswith("usage: fovlm COMMAND")
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert set(listed) == set(COMMANDS) and EXPECTED_COMMANDS <= set(listed)
    for name, command in COMMANDS.items():
        assert listed[name] == command.help and command.help  # one line each, not empty
    assert "test" not in listed


def test_readme_lists_the_commands_as_help_does(capsys):
    _, out, _ = _exit(["--help"], capsys)
    readme = (CONFIGS.parent / "README.md").read_text()
    for line in out.splitlines():
        if line.startswith("  "):
            assert line in readme, line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_its_own_help(name, capsys):
    code, out, _ = _exit([name, "--help"], capsys)
    assert code == 0
    usage = out.split("\n", 1)[0]
    assert usage.startswith("usage: fovlm") and name in usage
    if COMMANDS[name].target is None:  # LightningCLI's own help for the subcommand
        assert "--config" in out and "--trainer.max_steps" in out and "--model" in out


def test_lightning_offers_only_fit_and_validate():
    """LightningCLI's test and predict need a test_step / predict_step the module does not have."""
    assert set(FovlmCLI.subcommands()) == {"fit", "validate"}
    # The table's LightningCLI entries (no target) are exactly the subcommands FovlmCLI offers.
    assert {name for name, command in COMMANDS.items() if command.target is None} == set(SUBCOMMANDS)


def test_help_does_not_import_lightning():
    """`fovlm --help` lists the commands without loading the training stack."""
    code = "import sys; from fovlm.cli import commands_help; commands_help(); print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("order", ["options first", "options last"])
def test_predict_takes_options_before_or_after_the_media(order, tmp_path, capsys):
    """Both orders reach the video predict command (its own error for a missing model, not LightningCLI's parser)."""
    missing = str(tmp_path / "no-model.ckpt")
    options = ["--model", missing, "--prompt", "What happens?"]
    media = [str(tmp_path / "clip.mp4")]
    code, out, err = _exit(["predict", *(options + media if order == "options first" else media + options)], capsys)
    assert code == 1 and err.startswith("fovlm predict: error") and missing in err
    assert "Parser key" not in err and not out


@pytest.mark.parametrize("args", [["test", "--config", "x.yaml"], ["tset"], ["--config", "x.yaml", "fit"]])
def test_unknown_command_is_one_line_with_the_commands(args, capsys):
    code, out, err = _exit(args, capsys)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("fovlm: error:") and repr(args[0]) in err
    assert all(name in err for name in COMMANDS)


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


def _write_shard(path: Path, samples: list[dict]) -> str:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write({k: json.dumps(v).encode() if k == "json" else v for k, v in sample.items()})
    return str(path)


def _caption(key: str, frame: bytes) -> dict:
    return {"__key__": key, "json": {"source": "toy", "media": "video", "caption": "A clip."}, "000.jpg": frame,
            "001.jpg": frame}


def _own_shards(extra: list[str], tmp_path: Path) -> list[str]:
    """`fovlm fit` of stage 1 (tiny model) on the shards given in ``extra`` alone."""
    base = fit_args(1, tmp_path / "no-data", tmp_path, 2, extra=["--data.init_args.val_shards", "null",
                                                                 "--data.init_args.text_shards", "null"])
    return base + extra


def test_shards_without_a_readable_sample_are_a_configuration_error(tmp_path, capsys):
    """Every sample broken (or a truncated tar): one error line naming the split, the shards and the skips by
    reason, exit code 2, no traceback; the same for the validation split."""
    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(jpeg, format="JPEG")
    no_text = {"__key__": "no_text", "json": {"source": "toy", "media": "video"}, "000.jpg": jpeg.getvalue()}
    broken = [_caption(f"broken{i}", b"not a jpeg") for i in range(3)]
    bad = _write_shard(tmp_path / "bad" / "000.tar", [*broken, no_text])
    cut = Path(_write_shard(tmp_path / "cut" / "000.tar", [_caption("lost", jpeg.getvalue())]))
    cut.write_bytes(cut.read_bytes()[:700])
    code, _, err = _exit(_own_shards(["--data.init_args.train_shards", bad], tmp_path), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: data.init_args.train_shards: no readable sample in the train shards ({bad!r}: 1 file); "
        "skipped bad_image: 3, missing_text: 1; first: 000.tar/broken0 (bad_image), 000.tar/broken1 (bad_image), "
        "000.tar/broken2 (bad_image)"
    )
    good = _write_shard(tmp_path / "good" / "000.tar", [_caption("fine", jpeg.getvalue())])
    data_args = ["--data.init_args.train_shards", good, "--data.init_args.val_shards", str(cut)]
    code, _, err = _exit(_own_shards(data_args, tmp_path), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: data.init_args.val_shards: no readable sample in the val shards ({str(cut)!r}: 1 file); "
        "skipped damaged_shard: 1; first: 000.tar (damaged_shard)"
    )


def test_missing_model_folders_name_the_make_target(tmp_path, capsys, monkeypatch):
    """A local llm / vision / tokenizer folder that does not exist fails before anything runs, naming the make
    target that builds it (not transformers' "Repo id must use alphanumeric chars")."""
    monkeypatch.chdir(tmp_path)  # no .cache/ here: as before `make smollm2` and `make dinov2` have run
    shards = ["--data.init_args.train_shards", str(tmp_path / "unchecked.tar")]
    (tmp_path / "unchecked.tar").write_bytes(b"")
    code, _, err = _exit(_own_shards(shards, tmp_path), capsys)  # llm "tiny": SmolLM2's tokenizer folder
    assert code == 2 and "Traceback" not in err and "Repo id" not in err
    assert err.strip().splitlines()[-1].strip() == (
        "data.init_args.tokenizer (linked from model.init_args.llm 'tiny'): tokenizer folder "
        "'.cache/smollm2-135m-instruct' does not exist: run `make smollm2` to build it"
    )
    vision = str(tmp_path / ".cache" / "dinov2-small-imgfocus")
    folders = ["--model.init_args.llm", ".cache/smollm2-135m-instruct", "--model.init_args.vision", vision]
    code, _, err = _exit(_own_shards(shards + folders, tmp_path), capsys)
    assert code == 2 and "Traceback" not in err
    problems = [line.strip() for line in err.strip().splitlines()[-2:]]
    assert problems == [
        "model.init_args.llm: LLM folder '.cache/smollm2-135m-instruct' does not exist: run `make smollm2` to build it",
        f"model.init_args.vision: DINOv2 folder {vision!r} does not exist: run `make dinov2` to build it",
    ]  # the tokenizer is the LLM's own folder: named once
    assert not (tmp_path / "stage1").exists()  # nothing was started


def test_python_m_fovlm_lists_the_commands():
    result = subprocess.run(fovlm_command(["--help"]), env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(f"  {name} " in result.stdout for name in EXPECTED_COMMANDS)


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
    assert linked_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert linked_tokenizer("tiny").endswith("smollm2-135m-instruct")
    assert linked_gguf_file("models/smol", "smol.gguf") == "smol.gguf" and linked_gguf_file("tiny", "smol.gguf") is None


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


def test_reference_logps_writes_the_cache_that_fit_reads_instead_of_a_reference_model(data, tmp_path, capsys):
    """`fovlm reference-logps` over a stage-3 run's shards (its own configs), then `fovlm fit` with the cache: the
    losses of the run with a reference model, every pair cached, the data settings recorded."""
    import torch
    from fitkit import read_events

    from fovlm.module import FoveatedModule

    torch.manual_seed(3)
    stage2 = FoveatedModule(llm="tiny", vision="tiny", query_dim=64, vision_init_range=0.2)  # demo + test overlay
    stage2.configure_model()
    init = tmp_path / "stage2.pt"
    torch.save(stage2.model.state_dict(), init)
    online = fit_args(3, data, tmp_path / "online", 3, extra=["--model.init_args.init_from", str(init)])
    cache = tmp_path / "reference-logps"
    code, out, _ = _exit(["reference-logps", *online[1:], "--output", str(cache)], capsys)
    assert code == 0 and f"wrote {cache / 'manifest.json'}" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"]["train"]["pairs"] == 12  # every preference pair of the synthetic set, once
    assert [Path(p).parent.name for p in manifest["splits"]["train"]["shards"]] == ["train"]
    assert manifest["identity"]["data"]["max_length"] == 128 and manifest["identity"]["precision"] == "32-true"
    assert manifest["identity"]["data"]["frames"] == {"frame_size": 56, "max_frames": 8, "image_frames": 4}

    FovlmCLI(args=online)
    cached_args = fit_args(3, data, tmp_path / "cached", 3, extra=[
        "--model.init_args.init_from", str(init), "--model.init_args.reference_logps", str(cache)])
    cli = FovlmCLI(args=cached_args)
    assert cli.model.reference is None and cli.model.reference_cache is not None
    expected = read_events(tmp_path / "online" / "stage3")["scalars"]["train/loss"]
    losses = read_events(tmp_path / "cached" / "stage3")["scalars"]["train/loss"]
    assert len(expected) == 3 and sorted(losses) == sorted(expected)  # the same steps
    assert [losses[s] for s in sorted(losses)] == pytest.approx([expected[s] for s in sorted(expected)], abs=1e-5)

    # another max_length tokenizes other pairs: the cache is stale, named with the setting
    with pytest.raises(ValueError, match=r"manifest\.json is stale: data\.max_length is 128 there but 96"):
        FovlmCLI(args=cached_args + ["--data.init_args.max_length", "96"])


@pytest.mark.slow
def test_reference_logps_on_two_ranks_writes_a_part_each_and_the_same_numbers(data, tmp_path, capsys):
    """Two CPU processes (DDP over gloo) split the pairs as training splits them: one part file per rank, every
    pair once, the numbers of the one-process build."""
    import torch

    from fovlm.module import FoveatedModule
    from fovlm.reference_logps import ReferenceLogps

    torch.manual_seed(3)
    stage2 = FoveatedModule(llm="tiny", vision="tiny", query_dim=64, vision_init_range=0.2)
    stage2.configure_model()
    torch.save(stage2.model.state_dict(), tmp_path / "stage2.pt")
    args = ["reference-logps", *fit_args(3, data, tmp_path / "runs", 3)[1:],
            "--model.init_args.init_from", str(tmp_path / "stage2.pt")]
    assert _exit([*args, "--output", str(tmp_path / "one")], capsys)[0] == 0
    two = [*args, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = subprocess.run(fovlm_command([*two, "--output", str(tmp_path / "two")]), env=subprocess_env(),
                            capture_output=True, text=True, timeout=300, cwd=CONFIGS.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one, both = ReferenceLogps.open(tmp_path / "one").tables["train"], ReferenceLogps.open(tmp_path / "two")
    assert both.manifest["splits"]["train"]["parts"] == ["train/part-00000-of-00002.pt", "train/part-00001-of-00002.pt"]
    two_ranks = both.tables["train"]
    assert set(two_ranks.rows) == set(one.rows) and len(one.rows) == 12
    for name, (row, digest, _) in one.rows.items():
        assert two_ranks.rows[name][1] == digest
        assert torch.allclose(two_ranks.logps[two_ranks.rows[name][0]], one.logps[row], atol=1e-4, rtol=1e-6), name
