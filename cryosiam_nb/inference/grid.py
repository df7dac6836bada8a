"""Outputs on the input grid: the one place that puts the voxel size on every result.

The voxel size has one carrier, ``attrs["voxel_size"]`` (float, Å), on every DataArray,
on every variable of a Dataset and on the Dataset itself; coordinates are
``index * voxel_size`` (Å).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from cryosiam_nb.constants import DIMS
from cryosiam_nb.io import voxel_size_of

__all__ = ["grid_voxel_size", "grid_coords", "on_grid"]


def grid_voxel_size(*objs: Any) -> float:
    """Voxel size (Å) of the first of ``objs`` carrying one; 1 Å when none does (as io)."""
    vs = voxel_size_of(*objs)
    return 1.0 if vs is None else float(vs)


def grid_coords(like: Any, shape: tuple[int, ...], voxel_size: float) -> dict[str, Any]:
    """(z, y, x) coordinates of ``like`` when it has them, else ``index * voxel_size`` (Å)."""
    coords: dict[str, Any] = {}
    for d, n in zip(DIMS, shape):
        if isinstance(like, xr.DataArray | xr.Dataset) and d in like.coords:
            coords[d] = like.coords[d].values
        else:
            coords[d] = np.arange(n, dtype=np.float64) * voxel_size
    return coords


def on_grid(
    data: Any, like: Any, name: str, voxel_size: float, attrs: dict[str, Any] | None = None
) -> xr.DataArray:
    """A (z, y, x) DataArray of ``data`` on the grid of ``like`` with ``attrs["voxel_size"]``."""
    out_attrs = dict(attrs or {})
    out_attrs["voxel_size"] = float(voxel_size)
    coords = grid_coords(like, tuple(data.shape), voxel_size)
    return xr.DataArray(data, dims=DIMS, coords=coords, name=name, attrs=out_attrs)
