"""Writes analyze_margins.ipynb from analyze_margins.py (the "# %%" percent format), so the two never drift.

Run: python examples/sync_notebook.py   (tests/test_examples.py checks that the notebook is in sync)
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def cells_of(script: str) -> list[tuple[str, str]]:
    """[(kind, source)] of a percent-format script: "# %%" starts a code cell, "# %% [markdown]" a
    Markdown cell whose lines drop their leading "# "."""
    cells: list[tuple[str, list[str]]] = []
    for line in script.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        out.append((kind, "\n".join(lines).strip("\n")))
    return out


def notebook_from(script_path: Path):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells_of(script_path.read_text()):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source))
    return notebook


def main() -> None:
    notebook = notebook_from(HERE / "analyze_margins.py")
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index}"  # stable ids: a rerun rewrites the same bytes
    nbformat.write(notebook, HERE / "analyze_margins.ipynb")
    print(f"wrote {HERE / 'analyze_margins.ipynb'} ({len(notebook.cells)} cells)")


if __name__ == "__main__":
    main()
