"""The :class:`Explorer` app: selection, gallery, slice viewer, curation and the UMAP plot.

Export/save live in :mod:`.exporting`, widgets and layout in :mod:`.layout` (mixins of
:class:`Explorer`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from cryosiam_nb import analysis
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.particles.curation import CLUSTER_COLORS_KEY
from cryosiam_nb.pl.curation.boxes import GALLERY_ORDERS, BoxesMixin
from cryosiam_nb.pl.curation.exporting import ExportMixin
from cryosiam_nb.pl.curation.geometry import points_in_box, points_in_lasso
from cryosiam_nb.pl.curation.histograms import HistogramMixin
from cryosiam_nb.pl.curation.layout import LayoutMixin
from cryosiam_nb.pl.curation.markers import CappedViewer
from cryosiam_nb.pl.curation.recluster import ReclusterMixin
from cryosiam_nb.pl.curation.render import (
    COLOR_FIELDS,
    EXCLUDED_COLOR,
    EXCLUDED_LABEL,
    assign_colors,
    extent,
    natural_key,
    render_umap,
)
from cryosiam_nb.pl.curation.session import SessionMixin, session_copy
from cryosiam_nb.pl.viewer import SliceViewer, ensure_bokeh

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

    #: A tomogram: (z, y, x) array, DataArray (voxel size in attrs) or a path to one.
    Volume = np.ndarray | da.Array | xr.DataArray | str | os.PathLike[str]

__all__ = ["Explorer", "explorer"]


def _name_plot(plot: Any, element: Any) -> None:
    # A stable bokeh model name lets browser tests (and users' JS) find the UMAP figure.
    plot.state.name = "cs-umap"


def _slots(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


class Explorer(
    SessionMixin,
    BoxesMixin,
    ExportMixin,
    ReclusterMixin,
    HistogramMixin,
    LayoutMixin,
    param.Parameterized,
):
    """Cluster-curation app over a :class:`~cryosiam_nb.particles.Particles` object.

    Curation actions modify ``particles`` in place, or a private copy with
    ``working_copy=True`` (what the server does for every browser session). Undo stops at
    the state the explorer was opened on. Python methods mirror every button. Build it with
    :func:`explorer` (same arguments, documented there).
    """

    color_by = param.Selector(default="cluster", objects=list(COLOR_FIELDS))
    order = param.Selector(default="centroid", objects=list(GALLERY_ORDERS))
    page = param.Integer(default=0, bounds=(0, None), doc="gallery page (0-based)")
    selection_version = param.Integer(default=0, precedence=-1)
    data_version = param.Integer(default=0, precedence=-1)
    active = param.String(default="", doc="id of the particle shown in the slice viewer")
    status = param.String(default="")
    max_scatter = param.Integer(
        default=20_000,
        doc="selections up to this size are drawn as markers, larger ones datashaded",
    )
    max_average = param.Integer(default=2000, doc="average preview: at most this many boxes")
    seed = param.Integer(default=0, doc="seed of the random gallery order / average sample")

    def __init__(
        self,
        particles: Particles | str | os.PathLike[str],
        tomograms: Mapping[str, Volume] | Volume | None = None,
        color_by: str = "cluster",
        page_size: int = 16,
        thumb_px: int = 64,
        box: int | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        export_path: str | os.PathLike[str] | None = None,
        overlays: Mapping[str, Mapping[str, Volume] | xr.Dataset] | None = None,
        width: int = 620,
        height: int = 520,
        working_copy: bool = False,
        output_dir: str | os.PathLike[str] | None = None,
        autosave: bool = False,
        tomogram: str | None = None,
        max_markers: int = 2000,
        session_label: str | None = None,
        **params: Any,
    ):
        if isinstance(particles, str | os.PathLike):
            particles = Particles.load(particles)
        if not isinstance(particles, Particles):
            raise InputError(
                f"particles: expected a cryosiam_nb Particles object or a path to one, "
                f"got {type(particles).__name__}"
            )
        if "umap" not in particles.obsm:
            raise InputError("particles: obsm['umap'] is missing; run tl.umap(particles) first")
        uv = np.asarray(particles.obsm["umap"], dtype=np.float64)
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise InputError(f"particles: obsm['umap'] must be (N, 2), got {uv.shape}")
        if int(page_size) < 1:
            raise InputError(f"page_size must be >= 1, got {page_size}")
        super().__init__(**params)
        self.particles = session_copy(particles) if working_copy else particles
        self._uv = uv
        self._init_recluster()
        self.page_size = int(page_size)
        self.thumb_px = int(thumb_px)
        self.width, self.height = int(width), int(height)
        self.max_markers = int(max_markers)
        self.tomograms = self._tomogram_dict(tomograms)
        self.overlays = {str(k): v for k, v in (overlays or {}).items()}
        unknown = sorted(set(self.overlays) - set(self.tomograms))
        if unknown:
            raise InputError(
                f"overlays: no tomogram named {unknown} (tomograms: {list(self.tomograms)})"
            )
        if tomogram is not None and str(tomogram) not in self.tomograms:
            raise InputError(f"tomogram: {tomogram!r} is not one of {list(self.tomograms)}")
        self.first_tomogram = str(tomogram) if tomogram is not None else None
        self.shapes = {str(k): tuple(int(s) for s in v) for k, v in (shapes or {}).items()}
        self.box = int(box) if box else self._default_box()
        if export_path is not None and output_dir is None:
            output_dir = Path(export_path).resolve().parent
        self._init_session(output_dir, autosave, session_label)
        self.export_path = str(export_path or self.output_dir / "selection.star")
        obs = self.particles.obs
        if not any(c in obs.columns for c in COLOR_FIELDS):
            obs["cluster"] = "all"
        fields = self._color_fields()
        self.param.color_by.objects = fields
        if color_by not in fields:
            raise InputError(f"color_by: {color_by!r} is not a column of particles.obs ({fields})")
        self.color_by = color_by
        self._sel = np.zeros(0, dtype=np.int64)
        self._order_cache: np.ndarray | None = None
        self._append = False
        self._hidden: dict[str, set[str]] = {}
        self._cat_names: dict[str, list[str]] = {}
        self._viewers: dict[str, SliceViewer] = {}
        self._frame: pd.DataFrame | None = None
        self._color_keys: dict[str, dict[str, str]] = {}
        self._layout: pn.viewable.Viewable | None = None
        self._widgets: dict[str, Any] = {}
        self._rebuild_frame()
        self.param.watch(lambda e: self._rebuild_frame(), ["color_by"], precedence=0)
        self.param.watch(lambda e: self._reorder(), ["order", "seed"], precedence=0)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _tomogram_dict(tomograms: Mapping[str, Volume] | Volume | None) -> dict[str, Volume]:
        if tomograms is None:
            return {}
        if isinstance(tomograms, Mapping):
            return {str(k): v for k, v in tomograms.items()}
        name = getattr(tomograms, "name", None) or "tomogram"
        return {str(name): tomograms}

    def _default_box(self) -> int:
        if "subtomograms" in self.particles.obsm:
            return int(self.particles.obsm.shape("subtomograms")[1])
        return int(self.particles.uns.get("box", 32))

    def _color_fields(self) -> list[str]:
        """obs columns to colour by: :data:`COLOR_FIELDS` first, then any other column."""
        cols = [str(c) for c in self.particles.obs.columns]
        skip = {"z", "y", "x", "excluded", "particle_id"}
        return [c for c in COLOR_FIELDS if c in cols] + [
            c for c in cols if c not in COLOR_FIELDS and c not in skip
        ]

    def _is_numeric(self, field: str) -> bool:
        s = self.particles.obs[field]
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            return False
        return pd.api.types.is_float_dtype(s) or s.nunique() > 40

    # ------------------------------------------------------------------ data frame for plots
    def _rebuild_frame(self) -> None:
        """Plot table: ``u, v`` and the colour-by column (categories keyed to stable colours)."""
        obs = self.particles.obs
        f = self.color_by
        if f not in obs.columns:  # e.g. a column an undo removed
            self.param.color_by.objects = fields = self._color_fields()
            f = self.color_by = fields[0]
            return  # the watcher on color_by rebuilt the frame
        excluded = (
            obs["excluded"].to_numpy(dtype=bool)
            if "excluded" in obs.columns
            else np.zeros(len(obs), bool)
        )
        data: dict[str, Any] = {"u": self._uv[:, 0], "v": self._uv[:, 1]}
        if self._is_numeric(f):
            vals = obs[f].to_numpy(dtype=np.float64)
            data[f] = np.where(excluded, np.nan, vals)
            self._color_keys.pop(f, None)
        else:
            raw = obs[f].astype("string").fillna("(none)").to_numpy(dtype=object)
            present = sorted({str(c) for c in pd.unique(raw)}, key=natural_key)
            if f == "cluster":
                colors = self.particles.uns.setdefault(CLUSTER_COLORS_KEY, {})
            else:
                colors = self._color_keys.setdefault(f"_all:{f}", {})
            assign_colors(colors, present)
            vals = np.where(excluded, EXCLUDED_LABEL, raw)
            cats = sorted({str(c) for c in pd.unique(vals)} - {EXCLUDED_LABEL}, key=natural_key)
            key = {c: colors[c] for c in cats}
            if excluded.any():
                cats.append(EXCLUDED_LABEL)
                key[EXCLUDED_LABEL] = EXCLUDED_COLOR
            # datashader compiles its count_cat kernel per *set of category names* (seconds):
            # the plot column holds slot names "k0", "k1", ... (codes into ``cats``), padded
            # to a power of two (≥ 32), so curation edits never trigger a recompile.
            n_slots = max(32, 1 << (len(cats) - 1).bit_length())
            codes = pd.Categorical(vals, categories=cats).codes
            data[f] = pd.Categorical.from_codes(codes, categories=_slots(n_slots))
            self._cat_names[f] = cats
            self._color_keys[f] = key
        self._frame = pd.DataFrame(data)

    def category_codes(self, field: str) -> np.ndarray:
        """Per-particle category codes of a categorical colour field (index into its names)."""
        return np.asarray(self._frame[field].cat.codes)

    def category_counts(self, field: str) -> dict[str, int]:
        """``{category: number of particles}`` of a categorical colour field."""
        names = self._cat_names[field]
        counts = np.bincount(self.category_codes(field), minlength=len(names))
        return dict(zip(names, counts[: len(names)].tolist()))

    def _codes_of(self, field: str, names: Any) -> list[int]:
        idx = {c: i for i, c in enumerate(self._cat_names.get(field, []))}
        return [idx[n] for n in names if n in idx]

    # ------------------------------------------------------------------ selection
    @property
    def selection(self) -> np.ndarray:
        """Row positions of the current selection (int64, ascending)."""
        return self._sel

    @property
    def selected_ids(self) -> list[str]:
        """Particle ids of the current selection (obs order)."""
        return self.particles.obs.index[self._sel].tolist()

    def _set_selection(self, pos: np.ndarray, how: str, add: bool = False) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64)
        self._sel = np.union1d(self._sel, pos) if add else np.unique(pos)
        self._order_cache = None
        verb = "added" if add else "selected"
        with pn.io.hold():
            self.page = 0
            self.selection_version += 1
            self.status = f"{len(self._sel)} particle(s) selected ({how}, {verb} {len(pos)})"
        return self._sel

    def _reorder(self) -> None:
        self._order_cache = None
        self.page = 0
        self.selection_version += 1

    def select_box(
        self, x0: float, y0: float, x1: float, y1: float, add: bool = False
    ) -> np.ndarray:
        """Select particles whose UMAP coordinates lie in the box (``add``: union with the
        current selection); returns row positions."""
        return self._set_selection(points_in_box(self._uv, (x0, y0, x1, y1)), "box", add)

    def select_lasso(
        self, polygon: np.ndarray | Sequence[Sequence[float]], add: bool = False
    ) -> np.ndarray:
        """Select particles inside a lasso ``polygon`` (M, 2) in UMAP units."""
        return self._set_selection(points_in_lasso(self._uv, polygon), "lasso", add)

    def select_ids(self, ids: Sequence[str] | np.ndarray, add: bool = False) -> np.ndarray:
        """Select particles by id (or boolean mask / row positions)."""
        return self._set_selection(self.particles._positions(ids, "selection"), "ids", add)

    def select_clusters(self, names: Sequence[str], add: bool = False) -> np.ndarray:
        """Select all particles of the given clusters."""
        names = self.particles._require_clusters(names)
        mask = self.particles.obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False)
        return self._set_selection(np.flatnonzero(mask), "clusters", add)

    def clear_selection(self) -> None:
        """Select nothing."""
        self._set_selection(np.zeros(0, np.int64), "cleared")

    def find(self, pid: str) -> SliceViewer | None:
        """Search by particle id: select it, mark it on the UMAP and show it in the viewer."""
        pid = str(pid).strip()
        if pid not in self.particles.obs.index:
            raise InputError(f"no particle with id {pid!r}")
        self.select_ids([pid])
        return self.show_particle(pid)

    # ------------------------------------------------------------------ slice viewer
    def _viewer(self, tomogram: str) -> SliceViewer:
        if tomogram not in self._viewers:
            if tomogram not in self.tomograms:
                raise InputError(
                    f"tomogram {tomogram!r} was not given (have {list(self.tomograms)})"
                )
            v = CappedViewer(
                self.tomograms[tomogram],
                overlays=self.overlays.get(tomogram),
                name=tomogram,
                width=420,
                max_markers=self.max_markers,
            )
            obs = self.particles.obs
            v.set_particles(obs.loc[obs["tomogram"].astype(str) == tomogram, ["z", "y", "x"]])
            self._viewers[tomogram] = v
        return self._viewers[tomogram]

    def show_particle(self, pid: str) -> SliceViewer | None:
        """Jump the slice viewer to particle ``pid`` and mark it on the UMAP (returns the
        viewer, None without tomograms)."""
        pid = str(pid)
        if pid not in self.particles.obs.index:
            raise InputError(f"unknown particle id {pid!r}")
        row = self.particles.obs.loc[pid]
        tomo = str(row["tomogram"])
        with pn.io.hold():
            self.active = pid
            if "gallery" in self._widgets:
                self._widgets["gallery"].active = pid
            self.status = (
                f"particle {pid} ({row['cluster'] if 'cluster' in row else ''}): tomogram "
                f"{tomo}, z {row.z:.0f}, y {row.y:.0f}, x {row.x:.0f} (voxels)"
            )
            if tomo not in self.tomograms:
                return None
            if "tomogram" in self._widgets and self._widgets["tomogram"].value != tomo:
                self._widgets["tomogram"].value = tomo
            v = self._viewer(tomo)
            v.goto(row.z, row.y, row.x)
        return v

    def _update_viewer_highlight(self) -> None:
        obs = self.particles.obs
        sel = obs.iloc[self._sel[:5000]]
        for name, v in self._viewers.items():
            v.highlight = sel.index[sel["tomogram"].astype(str) == name].tolist()

    # ------------------------------------------------------------------ curation
    def _after_edit(self, message: str) -> None:
        self._rebuild_frame()
        self._order_cache = None
        with pn.io.hold():  # legend, header, status, plot and gallery change together
            self.data_version += 1
            self.selection_version += 1  # gallery labels may change
            self.status = message
        self._autosave_safely()

    def _autosave_safely(self) -> None:
        try:
            self.autosave_now()
        except OSError as err:
            self.status = f"{self.status} (⚠ autosave failed: {err})"

    def clusters(self) -> list[str]:
        """Current cluster names."""
        return self.particles.clusters()

    def rename(self, old: str, new: str) -> None:
        """Rename cluster ``old`` to ``new``."""
        self.particles.rename_cluster(old, new)
        self._after_edit(f"renamed cluster {old!r} → {new!r}")

    def annotate(self, name: str, text: str) -> None:
        """Attach a free-text annotation to cluster ``name``."""
        self.particles.annotate_cluster(name, text)
        self._after_edit(f"annotated cluster {name!r}: {text}")

    def merge(self, names: Sequence[str], into: str | None = None) -> str:
        """Merge clusters ``names`` (≥ 2) into ``into`` (default: the first)."""
        out = self.particles.merge_clusters(list(names), into=into or None)
        self._after_edit(f"merged {list(names)} into {out!r}")
        return out

    def split_selection(self, k: int | None = None, seed: int = 0) -> list[str]:
        """Re-cluster the selected particles in place (:func:`cryosiam_nb.analysis.split`)."""
        names = analysis.split(self.particles, self.selected_ids, k=k, seed=seed)
        self._after_edit(f"split {len(self._sel)} particle(s) into {names}")
        return names

    def exclude_selection(self) -> int:
        """Flag the selected particles as excluded."""
        n = self.particles.exclude(self.selected_ids)
        self._after_edit(f"excluded {n} particle(s)")
        return n

    def include_selection(self) -> int:
        """Clear the excluded flag of the selected particles."""
        n = self.particles.include(self.selected_ids)
        self._after_edit(f"re-included {n} particle(s)")
        return n

    def undo(self) -> dict[str, Any]:
        """Undo the last curation action of this session (never the pipeline's steps)."""
        entry = self.particles.undo(floor=self._floor)
        self._leave_subset_if_undone()
        self._after_edit(f"undid {entry['action']}")
        return entry

    # ------------------------------------------------------------------ UMAP plot
    def _umap_frame(self, x_range=None, y_range=None, width=None, height=None, **_: Any) -> hv.RGB:
        f = self.color_by
        if x_range is not None and y_range is not None:  # the view a re-embed fits into
            self._view_range = (tuple(x_range), tuple(y_range))
        hidden = self._hidden.get(f)
        rows = None
        if hidden and f in self._cat_names:
            rows = np.flatnonzero(~np.isin(self.category_codes(f), self._codes_of(f, hidden)))
        key = None
        if f in self._cat_names:
            key = {f"k{i}": self._color_keys[f][c] for i, c in enumerate(self._cat_names[f])}
        return render_umap(
            self._frame,
            f,
            key,
            x_range=x_range or self._data_range(0),
            y_range=y_range or self._data_range(1),
            width=width or self.width,
            height=height or self.height,
            rows=rows,
        )

    def _selection_frame(self, x_range=None, y_range=None, width=None, height=None, **_: Any):
        """Selected points datashaded in black when there are many (else an empty image)."""
        xr = tuple(x_range or self._data_range(0))
        yr = tuple(y_range or self._data_range(1))
        if len(self._sel) <= self.max_scatter:
            empty = np.zeros((2, 2, 4), np.uint8)
            return hv.RGB(empty, bounds=(xr[0], yr[0], xr[1], yr[1]), kdims=["u", "v"])
        rgb = render_umap(
            self._frame,
            None,
            x_range=xr,
            y_range=yr,
            width=width or self.width,
            height=height or self.height,
            rows=self._sel,
            spread=False,
        )
        return rgb

    def _selection_points(self, **_: Any) -> hv.Points:
        """Selected points as outlined markers (only while ``len(selection) <= max_scatter``)."""
        if len(self._sel) > self.max_scatter:
            return hv.Points(self._frame.iloc[:0], kdims=["u", "v"], vdims=[])
        return hv.Points(self._frame.iloc[self._sel], kdims=["u", "v"], vdims=[])

    def _active_point(self, **_: Any) -> hv.Points:
        """The particle shown in the slice viewer (a thumbnail click / search), as a cross."""
        pos = self.particles.obs.index.get_indexer([self.active]) if self.active else [-1]
        rows = self._frame.iloc[[int(pos[0])]] if pos[0] >= 0 else self._frame.iloc[:0]
        return hv.Points(rows, kdims=["u", "v"], vdims=[])

    def _data_range(self, axis: int) -> tuple[float, float]:
        return extent(self._uv[:, axis])

    def umap_plot(self) -> hv.DynamicMap:
        """The datashaded UMAP (HoloViews DynamicMap) with box/lasso selection streams."""
        ensure_bokeh()
        rng = hv.streams.RangeXY()
        size = hv.streams.PlotSize()
        params = hv.streams.Params(self, ["color_by", "data_version"])
        dmap = hv.DynamicMap(
            lambda x_range=None, y_range=None, width=None, height=None, **kw: self._umap_frame(
                x_range, y_range, width, height
            ),
            streams=[rng, size, params],
        )
        sel_params = hv.streams.Params(self, ["selection_version"])
        sel = hv.DynamicMap(
            lambda x_range=None, y_range=None, width=None, height=None, **kw: self._selection_frame(
                x_range, y_range, width, height
            ),
            streams=[hv.streams.RangeXY(source=dmap), hv.streams.PlotSize(), sel_params],
        ).opts(alpha=0.5)
        sel_pts = hv.DynamicMap(
            self._selection_points, streams=[hv.streams.Params(self, ["selection_version"])]
        ).opts(
            hv.opts.Points(
                color="black",
                fill_alpha=0.0,
                size=7,
                line_width=1.5,
                tools=[],
                nonselection_alpha=1.0,
            )
        )
        active = hv.DynamicMap(
            self._active_point, streams=[hv.streams.Params(self, ["active", "data_version"])]
        ).opts(
            hv.opts.Points(
                color="#ff9900", marker="x", size=18, line_width=3, tools=[], nonselection_alpha=1
            )
        )
        self._bounds = hv.streams.BoundsXY(source=dmap, bounds=(0, 0, 0, 0))
        self._lasso = hv.streams.Lasso(source=dmap)
        self._bounds.add_subscriber(self._on_bounds)
        self._lasso.add_subscriber(self._on_lasso)
        xr, yr = self._data_range(0), self._data_range(1)
        plot = (dmap * sel * sel_pts * active).opts(
            hv.opts.RGB(
                frame_width=self.width,
                frame_height=self.height,
                xlim=xr,
                ylim=yr,
                tools=["box_select", "lasso_select"],
                active_tools=["box_select", "wheel_zoom"],
                xlabel="UMAP 1",
                ylabel="UMAP 2",
                toolbar="above",
                hooks=[_name_plot],
                show_legend=False,
            ),
            hv.opts.Overlay(show_legend=False),
        )
        return plot

    @staticmethod
    def _when_loaded(fn: Callable[[], Any]) -> None:
        """Run ``fn`` now or, in a served session whose page has not finished loading, once
        it has.

        Panel (1.9.4) drops the model changes made in a hold before the session counts as
        connected, expecting a full document to follow, but the browser already has the
        page; a later change that refers to a model created then ("reference … isn't
        known") froze the page. A drag in the first second after the UMAP appeared did it.
        """
        if not pn.state.loaded:  # True outside a served session (Jupyter, plain Python)
            pn.state.onload(fn)
        else:
            fn()

    def _on_bounds(self, bounds: Any = None, **_: Any) -> None:
        if bounds is None:
            return
        x0, y0, x1, y1 = bounds
        if x0 == x1 and y0 == y1:
            return
        add = self._append
        self._when_loaded(lambda: self.select_box(x0, y0, x1, y1, add=add))

    def _on_lasso(self, geometry: Any = None, **_: Any) -> None:
        if geometry is None or len(geometry) < 3:
            return
        polygon, add = np.asarray(geometry), self._append
        self._when_loaded(lambda: self.select_lasso(polygon, add=add))


def explorer(
    particles: Particles | str | os.PathLike[str],
    tomograms: Mapping[str, Volume] | Volume | None = None,
    color_by: str = "cluster",
    page_size: int = 16,
    **kwargs: Any,
) -> Explorer:
    """Build the cluster-curation app for ``particles``.

    Display the returned object in Jupyter (it has ``__panel__``) or call ``.servable()``;
    every button also has a Python method (``select_box``, ``merge``, ``export``, ...).

    Parameters
    ----------
    particles
        :class:`cryosiam_nb.particles.Particles` (or the path of a saved store) with
        ``obsm['umap']`` (N, 2) and, ideally, ``obs['cluster']`` and ``obsm['subtomograms']``
        (N, B, B, B; axis order z, y, x) for thumbnails. Curation modifies it in place.
    tomograms
        ``{name: tomogram}`` ((z, y, x) array, DataArray or path) matching ``obs['tomogram']``:
        enables the slice viewer, and thumbnails cut around the particle centres (voxels,
        z, y, x) when there are no stored subtomograms. A single tomogram is named after its
        ``.name`` (or ``"tomogram"``).
    color_by
        Initial colouring: any ``obs`` column (``cluster``, ``species``, ``size_category``,
        ``score`` first); categories get stable colours (clusters: ``uns["cluster_colors"]``,
        kept through renames, merges, splits and exclusions), numeric columns viridis.
    page_size
        Thumbnails per gallery page.
    **kwargs
        Passed to :class:`Explorer`: ``thumb_px`` (thumbnail edge, pixels), ``box``
        (thumbnail / average box edge, voxels; default the stored subtomograms' or
        ``uns['box']`` or 32), ``shapes`` (``{tomogram: (nz, ny, nx)}`` voxels, for RELION 5
        export), ``export_path`` (default export file name), ``overlays`` (``{tomogram name:
        {overlay name: label volume}}`` or an ``xarray.Dataset`` per tomogram, drawn in the
        slice viewer), ``width``, ``height`` (UMAP plot size, pixels), ``max_scatter``,
        ``working_copy`` (curate a copy, not ``particles`` itself; the server does this per
        browser session), ``output_dir`` (the only folder the UI writes to; default the
        working directory), ``autosave`` (rewrite ``output_dir/.autosave/session-*.parquet``
        after every edit and offer to restore another session's), ``tomogram`` (shown first),
        ``max_markers`` (slice-viewer markers per view, default 2000), ``order``
        (``"centroid"``, ``"random"`` or ``"table"`` gallery order), ``seed``,
        ``max_average`` (average preview: at most this many boxes, a seeded sample).

    Returns
    -------
    Explorer
        The app (not yet laid out; ``.panel()`` builds the layout once).

    Raises
    ------
    InputError
        No ``obsm['umap']``, not a Particles object, ``color_by`` not a column, overlays
        or ``tomogram`` naming unknown tomograms.
    """
    return Explorer(
        particles, tomograms=tomograms, color_by=color_by, page_size=page_size, **kwargs
    )
