"""The committed notebooks/quickstart.ipynb carries the outputs of a run of exactly its code cells, saved as
``make notebooks`` saves them (notebooks/run.py): small, and free of what would change from one run to the next."""

import copy
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "notebooks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_outputs_come_from_a_run_of_these_code_cells(runner, committed):
    recorded = committed.metadata.get("fovlm", {}).get("executed_code")
    assert recorded == runner.code_digest(committed), (
        "a code cell of notebooks/quickstart.ipynb changed since its outputs were made: run `make notebooks`")
    cells = code_cells(committed)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))  # one fresh run, in order
    assert all(cell.outputs for cell in cells)


def test_the_committed_notebook_shows_answers_scores_and_the_attention_picture(committed):
    outputs = [o for cell in code_cells(committed) for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "loaded runs/demo/export" in text and "What colour is the shape? ->" in text
    assert all(f"{mode} " in text for mode in ("coarse_only", "coarse_fine", "autoregressive"))
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    assert not [o for o in outputs if o.get("name") == "stderr" or o.output_type == "error"]
    assert str(ROOT) not in json.dumps(committed)  # nothing of the machine it ran on


def test_the_committed_notebook_is_saved_tidy_and_small(runner, committed):
    assert NOTEBOOK.stat().st_size < 300_000
    assert not [cell.metadata for cell in committed.cells if set(cell.metadata) - {"tags"}]
    assert committed.metadata["language_info"] == {"name": "python"}
    assert not [o for cell in code_cells(committed) for o in cell.outputs if "image/jpeg" in o.get("data", {})]
    retidied = runner.tidy(copy.deepcopy(committed))
    assert nbformat.writes(retidied) + "\n" == NOTEBOOK.read_text()  # saving it again changes no byte


def executed_by_hand(image_png: str) -> nbformat.NotebookNode:
    """A notebook as Jupyter saves it after a run: timings, kernel details and a picture in two formats."""
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "version": "3.11.7", "pygments_lexer": "ipython3"}})
    cell = nbformat.v4.new_code_cell("display(picture)", execution_count=1)
    cell.metadata = {"execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"}, "scrolled": True, "tags": ["x"]}
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "image/png": image_png, "image/jpeg": "/9j/AAAA", "text/plain": "<PIL.Image.Image image mode=RGB>"})]
    notebook.cells = [nbformat.v4.new_markdown_cell("# title"), cell]
    return notebook


def test_tidy_drops_session_metadata_and_the_duplicate_picture(runner):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG", compress_level=0)
    notebook = runner.tidy(executed_by_hand(base64.b64encode(buffer.getvalue()).decode()))
    cell = notebook.cells[1]
    assert cell.metadata == {"tags": ["x"]} and notebook.metadata["language_info"] == {"name": "python"}
    data = cell.outputs[0]["data"]
    assert set(data) == {"image/png", "text/plain"}
    picture = base64.b64decode(data["image/png"])
    assert len(picture) < len(buffer.getvalue())
    assert Image.open(io.BytesIO(picture)).getpixel((5, 5)) == (200, 30, 30)  # lossless
    assert runner.tidy(copy.deepcopy(notebook)) == notebook


def test_the_code_digest_sees_a_changed_code_cell_and_ignores_markdown(runner, committed):
    edited = copy.deepcopy(committed)
    edited.cells[0].source += "\nMore words."
    assert runner.code_digest(edited) == runner.code_digest(committed)
    code_cells(edited)[-1].source += "\nprint('new')"
    assert runner.code_digest(edited) != runner.code_digest(committed)
