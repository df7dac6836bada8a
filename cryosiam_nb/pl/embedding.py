"""Scatter plots of particle embeddings (scanpy's ``pl.umap``): :func:`umap`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from cryosiam_nb.constants import INSTANCE_COLORS
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.particles.curation import natural_key
from cryosiam_nb.pl.static import Figure

__all__ = ["umap"]

#: Colour of excluded particles (drawn underneath the others).
EXCLUDED_COLOR = "#c8c8c8"
#: Colour of particles whose ``color`` value is missing.
MISSING_COLOR = "#e8e8e8"


def _is_categorical(values: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)


def _category_colors(
    cats: list[str], palette: Mapping[str, str] | Sequence[str] | None
) -> dict[str, str]:
    if isinstance(palette, Mapping):
        cycle = list(INSTANCE_COLORS)
        return {c: palette.get(c, cycle[i % len(cycle)]) for i, c in enumerate(cats)}
    cycle = list(palette) if palette is not None else list(INSTANCE_COLORS)
    if not cycle:
        raise InputError("palette: empty colour list")
    return {c: cycle[i % len(cycle)] for i, c in enumerate(cats)}


def umap(
    particles: Particles,
    *,
    color: str | None = "cluster",
    basis: str = "umap",
    ax: Axes | None = None,
    size: float | None = None,
    palette: Mapping[str, str] | Sequence[str] | None = None,
    cmap: str = "viridis",
    show_excluded: bool = True,
    legend: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] = (5.5, 4.5),
) -> Figure:
    """Scatter of a 2-D particle embedding (``obsm[basis]``) coloured by an ``obs`` column.

    A string, categorical or bool column gets one colour per value (sorted naturally: ``"2"``
    before ``"10"``) and a legend; a numeric column a continuous colour map and a colorbar.
    Particles flagged in ``obs["excluded"]`` are drawn in grey underneath the others (legend
    entry ``"(excluded)"``), particles with a missing value in light grey.

    Parameters
    ----------
    particles : Particles
        Particles with ``obsm[basis]`` (N, ≥ 2), e.g. from ``tl.umap``.
    color : str or None
        ``obs`` column to colour by (default ``"cluster"``); None draws one colour.
    basis : str
        ``obsm`` key of the coordinates (its first two columns are drawn).
    ax : matplotlib.axes.Axes, optional
        Draw into these axes (of an existing figure) instead of a new figure.
    size : float, optional
        Marker area in points² (default ``min(20, max(1, 12000 / N))``).
    palette : dict or sequence of colours, optional
        Category colours: a dict ``{value: colour}`` or a list cycled over the sorted
        values (default :data:`cryosiam_nb.constants.INSTANCE_COLORS`).
    cmap : str
        Colour map of a numeric column.
    show_excluded : bool
        Draw excluded particles (grey); False leaves them out.
    legend : bool
        Draw the legend (categorical) or colorbar (numeric).
    title : str, optional
        Axes title (default the ``color`` column).
    figsize : (float, float)
        Size in inches of a new figure (ignored with ``ax``).

    Returns
    -------
    Figure
        The figure drawn on (shows itself as PNG in Jupyter; ``fig.savefig(...)`` in scripts).
    """
    if not isinstance(particles, Particles):
        raise InputError(f"pl.umap: expected a Particles object, got {type(particles).__name__}")
    if basis not in particles.obsm:
        hint = "run tl.umap(particles) first" if basis == "umap" else f"set obsm[{basis!r}]"
        raise InputError(
            f"pl.umap: particles have no obsm[{basis!r}] ({hint}); "
            f"available: {sorted(particles.obsm)}"
        )
    xy = np.asarray(particles.obsm[basis], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"pl.umap: obsm[{basis!r}] must be (N, 2), got shape {xy.shape}")
    xy = xy[:, :2]
    obs = particles.obs
    if color is not None and color not in obs.columns:
        raise InputError(f"pl.umap: obs has no column {color!r}; columns: {list(obs.columns)}")
    n = len(particles)
    excluded = (
        obs["excluded"].to_numpy(dtype=bool) if "excluded" in obs.columns else np.zeros(n, bool)
    )
    shown = ~excluded
    s = float(size) if size is not None else float(min(20.0, max(1.0, 12000.0 / max(n, 1))))
    kw: dict[str, Any] = {"s": s, "linewidths": 0, "rasterized": n > 10_000}

    if ax is None:
        fig = Figure(figsize=figsize)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    handles: list[Line2D] = []

    def handle(label: str, colour: str) -> None:
        handles.append(Line2D([], [], marker="o", ls="", markersize=6, color=colour, label=label))

    if show_excluded and excluded.any():
        ax.scatter(xy[excluded, 0], xy[excluded, 1], c=EXCLUDED_COLOR, **kw)
    if color is None:
        ax.scatter(xy[shown, 0], xy[shown, 1], c=INSTANCE_COLORS[0], **kw)
    elif _is_categorical(obs[color]):
        values = obs[color].astype(object).to_numpy()
        missing = pd.isna(values)
        labels = np.array([str(v) for v in values], dtype=object)
        cats = sorted({labels[i] for i in np.flatnonzero(shown & ~missing)}, key=natural_key)
        colours = _category_colors(cats, palette)
        if (shown & missing).any():
            sel = shown & missing
            ax.scatter(xy[sel, 0], xy[sel, 1], c=MISSING_COLOR, **kw)
            handle("(missing)", MISSING_COLOR)
        for c in cats:
            sel = shown & ~missing & (labels == c)
            ax.scatter(xy[sel, 0], xy[sel, 1], c=colours[c], **kw)
            handle(c, colours[c])
    else:
        values = pd.to_numeric(obs[color], errors="coerce").to_numpy(dtype=float)
        missing = ~np.isfinite(values)
        if (shown & missing).any():
            sel = shown & missing
            ax.scatter(xy[sel, 0], xy[sel, 1], c=MISSING_COLOR, **kw)
        sel = shown & ~missing
        points = ax.scatter(xy[sel, 0], xy[sel, 1], c=values[sel], cmap=cmap, **kw)
        if legend:
            fig.colorbar(points, ax=ax, label=color, shrink=0.8)
    if show_excluded and excluded.any() and (color is None or handles):
        handle("(excluded)", EXCLUDED_COLOR)
    if legend and handles:
        ncol = 1 if len(handles) <= 12 else 2
        ax.legend(
            handles=handles,
            fontsize=7,
            frameon=False,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            ncol=ncol,
        )
    name = basis.upper() if basis == "umap" else basis
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title if title is not None else (color or basis), fontsize=10)
    if ax.figure is fig and len(fig.axes) == 1:
        fig.tight_layout()
    return fig
