"""Evaluation metrics (SPEC §7, thesis §3.5): Dice, instance AP, picking scores, PSNR, SSIM.

All volume metrics take numpy, dask or xarray inputs with the same (z, y, x) shape; dask
inputs are reduced chunk by chunk (label-pair counts, squared errors, SSIM maps with a halo),
so volumes larger than memory can be scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import product
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy.optimize import linear_sum_assignment

from cryosiam_nb.io import InputError

__all__ = [
    "dice",
    "average_precision",
    "iou_pairs",
    "picking_scores",
    "psnr",
    "ssim",
    "AP_THRESHOLDS",
]

#: IoU thresholds 0.50, 0.55, …, 0.95.
AP_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


# ============================================================================ helpers
def _arr(x: Any, name: str) -> Any:
    if isinstance(x, xr.DataArray):
        x = x.data
    if not isinstance(x, da.Array):
        x = np.asarray(x)
    return x


def _pair(a: Any, b: Any, names: tuple[str, str]) -> tuple[Any, Any]:
    a, b = _arr(a, names[0]), _arr(b, names[1])
    if a.shape != b.shape:
        raise InputError(f"{names[0]}: shape {a.shape} differs from {names[1]} {b.shape}")
    return a, b


def _block_pairs(a: Any, b: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligned numpy blocks of two arrays (one block for numpy input)."""
    if not isinstance(a, da.Array) and not isinstance(b, da.Array):
        return [(np.asarray(a), np.asarray(b))]
    a = a if isinstance(a, da.Array) else da.from_array(a, chunks="auto")
    b = b if isinstance(b, da.Array) else da.from_array(b, chunks=a.chunks)
    b = b.rechunk(a.chunks)
    out = []
    for idx in product(*[range(len(c)) for c in a.chunks]):
        out.append((a.blocks[idx], b.blocks[idx]))
    return out


def _compute(x: Any) -> np.ndarray:
    return np.asarray(x.compute() if isinstance(x, da.Array) else x)


# ============================================================================ Dice
def dice(
    pred: Any, gt: Any, classes: Sequence[int] | Mapping[int, str] | None = None
) -> dict[Any, float]:
    """Dice 2|P∩G| / (|P|+|G|) per class of two label volumes.

    ``classes``: class ids to score (a sequence), or a mapping id → name (keys of the result
    are then the names); default: every non-zero label present in either volume. The result
    also holds ``"mean"``, the mean over the classes that occur in either volume. A class absent
    from both volumes scores NaN (and is left out of the mean).
    """
    pred, gt = _pair(pred, gt, ("pred", "gt"))
    counts: pd.Series | None = None
    for pb, gb in _block_pairs(pred, gt):
        p = _compute(pb).ravel().astype(np.int64)
        g = _compute(gb).ravel().astype(np.int64)
        if p.size and (p.min() < 0 or g.min() < 0):
            raise InputError("pred/gt: labels must be non-negative integers")
        df = pd.DataFrame({"p": p, "g": g})
        c = df.value_counts()
        counts = c if counts is None else counts.add(c, fill_value=0)
    assert counts is not None
    p_idx = counts.index.get_level_values(0).to_numpy()
    g_idx = counts.index.get_level_values(1).to_numpy()
    v = counts.to_numpy().astype(np.float64)
    n_pred = pd.Series(v).groupby(p_idx).sum()
    n_gt = pd.Series(v).groupby(g_idx).sum()
    inter = pd.Series(v[p_idx == g_idx]).groupby(p_idx[p_idx == g_idx]).sum()
    if classes is None:
        ids = sorted((set(n_pred.index) | set(n_gt.index)) - {0})
        names: Mapping[int, Any] = {i: int(i) for i in ids}
    elif isinstance(classes, Mapping):
        names = dict(classes)
    else:
        names = {int(c): int(c) for c in classes}
    out: dict[Any, float] = {}
    vals = []
    for cid, key in names.items():
        sp, sg = float(n_pred.get(cid, 0.0)), float(n_gt.get(cid, 0.0))
        if sp + sg == 0:
            out[key] = float("nan")
            continue
        d = 2.0 * float(inter.get(cid, 0.0)) / (sp + sg)
        out[key] = d
        vals.append(d)
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


# ============================================================================ instance AP
def iou_pairs(pred: Any, gt: Any) -> pd.DataFrame:
    """IoU of every overlapping (pred, gt) label pair, from a sparse contingency table.

    Returns a DataFrame with columns ``pred, gt, intersection, iou`` (only pairs with a
    non-zero intersection, both labels > 0) and ``attrs["n_pred"]``, ``attrs["n_gt"]`` (the
    number of distinct non-zero labels in each volume).
    """
    pred, gt = _pair(pred, gt, ("pred", "gt"))
    inter: pd.Series | None = None
    sp: pd.Series | None = None
    sg: pd.Series | None = None
    for pb, gb in _block_pairs(pred, gt):
        p = _compute(pb).ravel()
        g = _compute(gb).ravel()
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
            raise InputError("pred/gt: instance labels must be integer volumes")
        p = p.astype(np.int64)
        g = g.astype(np.int64)
        both = (p > 0) & (g > 0)
        c = pd.DataFrame({"p": p[both], "g": g[both]}).value_counts()
        a = pd.Series(p[p > 0]).value_counts()
        b = pd.Series(g[g > 0]).value_counts()
        inter = c if inter is None else inter.add(c, fill_value=0)
        sp = a if sp is None else sp.add(a, fill_value=0)
        sg = b if sg is None else sg.add(b, fill_value=0)
    assert inter is not None and sp is not None and sg is not None
    df = pd.DataFrame(
        {
            "pred": inter.index.get_level_values(0).to_numpy(dtype=np.int64),
            "gt": inter.index.get_level_values(1).to_numpy(dtype=np.int64),
            "intersection": inter.to_numpy().astype(np.int64),
        }
    )
    union = sp.reindex(df["pred"]).to_numpy() + sg.reindex(df["gt"]).to_numpy()
    df["iou"] = df["intersection"] / (union - df["intersection"])
    df.attrs["n_pred"] = int(len(sp))
    df.attrs["n_gt"] = int(len(sg))
    return df


def _n_matches(pairs: pd.DataFrame, t: float) -> int:
    """Number of one-to-one matches with IoU > t (maximum cardinality)."""
    sel = pairs[pairs["iou"] > t]
    if len(sel) == 0:
        return 0
    if t >= 0.5:
        # IoU > 0.5 is unique on both sides: every candidate pair is a match
        return int(len(sel))
    pu, pi = np.unique(sel["pred"].to_numpy(), return_inverse=True)
    gu, gi = np.unique(sel["gt"].to_numpy(), return_inverse=True)
    cost = np.ones((len(pu), len(gu)))
    cost[pi, gi] = -sel["iou"].to_numpy()  # valid pairs first, then best IoU
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] < 0).sum())


def average_precision(
    pred: Any, gt: Any, thresholds: Sequence[float] | np.ndarray = AP_THRESHOLDS
) -> dict[str, Any]:
    """Instance AP at IoU thresholds: TP / (TP + FP + FN) (thesis definition).

    Predicted and true instances (label volumes, 0 = background, (z, y, x)) are matched one
    to one at IoU > t. Returns ``{"AP50": …, "AP55": …, …, "mean": …, "thresholds": [...],
    "ap": [...], "tp": [...], "fp": [...], "fn": [...], "n_pred": int, "n_gt": int}``.
    Two empty volumes give AP = 1.
    """
    th = np.asarray(thresholds, dtype=np.float64).ravel()
    if th.size == 0 or np.any((th < 0) | (th >= 1)):
        raise InputError(f"thresholds: expected values in [0, 1), got {list(th)}")
    pairs = iou_pairs(pred, gt)
    n_pred, n_gt = pairs.attrs["n_pred"], pairs.attrs["n_gt"]
    out: dict[str, Any] = {}
    aps, tps, fps, fns = [], [], [], []
    for t in th:
        tp = _n_matches(pairs, float(t))
        fp, fn = n_pred - tp, n_gt - tp
        denom = tp + fp + fn
        ap = 1.0 if denom == 0 else tp / denom
        out[f"AP{int(round(t * 100))}"] = ap
        aps.append(ap)
        tps.append(tp)
        fps.append(fp)
        fns.append(fn)
    out.update(
        mean=float(np.mean(aps)),
        thresholds=[float(t) for t in th],
        ap=aps,
        tp=tps,
        fp=fps,
        fn=fns,
        n_pred=n_pred,
        n_gt=n_gt,
    )
    return out


# ============================================================================ picking
def picking_scores(
    pred_centres: Any,
    true_centres: Any,
    radius: float,
    pred_classes: Sequence[Any] | None = None,
    true_classes: Sequence[Any] | None = None,
    beta: float = 4.0,
) -> dict[str, Any]:
    """Particle-picking scores: match predicted to true centres within ``radius``.

    Centres are (N, 3) arrays in any common unit (voxels or Å, same unit as ``radius``), or
    DataFrames with columns ``z, y, x``. Matching is one to one and maximises the number of
    matches, then minimises the summed distance (``scipy.optimize.linear_sum_assignment`` per
    connected group of candidate pairs). Returns ``tp, fp, fn, precision, recall, f1,
    fbeta`` (F-beta with ``beta``, 4 in the CZII challenge), ``matches`` ((K, 2) index
    pairs) and, when both class lists are given, ``class_agreement`` (fraction of matches
    with equal classes) and class-aware ``precision_class, recall_class, f1_class``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    def centres(x: Any, name: str) -> np.ndarray:
        if isinstance(x, pd.DataFrame):
            x = x[["z", "y", "x"]].to_numpy()
        a = np.asarray(x, dtype=np.float64)
        if a.size == 0:
            return np.zeros((0, 3))
        if a.ndim != 2 or a.shape[1] != 3:
            raise InputError(f"{name}: expected an (N, 3) array of (z, y, x), got {a.shape}")
        return a

    p = centres(pred_centres, "pred_centres")
    g = centres(true_centres, "true_centres")
    if not radius > 0:
        raise InputError(f"radius: must be positive, got {radius}")
    matches = np.zeros((0, 2), dtype=np.int64)
    if len(p) and len(g):
        sdm = cKDTree(p).sparse_distance_matrix(cKDTree(g), radius, output_type="coo_matrix")
        # distance exactly 0 is dropped by sparse storage: add pairs closer than eps back
        rows, cols, dists = sdm.row, sdm.col, sdm.data
        zero = cKDTree(p).query_ball_tree(cKDTree(g), 1e-9)
        zr = [i for i, js in enumerate(zero) for _ in js]
        zc = [j for js in zero for j in js]
        rows = np.concatenate([rows, np.asarray(zr, dtype=np.int64)])
        cols = np.concatenate([cols, np.asarray(zc, dtype=np.int64)])
        dists = np.concatenate([dists, np.zeros(len(zr))])
        if len(rows):
            n_p, n_g = len(p), len(g)
            adj = coo_matrix((np.ones(len(rows)), (rows, cols + n_p)), shape=(n_p + n_g, n_p + n_g))
            _, comp = connected_components(adj, directed=False)
            big = 1e6 * (radius + 1.0)
            found = []
            pair_comp = comp[rows]
            order = np.argsort(pair_comp, kind="stable")
            bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
            for grp in np.split(order, bounds):
                r, c, d = rows[grp], cols[grp], dists[grp]
                ru, ri = np.unique(r, return_inverse=True)
                cu, ci = np.unique(c, return_inverse=True)
                cost = np.full((len(ru), len(cu)), big)
                cost[ri, ci] = d
                a, b = linear_sum_assignment(cost)
                ok = cost[a, b] < big
                found.append(np.stack([ru[a[ok]], cu[b[ok]]], axis=1))
            matches = np.concatenate(found).astype(np.int64)
    tp = len(matches)
    fp, fn = len(p) - tp, len(g) - tp

    def prf(tp_: int) -> tuple[float, float, float, float]:
        pr = tp_ / len(p) if len(p) else float("nan")
        rc = tp_ / len(g) if len(g) else float("nan")
        f1 = 2 * pr * rc / (pr + rc) if pr + rc > 0 else 0.0
        b2 = beta**2
        fb = (1 + b2) * pr * rc / (b2 * pr + rc) if b2 * pr + rc > 0 else 0.0
        return pr, rc, f1, fb

    precision, recall, f1, fbeta = prf(tp)
    out: dict[str, Any] = {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fbeta": fbeta,
        "beta": float(beta),
        "matches": matches,
    }
    if pred_classes is not None and true_classes is not None:
        pc, tc = np.asarray(pred_classes), np.asarray(true_classes)
        if len(pc) != len(p) or len(tc) != len(g):
            raise InputError("pred_classes/true_classes: lengths must match the centres")
        same = pc[matches[:, 0]] == tc[matches[:, 1]] if tp else np.zeros(0, bool)
        out["class_agreement"] = float(same.mean()) if tp else float("nan")
        pr_c, rc_c, f1_c, fb_c = prf(int(same.sum()))
        out.update(precision_class=pr_c, recall_class=rc_c, f1_class=f1_c, fbeta_class=fb_c)
    return out


# ============================================================================ PSNR / SSIM
def psnr(x: Any, ref: Any, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of ``x`` against the reference ``ref``.

    PSNR = 10 log10(data_range² / MSE); ``data_range`` defaults to ``ref.max() - ref.min()``.
    """
    x, ref = _pair(x, ref, ("x", "ref"))
    if isinstance(x, da.Array) or isinstance(ref, da.Array):
        xd = da.asarray(x).astype(np.float64)
        rd = da.asarray(ref).astype(np.float64)
        mse, lo, hi = da.compute(((xd - rd) ** 2).mean(), rd.min(), rd.max())
    else:
        xf, rf = x.astype(np.float64), ref.astype(np.float64)
        mse, lo, hi = np.mean((xf - rf) ** 2), rf.min(), rf.max()
    dr = float(hi - lo) if data_range is None else float(data_range)
    if dr <= 0:
        raise InputError("ref: constant reference; pass data_range explicitly")
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(dr**2 / float(mse)))


def ssim(x: Any, ref: Any, data_range: float | None = None, win_size: int = 7) -> float:
    """Mean structural similarity of 3-D volumes ``x`` and ``ref`` (z, y, x).

    Uses ``skimage.metrics.structural_similarity`` (uniform ``win_size``³ window, K1 = 0.01,
    K2 = 0.03); ``data_range`` defaults to ``ref.max() - ref.min()``. For dask input the SSIM
    map is computed block-wise with a halo of ``win_size // 2`` and averaged over the same
    interior skimage uses, so the value equals the in-memory result.
    """
    from skimage.metrics import structural_similarity

    x, ref = _pair(x, ref, ("x", "ref"))
    if x.ndim != 3:
        raise InputError(f"x: expected a 3-D (z, y, x) volume, got shape {x.shape}")
    if min(x.shape) < win_size:
        raise InputError(f"x: every axis must be >= win_size={win_size}, got {x.shape}")
    if data_range is None:
        lo, hi = (
            da.compute(ref.min(), ref.max())
            if isinstance(ref, da.Array)
            else (ref.min(), ref.max())
        )
        data_range = float(hi - lo)
    if data_range <= 0:
        raise InputError("ref: constant reference; pass data_range explicitly")
    if not isinstance(x, da.Array) and not isinstance(ref, da.Array):
        return float(
            structural_similarity(
                x.astype(np.float64),
                ref.astype(np.float64),
                data_range=data_range,
                win_size=win_size,
            )
        )
    xd = da.asarray(x).astype(np.float64)
    rd = da.asarray(ref).astype(np.float64).rechunk(xd.chunks)
    h = win_size // 2

    def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if min(a.shape) < win_size:
            return np.zeros_like(a)
        return structural_similarity(a, b, data_range=data_range, win_size=win_size, full=True)[1]

    full = da.map_overlap(ssim_map, xd, rd, depth=h, boundary="none", dtype=np.float64)
    pad = (win_size - 1) // 2
    inner = full[tuple(slice(pad, s - pad) for s in x.shape)]
    return float(inner.mean().compute())
