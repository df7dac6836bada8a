"""Ground-truth side of instance segmentation: perfect maps from labels, synthetic labels.

:func:`maps_from_labels` gives the maps a perfectly trained instance network outputs (the
training targets of :mod:`cryosiam_nb.models.targets`), to check :func:`instances`
post-processing; :func:`synthetic_instances` makes crowded, touching test labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr

from cryosiam_nb.constants import DISTANCE_SCALE
from cryosiam_nb.inference.grid import grid_voxel_size, on_grid
from cryosiam_nb.inference.stitching import relabel
from cryosiam_nb.io import InputError, as_volume
from cryosiam_nb.models.targets import instance_maps

__all__ = ["maps_from_labels", "synthetic_instances"]


def maps_from_labels(
    instances: Any,
    *,
    distance_clip: float = DISTANCE_SCALE,
    boundary: Literal["instances", "all"] = "instances",
    halo: int | None = None,
) -> xr.Dataset:
    """Ground-truth instance labels (z, y, x) → the maps an instance network predicts.

    The maps are those of :func:`cryosiam_nb.models.targets.instance_maps`, the same
    generator that makes the instance head's training targets, so "perfect predictions"
    built here are what a perfectly trained network outputs. Used to check the
    post-processing (:func:`~cryosiam_nb.segmentation.instances`) and in benchmarks.

    Parameters
    ----------
    instances
        Integer instance labels (z, y, x), 0 = background: numpy, dask or ``DataArray``.
        Dask input stays lazy (``map_overlap`` with a halo of ``halo`` voxels, default
        ``ceil(distance_clip) + 2``; computed when the result is).
    distance_clip
        Clip distance in voxels (5); the distance map is divided by it.
    boundary
        ``"instances"`` (boundaries between different instances only) or ``"all"``
        (also the instance/background border); see
        :func:`~cryosiam_nb.models.targets.instance_maps`.
    halo
        Overlap between dask blocks in voxels.

    Returns
    -------
    xarray.Dataset
        float32 variables ``foreground`` (1 inside any instance), ``boundary`` ({0, 1},
        grown by one voxel) and ``distance`` (signed: inside an instance the distance to
        the nearest voxel outside it, in the background minus the distance to the nearest
        instance; clipped to ±``distance_clip`` and divided by it, range ±1 — the unit
        that ``instances`` undoes with ``distance_scale``). On the input grid; the
        voxel size (Å) of ``instances`` (1 Å when it carries none) is copied to
        ``attrs["voxel_size"]`` of the Dataset and of every variable.
    """
    arr = as_volume(instances, "instances")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"instances: expected integer labels, got dtype {arr.dtype}")
    if boundary not in ("instances", "all"):
        raise InputError(f"boundary: expected 'instances' or 'all', got {boundary!r}")

    def one(b: np.ndarray, i: int) -> np.ndarray:
        return instance_maps(b, clip=distance_clip, grow=1, boundary=boundary)[i]

    if isinstance(arr, da.Array):
        depth = int(np.ceil(distance_clip)) + 2 if halo is None else int(halo)
        fg, bd, dist = (
            arr.map_overlap(one, i=i, depth=depth, boundary="none", dtype=np.float32, trim=True)
            for i in range(3)
        )
    else:
        fg, bd, dist = instance_maps(arr, clip=distance_clip, grow=1, boundary=boundary)
    vs = grid_voxel_size(instances)
    unit = {"unit": f"1 = {distance_clip:g} voxels"}
    return xr.Dataset(
        {
            "foreground": on_grid(fg, instances, "foreground", vs),
            "boundary": on_grid(bd, instances, "boundary", vs),
            "distance": on_grid(dist, instances, "distance", vs, unit),
        },
        attrs={"voxel_size": vs},
    )


def synthetic_instances(
    shape: Sequence[int] = (64, 64, 64),
    density: float = 0.3,
    radius: tuple[float, float] = (3.0, 8.0),
    seed: int = 0,
) -> np.ndarray:
    """Crowded, touching random ellipsoids as uint32 labels (z, y, x) — a test volume.

    Ellipsoids (semi-axes drawn uniformly from ``radius`` voxels, random orientation) are
    placed until about ``density`` of the volume is covered; where two overlap, each voxel
    goes to the ellipsoid whose normalised radius is smallest, so neighbours touch along flat
    faces. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    lab = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf, np.float32)
    target = density * float(np.prod(shape))
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(radius) ** 3
    n = max(1, int(3 * target / mean_vol))
    covered = 0
    for i in range(1, n + 1):
        c = rng.uniform(0, shape)
        r = rng.uniform(radius[0], radius[1], size=3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        ext = int(np.ceil(r.max())) + 1
        sl = tuple(
            slice(max(int(cc) - ext, 0), min(int(cc) + ext + 1, s)) for cc, s in zip(c, shape)
        )
        if any(s.stop <= s.start for s in sl):
            continue
        grid = np.stack(
            np.meshgrid(*[np.arange(s.start, s.stop) - cc for s, cc in zip(sl, c)], indexing="ij"),
            axis=-1,
        )
        d = np.sqrt((((grid @ q) / r) ** 2).sum(-1)).astype(np.float32)
        win = (d < 1.0) & (d < best[sl])
        covered += int((win & (lab[sl] == 0)).sum())
        lab[sl][win] = i
        best[sl][win] = d[win]
        if covered >= target:
            break
    return relabel(lab)
