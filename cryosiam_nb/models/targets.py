"""Training targets made from label volumes: the one definition of each.

- :func:`instance_maps` / :func:`instance_targets`: the foreground, boundary and signed
  distance maps an instance network predicts. Used by
  :class:`~cryosiam_nb.models.losses.InstanceLoss` (training) and by
  :func:`cryosiam_nb.segmentation.maps_from_labels` (perfect "predictions" to check the
  post-processing), so both see the same maps.
- :func:`distance_targets`: per-class signed distances for the semantic head.
- :func:`small_instance_weights`: per-voxel loss weights that up-weight small instances.

Axis order (z, y, x); distances in voxels, clipped to ±``clip`` and divided by ``clip``
(range ±1; 1 ≙ :data:`~cryosiam_nb.constants.DISTANCE_SCALE` = 5 voxels by default).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from cryosiam_nb.constants import DISTANCE_SCALE
from cryosiam_nb.io import InputError

__all__ = ["instance_maps", "instance_targets", "distance_targets", "small_instance_weights"]

_STRUCT6 = ndimage.generate_binary_structure(3, 1)


def _signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """Signed Euclidean distance in voxels (+ inside, − outside), clipped, divided by clip."""
    if mask.all():
        return np.ones(mask.shape, np.float32)
    if not mask.any():
        return -np.ones(mask.shape, np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (np.clip(inside - outside, -clip, clip) / clip).astype(np.float32)


def _labels_np(labels: Any, name: str) -> tuple[np.ndarray, bool, torch.device | None]:
    is_t = isinstance(labels, torch.Tensor)
    dev = labels.device if is_t else None
    arr = labels.detach().cpu().numpy() if is_t else np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise InputError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64), is_t, dev


def _batch(lab: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """(Z, Y, X) / (N, Z, Y, X) / (N, 1, Z, Y, X) → (N, Z, Y, X) and whether it was single."""
    if lab.ndim == 5:
        if lab.shape[1] != 1:
            raise InputError(f"{name}: shape {lab.shape}; expected one channel")
        lab = lab[:, 0]
    single = lab.ndim == 3
    if single:
        lab = lab[None]
    if lab.ndim != 4:
        raise InputError(f"{name}: shape {lab.shape}; expected (Z, Y, X) or (N, [1,] Z, Y, X)")
    return lab, single


def distance_targets(labels: Any, n_classes: int, clip: float = DISTANCE_SCALE) -> Any:
    """Per-class signed distance maps for semantic training (SPEC §2).

    Parameters
    ----------
    labels
        Integer class labels, ``(Z, Y, X)``, ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)``;
        numpy array or torch tensor.
    n_classes
        Number of classes C; labels must lie in ``[0, C - 1]``.
    clip
        Clip distance in voxels.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        float32 ``(C, Z, Y, X)`` or ``(N, C, Z, Y, X)`` (torch in → torch out on the same
        device): for class c the Euclidean distance (voxels) to the class border, positive
        inside c, negative outside, clipped to ±``clip`` and divided by ``clip`` (the
        network predicts it through tanh). A class absent from a volume is −1.
    """
    lab, is_t, dev = _labels_np(labels, "labels")
    lab, single = _batch(lab, "labels")
    if lab.min(initial=0) < 0 or lab.max(initial=0) >= n_classes:
        raise InputError(
            f"labels: values must lie in [0, {n_classes - 1}] for n_classes={n_classes}"
        )
    out = np.empty((lab.shape[0], n_classes, *lab.shape[1:]), np.float32)
    for i in range(lab.shape[0]):
        for c in range(n_classes):
            out[i, c] = _signed_distance(lab[i] == c, clip)
    if single:
        out = out[0]
    return torch.from_numpy(out).to(dev) if is_t else out


def instance_maps(
    labels: np.ndarray,
    *,
    clip: float = DISTANCE_SCALE,
    grow: int = 1,
    boundary: Literal["instances", "all"] = "instances",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground, boundary and distance maps of one instance label volume.

    Parameters
    ----------
    labels
        Integer instance labels (z, y, x), 0 = background (numpy, in memory).
    clip
        Clip distance in voxels (the distance map is divided by it).
    grow
        The boundary is dilated by ``grow`` voxels (6-connected, iterated).
    boundary
        ``"instances"`` (default): voxels of an instance with a 6-neighbour in a
        *different instance*, on both sides of the contact. The instance/background border
        is already the foreground's edge; marking it too makes the multicut cut thin necks
        of multi-lobed particles (AP-50 ≈ 0.57 vs ≈ 0.99 from perfect maps of crowded
        simulator particles in our check). ``"all"``: every label change including
        instance/background (``skimage.segmentation.find_boundaries`` mode "thick").

    Returns
    -------
    foreground, boundary, distance : numpy.ndarray
        float32 (z, y, x). ``foreground`` 1 inside any instance. ``boundary`` in {0, 1}.
        ``distance``: inside an instance the distance to the nearest voxel outside *that*
        instance (1 on its inner boundary, 1 + EDT to the inner boundary inside, so
        touching instances separate); in the background minus the distance to the nearest
        instance; clipped to ±``clip`` and divided by ``clip`` (range ±1, 1 ≙ ``clip``
        voxels, the unit ``segmentation.instances`` undoes with ``distance_scale``).
    """
    from skimage.segmentation import find_boundaries

    lab = np.asarray(labels).astype(np.int64, copy=False)
    if lab.ndim != 3:
        raise InputError(f"labels: expected a 3-D (z, y, x) volume, got shape {lab.shape}")
    if boundary not in ("instances", "all"):
        raise InputError(f"boundary: expected 'instances' or 'all', got {boundary!r}")
    fg = lab > 0
    if boundary == "instances":
        big = np.iinfo(np.int64).max
        higher = ndimage.grey_dilation(lab, footprint=_STRUCT6, mode="nearest") > lab
        masked = np.where(fg, lab, big)
        lower = ndimage.grey_erosion(masked, footprint=_STRUCT6, mode="nearest") < lab
        bd = fg & (higher | lower)
    else:
        bd = find_boundaries(lab, connectivity=1, mode="thick")
    if grow > 0 and bd.any():
        bd = ndimage.binary_dilation(bd, structure=_STRUCT6, iterations=int(grow))
    inner = find_boundaries(lab, connectivity=1, mode="inner") & fg
    dist = np.empty(lab.shape, np.float32)
    if fg.any():
        d_in = ndimage.distance_transform_edt(fg & ~inner) + 1.0
        dist[fg] = np.minimum(d_in[fg], clip)
        if not fg.all():
            d_out = ndimage.distance_transform_edt(~fg)
            dist[~fg] = -np.minimum(d_out[~fg], clip)
    else:
        dist[:] = -clip
    return fg.astype(np.float32), bd.astype(np.float32), (dist / clip).astype(np.float32)


def instance_targets(instances: Any, clip: float = DISTANCE_SCALE, grow: int = 1) -> dict[str, Any]:
    """Training targets of the instance heads from instance labels (0 = background).

    Parameters
    ----------
    instances
        Integer labels ``(Z, Y, X)``, ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)``; numpy array
        or torch tensor.
    clip
        Clip distance in voxels.
    grow
        Boundary dilation in voxels.

    Returns
    -------
    dict
        ``foreground``, ``boundary``, ``distance`` (see :func:`instance_maps`), float32
        with a channel axis: ``(1, Z, Y, X)`` or ``(N, 1, Z, Y, X)``; numpy in → numpy out,
        torch in → torch out on the same device.
    """
    lab, is_t, dev = _labels_np(instances, "instances")
    lab, single = _batch(lab, "instances")
    maps = [instance_maps(v, clip=clip, grow=grow) for v in lab]
    out = {}
    for i, key in enumerate(("foreground", "boundary", "distance")):
        a = np.stack([m[i] for m in maps])[:, None]
        if single:
            a = a[0]
        out[key] = torch.from_numpy(a).to(dev) if is_t else a
    return out


def small_instance_weights(
    instances: Any, max_size: int = 150, weight: float = 4.0, grow: int = 1
) -> Any:
    """Per-voxel loss weights: ``weight`` on instances under ``max_size`` voxels, else 1.

    The voxels of every instance smaller than ``max_size`` voxels (counted in the given
    volume, so a particle cut by a patch face counts as small) and a ``grow``-voxel
    (6-connected) shell of background around it get ``weight``; all others 1. Small
    particles are a tiny share of the foreground voxels, so an unweighted loss lets the
    network blur them away (their predicted centre distance stays below the seed
    threshold). Labels ``(Z, Y, X)``, ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)`` (numpy or
    torch); returns float32 of the same layout and kind (with a channel axis like
    :func:`instance_targets`).
    """
    lab, is_t, dev = _labels_np(instances, "instances")
    lab, single = _batch(lab, "instances")
    out = np.ones(lab.shape, np.float32)
    for i, v in enumerate(lab):
        v = np.asarray(v).astype(np.int64, copy=False)
        sizes = np.bincount(v[v > 0].ravel(), minlength=int(v.max()) + 1)
        small = (sizes > 0) & (sizes < int(max_size))
        small[0] = False
        mask = small[v]
        if grow > 0 and mask.any():
            grown = ndimage.binary_dilation(mask, structure=_STRUCT6, iterations=int(grow))
            mask = mask | (grown & (v == 0))
        out[i][mask] = float(weight)
    out = out[:, None]
    if single:
        out = out[0]
    return torch.from_numpy(out).to(dev) if is_t else out
