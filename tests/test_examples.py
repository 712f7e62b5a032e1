"""The example notebook runs top to bottom offline, and stays the twin of its plain script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_notebook_holds_the_scripts_cells():
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from sync_notebook import notebook_from
    finally:
        sys.path.remove(str(EXAMPLES))
    expected = notebook_from(EXAMPLES / "analyze_margins.py")
    committed = nbformat.read(EXAMPLES / "analyze_margins.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells]


def test_notebook_executes_and_shows_figures(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("trl")
    notebook = nbformat.read(EXAMPLES / "analyze_margins.ipynb", as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # margins, length margins, q curve, training curves, the trained policy's margins
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
