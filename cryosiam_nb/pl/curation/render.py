"""Server-side UMAP rendering: datashader aggregation at screen resolution → HoloViews RGB.

Also the categorical palette of the explorer's colour-by fields (clusters, species, sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datashader as ds
import datashader.transfer_functions as tf
import holoviews as hv
import numpy as np
import pandas as pd
from scipy import ndimage

from cryosiam_nb.constants import INSTANCE_COLORS
from cryosiam_nb.particles.curation import natural_key  # noqa: F401 - re-exported for app.py

__all__ = [
    "render_umap",
    "palette",
    "assign_colors",
    "COLOR_FIELDS",
    "EXCLUDED_LABEL",
    "EXCLUDED_COLOR",
]

#: ``obs`` columns the explorer can colour the UMAP by (those present are offered).
COLOR_FIELDS: tuple[str, ...] = ("cluster", "species", "size_category", "score")
#: Category shown for excluded particles, whatever their value.
EXCLUDED_LABEL = "(excluded)"
#: Colour of :data:`EXCLUDED_LABEL`.
EXCLUDED_COLOR = "#c8c8c8"
#: Viridis stops for numeric fields (``score``).
_VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]


def palette(n: int) -> list[str]:
    """``n`` distinct category colours (hex ``#rrggbb``).

    :data:`cryosiam_nb.constants.INSTANCE_COLORS` first (the colours ``pl.umap`` uses), then
    colorcet's ``glasbey_dark``; cycles beyond that.
    """
    if n <= len(INSTANCE_COLORS):
        return list(INSTANCE_COLORS[:n])
    import colorcet  # noqa: PLC0415 - a datashader dependency; only needed past 20

    cols = list(INSTANCE_COLORS) + list(colorcet.glasbey_dark)
    return [cols[i % len(cols)] for i in range(n)]


def assign_colors(colors: dict[str, str], names: Sequence[str]) -> dict[str, str]:
    """Give every name in ``names`` a colour, keeping the ones ``colors`` already holds.

    A new name takes the first :func:`palette` colour no name in ``colors`` uses (the map
    keeps the colours of clusters that are gone, so an undone merge gets its colours back);
    past the palette's length colours repeat. ``colors`` is updated in place and returned.
    """
    missing = [str(n) for n in names if str(n) not in colors]
    if not missing:
        return colors
    used = set(colors.values())
    pal = palette(len(colors) + len(missing) + len(used) + 1)
    free = iter([c for c in pal if c not in used])
    for i, n in enumerate(missing):
        colors[n] = next(free, pal[(len(colors) + i) % len(pal)])
    return colors


def extent(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``a`` padded by 3 % of the range ((0, 1) for no data)."""
    if a.size == 0:
        return (0.0, 1.0)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    pad = 0.03 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad


def _to_rgb(img: tf.Image, x_range: Sequence[float], y_range: Sequence[float]) -> hv.RGB:
    """datashader Image (uint32 RGBA, y ascending) → HoloViews RGB element."""
    rgba = np.ascontiguousarray(np.asarray(img.data, dtype=np.uint32)).view(np.uint8)
    rgba = rgba.reshape(img.shape[0], img.shape[1], 4)[::-1]
    return hv.RGB(
        rgba,
        bounds=(x_range[0], y_range[0], x_range[1], y_range[1]),
        kdims=["u", "v"],
        vdims=["R", "G", "B", "A"],
    )


def render_umap(
    frame: pd.DataFrame,
    color_by: str | None,
    color_key: Mapping[str, str] | None = None,
    x_range: Sequence[float] | None = None,
    y_range: Sequence[float] | None = None,
    width: int = 600,
    height: int = 520,
    spread: bool = True,
    rows: np.ndarray | None = None,
) -> hv.RGB:
    """Aggregate the UMAP points with datashader and shade them into one RGB image.

    Parameters
    ----------
    frame
        Columns ``u, v`` (UMAP coordinates) and ``color_by``.
    color_by
        A categorical column (``count_cat`` aggregation, one colour per category from
        ``color_key``), a numeric column such as ``"score"`` (no ``color_key``: mean per
        pixel, viridis), or ``None``:
        draw ``rows`` in black (the selection layer).
    color_key
        ``{category: "#rrggbb"}`` for a categorical ``color_by``.
    x_range, y_range
        Plotted (min, max) in UMAP units; default: the data extent + 3 %.
    width, height
        Canvas size in pixels.
    spread
        Grow isolated pixels (up to 3 px, by canvas coverage) so sparse points show.
    rows
        Row positions of ``frame`` to draw (default: all).

    Returns
    -------
    holoviews.RGB
        The image with kdims ``u, v`` and bounds = the ranges.
    """
    x_range = tuple(x_range) if x_range is not None else extent(frame["u"].to_numpy())
    y_range = tuple(y_range) if y_range is not None else extent(frame["v"].to_numpy())
    if rows is not None:
        frame = frame.iloc[rows]
    cvs = ds.Canvas(
        plot_width=max(int(width), 2),
        plot_height=max(int(height), 2),
        x_range=x_range,
        y_range=y_range,
    )
    if color_by is None:
        agg = cvs.points(frame, "u", "v", agg=ds.count())
        img = tf.shade(agg, cmap=["#000000", "#000000"], min_alpha=160)
    elif not color_key and pd.api.types.is_numeric_dtype(frame[color_by]):
        agg = cvs.points(frame, "u", "v", agg=ds.mean(color_by))
        img = tf.shade(agg, cmap=_VIRIDIS)
    else:
        agg = cvs.points(frame, "u", "v", agg=ds.count_cat(color_by))
        key = dict(color_key or {})
        cats = frame[color_by].cat.categories
        img = _shade_categories(agg, [key.get(c, "#000000") for c in cats], min_alpha=140)
    if spread:
        img = _spread_sparse(img)
    return _to_rgb(img, x_range, y_range)


def _shade_categories(agg: Any, colors: Sequence[str], min_alpha: int = 140) -> tf.Image:
    """Shade a (y, x, category) count aggregate: count-weighted mean colour per pixel.

    One matrix product instead of datashader's per-category colorize (which costs ~1 s per
    frame on a busy CPU for 32 categories); alpha grows with log(count) from ``min_alpha``
    to 255; empty pixels are transparent.
    """
    counts = np.asarray(agg.data, dtype=np.float32)  # (H, W, K)
    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colors], np.float32)
    total = counts.sum(-1)
    mixed = counts.reshape(-1, counts.shape[-1]) @ rgb
    mixed = (mixed / np.maximum(total.reshape(-1, 1), 1)).reshape(*total.shape, 3)
    top = float(np.log1p(total.max())) or 1.0
    alpha = min_alpha + (255 - min_alpha) * np.log1p(total) / top
    alpha = np.where(total > 0, alpha, 0)
    rgba = np.concatenate([mixed, alpha[..., None]], -1).round().clip(0, 255).astype(np.uint8)
    packed = rgba.view(np.uint32).reshape(total.shape)
    return tf.Image(
        packed, coords=[agg.coords[agg.dims[0]], agg.coords[agg.dims[1]]], dims=agg.dims[:2]
    )


def _spread_sparse(img: tf.Image, max_px: int = 3) -> tf.Image:
    """Grow isolated points of a shaded image by up to ``max_px`` pixels (sparse plots only).

    The radius follows how much of the canvas is covered (dense plots are left untouched);
    empty pixels take a neighbour's colour (``scipy.ndimage.maximum_filter`` on the packed
    RGBA values), so colours are never mixed. Works for any number of categories at the cost
    of one 2-D filter (datashader's own ``spread`` needs a slow per-shape JIT compile).
    """
    packed = np.asarray(img.data, dtype=np.uint32)
    opaque = (packed >> 24) != 0  # empty pixels have alpha 0 (but may carry a colour)
    packed = np.where(opaque, packed, np.uint32(0))
    filled = float(np.count_nonzero(opaque)) / max(packed.size, 1)
    px = 3 if filled < 0.01 else 2 if filled < 0.05 else 1 if filled < 0.2 else 0
    px = min(px, int(max_px))
    if px == 0:
        return img
    yy, xx = np.mgrid[-px : px + 1, -px : px + 1]
    grown = ndimage.maximum_filter(packed, footprint=(yy**2 + xx**2) <= px * px + 1)
    out = img.copy()
    out.data = np.where(opaque, packed, grown)
    return out
