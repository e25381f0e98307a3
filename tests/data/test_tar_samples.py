"""Reading samples out of a tar: streamed sources (pipe: commands, http) give what the local file gives, and
name themselves when they are missing, damaged or cut off."""

import os
import time

import pytest
from shardkit import ShardServer, caption_sample, write_shard

from fovlm.data.tar_samples import ShardReadError, is_streamed, iter_tar_samples


def _read(source, **kwargs):
    """``[(index, key, {member: data} or None)]`` and the error message (None if the shard reads to its end)."""
    got = []
    try:
        for index, key, members in iter_tar_samples(source, **kwargs):
            got.append((index, key, members))
    except ShardReadError as err:
        return got, str(err)
    return got, None


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """``good.tar`` (6 samples), and copies cut inside a member, at a member boundary, before any member, and
    a file that is not a tar."""
    root = tmp_path_factory.mktemp("tars")
    good = write_shard(root / "good.tar", [caption_sample(f"k{i}", f"c{i}", frames=2, size=(8, 8)) for i in range(6)])
    data = good.read_bytes()
    (root / "cut-inside.tar").write_bytes(data[: len(data) // 2])
    boundary = data.find(b"k4.")  # the header of k4's first member starts here
    assert boundary % 512 == 0
    (root / "cut-boundary.tar").write_bytes(data[:boundary])
    (root / "cut-header.tar").write_bytes(data[:300])
    (root / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    return root


def _sources(root, name, server):
    return {"pipe": f"pipe:cat {root / name}", "http": server.url(name)}


def test_is_streamed():
    assert is_streamed("pipe:cat x.tar") and is_streamed("http://h/x.tar") and is_streamed("HTTPS://h/x.tar")
    assert is_streamed("gs://bucket/x.tar")
    assert not is_streamed("data/x.tar") and not is_streamed("/abs/x.tar") and not is_streamed("run:1/x.tar")
    assert not is_streamed("s3://bucket/x.tar")  # not read directly (expand_shards says how)


def test_streams_read_what_the_file_holds(tars):
    local, error = _read(str(tars / "good.tar"))
    assert error is None and [k for _, k, _ in local] == [f"k{i}" for i in range(6)]
    ranged, _ = _read(str(tars / "good.tar"), start=2, stop=5, load=lambda i: i != 3)
    with ShardServer(tars) as server:
        for kind, source in _sources(tars, "good.tar", server).items():
            assert _read(source) == (local, None), kind
            # A range: the samples before it are read forward and dropped, unloaded ones yield None.
            assert _read(source, start=2, stop=5, load=lambda i: i != 3) == (ranged, None), kind
            assert [(i, m is None) for i, _, m in ranged] == [(2, False), (3, True), (4, False)]
            names, _ = _read(source, fields=lambda name: name == "json")
            assert all(m["000.jpg"] == b"" and m["json"] for _, _, m in names)


@pytest.mark.parametrize("name", ["cut-inside.tar", "cut-boundary.tar", "cut-header.tar", "garbage.tar"])
def test_damaged_streams_keep_the_samples_before_the_damage(tars, name):
    local, local_error = _read(str(tars / name))
    assert local_error is not None and name in local_error
    with ShardServer(tars) as server:
        for kind, source in _sources(tars, name, server).items():
            got, error = _read(source)
            assert got == local, kind  # the same complete samples, the partial one left out
            assert error is not None and error.startswith(f"shard {source} is "), (kind, error)
            if name.startswith("cut-inside") or name.startswith("cut-boundary"):
                assert "truncated" in error and f"inside sample {len(local)}" in error


def test_a_missing_shard_or_failing_command_names_the_source(tars):
    with ShardServer(tars) as server:
        with pytest.raises(ShardReadError, match=r"missing\.tar: curl exited with status 22: HTTP error"):
            list(iter_tar_samples(server.url("missing.tar")))
    with pytest.raises(ShardReadError, match=r"shard pipe:cat /nowhere/x\.tar 2>/dev/null: the command exited with status 1"):
        list(iter_tar_samples("pipe:cat /nowhere/x.tar 2>/dev/null"))
    # A command that fails after writing a complete tar: its data cannot be trusted.
    with pytest.raises(ShardReadError, match="exited with status 3"):
        list(iter_tar_samples(f"pipe:cat {tars / 'good.tar'}; exit 3"))


def test_stopping_early_ends_the_command(tars, tmp_path):
    pid_file = tmp_path / "pid"
    # The command would run for a minute after writing the tar; a reader that stops ends it at once.
    source = f"pipe:echo $$ > {pid_file}; cat {tars / 'good.tar'}; exec sleep 60"
    started = time.monotonic()
    samples = iter_tar_samples(source, stop=2)
    assert [k for _, k, _ in samples] == ["k0", "k1"]
    reader = iter_tar_samples(source)
    assert next(reader)[1] == "k0"
    reader.close()
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # ended and reaped
