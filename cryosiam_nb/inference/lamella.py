"""The sample (lamella) mask from lamella-model probabilities, out of core (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from cryosiam_nb.inference.grid import grid_voxel_size, on_grid
from cryosiam_nb.inference.outputs import outputs_of
from cryosiam_nb.inference.stitching import block_components, filter_components
from cryosiam_nb.io import InputError, as_volume

__all__ = ["lamella_mask"]


def _hull_block(block: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    out = np.zeros(block.shape, dtype=np.uint8)
    for z in range(block.shape[0]):
        if block[z].any():
            out[z] = convex_hull_image(block[z] > 0)
    return out


def lamella_mask(
    probabilities: xr.Dataset | xr.DataArray,
    *,
    sigma: Sequence[float] = (10.0, 5.0, 5.0),
    threshold: float = 0.9,
    cls: int | str = -1,
    factor: int = 2,
    progress: bool = True,
) -> xr.DataArray:
    """Sample (lamella) mask from lamella-model probabilities, SPEC §2, out of core.

    Gaussian smoothing with ``sigma`` (``dask.map_overlap``, halo 4σ, reflecting edges —
    identical to ``scipy.ndimage.gaussian_filter``), threshold ``> threshold``, keep the
    largest connected component (exact across chunks, see
    :func:`cryosiam_nb.inference.stitching.block_components`), then fill each z slice with
    its 2-D convex hull.

    Parameters
    ----------
    probabilities
        A lamella :func:`~cryosiam_nb.inference.predict` Dataset, its ``probabilities``
        (class, z, y, x), or a (z, y, x) probability of the sample.
    sigma
        Gaussian sigma (z, y, x) in **voxels** of the input grid.
    threshold
        Probability threshold of the smoothed map.
    cls
        Class index or name of the sample in the ``class`` dim (default: the last one).
    factor
        Work on a grid ``factor`` times coarser per axis (block means; ``sigma / factor``)
        and repeat the mask back onto the input grid: the lamella is a smooth slab, and
        this makes the step ~``factor³`` cheaper. ``1`` works at full resolution.
    progress
        Show a progress bar over the component pass (which computes the smoothing and
        thresholding here; the hull is lazy).

    Returns
    -------
    xarray.DataArray
        Lazy uint8 mask (z, y, x; 1 = sample), named ``lamella``, on the same grid, with
        ``attrs["voxel_size"]`` (Å; 1 Å when the input carries none). Use it as ``roi=``.
    """
    p = probabilities
    if isinstance(p, xr.Dataset):
        p = outputs_of(p, "lamella")
        if "probabilities" not in p:
            raise InputError("probabilities: the Dataset has no 'probabilities' variable")
        p = p["probabilities"]
    if not isinstance(p, xr.DataArray):
        raise InputError(f"probabilities: expected a DataArray, got {type(p).__name__}")
    vs = grid_voxel_size(p, probabilities)
    if "class" in p.dims:
        if isinstance(cls, str):
            names = [str(c) for c in p.coords["class"].values] if "class" in p.coords else []
            if cls not in names:
                raise InputError(f"cls: unknown class {cls!r} (known: {names})")
            p = p.isel({"class": names.index(cls)})
        else:
            p = p.isel({"class": int(cls)})
        p = p.drop_vars("class", errors="ignore")
    vol = as_volume(p, "probabilities")
    sig = tuple(float(s) for s in sigma)
    if len(sig) != 3 or min(sig) < 0:
        raise InputError(f"sigma: expected 3 non-negative values (z, y, x) in voxels, got {sigma}")
    arr = vol if isinstance(vol, da.Array) else da.from_array(vol, chunks=64)
    arr = arr.astype(np.float32)
    f = int(factor)
    if f < 1:
        raise InputError(f"factor: must be a positive integer, got {factor!r}")
    full_shape, full_chunks = arr.shape, arr.chunks
    if f > 1:
        arr = _coarsened(arr, f)
        sig = tuple(s / f for s in sig)
    depth = {ax: min(int(4.0 * s + 0.5), arr.shape[ax] - 1) for ax, s in enumerate(sig)}
    smooth = arr.map_overlap(
        ndimage.gaussian_filter,
        depth=depth,
        boundary="reflect",
        sigma=sig,
        mode="reflect",
        truncate=4.0,
        dtype=np.float32,
    )
    binary = (smooth > threshold).astype(np.uint8)
    per_block, comp_size, _ = block_components(binary, (1,), progress)
    keep = np.zeros(len(comp_size), dtype=bool)
    if len(comp_size):
        keep[int(np.argmax(comp_size))] = True
    largest = filter_components(binary, (1,), per_block, keep, 0, np.uint8)
    zc = max(1, min(arr.chunks[0]))
    slabs = largest.rechunk({0: zc, 1: -1, 2: -1})
    hull = slabs.map_blocks(_hull_block, dtype=np.uint8).rechunk(arr.chunks)
    if f > 1:
        for ax in range(3):
            hull = da.repeat(hull, f, axis=ax)
        hull = hull[tuple(slice(0, n) for n in full_shape)].rechunk(full_chunks)
    return on_grid(hull, p, "lamella", vs, dict(p.attrs))


def _coarsened(arr: da.Array, f: int) -> da.Array:
    """Block means over ``f``³ voxels (edge-padded to a multiple of ``f`` per axis)."""
    pad = [(0, (-n) % f) for n in arr.shape]
    if any(b for _, b in pad):
        arr = da.pad(arr, pad, mode="edge")
    chunks = tuple(max(f, (max(c) // f) * f) for c in arr.chunks)
    arr = arr.rechunk(chunks)
    return da.coarsen(np.mean, arr, {0: f, 1: f, 2: f}).astype(np.float32)
