"""A classical, model-free baseline for instance maps: density threshold + distance."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage as ndi

from cryosiam_nb.constants import DISTANCE_SCALE
from cryosiam_nb.inference.grid import grid_voxel_size, on_grid
from cryosiam_nb.io import InputError, as_volume

__all__ = ["maps_from_density"]


def maps_from_density(
    volume: xr.DataArray | np.ndarray | da.Array,
    *,
    threshold: float | None = None,
    roi: xr.DataArray | np.ndarray | da.Array | None = None,
    sigma: float = 1.0,
    distance_clip: float = DISTANCE_SCALE,
) -> xr.Dataset:
    """Classical, model-free instance maps from a protein-bright (e.g. denoised) volume.

    Feed the result to :func:`~cryosiam_nb.segmentation.instances` to pick particles by
    density alone — a baseline, and a way through the pipeline when no trained instance
    model is good enough for the data.

    Parameters
    ----------
    volume
        Protein-bright volume (z, y, x): numpy, dask or ``DataArray``. In memory: dask
        input is computed here (intended for tomograms that fit in RAM).
    threshold
        Density threshold of the smoothed volume; default Otsu's threshold of the voxels
        inside ``roi``.
    roi
        Optional region of interest, a 0/1 (z, y, x) volume (e.g. ``tl.lamella_mask``):
        the foreground is restricted to it and the threshold computed inside it.
    sigma
        Gaussian smoothing in voxels (0: none).
    distance_clip
        Clip of the distance in voxels; the distance is divided by it.

    Returns
    -------
    xarray.Dataset
        float32 ``foreground`` (smoothed density > threshold, inside ``roi``), ``boundary``
        (0) and ``distance`` (Euclidean distance to the background, clipped at
        ``distance_clip`` voxels and divided by it: the unit ``instances`` expects), on the
        input grid. ``attrs["voxel_size"]`` (Å; 1 Å when the input carries none) on the
        Dataset and every variable; the Dataset's ``attrs["threshold"]`` is the threshold
        used.
    """
    from skimage.filters import threshold_otsu

    vol = as_volume(volume, "volume")
    vol = np.asarray(vol.compute() if isinstance(vol, da.Array) else vol, dtype=np.float32)
    if roi is None:
        keep = np.ones(vol.shape, bool)
    else:
        r = as_volume(roi, "roi")
        keep = np.asarray(r.compute() if isinstance(r, da.Array) else r) > 0
    if keep.shape != vol.shape:
        raise InputError(f"roi: shape {keep.shape} differs from the volume's {vol.shape}")
    if not keep.any():
        raise InputError("roi: selects no voxel")
    smooth = ndi.gaussian_filter(vol, sigma) if sigma > 0 else vol
    thr = float(threshold_otsu(smooth[keep])) if threshold is None else float(threshold)
    fg = (smooth > thr) & keep
    dist = np.minimum(ndi.distance_transform_edt(fg), distance_clip) / distance_clip
    vs = grid_voxel_size(volume)
    unit = {"unit": f"1 = {distance_clip:g} voxels"}
    return xr.Dataset(
        {
            "foreground": on_grid(fg.astype(np.float32), volume, "foreground", vs),
            "boundary": on_grid(np.zeros(vol.shape, np.float32), volume, "boundary", vs),
            "distance": on_grid(dist.astype(np.float32), volume, "distance", vs, unit),
        },
        attrs={"threshold": thr, "voxel_size": vs},
    )
