"""Both notebooks of analysis/notebooks execute top to bottom (nbclient, kernel python3), so they never rot."""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs subprocesses

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "analysis" / "notebooks"
ROOT = NOTEBOOKS.parents[1]


@pytest.mark.parametrize("name", ["results_walkthrough.ipynb", "comm_scaling.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSIM_RESULTS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if name == "comm_scaling.ipynb":
        assert "48.63M" in text and "2.82M" in text  # the Fed-SB paper's Llama-3.2 3B counts
        assert any("image/png" in o.get("data", {}) for o in outputs)
    else:
        assert "flagged rounds: 0" in text
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
