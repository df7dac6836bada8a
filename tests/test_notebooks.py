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
    ]


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
