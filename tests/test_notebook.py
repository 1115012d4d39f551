"""docs/fastbook_ch4.ipynb executed headless (nbclient, a real ipykernel) on the real
mnist_sample and MNIST archives, its outputs checked: fastbook's figures, the tables and
pictures, and no terminal control codes anywhere in the cells' output."""

import os
import re

import pytest

from tests.conftest import PROJECT_ROOT, shared_ray_address
from tests.test_evaluate_job import FASTBOOK_L1

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.ray

NOTEBOOK = PROJECT_ROOT / "docs" / "fastbook_ch4.ipynb"
CONTROL = re.compile(r"\r|\x1b\[")


def outputs(cell, kind: str) -> list:
    return [o for o in cell.get("outputs", []) if o["output_type"] == kind]


def test_the_notebook_runs_and_shows_fastbook_figures(mnist_sample_tgz, mnist_png_tgz, cache_dir, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "the notebook is committed without outputs (they hold images derived from MNIST)"
    # The kernel inherits this environment: local archives, the session's cache and Ray.
    monkeypatch.setenv("MNIST37_SAMPLE", str(mnist_sample_tgz))
    monkeypatch.setenv("MNIST37_FULL", str(mnist_png_tgz))
    monkeypatch.setenv("MNIST37_CACHE", str(cache_dir))
    monkeypatch.setenv("MNIST37_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("RAY_ADDRESS", shared_ray_address())
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # kept with the test's tmp_path, to read what each cell showed
        nbformat.write(notebook, tmp_path / "fastbook_ch4.executed.ipynb")
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code:
        assert not outputs(cell, "error"), cell.source
        for stream in outputs(cell, "stream"):
            assert not CONTROL.search(stream["text"]), (cell.source, stream["text"])

    setup, sample, ideal, table, worst, full, confused, predicted = code
    shown = outputs(sample, "execute_result")[0]["data"]["text/html"]
    assert shown.count("<img") == 2 and f"{FASTBOOK_L1['mean']:.4f}" in shown
    assert "decode: " in "".join(s["text"] for s in outputs(sample, "stream"))  # progress lines, readable
    assert "image/png" in outputs(ideal, "execute_result")[0]["data"]
    printed = "".join(s["text"] for s in outputs(table, "stream"))
    assert f"l1: 3: {FASTBOOK_L1['3']:.4f}, 7: {FASTBOOK_L1['7']:.4f}; mean of classes {FASTBOOK_L1['mean']:.4f}" \
        in printed
    listed = "".join(s["text"] for s in outputs(worst, "stream"))
    assert re.search(r"valid/[37]/\S+\.png: a [37] taken for a [37]", listed)
    assert "image/png" in outputs(worst, "execute_result")[0]["data"]
    page = outputs(full, "execute_result")[0]["data"]["text/html"]
    assert page.count("<img") == 10 and all(f"<th>{digit}</th>" in page for digit in "0123456789")
    assert re.search(r"\d+ \ds taken for \ds", "".join(s["text"] for s in outputs(confused, "stream")))
    printed = "".join(s["text"] for s in outputs(predicted, "stream"))
    assert printed.startswith("10000 rows: path, split, true, true_name, l1_predicted, l1_distance, l1_margin")
    assert re.search(r"l1: top-1 0\.\d{4}, top-5 0\.\d{4}", printed)
    assert len(re.findall(r"testing/\d/\S+\.png: a \d taken for a \d \(margin", printed)) == 8
    assert "image/png" in outputs(predicted, "execute_result")[0]["data"]
