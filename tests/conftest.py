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
