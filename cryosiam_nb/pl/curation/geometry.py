"""Selection geometry in UMAP units: which 2-D points lie in a box or a lasso polygon."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.path import Path as MplPath

__all__ = ["points_in_box", "points_in_lasso"]


def points_in_box(uv: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Row positions of the 2-D points inside an axis-aligned box (edges included).

    Parameters
    ----------
    uv
        (N, 2) points, columns (u, v) (e.g. UMAP coordinates).
    bounds
        ``(x0, y0, x1, y1)`` in the units of ``uv``; the corners may come in any order.

    Returns
    -------
    numpy.ndarray
        int64 row positions into ``uv``, ascending.
    """
    x0, y0, x1, y1 = (float(b) for b in bounds)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    u, v = uv[:, 0], uv[:, 1]
    return np.flatnonzero((u >= x0) & (u <= x1) & (v >= y0) & (v <= y1))


def points_in_lasso(uv: np.ndarray, polygon: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Row positions of the 2-D points inside a closed polygon.

    Points are first filtered by the polygon's bounding box, then tested with
    ``matplotlib.path.Path.contains_points`` (vectorised C code). Non-finite vertices are
    dropped; fewer than 3 vertices select nothing.

    Parameters
    ----------
    uv
        (N, 2) points, columns (u, v).
    polygon
        (M, 2) vertices in the units of ``uv`` (closed implicitly).

    Returns
    -------
    numpy.ndarray
        int64 row positions into ``uv``, ascending.
    """
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    poly = poly[np.all(np.isfinite(poly), axis=1)]
    if len(poly) < 3:
        return np.zeros(0, dtype=np.int64)
    cand = points_in_box(uv, (*poly.min(0), *poly.max(0)))
    if cand.size == 0:
        return cand
    inside = MplPath(poly).contains_points(np.asarray(uv[cand], dtype=np.float64))
    return cand[inside]
