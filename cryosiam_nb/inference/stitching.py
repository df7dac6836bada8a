"""Block stitching and relabelling: the one home of both.

Volumes too large for memory are labelled block by block; labels that continue across a
block face are joined by **one** rule: build a sparse graph whose nodes are the labels of
all blocks and whose edges are the pairs of labels that meet across a face, and take its
connected components (:func:`scipy.sparse.csgraph.connected_components`, see
:func:`merge_pairs`). Semantic post-processing (:func:`block_components`) joins labels of
the same class that touch across a face; instance segmentation joins instance labels
whose overlap on the two voxel planes around a face has IoU > 0.5 (:func:`match_iou`).

The relabelling helpers (:func:`relabel`, :func:`size_filter_lut`) live here too.
Arrays are (z, y, x); sizes are in voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cryosiam_nb.inference._compute import compute

__all__ = [
    "merge_pairs",
    "face_pairs",
    "match_iou",
    "label_block",
    "block_components",
    "filter_components",
    "relabel",
    "size_filter_lut",
]


# ============================================================================ the one merge
def merge_pairs(n: int, u: np.ndarray, v: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of ``n`` labels joined by the pairs ``(u[i], v[i])``.

    Parameters
    ----------
    n
        Number of labels (nodes ``0 .. n - 1``).
    u, v
        Integer arrays of equal length: label ``u[i]`` and label ``v[i]`` are the same object.

    Returns
    -------
    n_components : int
        Number of components.
    component : numpy.ndarray
        int64 ``(n,)``: the component of each label, ``0 .. n_components - 1``, numbered in
        order of each component's smallest label (so label 0 is in component 0).
    """
    u = np.asarray(u, dtype=np.int64).ravel()
    v = np.asarray(v, dtype=np.int64).ravel()
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    return int(n_comp), comp.astype(np.int64)


def face_pairs(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of labels facing each other across a block face (0 = no label).

    ``hi`` is the last voxel plane of the lower block, ``lo`` the first plane of the upper
    block, both with globally unique labels. Returns the label pairs ``(u, v)`` of every
    face-adjacent voxel pair where both are labelled.
    """
    both = (hi > 0) & (lo > 0)
    return hi[both].astype(np.int64), lo[both].astype(np.int64)


def match_iou(a: np.ndarray, b: np.ndarray, thr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs of two views of the same voxels whose IoU exceeds ``thr``.

    Parameters
    ----------
    a, b
        Label arrays of one shape (the same voxels as two blocks segmented them; 0 = none).
    thr
        IoU threshold.

    Returns
    -------
    u, v : numpy.ndarray
        int64 label pairs ``(a label, b label)`` with IoU > ``thr``.
    """
    a = a.ravel()
    b = b.ravel()
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pa, na = np.unique(a[a > 0], return_counts=True)
    pb, nb = np.unique(b[b > 0], return_counts=True)
    key = np.stack([a[both], b[both]], axis=1)
    uniq, nab = np.unique(key, axis=0, return_counts=True)
    sa = na[np.searchsorted(pa, uniq[:, 0])]
    sb = nb[np.searchsorted(pb, uniq[:, 1])]
    ok = nab / (sa + sb - nab) > thr
    return uniq[ok, 0].astype(np.int64), uniq[ok, 1].astype(np.int64)


# ============================================================================ relabelling
def relabel(labels: np.ndarray, dtype: Any = np.uint32) -> np.ndarray:
    """Labels renumbered ``1 .. n`` in order of their old value (0 stays 0)."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(np.asarray(labels))[0].astype(dtype, copy=False)


def size_filter_lut(
    ids: np.ndarray,
    counts: np.ndarray,
    min_size: int = 0,
    max_size: int | None = None,
    keep_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Look-up table old id → new id (``1 .. n`` in old-id order), 0 for removed labels.

    Parameters
    ----------
    ids, counts
        The labels (positive ints) and their sizes in voxels.
    min_size, max_size
        Keep labels with ``min_size <= count <= max_size`` (voxels; ``None``: no maximum).
    keep_ids
        If given, keep only labels in it as well.

    Returns
    -------
    numpy.ndarray
        uint32 ``(max(ids) + 1,)``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts)
    ok = counts >= min_size
    if max_size is not None:
        ok &= counts <= max_size
    if keep_ids is not None:
        ok &= np.isin(ids, keep_ids)
    keep = np.sort(ids[ok])
    top = int(ids.max()) if ids.size else 0
    lut = np.zeros(top + 1, dtype=np.uint32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.uint32)
    return lut


# ============================================================================ chunked components
def label_block(
    block: np.ndarray, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face-connected components of each class in one block.

    Returns local labels (0 = none, 1..n consecutive over all classes), the class of each
    label and its voxel count.
    """
    lab = np.zeros(block.shape, dtype=np.int32)
    cls, sizes = [], []
    offset = 0
    for c in classes:
        lc, n = ndimage.label(block == c)
        if n:
            sel = lc > 0
            lab[sel] = lc[sel] + offset
            cls.extend([c] * n)
            sizes.extend(np.bincount(lc[sel], minlength=n + 1)[1:].tolist())
            offset += n
    return lab, np.asarray(cls, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


def _label_summary(block: np.ndarray, classes: tuple[int, ...]) -> dict[str, Any]:
    lab, cls, sizes = label_block(block, classes)
    faces = {}
    for ax in range(3):
        faces[ax, 0] = np.take(lab, 0, axis=ax).copy()
        faces[ax, 1] = np.take(lab, -1, axis=ax).copy()
    return {"cls": cls, "sizes": sizes, "faces": faces}


def block_components(
    arr: da.Array, classes: Sequence[int], progress: bool = True
) -> tuple[dict[tuple[int, ...], np.ndarray], np.ndarray, np.ndarray]:
    """Exact global connected components (per class, face connectivity) of a chunked volume.

    One pass over the data (computed here, on the active dask scheduler) labels each
    block with ``scipy.ndimage.label`` and keeps its six faces; labels of the same class
    that touch across a face are joined by :func:`merge_pairs`.

    Parameters
    ----------
    arr
        Integer label volume (z, y, x), dask array; its chunks are the blocks.
    classes
        Label values whose components are wanted.
    progress
        Show a progress bar.

    Returns
    -------
    per_block : dict
        Block index → int64 array: the global component of each local label (``1..n`` →
        position ``0..n-1``), local labels as :func:`label_block` numbers them.
    size : numpy.ndarray
        int64 voxel count of each component.
    cls : numpy.ndarray
        int64 class of each component.
    """
    classes = tuple(int(c) for c in classes)
    blocks = arr.to_delayed()
    grid = blocks.shape
    index = list(np.ndindex(grid))
    summ = compute(
        *[dask.delayed(_label_summary, pure=True)(blocks[b], classes) for b in index],
        progress=progress,
    )
    by_block = dict(zip(index, summ))
    offsets, total = {}, 0
    for b in index:
        offsets[b] = total
        total += len(by_block[b]["sizes"])
    us, vs = [], []
    for b in index:
        for ax in range(3):
            nb = list(b)
            nb[ax] += 1
            nb = tuple(nb)
            if nb[ax] >= grid[ax]:
                continue
            u, v = face_pairs(by_block[b]["faces"][ax, 1], by_block[nb]["faces"][ax, 0])
            us.append(u - 1 + offsets[b])
            vs.append(v - 1 + offsets[nb])
    cls_all = np.concatenate([by_block[b]["cls"] for b in index] + [np.zeros(0, np.int64)])
    size_all = np.concatenate([by_block[b]["sizes"] for b in index] + [np.zeros(0, np.int64)])
    u = np.concatenate(us + [np.zeros(0, np.int64)])
    v = np.concatenate(vs + [np.zeros(0, np.int64)])
    same = cls_all[u] == cls_all[v]  # voxels of different classes never merge
    n_comp, comp = merge_pairs(total, u[same], v[same])
    comp_size = np.bincount(comp, weights=size_all, minlength=n_comp).astype(np.int64)
    comp_cls = np.zeros(n_comp, dtype=np.int64)
    comp_cls[comp] = cls_all
    per_block = {b: comp[offsets[b] : offsets[b] + len(by_block[b]["sizes"])] for b in index}
    return per_block, comp_size, comp_cls


def _filter_block(
    block: np.ndarray, classes: tuple[int, ...], lut: np.ndarray, fill: int, dtype: Any
) -> np.ndarray:
    """Re-label one block and keep voxels whose component ``lut`` keeps; others → fill."""
    lab, _, _ = label_block(block, classes)
    keep = np.concatenate([[True], lut])[lab]
    out = np.where((lab > 0) & ~keep, fill, block)
    return out.astype(dtype, copy=False)


def filter_components(
    arr: da.Array,
    classes: Sequence[int],
    per_block: dict[tuple[int, ...], np.ndarray],
    keep: np.ndarray,
    fill: int = 0,
    dtype: Any = None,
) -> da.Array:
    """Lazily set voxels of components not kept to ``fill`` (from :func:`block_components`).

    Parameters
    ----------
    arr, classes, per_block
        As given to / returned by :func:`block_components`.
    keep
        bool per component.
    fill
        Value of removed voxels.
    dtype
        Output dtype (default ``arr.dtype``).

    Returns
    -------
    dask.array.Array
        Same chunks as ``arr``; nothing computed.
    """
    classes = tuple(int(c) for c in classes)
    dtype = arr.dtype if dtype is None else np.dtype(dtype)
    blocks = arr.to_delayed()
    grid = blocks.shape
    out = np.empty(grid, dtype=object)
    for b in np.ndindex(grid):
        lut = keep[per_block[b]]
        shape = tuple(arr.chunks[ax][b[ax]] for ax in range(3))
        d = dask.delayed(_filter_block, pure=True)(blocks[b], classes, lut, fill, dtype)
        out[b] = da.from_delayed(d, shape, dtype=dtype)
    return da.block(out.tolist())
