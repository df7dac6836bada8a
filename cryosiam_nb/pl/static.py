"""Static quick-look figures (matplotlib): side-by-side slices, orthogonal slices, loss curves.

All functions return a :class:`matplotlib.figure.Figure` built without pyplot, so a notebook
shows it exactly once (as the cell's value, or with ``display(fig)``; it renders itself as
PNG even in a fresh kernel where pyplot was never imported) and scripts can
``fig.savefig(...)``. Only the
slices shown are read from (possibly dask-backed, larger-than-memory) volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure as _MplFigure
from matplotlib.patches import Patch

from cryosiam_nb.constants import DIMS, SEMANTIC_COLORS
from cryosiam_nb.io import InputError, as_volume

__all__ = ["slices", "orthoslices", "loss_curves"]


class Figure(_MplFigure):
    """A matplotlib figure that Jupyter displays as PNG without pyplot's inline backend."""

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


DEFAULT_VARIABLES = ("clean", "noisy", "semantic", "instances", "lamella")


def _as_dataset(data: Any) -> tuple[xr.Dataset | None, xr.DataArray | None]:
    """(Dataset, None) for Simulation / Dataset input, (None, DataArray) for one volume."""
    vols = getattr(data, "volumes", None)
    if isinstance(vols, xr.Dataset):
        return vols, None
    if isinstance(data, xr.Dataset):
        return data, None
    if isinstance(data, xr.DataArray):
        if data.ndim != 3:
            raise InputError(f"data: expected a 3-D (z, y, x) volume, got dims {data.dims}")
        return None, data
    if getattr(np.asarray(data) if not hasattr(data, "shape") else data, "ndim", 0) != 3:
        raise InputError(
            f"data: expected a Simulation, an xarray Dataset/DataArray or a 3-D (z, y, x) "
            f"array, got {type(data).__name__} with shape {getattr(data, 'shape', None)}"
        )
    return None, xr.DataArray(as_volume(data, "data"), dims=DIMS)


def _is_label(arr: xr.DataArray) -> bool:
    return np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)


def _take(arr: xr.DataArray, axis: str, index: int | None) -> tuple[np.ndarray, int]:
    dims = tuple(arr.dims)
    if axis not in dims:
        raise InputError(f"axis: {axis!r} is not a dimension of the volume {dims}")
    n = arr.sizes[axis]
    i = n // 2 if index is None else int(index)
    if not -n <= i < n:
        raise InputError(f"{axis}: slice index {index} outside the volume ({axis} has {n} slices)")
    i %= n
    return np.asarray(arr.isel({axis: i}).values), i


def _label_cmap(name: str, values: np.ndarray, classes: Sequence[str] | None):
    if classes is not None or name == "semantic":
        names = list(classes) if classes is not None else list(SEMANTIC_COLORS)
        colors = [SEMANTIC_COLORS.get(c, f"C{i}") for i, c in enumerate(names)]
        colors[0] = "#00000000"
        return ListedColormap(colors), 0, len(colors) - 1, names
    n = int(values.max()) if values.size else 0
    rng = np.random.default_rng(0)
    hues = rng.random((max(n, 1) + 1, 3)) * 0.8 + 0.2
    colors = np.concatenate([hues, np.ones((len(hues), 1))], 1)
    colors[0] = (0, 0, 0, 0)
    return ListedColormap(colors), 0, len(colors) - 1, None


def _show_labels(ax, name, lab, classes, alpha, extent):
    cmap, lo, hi, names = _label_cmap(name, lab, classes)
    shown = np.ma.masked_equal(lab.astype(np.int64), 0)
    ax.imshow(
        shown,
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        alpha=alpha,
        interpolation="nearest",
        extent=extent,
        origin="upper",
    )
    if names is not None:
        present = sorted(set(np.unique(lab).tolist()) - {0})
        handles = [
            Patch(color=SEMANTIC_COLORS.get(names[i], f"C{i}"), label=names[i])
            for i in present
            if i < len(names)
        ]
        if handles:
            ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)


def _extent(shape2d, vs):
    h, w = shape2d
    return (-0.5 * vs, (w - 0.5) * vs, (h - 0.5) * vs, -0.5 * vs)


def slices(
    data: Any,
    overlays: Mapping[str, Any] | Sequence[str] | None = None,
    z: int | None = None,
    variables: Sequence[str] | None = None,
    axis: str = "z",
    cmap: str = "gray",
    alpha: float = 0.45,
    percentiles: tuple[float, float] = (0.5, 99.5),
    panel_size: float = 3.2,
    ncols: int | None = None,
    title: str | None = None,
    interactive: bool = False,
    **kwargs: Any,
) -> Figure | Any:
    """Side-by-side slices of a tomogram and its labels.

    Parameters
    ----------
    data
        A :class:`cryosiam_nb.sim.Simulation`, an ``xarray.Dataset`` (e.g. predictions on a
        tomogram's grid), or one (z, y, x) volume (DataArray / numpy / dask).
    overlays
        For a single volume: ``{name: labels}`` (integer (z, y, x) arrays), each drawn over
        the volume in its own panel. For a Dataset: names of label variables to draw over
        every image panel instead of showing them separately.
    z
        Slice index (voxels) along ``axis``; default the middle slice.
    variables
        Dataset variables to show (default: clean, noisy, semantic, instances, lamella — those
        present; else every 3-D variable). Label variables (integer dtype) are drawn in colour
        over the first image variable, ``semantic`` with a class legend.
    axis
        Slice normal: ``"z"`` (an x-y view), ``"y"`` or ``"x"``.
    cmap, alpha, percentiles
        Grey map for images, label opacity, and the display range of images (percentiles of
        the shown slice).
    interactive
        Hand over to the interactive viewer ``cryosiam_nb.pl.viewer.slice_viewer`` (Panel):
        the image variable (``noisy`` when shown, else the first image) with the label
        variables (or ``overlays``) as overlays and a Simulation's particles as markers;
        extra keyword arguments go to the viewer.

    Returns
    -------
    matplotlib.figure.Figure
        (or the viewer object when ``interactive=True``). Axes are in Å when the data carry
        ``voxel_size``, else in voxels.
    """
    if interactive:
        return _interactive(data, overlays, variables, **kwargs)
    if kwargs:
        raise InputError(f"slices: unexpected arguments {sorted(kwargs)}")
    if axis not in DIMS:
        raise InputError(f"axis: must be one of {DIMS}, got {axis!r}")
    ds, arr = _as_dataset(data)
    panels: list[tuple[str, xr.DataArray | None, list[tuple[str, xr.DataArray]]]] = []
    if ds is not None:
        if variables is None:
            variables = [v for v in DEFAULT_VARIABLES if v in ds.data_vars] or [
                v for v in ds.data_vars if ds[v].ndim == 3
            ]
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise InputError(
                f"variables: {missing} not in the data (has {sorted(map(str, ds.data_vars))})"
            )
        over = [] if overlays is None else list(overlays)
        if isinstance(overlays, Mapping):
            raise InputError("overlays: for a Dataset give variable names, e.g. ['semantic']")
        bad = [o for o in over if o not in ds.data_vars]
        if bad:
            raise InputError(f"overlays: {bad} not in the data")
        images = [v for v in variables if not _is_label(ds[v])]
        base = ds[images[0]] if images else None
        for v in variables:
            if v in over:
                continue
            if _is_label(ds[v]):
                panels.append((v, base, [(v, ds[v])]))
            else:
                panels.append((v, ds[v], [(o, ds[o]) for o in over]))
        vs = float(ds.attrs.get("voxel_size", 0) or 0)
    else:
        name = str(arr.name) if arr.name is not None else "volume"
        panels.append((name, arr, []))
        if overlays is not None:
            if not isinstance(overlays, Mapping):
                raise InputError("overlays: for a single volume give a mapping {name: labels}")
            for k, lab in overlays.items():
                lab_da = lab if isinstance(lab, xr.DataArray) else xr.DataArray(lab, dims=DIMS)
                if tuple(lab_da.shape) != tuple(arr.shape):
                    raise InputError(
                        f"overlays[{k!r}]: shape {tuple(lab_da.shape)} differs from the "
                        f"volume {tuple(arr.shape)}"
                    )
                panels.append((k, arr, [(k, lab_da)]))
        vs = float(arr.attrs.get("voxel_size", 0) or 0)
    if not panels:
        raise InputError("slices: nothing to show")

    n = len(panels)
    ncols = min(n, ncols or 5)
    nrows = int(np.ceil(n / ncols))
    first = panels[0][1] if panels[0][1] is not None else panels[0][2][0][1]
    shp = [first.sizes[d] for d in DIMS if d != axis]
    aspect = shp[0] / max(shp[1], 1)
    fig = Figure(figsize=(panel_size * ncols, panel_size * aspect * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    index_used = None
    for ax, (label, img, labs) in zip(axes.ravel(), panels):
        unit_vs = vs if vs > 0 else 1.0
        if img is not None:
            im, index_used = _take(img, axis, z)
            lo, hi = np.percentile(im, percentiles) if im.size else (0, 1)
            ext = _extent(im.shape, unit_vs)
            ax.imshow(im, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, extent=ext)
        for oname, lab in labs:
            sl, index_used = _take(lab, axis, z)
            classes = lab.attrs.get("classes")
            _show_labels(
                ax, oname, sl, classes, 1.0 if img is None else alpha, _extent(sl.shape, unit_vs)
            )
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    unit = "Å" if vs > 0 else "voxels"
    rest = [d for d in DIMS if d != axis]
    axes[-1, 0].set_xlabel(f"{rest[1]} ({unit})", fontsize=8)
    axes[-1, 0].set_ylabel(f"{rest[0]} ({unit})", fontsize=8)
    fig.suptitle(title or f"{axis} = {index_used}", fontsize=11)
    fig.tight_layout()
    return fig


def _interactive(data: Any, overlays: Any, variables: Sequence[str] | None, **kwargs: Any) -> Any:
    """Translate ``slices`` arguments for ``cryosiam_nb.pl.viewer.slice_viewer``: one image
    volume, label volumes as overlays, and a Simulation's particle table as markers."""
    from cryosiam_nb.pl.viewer import slice_viewer

    ds, arr = _as_dataset(data)
    if ds is None:
        opts = dict(kwargs)
        if overlays is not None:
            opts["overlays"] = overlays
        return slice_viewer(arr, **opts)
    names = (
        list(variables)
        if variables is not None
        else [v for v in DEFAULT_VARIABLES if v in ds.data_vars]
        or [v for v in ds.data_vars if ds[v].ndim == 3]
    )
    missing = [v for v in names if v not in ds.data_vars]
    if missing:
        raise InputError(
            f"variables: {missing} not in the data (has {sorted(map(str, ds.data_vars))})"
        )
    images = [v for v in names if not _is_label(ds[v])]
    if not images:
        raise InputError(f"variables: the viewer needs an image volume among {names}")
    image = "noisy" if "noisy" in images else images[0]
    labels = list(overlays) if overlays is not None else [v for v in names if _is_label(ds[v])]
    opts = dict(kwargs)
    if labels:
        opts["overlays"] = {v: ds[v] for v in labels}
    table = getattr(data, "particles", None)
    if isinstance(table, pd.DataFrame) and "id" in table and "particles" not in opts:
        opts["particles"] = table.set_index("id")
    return slice_viewer(ds[image], **opts)


def orthoslices(
    volume: Any,
    z: int | None = None,
    y: int | None = None,
    x: int | None = None,
    cmap: str = "gray",
    percentiles: tuple[float, float] = (0.5, 99.5),
    size: float = 6.0,
    title: str | None = None,
) -> Figure:
    """Three orthogonal slices through one (z, y, x) volume, with crosshairs.

    Parameters
    ----------
    volume
        ``DataArray`` / numpy / dask volume, axes (z, y, x). Only the three slices are read.
    z, y, x
        Slice indices in voxels (default the centre): x-y at ``z``, x-z at ``y``, y-z at ``x``.
    cmap
        Matplotlib colour map.
    percentiles
        Contrast limits as percentiles (%) of the shown slices.
    size
        Figure width in inches.
    title
        Figure title.

    Returns
    -------
    Figure
        A matplotlib figure (shows itself in Jupyter); axes in Å when the volume carries
        ``attrs["voxel_size"]``, else in voxels.
    """
    _, arr = _as_dataset(volume)
    if arr is None:
        raise InputError("volume: orthoslices takes one (z, y, x) volume, not a Dataset")
    nz, ny, nx = (arr.sizes[d] for d in DIMS)
    xy, zi = _take(arr, "z", z)
    xz, yi = _take(arr, "y", y)
    yz, xi = _take(arr, "x", x)
    vs = float(arr.attrs.get("voxel_size", 0) or 0) or 1.0
    unit = "Å" if arr.attrs.get("voxel_size") else "voxels"
    lo, hi = np.percentile(np.concatenate([xy.ravel(), xz.ravel(), yz.ravel()]), percentiles)
    hi = hi if hi > lo else lo + 1
    w = nx + nz
    h = ny + nz
    fig = Figure(figsize=(size, size * h / w + 0.4))
    gs = fig.add_gridspec(2, 2, width_ratios=[nx, nz], height_ratios=[ny, nz])
    a_xy = fig.add_subplot(gs[0, 0])
    a_yz = fig.add_subplot(gs[0, 1], sharey=a_xy)
    a_xz = fig.add_subplot(gs[1, 0], sharex=a_xy)
    kw = {"cmap": cmap, "vmin": lo, "vmax": hi}
    a_xy.imshow(xy, extent=_extent(xy.shape, vs), **kw)
    a_xz.imshow(xz, extent=_extent(xz.shape, vs), **kw)
    a_yz.imshow(yz.T, extent=_extent(yz.T.shape, vs), **kw)
    for a, (hline, vline) in (
        (a_xy, (yi, xi)),
        (a_xz, (zi, xi)),
        (a_yz, (yi, zi)),
    ):
        a.axhline(hline * vs, color="y", lw=0.6, alpha=0.7)
        a.axvline(vline * vs, color="y", lw=0.6, alpha=0.7)
        a.tick_params(labelsize=7)
    a_xy.set_title(f"x-y (z={zi})", fontsize=9)
    a_xz.set_title(f"x-z (y={yi})", fontsize=9)
    a_yz.set_title(f"z-y (x={xi})", fontsize=9)
    a_xz.set_xlabel(f"x ({unit})", fontsize=8)
    a_xy.set_ylabel(f"y ({unit})", fontsize=8)
    a_xz.set_ylabel(f"z ({unit})", fontsize=8)
    a_yz.set_xlabel(f"z ({unit})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        df = history
    elif isinstance(history, Mapping):
        lens = {k: len(v) for k, v in history.items() if np.ndim(v) == 1}
        if not lens:
            raise InputError(
                "history: a dict of loss sequences, e.g. {'train': [...], 'val': [...]}"
            )
        n = max(lens.values())
        df = pd.DataFrame(
            {
                k: np.concatenate([np.asarray(history[k], float), np.full(n - m, np.nan)])
                for k, m in lens.items()
            }
        )
    elif isinstance(history, Sequence) and history and isinstance(history[0], Mapping):
        df = pd.DataFrame(list(history))
    else:
        raise InputError(
            "history: expected a DataFrame, a dict of sequences or a list of dict records, "
            f"got {type(history).__name__}"
        )
    if df.empty:
        raise InputError("history: empty, nothing to plot")
    return df


def loss_curves(
    history: Any,
    keys: Sequence[str] | None = None,
    x: str | None = None,
    logy: bool = False,
    smooth: int = 1,
    title: str | None = None,
    size: tuple[float, float] = (6.0, 3.5),
) -> Figure:
    """Training curves: one line per numeric column (or ``keys``) of ``history``.

    Parameters
    ----------
    history
        A DataFrame (e.g. the history a trainer returns), a dict ``name → sequence`` or a
        list of per-epoch dicts.
    keys
        Columns to draw (default every numeric column but the x axis).
    x
        Column for the x axis, else ``epoch`` or ``step`` when present, else the row number.
    logy
        Log-scale y axis.
    smooth
        > 1 overlays a centred running mean of that many points.
    title
        Axes title.
    size
        Figure size in inches (width, height).

    Returns
    -------
    Figure
        A matplotlib figure (shows itself in Jupyter).
    """
    df = _history_frame(history)
    if x is None:
        x = next((c for c in ("epoch", "step", "iteration") if c in df.columns), None)
    elif x not in df.columns:
        raise InputError(f"x: column {x!r} not in the history ({list(df.columns)})")
    if keys is None:
        keys = [
            c
            for c in df.columns
            if c != x and pd.api.types.is_numeric_dtype(df[c]) and c not in ("epoch", "step")
        ]
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise InputError(f"keys: {missing} not in the history ({list(df.columns)})")
    if not keys:
        raise InputError("history: no numeric columns to plot")
    xs = df[x].to_numpy() if x is not None else np.arange(len(df))
    fig = Figure(figsize=size)
    ax = fig.add_subplot(1, 1, 1)
    for i, k in enumerate(keys):
        ys = pd.to_numeric(df[k], errors="coerce")
        ok = ys.notna().to_numpy()
        if smooth > 1:
            ax.plot(xs[ok], ys[ok], color=f"C{i}", alpha=0.3, lw=1)
            ys = ys.rolling(int(smooth), center=True, min_periods=1).mean()
        ax.plot(xs[ok], ys[ok], color=f"C{i}", lw=1.6, label=k)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x or "row")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
