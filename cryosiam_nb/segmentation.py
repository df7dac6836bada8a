"""Instance segmentation post-processing, the particle table and subtomogram extraction.

Everything here uses (z, y, x) axis order and voxel units unless a name ends in ``_A``
(Ångström). The algorithm of :func:`instances` follows SPEC §5 (the CryoSiam release):

1. Gaussian smoothing (σ = 0.5 voxel) of foreground and distance; distance < 0 → 0; distance
   set to 0 where the smoothed foreground is below ``threshold_foreground``.
2. Optionally average the distance with the Euclidean distance transform (EDT) of the
   thresholded foreground, clipped to [0, 5] voxels.
3. Hierarchical seeds: connected components of ``distance > min_center_distance``; the
   threshold is raised in steps of 0.5 voxel up to ``max_center_distance``; a seed that splits
   into several components is replaced by them, one that vanishes keeps its lower-level self.
4. Seeded watershed (``skimage.segmentation.watershed``) on −distance inside the foreground.
5. Multicut refinement (python-elf, Kernighan–Lin) on the watershed's region adjacency graph,
   edge costs from the mean boundary probability with boundary bias β. Background (label 0)
   is an *ignore* label: it takes part in no edge and stays 0.
6. Size filters and an optional "touches semantic class k" filter.

Large volumes are processed block-wise with a halo; the blocks are stitched into globally
consistent ids by union-find over face-adjacent labels whose overlap on the two voxel planes
around each face has IoU > 0.5 (see :func:`instances`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage as ndi

from cryosiam_nb.io import DIMS, InputError, atomic_path

__all__ = [
    "instances",
    "particles",
    "extract_subtomograms",
    "maps_from_labels",
    "size_category",
    "SIZE_CATEGORIES",
    "DISTANCE_SCALE",
    "synthetic_instances",
]

#: The network predicts the signed distance to the background through tanh, clipped at
#: ±5 voxels and divided by 5: a predicted value of 1 means 5 voxels.
DISTANCE_SCALE = 5.0

#: Size categories of SPEC §5 (instance volume in voxels): (name, lower bound inclusive).
SIZE_CATEGORIES: tuple[tuple[str, int], ...] = (
    ("very big", 6000),
    ("big", 2000),
    ("medium", 900),
    ("small", 150),
    ("tiny", 0),
)


# The class order of the DEVELOPING.md contract (``cryosiam_nb.sim.SEMANTIC_CLASSES``),
# used when the simulator package is not importable.
_SEMANTIC_CLASSES = ("background", "membrane", "microtubule", "particle", "actin", "dna")


# ============================================================================ helpers
def _as_array(x: Any, name: str) -> Any:
    """numpy or dask array (z, y, x) from numpy / dask / xarray input."""
    if isinstance(x, xr.DataArray):
        x = x.data
    if not isinstance(x, da.Array):
        x = np.asarray(x)
    if x.ndim != 3:
        raise InputError(f"{name}: expected a 3-D (z, y, x) volume, got shape {x.shape}")
    return x


def _np(x: Any) -> np.ndarray:
    return x.compute() if isinstance(x, da.Array) else np.asarray(x)


def _voxel_size_of(*objs: Any) -> float | None:
    for o in objs:
        vs = getattr(o, "attrs", {}).get("voxel_size") if o is not None else None
        if vs is not None:
            return float(vs)
    return None


def _wrap(arr: Any, like: Any, name: str, attrs: dict[str, Any]) -> xr.DataArray:
    coords = None
    if isinstance(like, xr.DataArray | xr.Dataset):
        coords = {d: like.coords[d] for d in DIMS if d in like.coords}
    return xr.DataArray(arr, dims=DIMS, coords=coords, name=name, attrs=attrs)


def size_category(n_voxels: Any) -> Any:
    """SPEC §5 size category of an instance volume in voxels.

    very big ≥ 6000, big 2000–6000, medium 900–2000, small 150–900, tiny < 150 (lower
    bounds inclusive, as in ``cryosiam_nb.sim``).
    Accepts a scalar or an array; returns a str or an object array of str.
    """
    n = np.asarray(n_voxels)
    out = np.full(n.shape, "tiny", dtype=object)
    for cat, lo in reversed(SIZE_CATEGORIES):
        out[n >= lo] = cat
    return out.item() if out.ndim == 0 else out


# ============================================================================ GT → maps
def _maps_np(
    lab: np.ndarray, clip: float, boundary: str = "instances"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from skimage.segmentation import find_boundaries

    lab = np.asarray(lab)
    fg = lab > 0
    st = ndi.generate_binary_structure(3, 1)
    if boundary == "instances":
        # instance voxels with a 6-neighbour of a *different instance* (both sides: thick)
        big = np.iinfo(lab.dtype).max
        mx = ndi.maximum_filter(lab, footprint=st, mode="nearest")
        mn = ndi.minimum_filter(np.where(fg, lab, big), footprint=st, mode="nearest")
        thick = fg & (((mx != lab) & (mx > 0)) | ((mn != lab) & (mn != big)))
    else:
        thick = find_boundaries(lab, connectivity=1, mode="thick")
    bd = ndi.binary_dilation(thick, structure=st)
    inner = find_boundaries(lab, connectivity=1, mode="inner") & fg
    # distance to the nearest voxel outside the instance: 1 on the inner boundary, then
    # 1 + Euclidean distance to the instance's inner boundary inside (separates touching ones).
    dist = np.zeros(lab.shape, np.float32)
    if fg.any():
        interior = fg & ~inner
        d = ndi.distance_transform_edt(interior).astype(np.float32) + 1.0
        dist[fg] = d[fg]
    dist = np.minimum(dist, clip) / clip
    return fg.astype(np.float32), bd.astype(np.float32), dist.astype(np.float32)


def maps_from_labels(
    instances: Any,
    distance_clip: float = DISTANCE_SCALE,
    boundary: Literal["instances", "all"] = "instances",
    halo: int | None = None,
) -> xr.Dataset:
    """Ground-truth instance labels (z, y, x) → the maps an instance network predicts.

    Used as training targets and to check the post-processing with perfect predictions.

    - ``foreground``: 1 inside any instance, else 0 (float32).
    - ``boundary``: thick boundaries of the instance labels grown by one voxel (6-connected
      dilation), float32 in {0, 1}. ``boundary="instances"`` (default): the boundaries
      *between different instances* (voxels of an instance with a 6-neighbour in another
      instance, on both sides); ``"all"``: every label change including instance/background
      (``skimage.segmentation.find_boundaries`` mode "thick"). The default is what the
      multicut needs: with "all", a thin neck inside one particle is boundary everywhere and
      multi-lobed particles get cut (AP-50 ≈ 0.57 vs ≈ 0.99 from perfect maps of crowded
      simulator particles in our check); the instance/background border is already given
      by ``foreground``.
    - ``distance``: distance in voxels from each instance voxel to the nearest voxel outside
      its own instance (1 on the inner boundary, 1 + EDT to the inner boundary inside, so
      touching instances are separated), clipped at ``distance_clip`` (5 voxels) and divided
      by it: range [0, 1], 1 ≙ 5 voxels, 0 in the background — the unit that
      :func:`instances` undoes with ``distance_scale``.

    ``instances`` may be numpy, dask or xarray; dask input stays lazy (``map_overlap``
    with a halo of ``distance_clip + 2`` voxels). Returns an ``xarray.Dataset`` on the
    input grid (voxel size copied from ``attrs``).
    """
    arr = _as_array(instances, "instances")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"instances: expected integer labels, got dtype {arr.dtype}")
    if boundary not in ("instances", "all"):
        raise InputError(f"boundary: expected 'instances' or 'all', got {boundary!r}")
    if isinstance(arr, da.Array):
        depth = int(np.ceil(distance_clip)) + 2 if halo is None else int(halo)
        outs = []
        for i in range(3):
            outs.append(
                arr.map_overlap(
                    lambda b, i=i: _maps_np(b, distance_clip, boundary)[i],
                    depth=depth,
                    boundary="none",
                    dtype=np.float32,
                    trim=True,
                )
            )
        fg, bd, dist = outs
    else:
        fg, bd, dist = _maps_np(arr, distance_clip, boundary)
    attrs = {}
    vs = _voxel_size_of(instances)
    if vs is not None:
        attrs["voxel_size"] = vs
    ds = xr.Dataset(
        {
            "foreground": _wrap(fg, instances, "foreground", {}),
            "boundary": _wrap(bd, instances, "boundary", {}),
            "distance": _wrap(
                dist, instances, "distance", {"unit": f"1 = {distance_clip:g} voxels"}
            ),
        },
        attrs=attrs,
    )
    return ds


def maps_from_density(
    volume: Any,
    threshold: float | None = None,
    mask: Any = None,
    sigma: float = 1.0,
    distance_clip: float = DISTANCE_SCALE,
) -> xr.Dataset:
    """Classical, model-free instance maps from a protein-bright (e.g. denoised) volume.

    ``foreground`` = Gaussian-smoothed (``sigma`` voxels) density above ``threshold``
    (default: Otsu's threshold of the voxels inside ``mask``), restricted to ``mask``;
    ``distance`` = the Euclidean distance to the background, clipped at ``distance_clip``
    voxels and divided by it (the unit :func:`instances` expects); ``boundary`` = 0.
    Feed the result to :func:`instances` to pick particles by density alone — a baseline,
    and a way through the pipeline when no trained instance model is good enough for the
    data. In memory: intended for tomograms that fit in RAM.
    """
    from skimage.filters import threshold_otsu

    vol = np.asarray(_as_array(volume, "volume"), dtype=np.float32)
    if vol.ndim != 3:
        raise InputError(f"volume: expected a 3-D (z, y, x) array, got shape {vol.shape}")
    keep = np.ones(vol.shape, bool) if mask is None else np.asarray(mask) > 0
    if keep.shape != vol.shape:
        raise InputError(f"mask: shape {keep.shape} differs from the volume's {vol.shape}")
    if not keep.any():
        raise InputError("mask: selects no voxel")
    smooth = ndi.gaussian_filter(vol, sigma) if sigma > 0 else vol
    thr = float(threshold_otsu(smooth[keep])) if threshold is None else float(threshold)
    fg = (smooth > thr) & keep
    dist = np.minimum(ndi.distance_transform_edt(fg), distance_clip) / distance_clip
    ds = xr.Dataset(
        {
            "foreground": _wrap(fg.astype(np.float32), volume, "foreground", {}),
            "boundary": _wrap(np.zeros(vol.shape, np.float32), volume, "boundary", {}),
            "distance": _wrap(
                dist.astype(np.float32),
                volume,
                "distance",
                {"unit": f"1 = {distance_clip:g} voxels"},
            ),
        },
        attrs={"threshold": thr},
    )
    vs = _voxel_size_of(volume)
    if vs is not None:
        ds.attrs["voxel_size"] = vs
    return ds


# ============================================================================ core algorithm
def _hierarchical_seeds(dist: np.ndarray, lo: float, hi: float, step: float = 0.5) -> np.ndarray:
    """Seeds from thresholds lo, lo+step, …, hi (SPEC §5 step 3); uint32 labels."""
    seeds, n = ndi.label(dist > lo)
    seeds = seeds.astype(np.uint32)
    levels = np.arange(lo + step, hi + 1e-6, step)
    for t in levels:
        comp, nc = ndi.label(dist > t)
        if nc == 0:
            break
        both = (seeds > 0) & (comp > 0)
        pairs = np.unique(
            seeds[both].astype(np.uint64) * np.uint64(nc + 1) + comp[both].astype(np.uint64)
        )
        parent = (pairs // np.uint64(nc + 1)).astype(np.int64)
        child = (pairs % np.uint64(nc + 1)).astype(np.int64)
        counts = np.bincount(parent, minlength=int(n) + 1)
        split_parents = np.flatnonzero(counts >= 2)
        if split_parents.size == 0:
            continue
        split_children = child[np.isin(parent, split_parents)]
        # children of splitting seeds replace their parent; other seeds are kept as they are
        lut_parent = np.ones(int(n) + 1, dtype=bool)
        lut_parent[split_parents] = False
        lut_parent[0] = True
        seeds = np.where(lut_parent[seeds], seeds, 0).astype(np.uint32)
        lut_child = np.zeros(nc + 1, dtype=np.uint32)
        lut_child[split_children] = np.arange(1, split_children.size + 1, dtype=np.uint32) + n
        new = lut_child[comp]
        seeds = np.where(new > 0, new, seeds)
        n = int(n + split_children.size)
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(seeds)[0].astype(np.uint32)


def _multicut(ws: np.ndarray, boundary: np.ndarray, beta: float) -> np.ndarray:
    """Multicut (Kernighan–Lin) on the watershed RAG; background 0 is an ignore label."""
    import bioimage_cpp as bic
    from elf.segmentation.features import (
        compute_boundary_mean_and_length,
        compute_rag,
        project_node_labels_to_pixels,
    )
    from elf.segmentation.multicut import compute_edge_costs, multicut_kernighan_lin

    if ws.max() < 2:
        return ws
    rag = compute_rag(ws, n_threads=1)
    feats = compute_boundary_mean_and_length(rag, ws, boundary.astype(np.float32), n_threads=1)
    uv = np.asarray(rag.uv_ids(), dtype=np.uint64)
    keep = (uv[:, 0] != 0) & (uv[:, 1] != 0)  # no edge touches the background
    n_nodes = int(rag.number_of_nodes)
    if not keep.any():
        return ws
    costs = compute_edge_costs(
        feats[keep, 0].astype(np.float64), edge_sizes=feats[keep, 1], beta=beta
    )
    graph = bic.graph.UndirectedGraph.from_edges(n_nodes, uv[keep])
    node_labels = np.asarray(multicut_kernighan_lin(graph, costs), dtype=np.uint64) + 1
    node_labels[0] = 0  # background stays background
    seg = project_node_labels_to_pixels(rag, ws.astype(np.uint64), node_labels, n_threads=1)
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(seg.astype(np.uint32))[0].astype(np.uint32)


def _segment_block(
    fg: np.ndarray,
    boundary: np.ndarray,
    dist: np.ndarray,
    mask: np.ndarray | None,
    p: dict[str, Any],
) -> np.ndarray:
    """Steps 1–5 of SPEC §5 on one in-memory block; returns uint32 labels 1..n."""
    from skimage.segmentation import watershed

    fg = ndi.gaussian_filter(fg.astype(np.float32), p["sigma"])
    dist = ndi.gaussian_filter(dist.astype(np.float32) * p["distance_scale"], p["sigma"])
    if mask is not None:
        fg = np.where(mask, fg, 0.0)
    fg_mask = fg >= p["threshold_foreground"]
    dist = np.where(fg_mask & (dist > 0), dist, 0.0).astype(np.float32)
    if p["average_edt"]:
        edt = np.clip(ndi.distance_transform_edt(fg_mask), 0.0, 5.0).astype(np.float32)
        dist = 0.5 * (dist + edt)
    seeds = _hierarchical_seeds(dist, p["min_center_distance"], p["max_center_distance"])
    if seeds.max() == 0:
        return np.zeros(fg.shape, np.uint32)
    ws = watershed(-dist, markers=seeds, mask=fg_mask).astype(np.uint32)
    if p["multicut"]:
        ws = _multicut(ws, np.asarray(boundary, dtype=np.float32), p["boundary_bias"])
    return ws


def _class_ids(k: Any) -> list[int]:
    """Semantic class ids from ints or names of ``cryosiam_nb.sim.SEMANTIC_CLASSES``."""
    try:
        from cryosiam_nb.sim import SEMANTIC_CLASSES as names
    except ImportError:
        names = _SEMANTIC_CLASSES
    out = []
    for c in np.atleast_1d(np.asarray(k, dtype=object)):
        if isinstance(c, str):
            if c not in names:
                raise InputError(f"touching: unknown class {c!r}; known: {list(names)}")
            out.append(names.index(c))
        else:
            out.append(int(c))
    return out


def _label_counts(lab: np.ndarray) -> pd.Series:
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return pd.Series(counts, index=ids, dtype=np.int64)


def _touching_ids(lab: np.ndarray, sem: np.ndarray, k: Any) -> np.ndarray:
    cls = np.isin(sem, np.atleast_1d(k))
    near = ndi.binary_dilation(cls, structure=ndi.generate_binary_structure(3, 1))
    return np.unique(lab[near & (lab > 0)])


def _filter_lut(
    counts: pd.Series, min_size: int, max_size: int | None, touching_ids: np.ndarray | None
) -> np.ndarray:
    """Look-up table old id → new id (sequential), 0 for removed instances."""
    ok = counts >= min_size
    if max_size is not None:
        ok &= counts <= max_size
    if touching_ids is not None:
        ok &= counts.index.isin(touching_ids)
    keep = np.sort(np.asarray(counts.index[ok.to_numpy()], dtype=np.int64))
    top = int(counts.index.max()) if len(counts) else 0
    lut = np.zeros(top + 1, dtype=np.uint32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.uint32)
    return lut


# ============================================================================ block-wise
class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _grid(shape: Sequence[int], block: Sequence[int]) -> list[tuple[slice, ...]]:
    axes = [range(0, s, b) for s, b in zip(shape, block)]
    return [
        tuple(slice(o, min(o + b, s)) for o, b, s in zip(orig, block, shape))
        for orig in product(*axes)
    ]


def _read(arr: Any, sl: tuple[slice, ...]) -> np.ndarray:
    return _np(arr[sl])


def _read_many(arrays: Sequence[Any], sl: tuple[slice, ...]) -> list[np.ndarray | None]:
    """Read the same window of several arrays in one dask compute.

    The maps of ``tl.predict`` come from one model pass, so computing them together runs
    the network once per window instead of once per variable. ``None`` entries stay None.
    """
    parts = [None if a is None else a[sl] for a in arrays]
    lazy = [i for i, a in enumerate(parts) if isinstance(a, da.Array)]
    if lazy:
        done = da.compute(*[parts[i] for i in lazy])
        for i, v in zip(lazy, done):
            parts[i] = v
    return [None if a is None else np.asarray(a) for a in parts]


def _blockwise(
    fg: Any,
    bd: Any,
    dist: Any,
    mask: Any,
    p: dict[str, Any],
    block_shape: tuple[int, int, int],
    halo: int,
    out_store: Any,
    progress: bool,
) -> tuple[Any, pd.Series, list[tuple[int, int]]]:
    """Segment each block with a halo, keep its core, stitch ids by face overlap.

    Returns (core label volume with *block-offset* ids, counts per id, merge pairs).
    """
    from skimage.segmentation import relabel_sequential
    from tqdm.auto import tqdm

    shape = fg.shape
    cores = _grid(shape, block_shape)
    index = {tuple(s.start for s in c): i for i, c in enumerate(cores)}
    faces: dict[tuple[int, int], np.ndarray] = {}  # (block, axis+sign) → labels on 2 planes
    counts = []
    offset = 0
    for core in tqdm(cores, desc="instances (blocks)", disable=not progress):
        ext = tuple(
            slice(max(c.start - halo, 0), min(c.stop + halo, s)) for c, s in zip(core, shape)
        )
        f_, b_, d_, m = _read_many((fg, bd, dist, mask), ext)
        lab = _segment_block(f_, b_, d_, None if m is None else m.astype(bool), p)
        inner = tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(core, ext))
        core_lab, fw, _ = relabel_sequential(lab[inner])
        core_lab = core_lab.astype(np.uint32)
        # relabel the block's view consistently: labels not in the core become 0
        lut = np.zeros(int(lab.max()) + 1, dtype=np.int64)
        old = np.asarray(fw.in_values, dtype=np.int64)
        lut[old] = np.asarray(fw.out_values, dtype=np.int64)
        n_core = int(core_lab.max())
        if offset + n_core >= np.iinfo(np.uint32).max:
            raise InputError("instances: more than 2**32 - 1 instances; use a larger min_size")
        bi = index[tuple(s.start for s in core)]
        # the two planes around each face, as this block sees them (global ids)
        for ax in range(3):
            for sign in (-1, 1):
                edge = core[ax].start if sign < 0 else core[ax].stop
                if edge <= 0 or edge >= shape[ax]:
                    continue
                lo = edge - 1 - ext[ax].start
                sl = list(inner)
                sl[ax] = slice(lo, lo + 2)
                view = lut[lab[tuple(sl)]]
                faces[(bi, ax, sign)] = np.where(view > 0, view + offset, 0)
        core_lab[core_lab > 0] += np.uint32(offset)
        out_store[core] = core_lab
        counts.append(_label_counts(core_lab))
        offset += n_core
    # union-find over face pairs: IoU > 0.5 on the two planes around the face
    pairs: list[tuple[int, int]] = []
    for (bi, ax, sign), a in faces.items():
        if sign < 0:
            continue
        start = [s.start for s in cores[bi]]
        start[ax] = cores[bi][ax].stop
        bj = index.get(tuple(start))
        if bj is None or (bj, ax, -1) not in faces:
            continue
        b = faces[(bj, ax, -1)]
        pairs.extend(_match_iou(a, b, 0.5))
    total = pd.concat(counts) if counts else pd.Series(dtype=np.int64)
    return out_store, total, pairs


def _match_iou(a: np.ndarray, b: np.ndarray, thr: float) -> list[tuple[int, int]]:
    a = a.ravel()
    b = b.ravel()
    both = (a > 0) & (b > 0)
    if not both.any():
        return []
    pa, na = np.unique(a[a > 0], return_counts=True)
    pb, nb = np.unique(b[b > 0], return_counts=True)
    key = np.stack([a[both], b[both]], axis=1)
    uniq, nab = np.unique(key, axis=0, return_counts=True)
    sa = na[np.searchsorted(pa, uniq[:, 0])]
    sb = nb[np.searchsorted(pb, uniq[:, 1])]
    iou = nab / (sa + sb - nab)
    return [(int(u), int(v)) for (u, v), i in zip(uniq, iou) if i > thr]


# ============================================================================ public API
def instances(
    maps: xr.Dataset,
    threshold_foreground: float = 0.5,
    min_center_distance: float = 1.0,
    max_center_distance: float = 4.5,
    boundary_bias: float = 0.5,
    multicut: bool = True,
    min_size: int = 10,
    max_size: int | None = None,
    mask: Any = None,
    touching: tuple[Any, Any] | None = None,
    average_edt: bool = False,
    distance_scale: float = DISTANCE_SCALE,
    sigma: float = 0.5,
    block_shape: str | int | Sequence[int] | None = "auto",
    halo: int = 24,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> xr.DataArray:
    """Instance labels (uint32, 0 = background) from foreground / boundary / distance maps.

    Parameters
    ----------
    maps
        ``xarray.Dataset`` with dims (z, y, x) and variables ``foreground``, ``boundary``
        (probabilities in [0, 1]) and ``distance`` (signed distance to the background in
        network units: the instance head is trained on :func:`maps_from_labels` targets, in
        [0, 1] with 1 ≙ 5 voxels; multiplied by ``distance_scale`` to get voxels).
        numpy- or dask-backed (e.g. the lazy output of ``tl.predict``).
    threshold_foreground
        Foreground probability threshold (release range 0.4–0.65).
    min_center_distance, max_center_distance
        Seed thresholds on the smoothed distance **in voxels** (0–1 and 4–5 in the release);
        raised in steps of 0.5 voxel.
    boundary_bias
        Multicut boundary bias β (0.45–0.8); larger → more splitting.
    multicut
        Refine the watershed by multicut (python-elf, Kernighan–Lin). Background is never a
        graph node.
    min_size, max_size
        Keep instances with ``min_size <= n_voxels <= max_size`` (voxels).
    mask
        Optional boolean (z, y, x) volume (e.g. the lamella mask); foreground outside is ignored.
    touching
        ``(semantic_labels, k)``: keep only instances touching (6-neighbourhood) a voxel of
        semantic class ``k`` (an id, a class name such as ``"membrane"``, or a list of
        them), e.g. membrane-bound particles.
    average_edt
        Average the distance with the EDT of the thresholded foreground (clipped [0, 5]).
    distance_scale
        Voxels per unit of ``maps.distance`` (5: a predicted 1 ≙ 5 voxels, the clip of the
        training targets). Use 1 for a distance already in voxels.
    sigma
        Gaussian smoothing of foreground and distance (voxels).
    block_shape, halo
        Block-wise processing for large volumes: each block is segmented with ``halo`` voxels
        of context, its core is kept, and instances cut by block faces are joined when their
        labels on the two voxel planes around the face overlap with IoU > 0.5 (union-find),
        giving globally consistent ids. ``"auto"``: whole volume when it has ≤ 256³ voxels,
        else blocks of 192³. ``None``: always the whole volume. The halo should exceed the
        largest particle radius (24 voxels ≈ 240 Å at 10 Å/voxel).
    out
        Optional zarr path: block results are written there (atomically) and a dask-backed
        DataArray reading it is returned, so the labels never need to fit in memory.
        Otherwise a numpy-backed DataArray is returned.
    progress
        Show a progress bar over blocks.

    Returns
    -------
    xarray.DataArray
        uint32 labels (z, y, x), ids 1..N sequential, on the grid of ``maps``; ``attrs``
        hold ``voxel_size`` (Å, if known) and the parameters.
    """
    if not isinstance(maps, xr.Dataset):
        raise InputError("maps: expected an xarray.Dataset with foreground/boundary/distance")
    missing = [v for v in ("foreground", "boundary", "distance") if v not in maps]
    if missing:
        raise InputError(f"maps: missing variable(s) {missing}")
    fg = _as_array(maps["foreground"], "maps.foreground")
    bd = _as_array(maps["boundary"], "maps.boundary")
    dist = _as_array(maps["distance"], "maps.distance")
    shape = fg.shape
    if bd.shape != shape or dist.shape != shape:
        raise InputError("maps: foreground, boundary and distance must have the same shape")
    if not 0.0 <= threshold_foreground <= 1.0:
        raise InputError(f"threshold_foreground: must be in [0, 1], got {threshold_foreground}")
    if max_center_distance < min_center_distance:
        raise InputError("max_center_distance: must be >= min_center_distance")
    if not 0.0 < boundary_bias < 1.0:
        raise InputError(f"boundary_bias: must be in (0, 1), got {boundary_bias}")
    if distance_scale <= 0:
        raise InputError(f"distance_scale: must be positive, got {distance_scale}")
    m = None
    if mask is not None:
        m = _as_array(mask, "mask")
        if m.shape != shape:
            raise InputError(f"mask: shape {m.shape} differs from maps {shape}")
    sem = k = None
    if touching is not None:
        try:
            sem, k = touching
        except (TypeError, ValueError):
            raise InputError("touching: expected a (semantic_labels, class) pair") from None
        k = _class_ids(k)
        sem = _as_array(sem, "touching[0]")
        if sem.shape != shape:
            raise InputError(f"touching: semantic shape {sem.shape} differs from maps {shape}")
    p = {
        "threshold_foreground": float(threshold_foreground),
        "min_center_distance": float(min_center_distance),
        "max_center_distance": float(max_center_distance),
        "boundary_bias": float(boundary_bias),
        "multicut": bool(multicut),
        "average_edt": bool(average_edt),
        "distance_scale": float(distance_scale),
        "sigma": float(sigma),
    }
    if isinstance(block_shape, str):
        if block_shape != "auto":
            raise InputError(f"block_shape: expected 'auto', None or ints, got {block_shape!r}")
        block_shape = None if int(np.prod(shape)) <= 256**3 else (192, 192, 192)
    if block_shape is not None:
        bs = (int(block_shape),) * 3 if np.isscalar(block_shape) else tuple(block_shape)
        if len(bs) != 3 or min(bs) < 1:
            raise InputError(f"block_shape: expected 3 positive ints, got {block_shape!r}")
        block_shape = tuple(min(b, s) for b, s in zip(bs, shape))
        if block_shape == tuple(shape):
            block_shape = None
        elif int(halo) < 1:
            raise InputError(f"halo: must be >= 1 voxel for block-wise processing, got {halo}")

    attrs: dict[str, Any] = {k_: v for k_, v in p.items()}
    attrs.update(min_size=int(min_size), max_size=-1 if max_size is None else int(max_size))
    vs = _voxel_size_of(maps, maps["foreground"])
    if vs is not None:
        attrs["voxel_size"] = vs

    store_ctx = None
    if out is not None:
        import zarr

        store_ctx = atomic_path(out)
        tmp = store_ctx.__enter__()
        chunks = block_shape or tuple(min(s, 128) for s in shape)
        store = zarr.create_array(
            store=str(tmp), shape=shape, chunks=chunks, dtype=np.uint32, zarr_format=3
        )
    else:
        store = np.zeros(shape, np.uint32)
    try:
        if block_shape is None:
            f_, b_, d_, m_ = _read_many((fg, bd, dist, m), tuple(slice(0, n) for n in shape))
            lab = _segment_block(f_, b_, d_, None if m_ is None else m_.astype(bool), p)
            store[...] = lab
            counts = _label_counts(lab)
            pairs: list[tuple[int, int]] = []
        else:
            store, counts, pairs = _blockwise(
                fg, bd, dist, m, p, block_shape, int(halo), store, progress
            )
        top = int(counts.index.max()) if len(counts) else 0
        uf = _UnionFind(top + 1)
        for a, b in pairs:
            uf.union(a, b)
        roots = np.array([uf.find(i) for i in range(top + 1)], dtype=np.int64)
        merged = counts.groupby(roots[counts.index.to_numpy()]).sum()
        touch_ids = None
        chunk_slices = _grid(shape, block_shape or shape)
        if sem is not None:
            found = []
            for core in chunk_slices:
                ext = tuple(
                    slice(max(c.start - 1, 0), min(c.stop + 1, s)) for c, s in zip(core, shape)
                )
                lab_e = roots[store[ext]]
                found.append(_touching_ids(lab_e, _read(sem, ext), k))
            touch_ids = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
        lut = _filter_lut(merged, int(min_size), max_size, touch_ids)
        final = np.zeros(top + 1, dtype=np.uint32)
        final[: top + 1] = lut[roots] if lut.size else 0
        for core in chunk_slices:
            store[core] = final[store[core]]
        if out is not None:
            store.attrs.update(
                {"voxel_size": attrs.get("voxel_size"), "axes": list(DIMS), "unit": "voxel"}
            )
            store_ctx.__exit__(None, None, None)
            store_ctx = None
            import zarr

            data = da.from_zarr(zarr.open_array(str(Path(out)), mode="r"))
        else:
            data = store
    except BaseException as e:
        if store_ctx is not None:
            store_ctx.__exit__(type(e), e, e.__traceback__)
        raise
    return _wrap(data, maps, "instances", attrs)


# ============================================================================ particle table
_TABLE_COLUMNS = [
    "particle_id",
    "tomogram",
    "z",
    "y",
    "x",
    "z_A",
    "y_A",
    "x_A",
    "n_voxels",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "size_category",
    "semantic_class",
]


def _chunk_stats(lab: np.ndarray, origin: Sequence[int], sem: np.ndarray | None) -> pd.DataFrame:
    z, y, x = np.nonzero(lab)
    if z.size == 0:
        return pd.DataFrame()
    df = pd.DataFrame(
        {
            "id": lab[z, y, x].astype(np.int64),
            "z": z + origin[0],
            "y": y + origin[1],
            "x": x + origin[2],
        }
    )
    g = df.groupby("id")
    stats = g.agg(
        n=("z", "size"),
        sz=("z", "sum"),
        sy=("y", "sum"),
        sx=("x", "sum"),
        z0=("z", "min"),
        y0=("y", "min"),
        x0=("x", "min"),
        z1=("z", "max"),
        y1=("y", "max"),
        x1=("x", "max"),
    )
    if sem is not None:
        df["c"] = sem[z, y, x].astype(np.int64)
        cc = df.groupby(["id", "c"]).size().unstack(fill_value=0)
        cc.columns = [f"c{int(c)}" for c in cc.columns]
        stats = stats.join(cc)
    return stats


def particles(
    instances: Any,
    tomogram: Any = None,
    semantic: Any = None,
    name: str | None = None,
    voxel_size: float | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Particle table from an instance label volume (z, y, x), one row per instance.

    Columns: ``particle_id`` (the instance label), ``tomogram`` (name), ``z, y, x``
    (centroid, voxels, float), ``z_A, y_A, x_A`` (centroid in Å = voxels × voxel size),
    ``n_voxels``, ``bbox_z0 … bbox_x1`` (inclusive-exclusive voxel bounds), ``size_category``
    (SPEC §5), ``semantic_class`` (majority class name inside the instance when ``semantic``
    is given, else None).

    ``tomogram`` may be a name (str) or the tomogram DataArray (its ``name`` is used and its
    voxel size when ``instances`` has none). ``name`` overrides the name. ``voxel_size`` (Å)
    overrides ``attrs["voxel_size"]``; if none is known the Å columns are NaN.
    ``class_names`` default to ``cryosiam_nb.sim.SEMANTIC_CLASSES`` when importable.
    Dask-backed input is processed chunk by chunk (per-label sums accumulated).
    """
    from tqdm.auto import tqdm

    lab = _as_array(instances, "instances")
    if not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"instances: expected integer labels, got dtype {lab.dtype}")
    sem = None
    if semantic is not None:
        sem = _as_array(semantic, "semantic")
        if sem.shape != lab.shape:
            raise InputError(f"semantic: shape {sem.shape} differs from instances {lab.shape}")
    if name is None:
        if isinstance(tomogram, str):
            name = tomogram
        elif tomogram is not None and getattr(tomogram, "name", None) is not None:
            name = str(tomogram.name)
        else:
            name = str(getattr(instances, "attrs", {}).get("tomogram", "tomogram"))
    vs = voxel_size if voxel_size is not None else _voxel_size_of(instances, tomogram)
    if class_names is None and sem is not None:
        try:
            from cryosiam_nb.sim import SEMANTIC_CLASSES

            class_names = SEMANTIC_CLASSES
        except ImportError:
            class_names = _SEMANTIC_CLASSES
    if not isinstance(lab, da.Array) and lab.size > 128**3:
        lab = da.from_array(lab, chunks=(128, 128, 128))  # bounded temporary memory
    if isinstance(lab, da.Array):
        if sem is not None:
            sem = sem if isinstance(sem, da.Array) else da.from_array(sem, chunks=lab.chunks)
            sem = sem.rechunk(lab.chunks)
        starts = [np.cumsum((0,) + c[:-1]) for c in lab.chunks]
        parts = []
        blocks = list(product(*[range(len(c)) for c in lab.chunks]))
        for idx in tqdm(blocks, desc="particles (chunks)", disable=not progress):
            blk = np.asarray(lab.blocks[idx].compute())
            sblk = np.asarray(sem.blocks[idx].compute()) if sem is not None else None
            parts.append(_chunk_stats(blk, [starts[a][i] for a, i in enumerate(idx)], sblk))
        parts = [p for p in parts if len(p)]
        if parts:
            allp = pd.concat(parts).fillna(0)
            agg = {c: "sum" for c in allp.columns}
            agg.update({c: "min" for c in ("z0", "y0", "x0")})
            agg.update({c: "max" for c in ("z1", "y1", "x1")})
            stats = allp.groupby(level=0).agg(agg)
        else:
            stats = pd.DataFrame()
    else:
        stats = _chunk_stats(lab, (0, 0, 0), None if sem is None else np.asarray(sem))
    if len(stats) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _TABLE_COLUMNS})
    stats = stats.sort_index()
    n = stats["n"].to_numpy().astype(np.int64)
    df = pd.DataFrame(
        {
            "particle_id": stats.index.to_numpy().astype(np.int64),
            "tomogram": name,
            "z": stats["sz"].to_numpy() / n,
            "y": stats["sy"].to_numpy() / n,
            "x": stats["sx"].to_numpy() / n,
        }
    )
    for ax in "zyx":
        df[f"{ax}_A"] = df[ax] * (vs if vs is not None else np.nan)
    df["n_voxels"] = n
    for ax in "zyx":
        df[f"bbox_{ax}0"] = stats[f"{ax}0"].to_numpy().astype(np.int64)
    for ax in "zyx":
        df[f"bbox_{ax}1"] = stats[f"{ax}1"].to_numpy().astype(np.int64) + 1
    df["size_category"] = size_category(n)
    if sem is not None:
        ccols = [c for c in stats.columns if c.startswith("c") and c[1:].isdigit()]
        cls_ids = np.array([int(c[1:]) for c in ccols])
        best = cls_ids[np.argmax(stats[ccols].to_numpy(), axis=1)]
        if class_names is not None:
            df["semantic_class"] = [
                class_names[c] if 0 <= c < len(class_names) else str(c) for c in best
            ]
        else:
            df["semantic_class"] = [str(c) for c in best]
    else:
        df["semantic_class"] = None
    df.attrs["voxel_size"] = vs
    return df[_TABLE_COLUMNS]


# ============================================================================ subtomograms
def _padded_crop(arr: Any, centre: Sequence[int], box: int) -> tuple[Any, tuple[slice, ...]]:
    """Lazy/numpy crop of ``arr`` clipped to the volume + where it lands inside the box."""
    src, dst = [], []
    for c, s in zip(centre, arr.shape):
        lo = c - box // 2
        hi = lo + box
        a, b = max(lo, 0), min(hi, s)
        if b <= a:
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - lo, a - lo + (b - a)))
    return arr[tuple(src)], tuple(dst)


def extract_subtomograms(
    tomogram: Any,
    particles: pd.DataFrame,
    instances: Any = None,
    box: int = 64,
    mask: Literal["none", "convex_hull", "strict"] = "none",
    grow: int = 2,
    pad_value: float = 0.0,
    batch_size: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Cubes of side ``box`` voxels centred on each particle, as (N, box, box, box) float32.

    The particle centroid (``particles`` columns ``z, y, x`` in voxels, rounded half up)
    sits at index ``box // 2`` on every axis; parts of the box outside the volume are filled
    with ``pad_value`` (0). Only the chunks a box touches are read (the dask array is sliced
    per particle, computed in batches of ``batch_size``).

    Masking (needs ``instances``, matched by the ``particle_id`` column = instance label):

    - ``"none"``: raw crop.
    - ``"strict"``: keep the particle's own voxels dilated by ``grow`` voxels (ball
      structuring element), minus voxels of other particles; everything else → 0.
    - ``"convex_hull"``: keep the convex hull of the particle's voxels
      (``skimage.morphology.convex_hull_image`` in 3-D); everything else → 0.
    """
    from skimage.morphology import ball, convex_hull_image
    from tqdm.auto import tqdm

    if mask not in ("none", "convex_hull", "strict"):
        raise InputError(f"mask: expected 'none', 'convex_hull' or 'strict', got {mask!r}")
    if int(box) < 1:
        raise InputError(f"box: must be a positive number of voxels, got {box}")
    box = int(box)
    vol = _as_array(tomogram, "tomogram")
    lab = None
    if mask != "none":
        if instances is None:
            raise InputError(f"instances: needed for mask={mask!r}")
        lab = _as_array(instances, "instances")
        if lab.shape != vol.shape:
            raise InputError(f"instances: shape {lab.shape} differs from tomogram {vol.shape}")
    for c in ("z", "y", "x"):
        if c not in particles.columns:
            raise InputError(f"particles: missing column {c!r} (centroid in voxels)")
    if lab is not None and "particle_id" not in particles.columns:
        raise InputError("particles: missing column 'particle_id' (instance label) for masking")
    centres = np.floor(particles[["z", "y", "x"]].to_numpy(dtype=np.float64) + 0.5).astype(int)
    ids = particles["particle_id"].to_numpy() if lab is not None else None
    n = len(particles)
    out = np.full((n, box, box, box), pad_value, dtype=np.float32)
    structure = ball(int(grow)) if grow > 0 else None
    starts = range(0, n, max(int(batch_size), 1))
    for s in tqdm(starts, desc="subtomograms", disable=not progress or n == 0):
        idx = range(s, min(s + batch_size, n))
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
            own = lb == int(ids[i])
            if mask == "strict":
                keep = (
                    ndi.binary_dilation(own, structure=structure) if structure is not None else own
                )
                keep &= (lb == 0) | own
            else:
                keep = convex_hull_image(own) if own.any() else own
            sub[~keep] = 0.0
    return out


# ============================================================================ synthetic data
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
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(lab)[0].astype(np.uint32)
