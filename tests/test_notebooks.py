"""Every notebook in notebooks/ runs top to bottom (nbclient) in tiny mode ($CPM2_TINY=1: the
smallest sizes and a few steps), and is stored without outputs.

One kernel serves the four notebooks, its namespace reset (`%reset -f`) before each: JAX,
TensorFlow and SeqIO are imported once instead of four times, and the session's persistent
JAX compilation cache (tests/conftest.py) lets the notebooks that train the same tiny model
share its compiled step. Each notebook imports and defines everything it uses itself.
"""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "prompt_tuning.ipynb", "offload_inference.ipynb",
                                           "knowledge_inheritance.ipynb"}
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), \
            f"{path.name} is stored with outputs; strip them"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One python3 kernel on one CPU device (not the suite's 8 fake ones), files under a temp dir."""
    work = tmp_path_factory.mktemp("notebooks")
    env = {"CPM2_TINY": "1", "MPLBACKEND": "Agg", "TMPDIR": str(work),
           "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    try:
        with client.setup_kernel():
            yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel):
    book = nbformat.read(path, as_version=4)
    kernel.nb = book
    kernel.execute_cell(nbformat.v4.new_code_cell("%reset -f"), 0, store_history=False)
    for index, cell in enumerate(book.cells):
        kernel.execute_cell(cell, index)  # raises CellExecutionError naming the cell on any error
    errors = [out for cell in book.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
