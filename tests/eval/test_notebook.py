"""notebooks/quickstart.ipynb runs headless end to end (real Jupyter kernel) on a tiny exported model."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from eval_helpers import make_tiny_vlm

from fovlm.export import export_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, tokenizer, monkeypatch):
    export_model(make_tiny_vlm(), tokenizer, tmp_path / "model")
    monkeypatch.setenv("FOVLM_MODEL", str(tmp_path / "model"))
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "notebooks" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = runner.execute(ROOT / "notebooks" / "quickstart.ipynb", tmp_path / "executed", timeout=300)
    executed = nbformat.read(out, as_version=4)
    assert executed.metadata["fovlm"]["executed_code"] == runner.code_digest(executed)
    committed = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert runner.code_digest(executed) == runner.code_digest(committed)  # the committed cells, not a copy
    cells = [c for c in executed.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert "loaded" in text and "What colour is the shape? ->" in text
    for mode in ("coarse_only", "coarse_fine", "autoregressive"):
        assert f"{mode}" in text
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and "image/jpeg" not in images[0]["data"]  # the attention sheet, once
    assert not [o for c in cells for o in c.outputs if o.get("name") == "stderr"]
