"""The Colab notebooks (colab/*.ipynb) run top to bottom at their small size and show what they promise.

Each notebook runs in a fresh kernel of this interpreter (`sys.executable -m ipykernel_launcher`, so no
Jupyter kernelspec needs to be installed), in a temporary folder, with LMJAX_NOTEBOOK_SMALL=1. A cell
that raises fails the test with the cell's traceback. Then the test reads the notebook's outputs: the
numbers it printed, the images it showed, the files it wrote.

Slow (about a minute each on a 2-core CPU): `python -m pytest -q tests/test_notebooks.py -m slow`.
"""
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402  (comes with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

COLAB = ROOT / "colab"
CELL_TIMEOUT_S = 600  # one cell: the training cells are the longest (~30 s each at the small size here)

pytestmark = pytest.mark.slow


class ThisInterpreter(KernelSpecManager):
    """Every kernel name means an ipykernel of the Python running the tests, whatever kernelspecs
    (or none) are installed."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})", language="python", name=kernel_name,
        )


def run_notebook(name, workdir, monkeypatch, extra_env=None):
    """Execute colab/NAME in `workdir` at the small size; returns (the executed notebook, seconds)."""
    monkeypatch.setenv("LMJAX_NOTEBOOK_SMALL", "1")
    # The kernel finds lmjax where the tests do, installed or not (an earlier PYTHONPATH still wins).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # images as outputs
    for key, value in (extra_env or {}).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(COLAB / name, as_version=4)
    kernel = KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(workdir)}},
    )
    started = time.perf_counter()
    client.execute()  # CellExecutionError (with the cell's traceback) when a cell raises
    seconds = time.perf_counter() - started
    nbformat.write(notebook, workdir / f"executed-{name}")  # for a look at what it showed
    print(f"{name}: {seconds:.1f} s")
    return notebook, seconds


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
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(
        ["quickstart.ipynb", "tpu.ipynb", "real_model.ipynb"]
    )


def test_quickstart_trains_both_modes_measures_recall_plots_and_answers(tmp_path, monkeypatch):
    notebook, _ = run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
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
    assert "tool: " in text or "[tool]" in text


def test_tpu_notebook_trains_on_a_mesh_shows_sharded_params_exports_and_loads_back(tmp_path, monkeypatch):
    notebook, _ = run_notebook("tpu.ipynb", tmp_path, monkeypatch)
    text = output_text(notebook)
    assert "8 cpu devices" in text and "mesh: data=4 x model=2" in text
    devices = [int(n) for n in re.findall(r"on (\d+) devices", text)]
    assert devices and max(devices) == 8, text
    assert re.search(r"shard \(\d+, \d+\) of \(\d+, \d+\)", text), "a parameter split in two dimensions"
    export = tmp_path / "export" / "facts-mesh-small"
    assert (export / "model.safetensors").is_file() and (export / "params.json").is_file()
    assert "every tensor equal to the checkpoint's" in text
    assert "A: " in text


def test_real_model_notebook_chats_fine_tunes_and_exports(tmp_path, monkeypatch):
    try:
        from lmjax.interop.bundled import smollm2_gguf

        smollm2_gguf()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"SmolLM2's weights are not installed: {error}")
    notebook, _ = run_notebook("real_model.ipynb", tmp_path, monkeypatch)
    text = output_text(notebook)
    assert "size: small" in text and "A: " in text
    losses = numbers_after("eval/loss", text)
    assert losses and all(0.0 < loss < 20.0 for loss in losses), text
    assert list((tmp_path / "export").rglob("*.safetensors"))
