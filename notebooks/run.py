"""Execute notebooks headless with nbclient (a real Jupyter kernel) and save them with their outputs.

    python notebooks/run.py notebooks/quickstart.ipynb [--out runs/notebooks] [--timeout 600]

Exits non-zero, naming the notebook and the failing cell, when a cell raises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def execute(path: str | Path, out_dir: str | Path, timeout: int = 600) -> Path:
    """Run every cell of ``path`` in a fresh kernel started in the repository root; returns the saved copy."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    root = Path(__file__).resolve().parent.parent
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(root)}}
                   ).execute()
    out = Path(out_dir) / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", default="runs/notebooks", help="folder for the executed copies")
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
