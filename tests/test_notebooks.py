"""notebooks/kernels.ipynb runs top to bottom in a fresh Jupyter kernel (nbclient), as a user would run it:
on this CPU the Pallas kernels run in interpret mode and each must match its XLA reference (the notebook
asserts it), the error plot is drawn, and the GPU timing cell says it has nothing to time."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("decode", "prefill", "shared-prefix decode", "add + RMSNorm")


def test_kernels_notebook_runs_and_checks_every_kernel() -> None:
    notebook = nbformat.read(REPO / "notebooks" / "kernels.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    # Raises CellExecutionError, with the cell's traceback, if any cell fails (a kernel off its reference).
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    for kernel in KERNELS:
        assert f"{kernel}: max |kernel - reference|" in text
    assert any("image/png" in output.get("data", {}) for output in outputs), "the error plot is missing"
    assert "No GPU here" in text
