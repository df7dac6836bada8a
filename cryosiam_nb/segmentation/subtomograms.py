"""The one subtomogram extractor: boxes centred on particles, optionally masked.

Used by ``tl.extract_subtomograms`` (what ``tl.embed`` is fed), by the training code
(``cryosiam_nb.training``) and by the explorer's thumbnails, so a model is trained on the
same boxes it embeds later. Axis order (z, y, x); positions and sizes in voxels.

Rounding rule (everywhere): a centre ``c`` (float, voxels) is rounded half up,
``floor(c + 0.5)``, and lands at index ``box // 2`` of the box on every axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from cryosiam_nb.io import InputError, as_volume

__all__ = ["crop_box", "extract_subtomograms", "round_centres", "MASKINGS"]

#: The ways a subtomogram box can be masked (see :func:`extract_subtomograms`).
MASKINGS: tuple[str, ...] = ("none", "convex_hull", "strict")


def round_centres(centres: Any) -> np.ndarray:
    """Integer voxel centres from float ones: ``floor(c + 0.5)`` (round half up).

    Parameters
    ----------
    centres
        Array-like ``(N, 3)`` or ``(3,)`` of (z, y, x) positions in voxels.

    Returns
    -------
    numpy.ndarray
        int64 array of the same shape.
    """
    return np.floor(np.asarray(centres, dtype=np.float64) + 0.5).astype(np.int64)


def _padded_crop(arr: Any, centre: Sequence[int], box: int) -> tuple[Any, tuple[slice, ...]]:
    """Crop of ``arr`` clipped to the volume (lazy for dask) + where it lands in the box."""
    src, dst = [], []
    for c, s in zip(centre, arr.shape):
        lo = int(c) - box // 2
        hi = lo + box
        a, b = max(lo, 0), min(hi, s)
        if b <= a:
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - lo, a - lo + (b - a)))
    return arr[tuple(src)], tuple(dst)


def crop_box(
    volume: Any, centre_zyx: Sequence[float], box: int, *, pad_value: float = 0.0
) -> np.ndarray:
    """One cube of side ``box`` voxels centred on ``centre_zyx``, padded outside the volume.

    Parameters
    ----------
    volume
        numpy / dask array or ``DataArray``, axes (z, y, x). Only the part the box
        touches is read (a dask array is sliced, then that slice is computed).
    centre_zyx
        Centre (z, y, x) in voxels; rounded half up (:func:`round_centres`) and placed at
        index ``box // 2`` on every axis.
    box
        Side of the cube in voxels.
    pad_value
        Value of the box outside the volume (0).

    Returns
    -------
    numpy.ndarray
        ``(box, box, box)`` array of the volume's dtype.
    """
    box = _check_box(box)
    vol = as_volume(volume, "volume")
    c = round_centres(centre_zyx)
    if c.shape != (3,):
        raise InputError(f"centre_zyx: expected 3 values (z, y, x), got {np.shape(centre_zyx)}")
    crop, dst = _padded_crop(vol, c, box)
    crop = crop.compute() if isinstance(crop, da.Array) else crop
    out = np.full((box,) * 3, pad_value, dtype=np.asarray(crop).dtype)
    out[dst] = crop
    return out


def _check_box(box: int) -> int:
    if int(box) < 1:
        raise InputError(f"box: must be a positive number of voxels, got {box}")
    return int(box)


def _keep_mask(lb: np.ndarray, pid: int, masking: str, structure: np.ndarray | None) -> np.ndarray:
    own = lb == int(pid)
    if masking == "strict":
        keep = ndi.binary_dilation(own, structure=structure) if structure is not None else own
        return keep & ((lb == 0) | own)
    from skimage.morphology import convex_hull_image

    return convex_hull_image(own) if own.any() else own


def extract_subtomograms(
    tomogram: Any,
    particles: Any,
    *,
    box: int = 64,
    instances: Any = None,
    masking: Literal["none", "convex_hull", "strict"] = "none",
    grow: int = 2,
    pad_value: float = 0.0,
    batch_size: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Cubes of side ``box`` voxels centred on each particle.

    Parameters
    ----------
    tomogram
        numpy / dask array or ``DataArray``, axes (z, y, x). Only the chunks a box touches
        are read: the dask array is sliced per particle and computed in batches of
        ``batch_size`` particles.
    particles
        ``pandas.DataFrame`` (or an object with such an ``obs`` table) with the centres
        ``z, y, x`` in voxels (rounded half up, :func:`round_centres`) and, for masking,
        ``particle_id`` (the instance label).
    box
        Side of the cubes in voxels; the centre sits at index ``box // 2``.
    instances
        Instance labels (z, y, x) on the tomogram's grid; needed unless
        ``masking="none"``.
    masking
        ``"none"``: raw crop. ``"strict"``: keep the particle's own voxels dilated by
        ``grow`` voxels (ball structuring element) minus voxels of other particles.
        ``"convex_hull"``: keep the 3-D convex hull of the particle's voxels. Everything
        not kept is set to 0.
    grow
        Dilation radius in voxels for ``masking="strict"``.
    pad_value
        Value of the boxes outside the tomogram (0).
    batch_size
        Particles per dask compute.
    progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``(N, box, box, box)`` float32, in the row order of ``particles``.
    """
    from skimage.morphology import ball
    from tqdm.auto import tqdm

    if masking not in MASKINGS:
        raise InputError(f"masking: expected 'none', 'convex_hull' or 'strict', got {masking!r}")
    box = _check_box(box)
    table = getattr(particles, "obs", particles)
    if not isinstance(table, pd.DataFrame):
        raise InputError(
            f"particles: expected a DataFrame or Particles, got {type(particles).__name__}"
        )
    vol = as_volume(tomogram, "tomogram")
    lab = None
    if masking != "none":
        if instances is None:
            raise InputError(f"instances: needed for masking={masking!r}")
        lab = as_volume(instances, "instances")
        if lab.shape != vol.shape:
            raise InputError(f"instances: shape {lab.shape} differs from tomogram {vol.shape}")
    for c in ("z", "y", "x"):
        if c not in table.columns:
            raise InputError(f"particles: missing column {c!r} (centroid in voxels)")
    if lab is not None and "particle_id" not in table.columns:
        raise InputError("particles: missing column 'particle_id' (instance label) for masking")
    centres = round_centres(table[["z", "y", "x"]].to_numpy(dtype=np.float64))
    ids = table["particle_id"].to_numpy() if lab is not None else None
    n = len(table)
    out = np.full((n, box, box, box), pad_value, dtype=np.float32)
    structure = ball(int(grow)) if grow > 0 else None
    step = max(int(batch_size), 1)
    for s in tqdm(range(0, n, step), desc="subtomograms", disable=not progress or n == 0):
        idx = range(s, min(s + step, n))
        crops, dsts, labs = [], [], []
        for i in idx:
            c, d = _padded_crop(vol, centres[i], box)
            crops.append(c)
            dsts.append(d)
            if lab is not None:
                labs.append(_padded_crop(lab, centres[i], box)[0])
        if isinstance(vol, da.Array) or (labs and isinstance(labs[0], da.Array)):
            crops, labs = da.compute(crops, labs)
        for j, i in enumerate(idx):
            sub = out[i]
            sub[dsts[j]] = np.asarray(crops[j], dtype=np.float32)
            if lab is None:
                continue
            lb = np.zeros((box,) * 3, dtype=np.int64)
            lb[dsts[j]] = np.asarray(labs[j])
            sub[~_keep_mask(lb, ids[i], masking, structure)] = 0.0
    return out
