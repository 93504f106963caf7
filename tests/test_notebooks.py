"""Every notebook in notebooks/ runs top to bottom (nbclient) in tiny mode ($CPM2_TINY=1: the
smallest sizes and a few steps), and is stored without outputs; their install cell installs the
checkout they are in, or the repository named in the cell, and says what to set otherwise.

One kernel serves the four notebooks, its namespace reset (`%reset -f`) before each: JAX,
TensorFlow and SeqIO are imported once instead of four times, and the session's persistent
JAX compilation cache (tests/conftest.py) lets the notebooks that train the same tiny model
share its compiled step. Each notebook imports and defines everything it uses itself.
"""
import importlib.util
import os
import pathlib
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


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


def test_the_install_cell_installs_the_checkout_or_the_named_repository(tmp_path, monkeypatch):
    """The cell's own code, run as if cpm2_jax were missing (pip replaced by a recorder)."""
    cells = {c.source for p in NOTEBOOKS for c in nbformat.read(p, as_version=4).cells
             if "CPM2_JAX_REPOSITORY" in c.source}
    assert len(cells) == 1, "the notebooks' install cells differ"
    cell = cells.pop()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cpm2_jax" else find_spec(name, *a))
    installed = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: installed.append(argv[-1]))
    monkeypatch.delenv("CPM2_JAX_REPOSITORY", raising=False)

    monkeypatch.chdir(REPO / "notebooks")  # run locally: the checkout around the notebook
    exec(cell, {})
    monkeypatch.chdir(tmp_path)  # Colab: no checkout; the repository named in the cell or the environment
    exec(cell.replace('CPM2_JAX_REPOSITORY = ""', 'CPM2_JAX_REPOSITORY = "git+https://example.org/cpm2-jax.git"'), {})
    monkeypatch.setenv("CPM2_JAX_REPOSITORY", "/somewhere/cpm2-jax")
    exec(cell, {})
    assert installed == [str(REPO), "git+https://example.org/cpm2-jax.git", "/somewhere/cpm2-jax"]
    monkeypatch.delenv("CPM2_JAX_REPOSITORY")
    with pytest.raises(RuntimeError, match="set CPM2_JAX_REPOSITORY at the top of this cell"):
        exec(cell, {})
