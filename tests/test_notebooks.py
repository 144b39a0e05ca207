"""The notebooks in notebooks/ are stored executed, and still run: each is executed here with
nbclient on this interpreter's kernel, in smoke mode (CLIPFT_NOTEBOOK_SMOKE=1: a few training
steps and small evaluation sets instead of the stored run's 300 steps), which checks every cell
in about half a minute per notebook."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_modality_gap.ipynb"]


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel named python3 is this environment's (its own kernelspec comes first, ahead of
    any user-level python3 kernel), runs offline and in smoke mode."""
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("CLIPFT_NOTEBOOK_SMOKE", "1")


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def has_image(cell: nbformat.NotebookNode) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def code_cell(nb: nbformat.NotebookNode, snippet: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(cells) == 1, f"expected one code cell containing {snippet!r}, found {len(cells)}"
    return cells[0]


def test_kernel_is_this_interpreter(kernel_env: None) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    prefix = text_of(execute(nb).cells[0]).strip()
    assert Path(prefix) == Path(sys.prefix), f"kernel python3 runs in {prefix}, not in this environment {sys.prefix}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_executed(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{name}: store it executed (with outputs)"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: stored with an error output: {errors[0].get('ename')}"
    assert sum(has_image(c) for c in code) >= 2, f"{name}: its figures are missing from the stored outputs"


def test_quickstart_notebook_runs(kernel_env: None) -> None:
    nb = execute(nbformat.read(NOTEBOOKS / NAMES[0], as_version=4))
    assert "lightning" in text_of(code_cell(nb, "open_clip.__version__"))
    metrics = text_of(code_cell(nb, 'report.json").read_text'))
    assert "centroid_distance" in metrics and "i2t_r1" in metrics
    assert has_image(code_cell(nb, '"curves.png"')) and has_image(code_cell(nb, '"gap.png"'))
    assert "open_clip_model.safetensors" in text_of(code_cell(nb, "export(run_dir"))
    retrieval = code_cell(nb, 'retrieve("a large red circle")')
    assert has_image(retrieval) and "top-5" in text_of(retrieval)


def test_modality_gap_notebook_runs(kernel_env: None) -> None:
    nb = execute(nbformat.read(NOTEBOOKS / NAMES[1], as_version=4))
    table = text_of(code_cell(nb, "ROWS = ["))
    for row in ("centroid distance", "linear separability", "alignment", "uniformity", "zero-shot shape top-1"):
        assert row in table
    assert sum("image/png" in o.get("data", {}) for o in code_cell(nb, "for title, report in").outputs) == 2
    assert has_image(code_cell(nb, "def probe("))
    probe = text_of(code_cell(nb, "names = list(results)"))
    assert "as is" in probe and "‖Δ‖ of" in probe and probe.count("λ=") == 19
