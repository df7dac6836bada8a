"""Shared pytest fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def write_mrc(tmp_path):
    """Write a numpy volume as MRC with a voxel size (Å); returns the path."""
    import mrcfile

    def _write(data: np.ndarray, name: str = "tomo.mrc", voxel_size: float = 6.8):
        path = tmp_path / name
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(data)
            m.voxel_size = voxel_size
        return path

    return _write


#: Chromium for the browser tests (``scripts/install_browser.sh``; override the path with
#: ``CRYOSIAM_NB_CHROMIUM``)
CHROMIUM = os.environ.get("CRYOSIAM_NB_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium_browser():
    """A headless Chromium (playwright); skips when playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: run scripts/install_browser.sh as root "
            "(apt-get install chromium) or set CRYOSIAM_NB_CHROMIUM"
        )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()
