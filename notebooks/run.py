"""Execute notebooks headless with nbclient (a real Jupyter kernel) and save them with their outputs.

    python notebooks/run.py notebooks/quickstart.ipynb [--out DIR] [--timeout 600]

An executed notebook replaces its own file unless ``--out DIR`` names a folder for the copy: ``make notebooks``
(after ``make demo``) saves the quickstart with its outputs on the demo model, so that it reads complete where it
is published. The saved notebook diffs cleanly between runs (:func:`tidy`): no execution timestamps, no kernel
or Python version, each picture once, as an optimised lossless PNG. It records the SHA-256 of the code cells it
ran (``metadata.fovlm.executed_code``, :func:`code_digest`), so a code cell edited after the run shows as a
notebook whose outputs are stale (tests/eval/test_notebook_outputs.py).

Exits non-zero, naming the notebook and the failing cell, when a cell raises.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
CELL_METADATA_KEPT = ("tags",)
"""Cell metadata that is content; the rest (timings, scroll and collapse state) is the session's, and dropped."""
KERNEL_WARNINGS = "ignore:IProgress not found"
"""``PYTHONWARNINGS`` of the headless kernel: tqdm's note that notebook widgets are missing (its message; the
category, tqdm's own, cannot be named before the kernel has imported tqdm) is moot without a front end."""


def code_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells' sources, in order (markdown cells do not change outputs)."""
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def _optimised_png(data: str) -> str:
    """A base64 PNG re-encoded losslessly with PIL's optimiser (smaller, and the same bytes on every run)."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode() + "\n"


def _tidy_output(output: nbformat.NotebookNode) -> None:
    data = output.get("data")
    if not data or "image/png" not in data:
        return
    data.pop("image/jpeg", None)  # IPython offers a PIL image in both formats: keep the lossless one
    data["image/png"] = _optimised_png(data["image/png"])


def tidy(notebook: nbformat.NotebookNode, metadata: dict | None = None) -> nbformat.NotebookNode:
    """The notebook as it is saved: session metadata dropped, pictures once as optimised PNGs; in place.

    Args:
        notebook: an executed notebook.
        metadata: the notebook metadata to keep (default: its own, less the kernel's ``language_info`` details).
    """
    kept = copy.deepcopy(dict(notebook.metadata) if metadata is None else metadata)
    if "language_info" in kept:
        kept["language_info"] = {"name": kept["language_info"].get("name", "python")}
    notebook.metadata = nbformat.from_dict(kept)
    for cell in notebook.cells:
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k in CELL_METADATA_KEPT})
        for output in cell.get("outputs", []):
            _tidy_output(output)
    return notebook


def execute(path: str | Path, out_dir: str | Path | None = None, timeout: int = 600) -> Path:
    """Run every cell of ``path`` in a fresh kernel started in the repository root and save the notebook with
    its outputs (:func:`tidy`, with :func:`code_digest` recorded) to ``out_dir``, or over ``path`` itself when
    ``out_dir`` is None; returns the saved file."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    metadata = {k: v for k, v in notebook.metadata.items() if k != "fovlm"}
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute(env={**os.environ, "PYTHONWARNINGS": KERNEL_WARNINGS})
    tidy(notebook, metadata)
    notebook.metadata["fovlm"] = {"executed_code": code_digest(notebook)}
    out = path if out_dir is None else Path(out_dir) / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", help="folder for the executed copies (default: each notebook is replaced)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        try:
            print(f"executed {notebook} -> {execute(notebook, args.out, args.timeout)}")
        except CellExecutionError as err:
            print(f"{notebook}: a cell failed:\n{err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
