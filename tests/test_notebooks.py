"""The notebooks run end to end at their small size (DAMEX_NOTEBOOK_SMALL=1), in a
temporary working directory so nothing is written into the repository."""
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import damex  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# the folder holding the damex this test imported: the checkout when built in place,
# site-packages when installed (CI); the notebook kernel must import the same one
DAMEX_HOME = str(pathlib.Path(damex.__file__).resolve().parent.parent)


def run_notebook(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DAMEX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [DAMEX_HOME, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    listing = lambda: sorted(os.listdir(ROOT)) + sorted(os.listdir(NOTEBOOKS))  # noqa: E731
    before = listing()
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert listing() == before, "the notebook wrote into the repository"
    if os.environ.get("DAMEX_KEEP_EXECUTED"):   # for a look at the outputs
        nbformat.write(nb, os.path.join(os.environ["DAMEX_KEEP_EXECUTED"], name))
    return nb


def test_notebooks_are_stripped():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs committed"


def test_moe_layer_walkthrough(tmp_path, monkeypatch):
    nb = run_notebook("moe_layer_walkthrough.ipynb", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if c.cell_type == "code")
    assert "routing accuracy" in text


def test_damex_mixture_walkthrough(tmp_path, monkeypatch):
    nb = run_notebook("damex_mixture_walkthrough.ipynb", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if c.cell_type == "code")
    assert "mean" in text and "AP" in text
