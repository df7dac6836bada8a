"""Interactive orthogonal slice viewer (Panel + HoloViews + datashader).

``slice_viewer(tomogram, overlays=..., particles=...)`` returns a :class:`SliceViewer`
whose ``.panel()`` is a Panel layout: an xy slice with a z slider plus optional xz / yz
slices, each rasterized server-side with datashader (so a 4k x 4k slice is sent to the
browser as a screen-sized image), contrast controls, semantic / instance label overlays
and particle markers. Axes are in **voxels**; arrays are ordered **(z, y, x)**.

``cryosiam_nb.pl.slices(..., interactive=True)`` delegates here.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from holoviews.operation.datashader import rasterize

from cryosiam_nb.constants import INSTANCE_COLORS, SEMANTIC_CLASSES, SEMANTIC_COLORS
from cryosiam_nb.io import InputError, as_volume, read, voxel_size_of

__all__ = ["SliceViewer", "slice_viewer"]

# Overlay colour of semantic labels 1..N: the shared class colours, then extras for
# labels beyond the known classes.
_SEMANTIC_OVERLAY = tuple(SEMANTIC_COLORS[c] for c in SEMANTIC_CLASSES[1:]) + (
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
)


def ensure_bokeh() -> None:
    """Load the HoloViews bokeh backend once (needed before building plots / options)."""
    if "bokeh" not in hv.Store.renderers:
        hv.extension("bokeh")
    elif hv.Store.current_backend != "bokeh":
        hv.Store.set_current_backend("bokeh")


def _as_volume(data: Any, what: str) -> tuple[Any, float]:
    """Return (array-like (z, y, x) supporting numpy indexing, voxel size in Å)."""
    if isinstance(data, str | os.PathLike):
        data = read(data)
    voxel_size = voxel_size_of(data) or 1.0
    arr = as_volume(data, what)
    return arr, voxel_size


def _label_kind(name: str, arr: Any) -> str:
    """'instances' for instance-id volumes, 'semantic' for class labels."""
    if "inst" in name.lower():
        return "instances"
    if np.dtype(arr.dtype).itemsize >= 4 and np.dtype(arr.dtype).kind in "ui":
        return "instances"
    return "semantic"


class _SliceCache:
    """Small LRU of 2-D slices so dask / memory-mapped volumes are read once per slice."""

    def __init__(self, size: int = 16):
        self.size = size
        self._d: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple, vol: Any, index: tuple) -> np.ndarray:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        out = vol[index]
        if hasattr(out, "compute"):
            out = out.compute()
        out = np.asarray(out)
        self._d[key] = out
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return out


def _robust_limits(vol: Any, max_voxels: int = 500_000) -> tuple[float, float, float, float]:
    """(p0.5, p99.5, min, max) of a strided sample of the volume."""
    n = int(np.prod(vol.shape))
    step = max(1, int(round((n / max_voxels) ** (1 / 3))))
    sample = vol[::step, ::step, ::step]
    if hasattr(sample, "compute"):
        sample = sample.compute()
    sample = np.asarray(sample, dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0, 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    vmin, vmax = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    return float(lo), float(hi), vmin, vmax


class SliceViewer(param.Parameterized):
    """Orthogonal slice viewer of one tomogram (z, y, x) with overlays and particle markers.

    Parameters are live: set ``viewer.z = 40`` or call :meth:`goto` from Python and the
    plots follow. Coordinates are voxel indices.
    """

    z = param.Integer(default=0, bounds=(0, None), doc="xy slice index (voxels)")
    y = param.Integer(default=0, bounds=(0, None), doc="xz slice index (voxels)")
    x = param.Integer(default=0, bounds=(0, None), doc="yz slice index (voxels)")
    contrast = param.Range(default=(0.0, 1.0), doc="display range (tomogram intensity units)")
    cmap = param.Selector(default="gray", objects=["gray", "Greys", "viridis", "magma"])
    overlay_alpha = param.Magnitude(default=0.45, doc="opacity of label overlays")
    visible_overlays = param.ListSelector(default=[], objects=[], doc="overlays drawn")
    marker_slab = param.Integer(
        default=3, bounds=(0, None), doc="markers shown within ± this many voxels of a slice"
    )
    show_markers = param.Boolean(default=True)
    highlight = param.List(default=[], doc="particle ids drawn highlighted")
    focus = param.Parameter(default=None, doc="(z, y, x) of the particle last jumped to")
    markers_version = param.Integer(default=0, precedence=-1)

    def __init__(
        self,
        tomogram: Any,
        overlays: Mapping[str, Any] | Any | None = None,
        particles: pd.DataFrame | None = None,
        orthogonal: bool = True,
        width: int = 520,
        name: str = "tomogram",
        **params: Any,
    ):
        ensure_bokeh()  # markers and overlays set HoloViews options: a backend must be loaded
        vol, voxel_size = _as_volume(tomogram, "tomogram")
        self.volume = vol
        self.voxel_size = voxel_size
        self.title = name
        self.orthogonal = bool(orthogonal)
        self.width = int(width)
        self.shape = tuple(int(s) for s in vol.shape)
        self.overlays: dict[str, tuple[Any, str]] = {}
        for key, arr in self._overlay_items(overlays):
            ov, _ = _as_volume(arr, f"overlays[{key!r}]")
            if tuple(ov.shape) != self.shape:
                raise InputError(
                    f"overlays[{key!r}]: shape {tuple(ov.shape)} differs from the tomogram "
                    f"shape {self.shape}"
                )
            self.overlays[key] = (ov, _label_kind(key, ov))
        lo, hi, vmin, vmax = _robust_limits(vol)
        super().__init__(**params)
        nz, ny, nx = self.shape
        self.param.z.bounds = (0, nz - 1)
        self.param.y.bounds = (0, ny - 1)
        self.param.x.bounds = (0, nx - 1)
        self.param.visible_overlays.objects = list(self.overlays)
        self._vrange = (vmin, vmax)
        with param.parameterized.discard_events(self):
            if "z" not in params:
                self.z = nz // 2
            if "y" not in params:
                self.y = ny // 2
            if "x" not in params:
                self.x = nx // 2
            if "contrast" not in params:
                self.contrast = (lo, hi)
            if "visible_overlays" not in params:
                self.visible_overlays = list(self.overlays)
        self._cache = _SliceCache()
        self._particles = pd.DataFrame(columns=["z", "y", "x"])
        if particles is not None:
            self.set_particles(particles)
        self._layout: pn.viewable.Viewable | None = None

    # ------------------------------------------------------------------ data helpers
    @staticmethod
    def _overlay_items(overlays: Any) -> Iterable[tuple[str, Any]]:
        if overlays is None:
            return []
        if hasattr(overlays, "data_vars"):  # xarray.Dataset of dense results
            return [
                (str(k), v)
                for k, v in overlays.data_vars.items()
                if tuple(v.dims) == ("z", "y", "x") and np.dtype(v.dtype).kind in "uib"
            ]
        if isinstance(overlays, Mapping):
            return [(str(k), v) for k, v in overlays.items()]
        return [("labels", overlays)]

    def set_particles(self, particles: pd.DataFrame | None) -> None:
        """Replace the particle markers (DataFrame with z, y, x in voxels; index = ids)."""
        if particles is None:
            particles = pd.DataFrame(columns=["z", "y", "x"])
        missing = {"z", "y", "x"} - set(particles.columns)
        if missing:
            raise InputError(f"particles: missing column(s) {sorted(missing)} (voxels)")
        self._particles = particles[["z", "y", "x"]].astype(float)
        self.markers_version += 1

    def goto(self, z: float, y: float, x: float, highlight: bool = True) -> None:
        """Move all three slices to voxel (z, y, x) and mark it."""
        nz, ny, nx = self.shape
        zi = int(np.clip(round(float(z)), 0, nz - 1))
        yi = int(np.clip(round(float(y)), 0, ny - 1))
        xi = int(np.clip(round(float(x)), 0, nx - 1))
        self.param.update(
            z=zi, y=yi, x=xi, focus=(float(z), float(y), float(x)) if highlight else None
        )

    def slice_array(self, view: str = "xy", source: str | None = None) -> np.ndarray:
        """The current 2-D slice of the tomogram (or overlay ``source``) for view xy/xz/yz.

        xy → (y, x) at ``self.z``; xz → (z, x) at ``self.y``; yz → (y, z) at ``self.x``.
        """
        vol = self.volume if source is None else self.overlays[source][0]
        if view == "xy":
            idx = (self.z, slice(None), slice(None))
        elif view == "xz":
            idx = (slice(None), self.y, slice(None))
        elif view == "yz":
            idx = (slice(None), slice(None), self.x)
        else:
            raise InputError(f"view: expected 'xy', 'xz' or 'yz', got {view!r}")
        pos = {"xy": self.z, "xz": self.y, "yz": self.x}[view]
        out = self._cache.get((source, view, pos), vol, idx)
        return out.T if view == "yz" else out

    def _axes(self, view: str) -> tuple[np.ndarray, np.ndarray, str, str]:
        nz, ny, nx = self.shape
        if view == "xy":
            return np.arange(nx), np.arange(ny), "x", "y"
        if view == "xz":
            return np.arange(nx), np.arange(nz), "x", "z"
        return np.arange(nz), np.arange(ny), "z", "y"

    # ------------------------------------------------------------------ plot callbacks
    def _image(self, view: str, z: int, y: int, x: int, contrast: tuple) -> hv.Image:
        h, v, hn, vn = self._axes(view)
        arr = self.slice_array(view).astype(np.float32, copy=False)
        return hv.Image((h, v, arr), kdims=[hn, vn], vdims=["intensity"]).opts(clim=tuple(contrast))

    def _overlay(self, view: str, source: str, z: int, y: int, x: int, visible: list) -> hv.Image:
        h, v, hn, vn = self._axes(view)
        kind = self.overlays[source][1]
        lab = self.slice_array(view, source)
        if source not in visible:
            arr = np.full(lab.shape, np.nan, dtype=np.float32)
        elif kind == "instances":
            arr = np.where(lab > 0, (lab.astype(np.int64) % len(INSTANCE_COLORS)) + 1, np.nan)
        else:
            arr = np.where(lab > 0, lab.astype(np.float32), np.nan)
        return hv.Image(
            (h, v, arr.astype(np.float32)), kdims=[hn, vn], vdims=[f"{source}"], label=source
        )

    def _markers(self, view: str, z: int, y: int, x: int, show: bool, slab: int, **_: Any):
        df = self._particles
        h_name, v_name = {"xy": ("x", "y"), "xz": ("x", "z"), "yz": ("z", "y")}[view]
        depth, pos = {"xy": ("z", z), "xz": ("y", y), "yz": ("x", x)}[view]
        if show and len(df):
            near = df[(df[depth] - pos).abs() <= slab]
        else:
            near = df.iloc[:0]
        hl = set(map(str, self.highlight))
        is_hl = near.index.astype(str).isin(hl) if len(near) else np.zeros(0, bool)
        cols = [h_name, v_name]
        base = hv.Points(near.loc[~is_hl, cols], kdims=cols).opts(
            color="#00d5ff", size=7, marker="circle", fill_alpha=0.0, line_width=1.5
        )
        sel = hv.Points(near.loc[is_hl, cols], kdims=cols).opts(
            color="#ff2d55", size=10, marker="circle", fill_alpha=0.0, line_width=2.5
        )
        focus = self.focus
        fpts = pd.DataFrame(columns=cols, dtype=float)
        if focus is not None:
            fz, fy, fx = focus
            coords = {"z": fz, "y": fy, "x": fx}
            if abs(coords[depth] - pos) <= max(slab, 1):
                fpts = pd.DataFrame({h_name: [coords[h_name]], v_name: [coords[v_name]]})
        foc = hv.Points(fpts, kdims=cols).opts(
            color="#ffcc00", size=22, marker="cross", line_width=2
        )
        return base * sel * foc

    def _frame_size(self, view: str) -> tuple[int, int]:
        """Screen size (px) of a view: xy is ``width`` wide; xz shares its width, yz its height."""
        nz, ny, nx = self.shape
        w_xy = self.width
        h_xy = int(round(w_xy * ny / nx))
        if h_xy > 1.2 * w_xy:  # tall tomograms: limit the height instead
            h_xy = int(1.2 * w_xy)
            w_xy = int(round(h_xy * nx / ny))
        if view == "xy":
            return w_xy, h_xy
        if view == "xz":
            return w_xy, max(60, int(round(w_xy * nz / nx)))
        return max(60, int(round(h_xy * nz / ny))), h_xy

    def _view(self, view: str) -> hv.Overlay:
        streams_img = [hv.streams.Params(self, ["z", "y", "x", "contrast"])]
        img = hv.DynamicMap(lambda **kw: self._image(view, **kw), streams=streams_img)
        width, height = self._frame_size(view)
        plot = rasterize(img, aggregator="mean", precompute=True).opts(
            cmap=self.cmap,
            colorbar=False,
            frame_width=width,
            frame_height=height,
            invert_yaxis=True,
            tools=["hover"],
            title=f"{self.title} {view}",
            toolbar="above",
            active_tools=["wheel_zoom"],
        )
        plot = plot.apply.opts(cmap=self.param.cmap)
        layers = plot
        for source, (_, kind) in self.overlays.items():
            stream = hv.streams.Params(self, ["z", "y", "x", "visible_overlays"])
            ov = hv.DynamicMap(
                lambda src=source, **kw: self._overlay(
                    view, src, kw["z"], kw["y"], kw["x"], kw["visible_overlays"]
                ),
                streams=[stream],
            )
            if kind == "instances":
                cmap, n = list(INSTANCE_COLORS), len(INSTANCE_COLORS)
            else:
                cmap, n = list(_SEMANTIC_OVERLAY), len(_SEMANTIC_OVERLAY)
            ovr = rasterize(ov, aggregator="first").opts(
                cmap=cmap, clim=(0.5, n + 0.5), colorbar=False, alpha=self.overlay_alpha
            )
            ovr = ovr.apply.opts(alpha=self.param.overlay_alpha)
            layers = layers * ovr
        mstream = hv.streams.Params(
            self,
            ["z", "y", "x", "show_markers", "marker_slab", "highlight", "focus", "markers_version"],
            rename={"show_markers": "show", "marker_slab": "slab"},
        )
        markers = hv.DynamicMap(lambda **kw: self._markers(view, **kw), streams=[mstream])
        return (layers * markers).opts(hv.opts.Overlay(show_legend=False))

    # ------------------------------------------------------------------ layout
    def plots(self) -> dict[str, hv.Overlay]:
        """HoloViews objects of the views (xy, and xz / yz when ``orthogonal``)."""
        ensure_bokeh()
        views = ["xy", "xz", "yz"] if self.orthogonal else ["xy"]
        return {v: self._view(v) for v in views}

    def controls(self) -> pn.Column:
        """The widget column: slice sliders, contrast, colormap, overlays, markers."""
        vmin, vmax = self._vrange
        step = (vmax - vmin) / 500.0 or 1.0
        widgets: dict[str, Any] = {
            "z": {"type": pn.widgets.IntSlider, "name": "z (xy slice)"},
            "contrast": {
                "type": pn.widgets.RangeSlider,
                "start": vmin,
                "end": vmax,
                "step": step,
                "name": "contrast",
            },
            "cmap": {"type": pn.widgets.Select},
            "marker_slab": {"type": pn.widgets.IntInput, "name": "marker slab ± (voxels)"},
            "show_markers": {"type": pn.widgets.Checkbox, "name": "show particles"},
        }
        params = ["z", "contrast", "cmap", "show_markers", "marker_slab"]
        if self.orthogonal:
            widgets["y"] = {"type": pn.widgets.IntSlider, "name": "y (xz slice)"}
            widgets["x"] = {"type": pn.widgets.IntSlider, "name": "x (yz slice)"}
            params[1:1] = ["y", "x"]
        if self.overlays:
            widgets["visible_overlays"] = {"type": pn.widgets.CheckBoxGroup, "name": "overlays"}
            widgets["overlay_alpha"] = {"type": pn.widgets.FloatSlider, "name": "overlay opacity"}
            params += ["visible_overlays", "overlay_alpha"]
        return pn.Param(
            self.param,
            parameters=params,
            widgets=widgets,
            show_name=False,
            width=260,
            css_classes=["cs-viewer-controls"],
        )

    def panel(self) -> pn.viewable.Viewable:
        """The Panel layout (controls + views); display it in a notebook or serve it."""
        if self._layout is None:
            plots = self.plots()
            panes = [pn.pane.HoloViews(p, linked_axes=False) for p in plots.values()]
            if len(panes) == 3:  # xy | yz on top, xz below xy (axes line up)
                views = pn.Column(pn.Row(panes[0], panes[2]), panes[1])
            else:
                views = panes[0]
            self._layout = pn.Row(self.controls(), views, css_classes=["cs-slice-viewer"])
        return self._layout

    def __panel__(self) -> pn.viewable.Viewable:
        return self.panel()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        # Jupyter shows the app inline when the object is the last expression of a cell.
        return self.panel()._repr_mimebundle_(include, exclude)

    def servable(self, title: str = "cryosiam_nb slice viewer") -> pn.viewable.Viewable:
        """Mark the layout servable for ``panel serve``."""
        return self.panel().servable(title=title)


def slice_viewer(
    tomogram: Any,
    overlays: Mapping[str, Any] | Any | None = None,
    particles: pd.DataFrame | None = None,
    **options: Any,
) -> SliceViewer:
    """Interactive orthogonal slice viewer of a tomogram (z, y, x).

    Parameters
    ----------
    tomogram
        ``xarray.DataArray`` with dims (z, y, x) (dask-backed is fine: only the shown slices
        are read), a numpy / dask array, or a path readable by ``cryosiam_nb.io.read``.
    overlays
        Label volumes on the tomogram grid: a dict ``name -> (z, y, x) array`` or an
        ``xarray.Dataset`` (its integer variables are used). Names containing ``"inst"`` or
        32/64-bit integer volumes are drawn as instances (cycling colours), others as
        semantic classes (one colour per class); 0 is transparent.
    particles
        DataFrame with ``z, y, x`` in voxels (index = particle ids) drawn as circles on
        slices within ``marker_slab`` voxels.
    **options
        The other arguments of :class:`SliceViewer`: ``orthogonal`` (default True: also
        show the xz and yz slices, with y / x sliders), ``width`` (default 520: frame width
        in screen pixels of the xy view; the image is rasterized by datashader to the
        screen size, so slices of any size stay responsive), ``name`` (default
        ``"tomogram"``: the title) and starting values of its parameters (``z``, ``y``,
        ``x`` slice indices in voxels, ``contrast``, ``cmap``, ``overlay_alpha``, ...).

    Returns a :class:`SliceViewer`; display it directly in Jupyter or call ``.panel()``.
    """
    return SliceViewer(tomogram, overlays=overlays, particles=particles, **options)
