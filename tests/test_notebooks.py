"""Execute every notebook top to bottom in FAST mode (papermill-style parameter injection).

Each notebook's first code cell is tagged ``parameters``; the test replaces ``FAST = False``
with ``FAST = True`` and points outputs into a temporary folder (``cryosiam_nb._nbrun``, shared
with ``scripts/screenshots.py``). Key cells assert on results.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from cryosiam_nb._nbrun import fast_client

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_data_and_simulation",
        "02_denoising",
        "03_semantic_segmentation_and_lamella",
        "04_instances_and_particles",
        "05_embeddings_and_cluster_curation",
        "06_train_on_your_data",
        "07_published_cryosiam_checkpoints",
        "08_a_whole_dataset",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_has_a_use_your_own_tomogram_cell(path):
    nb = nbformat.read(path, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "MY_TOMOGRAM" in params.source, f"{path.name}: no MY_TOMOGRAM(S) parameter"
    code = [c.source for c in nb.cells if c.cell_type == "code" and c is not params]
    assert any("MY_TOMOGRAM" in src for src in code), f"{path.name}: MY_TOMOGRAM is never used"


def test_the_explorer_is_displayed_in_fast_mode_too():
    # The explorer cell ends with the app itself (rendered inline), never skipped by FAST.
    for name in ("05_embeddings_and_cluster_curation", "08_a_whole_dataset"):
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        cells = [c.source for c in nb.cells if "pl.explorer(" in c.source]
        assert cells and any(src.rstrip().endswith("app") for src in cells), name
        assert not any("FAST" in src for src in cells), name


def test_progress_bars_are_widgets_in_a_kernel(tmp_path):
    """With ipywidgets installed, ``tqdm.auto`` in a Jupyter kernel draws a widget (no
    'IProgress not found' text fallback)."""
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[
            new_code_cell(
                "import warnings\n"
                "with warnings.catch_warnings(record=True) as caught:\n"
                "    warnings.simplefilter('always')\n"
                "    from tqdm.auto import tqdm\n"
                "    from tqdm.notebook import tqdm_notebook\n"
                "    bar = tqdm(range(3))\n"
                "    list(bar)\n"
                "print('widget bar:', isinstance(bar, tqdm_notebook))\n"
                "print('warnings:', [str(w.message) for w in caught if 'IProgress' in str(w.message)])"
            )
        ]
    )
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "widget bar: True" in text and "warnings: []" in text, outputs
    widgets = [o for o in outputs if o.output_type == "display_data"]
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in widgets), outputs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path):
    client = fast_client(path, tmp_path, timeout=600)
    env_before = dict(os.environ)
    os.environ["MPLBACKEND"] = "Agg"
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
