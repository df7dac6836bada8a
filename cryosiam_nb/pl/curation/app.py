"""The :class:`Explorer` app: selection, gallery, slice viewer, curation and the UMAP plot.

Export/save live in :mod:`.exporting`, widgets and layout in :mod:`.layout` (mixins of
:class:`Explorer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
from cryosiam_nb.pl.curation.exporting import ExportMixin
from cryosiam_nb.pl.curation.geometry import points_in_box, points_in_lasso
from cryosiam_nb.pl.curation.layout import LayoutMixin
from cryosiam_nb.pl.curation.render import (
    COLOR_FIELDS,
    EXCLUDED_COLOR,
    EXCLUDED_LABEL,
    extent,
    natural_key,
    palette,
    render_umap,
)
from cryosiam_nb.pl.curation.thumbnails import central_views, thumbnail_png
from cryosiam_nb.pl.viewer import SliceViewer, ensure_bokeh
from cryosiam_nb.segmentation.subtomograms import crop_box

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

    #: A tomogram: (z, y, x) array, DataArray (voxel size in attrs) or a path to one.
    Volume = np.ndarray | da.Array | xr.DataArray | str | os.PathLike[str]

__all__ = ["Explorer", "explorer"]


def _name_plot(plot: Any, element: Any) -> None:
    # A stable bokeh model name lets browser tests (and users' JS) find the UMAP figure.
    plot.state.name = "cs-umap"


class Explorer(ExportMixin, LayoutMixin, param.Parameterized):
    """Cluster-curation app over a :class:`~cryosiam_nb.particles.Particles` object.

    The Particles object is modified in place by curation actions (use ``.particles.undo()``
    or the Undo button to revert). Python methods mirror every button. Build it with
    :func:`explorer` (same arguments, documented there).
    """

    color_by = param.Selector(default="cluster", objects=list(COLOR_FIELDS))
    page = param.Integer(default=0, bounds=(0, None), doc="gallery page (0-based)")
    selection_version = param.Integer(default=0, precedence=-1)
    data_version = param.Integer(default=0, precedence=-1)
    status = param.String(default="")
    max_scatter = param.Integer(
        default=20_000,
        doc="selections up to this size are drawn as markers, larger ones datashaded",
    )

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
        self.particles = particles
        self._uv = uv
        self.page_size = int(page_size)
        self.thumb_px = int(thumb_px)
        self.width, self.height = int(width), int(height)
        self.tomograms = self._tomogram_dict(tomograms)
        self.overlays = {str(k): v for k, v in (overlays or {}).items()}
        unknown = sorted(set(self.overlays) - set(self.tomograms))
        if unknown:
            raise InputError(
                f"overlays: no tomogram named {unknown} (tomograms: {list(self.tomograms)})"
            )
        self.shapes = {str(k): tuple(int(s) for s in v) for k, v in (shapes or {}).items()}
        self.box = int(box) if box else self._default_box()
        self.export_path = str(export_path or Path.cwd() / "selection.star")
        fields = [c for c in COLOR_FIELDS if c in particles.obs.columns]
        if not fields:
            particles.obs["cluster"] = "all"
            fields = ["cluster"]
        self.param.color_by.objects = fields
        if color_by not in fields:
            raise InputError(f"color_by: {color_by!r} is not a column of particles.obs ({fields})")
        self.color_by = color_by
        self._sel = np.zeros(0, dtype=np.int64)
        self._viewers: dict[str, SliceViewer] = {}
        self._frame: pd.DataFrame | None = None
        self._color_keys: dict[str, dict[str, str]] = {}
        self._layout: pn.viewable.Viewable | None = None
        self._widgets: dict[str, Any] = {}
        self._rebuild_frame()

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

    # ------------------------------------------------------------------ data frame for plots
    def _rebuild_frame(self) -> None:
        obs = self.particles.obs
        excluded = (
            obs["excluded"].to_numpy(dtype=bool)
            if "excluded" in obs.columns
            else np.zeros(len(obs), bool)
        )
        data: dict[str, Any] = {"u": self._uv[:, 0], "v": self._uv[:, 1]}
        self._color_keys = {}
        for f in self.param.color_by.objects:
            if f == "score":
                data["score"] = obs["score"].to_numpy(dtype=np.float64)
                continue
            vals = obs[f].astype("string").fillna("(none)").to_numpy(dtype=object)
            vals = np.where(excluded, EXCLUDED_LABEL, vals)
            cats = sorted({str(c) for c in pd.unique(vals)} - {EXCLUDED_LABEL}, key=natural_key)
            cols = palette(len(cats))
            key = dict(zip(cats, cols))
            if excluded.any():
                cats.append(EXCLUDED_LABEL)
                key[EXCLUDED_LABEL] = EXCLUDED_COLOR
            data[f] = pd.Categorical(vals, categories=cats)
            self._color_keys[f] = key
        self._frame = pd.DataFrame(data)

    # ------------------------------------------------------------------ selection
    @property
    def selection(self) -> np.ndarray:
        """Row positions of the current selection (int64, ascending)."""
        return self._sel

    @property
    def selected_ids(self) -> list[str]:
        """Particle ids of the current selection (obs order)."""
        return self.particles.obs.index[self._sel].tolist()

    def _set_selection(self, pos: np.ndarray, how: str) -> np.ndarray:
        self._sel = np.unique(np.asarray(pos, dtype=np.int64))
        self.page = 0
        self.selection_version += 1
        self.status = f"{len(self._sel)} particle(s) selected ({how})"
        return self._sel

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Select particles whose UMAP coordinates lie in the box; returns row positions."""
        return self._set_selection(points_in_box(self._uv, (x0, y0, x1, y1)), "box")

    def select_lasso(self, polygon: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Select particles inside a lasso ``polygon`` (M, 2) in UMAP units."""
        return self._set_selection(points_in_lasso(self._uv, polygon), "lasso")

    def select_ids(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Select particles by id (or boolean mask / row positions)."""
        return self._set_selection(self.particles._positions(ids, "selection"), "ids")

    def select_clusters(self, names: Sequence[str]) -> np.ndarray:
        """Select all particles of the given clusters."""
        names = self.particles._require_clusters(names)
        mask = self.particles.obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False)
        return self._set_selection(np.flatnonzero(mask), "clusters")

    def clear_selection(self) -> None:
        """Select nothing."""
        self._set_selection(np.zeros(0, np.int64), "cleared")

    # ------------------------------------------------------------------ gallery
    @property
    def n_pages(self) -> int:
        """Number of gallery pages for the current selection (≥ 1)."""
        return max(1, -(-len(self._sel) // self.page_size))

    def page_ids(self, page: int | None = None) -> list[str]:
        """Particle ids shown on gallery ``page`` (default: the current page)."""
        page = self.page if page is None else int(page)
        if page < 0 or page >= self.n_pages:
            raise InputError(f"page must be in 0..{self.n_pages - 1}, got {page}")
        pos = self._sel[page * self.page_size : (page + 1) * self.page_size]
        return self.particles.obs.index[pos].tolist()

    def subtomogram(self, pid: str) -> np.ndarray:
        """(B, B, B) box around particle ``pid`` (from obsm['subtomograms'] or the tomogram)."""
        return self._boxes([pid])[0]

    def _boxes(self, ids: Sequence[str]) -> np.ndarray:
        pos = self.particles._positions(list(ids), "gallery ids")
        if "subtomograms" in self.particles.obsm:
            order = np.argsort(pos)
            lazy = self.particles.obsm.lazy("subtomograms")
            got = np.asarray(lazy[pos[order]].compute(), dtype=np.float32)
            out = np.empty_like(got)
            out[order] = got
            return out
        obs = self.particles.obs
        boxes = []
        for p in pos:
            row = obs.iloc[int(p)]
            tomo = str(row["tomogram"])
            if tomo not in self.tomograms:
                raise InputError(
                    f"no subtomograms in particles.obsm and no tomogram {tomo!r} given: pass "
                    f"tomograms={{'{tomo}': <array or path>}} to show thumbnails"
                )
            centre = (row.z, row.y, row.x)
            boxes.append(crop_box(self._viewer(tomo).volume, centre, self.box))
        if not boxes:
            return np.zeros((0, self.box, self.box, self.box), np.float32)
        return np.stack(boxes).astype(np.float32, copy=False)

    def gallery_items(self, page: int | None = None) -> list[dict[str, Any]]:
        """Thumbnails of a gallery page: dicts ``id, xy, xz`` (PNG data URIs), ``label``."""
        ids = self.page_ids(page)
        if not ids:
            return []
        obs = self.particles.obs
        try:
            boxes = self._boxes(ids)
        except InputError as err:
            self.status = str(err)
            boxes = None
        items = []
        for i, pid in enumerate(ids):
            row = obs.loc[pid]
            if boxes is not None:
                xy, xz = central_views(boxes[i])
                xy_png, xz_png = thumbnail_png(xy, self.thumb_px), thumbnail_png(xz, self.thumb_px)
            else:
                blank = np.zeros((4, 4), np.float32)
                xy_png = xz_png = thumbnail_png(blank, self.thumb_px)
            label = str(row["cluster"]) if "cluster" in obs.columns else str(row["tomogram"])
            items.append(
                {
                    "id": str(pid),
                    "xy": xy_png,
                    "xz": xz_png,
                    "label": label,
                    "excluded": bool(row["excluded"]) if "excluded" in obs.columns else False,
                }
            )
        return items

    # ------------------------------------------------------------------ slice viewer
    def _viewer(self, tomogram: str) -> SliceViewer:
        if tomogram not in self._viewers:
            if tomogram not in self.tomograms:
                raise InputError(
                    f"tomogram {tomogram!r} was not given (have {list(self.tomograms)})"
                )
            v = SliceViewer(
                self.tomograms[tomogram],
                overlays=self.overlays.get(tomogram),
                name=tomogram,
                width=420,
            )
            obs = self.particles.obs
            v.set_particles(obs.loc[obs["tomogram"].astype(str) == tomogram, ["z", "y", "x"]])
            self._viewers[tomogram] = v
        return self._viewers[tomogram]

    def show_particle(self, pid: str) -> SliceViewer | None:
        """Jump the slice viewer to particle ``pid`` (returns the viewer, None without tomograms)."""
        pid = str(pid)
        if pid not in self.particles.obs.index:
            raise InputError(f"unknown particle id {pid!r}")
        row = self.particles.obs.loc[pid]
        self.status = f"particle {pid}: tomogram {row['tomogram']}, z {row.z:.0f}, y {row.y:.0f}, x {row.x:.0f} (voxels)"
        tomo = str(row["tomogram"])
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
        self.data_version += 1
        self.selection_version += 1  # gallery labels may change
        self.status = message

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
        """Re-cluster the selected particles (:func:`cryosiam_nb.analysis.split`)."""
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
        """Undo the last curation action."""
        entry = self.particles.undo()
        self._after_edit(f"undid {entry['action']}")
        return entry

    # ------------------------------------------------------------------ UMAP plot
    def _umap_frame(self, x_range=None, y_range=None, width=None, height=None, **_: Any) -> hv.RGB:
        return render_umap(
            self._frame,
            self.color_by,
            self._color_keys.get(self.color_by),
            x_range=x_range or self._data_range(0),
            y_range=y_range or self._data_range(1),
            width=width or self.width,
            height=height or self.height,
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
        self._bounds = hv.streams.BoundsXY(source=dmap, bounds=(0, 0, 0, 0))
        self._lasso = hv.streams.Lasso(source=dmap)
        self._bounds.add_subscriber(self._on_bounds)
        self._lasso.add_subscriber(self._on_lasso)
        xr, yr = self._data_range(0), self._data_range(1)
        plot = (dmap * sel * sel_pts).opts(
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

    def _on_bounds(self, bounds: Any = None, **_: Any) -> None:
        if bounds is None:
            return
        x0, y0, x1, y1 = bounds
        if x0 == x1 and y0 == y1:
            return
        self.select_box(x0, y0, x1, y1)

    def _on_lasso(self, geometry: Any = None, **_: Any) -> None:
        if geometry is None or len(geometry) < 3:
            return
        self.select_lasso(np.asarray(geometry))


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
        Initial colouring: ``cluster``, ``species``, ``size_category`` or ``score``.
    page_size
        Thumbnails per gallery page.
    **kwargs
        Passed to :class:`Explorer`: ``thumb_px`` (thumbnail edge, pixels), ``box``
        (thumbnail box edge, voxels; default the stored subtomograms' or ``uns['box']`` or 32),
        ``shapes`` (``{tomogram: (nz, ny, nx)}`` voxels, for RELION 5 export),
        ``export_path``, ``overlays`` (``{tomogram name: {overlay name: label volume}}`` or an
        ``xarray.Dataset`` per tomogram, drawn in the slice viewer), ``width``, ``height``
        (UMAP plot size, pixels), ``max_scatter``.

    Returns
    -------
    Explorer
        The app (not yet laid out; ``.panel()`` builds the layout once).

    Raises
    ------
    InputError
        No ``obsm['umap']``, not a Particles object, ``color_by`` not a column, overlays
        naming unknown tomograms.
    """
    return Explorer(
        particles, tomograms=tomograms, color_by=color_by, page_size=page_size, **kwargs
    )
