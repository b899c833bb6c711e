"""The Colab notebooks (colab/*.ipynb) run top to bottom at their small size and show what they promise.

Each notebook runs in a fresh kernel of this interpreter (`sys.executable -m ipykernel_launcher`, so no
Jupyter kernelspec needs to be installed), in a temporary folder, with LMJAX_NOTEBOOK_SMALL=1. A cell
that raises fails the test with the cell's traceback. Then the test reads the notebook's outputs: the
numbers it printed, the images it showed, the files it wrote.

Running them is slow (about a minute each on a 2-core CPU; the SmolLM2 one ~3 min):
`python -m pytest -q -m slow tests/test_notebooks.py`. The checks of their cells alone are fast.
"""
import os
import re
import sys
import time

import pytest

from conftest import ROOT

import nbclient
import nbformat

COLAB = ROOT / "colab"
NOTEBOOKS = ["quickstart.ipynb", "tpu.ipynb", "real_model.ipynb"]
CELL_TIMEOUT_S = 600  # one cell: the training cells are the longest (~45 s at the small size here)


def kernel_of_this_interpreter():
    """A kernel manager whose every kernel name means an ipykernel of the Python running the tests,
    whatever kernelspecs (or none) are installed."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"Python ({sys.executable})", language="python", name=kernel_name,
            )

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def code_cells(name) -> list:
    return [cell.source for cell in nbformat.read(COLAB / name, as_version=4).cells if cell.cell_type == "code"]


def run_notebook(name, workdir, monkeypatch):
    """Execute colab/NAME in `workdir` at the small size; returns the executed notebook (also
    written to workdir/executed-NAME, failed or not, for a look at what it showed)."""
    monkeypatch.setenv("LMJAX_NOTEBOOK_SMALL", "1")
    # The kernel finds lmjax where the tests do, installed or not (an earlier PYTHONPATH still wins).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # images as outputs
    notebook = nbformat.read(COLAB / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=kernel_of_this_interpreter(), timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(workdir)}},
    )
    started = time.perf_counter()
    try:
        client.execute()  # CellExecutionError (with the cell's traceback) when a cell raises
    finally:
        nbformat.write(notebook, workdir / f"executed-{name}")
    print(f"{name}: {time.perf_counter() - started:.1f} s")
    return notebook


def output_text(notebook) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def numbers_after(label, text) -> list:
    return [float(x) for x in re.findall(rf"{re.escape(label)} (-?\d+\.\d+|nan)", text)]


def test_every_notebook_is_tested():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_clean_and_installs_only_on_colab(name):
    notebook = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code"), (
        "stored without outputs: run it, then clear the outputs before committing"
    )
    first = code_cells(name)[0]
    assert 'LMJAX_SOURCE = "' in first and '"google.colab" in sys.modules' in first
    assert "import jax" not in first and "import lmjax" not in first  # the install comes first
    assert any("SIZE = None" in cell and "LMJAX_NOTEBOOK_SMALL" in cell for cell in code_cells(name))


def test_tpu_notebook_sets_xla_flags_before_anything_imports_jax():
    cells = code_cells("tpu.ipynb")
    sets_flags = next(i for i, cell in enumerate(cells) if "--xla_force_host_platform_device_count=8" in cell)
    imports_jax = [i for i, cell in enumerate(cells) if re.search(r"^\s*(import jax|from jax|import lmjax|from lmjax)", cell, re.M)]
    assert imports_jax and sets_flags <= min(imports_jax)
    cell = cells[sets_flags]
    assert cell.index("XLA_FLAGS") < cell.index("import jax") and cell.index("XLA_FLAGS") < cell.index("from lmjax")


@pytest.mark.slow
def test_quickstart_trains_both_modes_measures_recall_plots_and_answers(tmp_path, monkeypatch):
    notebook = run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
    text = output_text(notebook)
    assert "size: small" in text
    recall = numbers_after("eval/qa_recall", text)
    assert len(recall) == 2 and all(0.0 <= r <= 1.0 for r in recall), text
    assert recall[0] >= 0.5, f"the in-weight model should recall most of 64 facts at the small size: {recall}"
    assert all(0.0 <= r <= 1.0 for r in numbers_after("eval/qa_unseen_recall", text))
    assert (tmp_path / "plots" / "qa_acc.png").stat().st_size > 1000
    assert images(notebook) >= 2  # the results PNG and the inline matplotlib figure
    for mode in ("weights", "tool"):
        assert (tmp_path / "runs" / f"facts-{mode}-small" / "summary.json").is_file()
        assert f"[{mode}] Q: " in text and "A: " in text


@pytest.mark.slow
def test_tpu_notebook_trains_on_a_mesh_shows_sharded_params_exports_and_loads_back(tmp_path, monkeypatch):
    notebook = run_notebook("tpu.ipynb", tmp_path, monkeypatch)
    text = output_text(notebook)
    assert "8 cpu devices" in text and "mesh: data=4 x model=2" in text
    split = [(int(pieces), int(devices)) for pieces, devices in re.findall(r"(\d+) pieces on (\d+) devices", text)]
    assert split and max(split) == (8, 8), text  # FSDP x tensor parallel: some parameter in 8 pieces
    assert re.search(r"shard \(\d+, \d+\) of \(\d+, \d+\)", text), "a parameter split in two dimensions"
    export = tmp_path / "export" / "facts-mesh-small"
    assert (export / "model.safetensors").is_file() and (export / "params.json").is_file()
    assert "every tensor equal to the checkpoint's" in text
    assert "A: " in text


@pytest.mark.slow
def test_real_model_notebook_chats_fine_tunes_and_exports(tmp_path, monkeypatch):
    notebook = run_notebook("real_model.ipynb", tmp_path, monkeypatch)
    text = output_text(notebook)
    assert "size: small" in text and "A: " in text
    losses = numbers_after("eval/loss", text)
    assert losses and all(0.0 < loss < 20.0 for loss in losses), text
    assert list((tmp_path / "export").rglob("*.safetensors"))
