"""The UMAP cluster-curation app (Panel + HoloViews + datashader).

``explorer(particles, tomograms=...)`` returns an :class:`Explorer`. Display it in
JupyterLab (it has ``__panel__``) or serve it::

    python -m cryosiam_nb.pl.explorer particles.zarr --tomogram tomo1=tomo1.mrc

The UMAP scatter is aggregated server-side by datashader at screen resolution, so
millions of particles stay smooth. Box / lasso selections are resolved server-side over
the full data (vectorised numpy / ``matplotlib.path``) into particle ids, shown as a paged
gallery of subtomogram thumbnails (central xy and xz slices) and as markers in the
tomogram slice viewer. Curation (rename, annotate, merge, split, exclude, undo) calls the
:class:`cryosiam_nb.particles.Particles` methods; export uses :mod:`cryosiam_nb.export`.

Every UI action has a Python method (``select_box``, ``select_lasso``, ``merge``,
``split_selection``, ``exclude_selection``, ``undo``, ``export``, ``save``...), so the app
can be scripted and tested without a browser. Coordinates: UMAP units for selections,
voxels (z, y, x) for particle centres, Å for voxel sizes.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datashader as ds
import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from cryosiam_nb.io import InputError
from cryosiam_nb.pl.viewer import SliceViewer, ensure_bokeh

__all__ = [
    "Explorer",
    "explorer",
    "Gallery",
    "EXPORT_FORMATS",
    "points_in_box",
    "points_in_lasso",
    "thumbnail_png",
    "render_umap",
    "main",
]

# label → (writer name, default file suffix)
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "STAR (RELION 3/4 + Warp)": ("relion4", ".star"),
    "STAR (RELION 5)": ("relion5", ".star"),
    "CSV (Å)": ("csv", ".csv"),
    "copick JSON": ("copick", ""),
}
_FORMAT_ALIASES = {
    "relion4": "relion4",
    "relion3": "relion4",
    "warp": "relion4",
    "star": "relion4",
    "relion5": "relion5",
    "csv": "csv",
    "copick": "copick",
}
COLOR_FIELDS = ("cluster", "species", "size_category", "score")
EXCLUDED_LABEL = "(excluded)"
_EXCLUDED_COLOR = "#c8c8c8"
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#393b79",
    "#ad494a",
    "#637939",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#843c39",
    "#d6616b",
    "#8ca252",
)


def _palette(n: int) -> list[str]:
    """``n`` distinct colours (the 20 above, then colorcet's glasbey when available)."""
    if n <= len(_PALETTE):
        return list(_PALETTE[:n])
    try:
        import colorcet  # noqa: PLC0415

        extra = list(colorcet.glasbey_dark)
    except ImportError:  # pragma: no cover - colorcet ships with datashader
        extra = []
    cols = list(_PALETTE) + extra
    return [cols[i % len(cols)] for i in range(n)]


# ---------------------------------------------------------------------- selection geometry
def points_in_box(uv: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Row positions of 2-D points ``uv`` (N, 2) inside ``bounds = (x0, y0, x1, y1)`` (inclusive)."""
    x0, y0, x1, y1 = (float(b) for b in bounds)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    u, v = uv[:, 0], uv[:, 1]
    return np.flatnonzero((u >= x0) & (u <= x1) & (v >= y0) & (v <= y1))


def points_in_lasso(uv: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Row positions of 2-D points ``uv`` (N, 2) inside the closed ``polygon`` (M, 2).

    Points are first filtered by the polygon's bounding box, then tested with
    ``matplotlib.path.Path.contains_points`` (vectorised C code).
    """
    from matplotlib.path import Path as MplPath  # noqa: PLC0415

    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    poly = poly[np.all(np.isfinite(poly), axis=1)]
    if len(poly) < 3:
        return np.zeros(0, dtype=np.int64)
    cand = points_in_box(uv, (*poly.min(0), *poly.max(0)))
    if cand.size == 0:
        return cand
    inside = MplPath(poly).contains_points(np.asarray(uv[cand], dtype=np.float64))
    return cand[inside]


# ---------------------------------------------------------------------- thumbnails
def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(finite, [1, 99])
    if hi <= lo:
        hi = lo + 1e-6
    out = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0, 1)
    return (out * 255).astype(np.uint8)


def thumbnail_png(img: np.ndarray, size: int = 72) -> str:
    """A 2-D image as a ``data:image/png;base64`` URI (1–99 % contrast, nearest upscale)."""
    from PIL import Image  # noqa: PLC0415 - Pillow ships with matplotlib

    im = Image.fromarray(_to_uint8(img), mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _central_views(sub: np.ndarray, slab: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Central xy (mean over z ± slab) and xz (mean over y ± slab) slices of a (B, B, B) box."""
    b = sub.shape[0]
    c = b // 2
    lo, hi = max(0, c - slab), min(b, c + slab + 1)
    return sub[lo:hi].mean(0), sub[:, lo:hi, :].mean(1)


def _crop(vol: Any, centre: Sequence[float], box: int) -> np.ndarray:
    """(box, box, box) crop of ``vol`` (z, y, x) around voxel ``centre``; outside is the mean."""
    half = box // 2
    c = [int(round(float(v))) for v in centre]
    out = None
    src, dst = [], []
    for ax, n in zip(c, vol.shape):
        a0, a1 = ax - half, ax - half + box
        s0, s1 = max(0, a0), min(int(n), a1)
        if s1 <= s0:
            return np.zeros((box, box, box), np.float32)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - a0, s0 - a0 + (s1 - s0)))
    block = vol[tuple(src)]
    if hasattr(block, "compute"):
        block = block.compute()
    block = np.asarray(block, dtype=np.float32)
    out = np.full((box, box, box), float(block.mean()) if block.size else 0.0, np.float32)
    out[tuple(dst)] = block
    return out


# ---------------------------------------------------------------------- UMAP rendering
def _extent(a: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return (0.0, 1.0)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    pad = 0.03 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad


def _to_rgb(img: Any, x_range: Sequence[float], y_range: Sequence[float]) -> hv.RGB:
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
    color_by: str,
    color_key: Mapping[str, str] | None = None,
    x_range: Sequence[float] | None = None,
    y_range: Sequence[float] | None = None,
    width: int = 600,
    height: int = 520,
    spread: bool = True,
    rows: np.ndarray | None = None,
) -> hv.RGB:
    """Aggregate the UMAP points with datashader and shade them into one RGB image.

    ``frame`` has columns ``u, v`` (UMAP coordinates) and ``color_by``: a categorical column
    (``count_cat`` aggregation, one colour per category from ``color_key``) or the numeric
    ``score`` (mean score per pixel, viridis). ``color_by=None`` draws ``rows`` (positions)
    in black (selection layer). Ranges default to the data extent (+3 %). ``spread`` grows
    isolated pixels (``tf.dynspread`` on the aggregate, up to 3 px) so sparse points show.
    """
    import datashader.transfer_functions as tf  # noqa: PLC0415

    x_range = tuple(x_range) if x_range is not None else _extent(frame["u"].to_numpy())
    y_range = tuple(y_range) if y_range is not None else _extent(frame["v"].to_numpy())
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
    elif color_by == "score":
        agg = cvs.points(frame, "u", "v", agg=ds.mean("score"))
    else:
        agg = cvs.points(frame, "u", "v", agg=ds.count_cat(color_by))
    if color_by is None:
        img = tf.shade(agg, cmap=["#000000", "#000000"], min_alpha=160)
    elif color_by == "score":
        img = tf.shade(agg, cmap=["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"])
    else:
        img = tf.shade(agg, color_key=dict(color_key or {}), min_alpha=140)
    if spread:
        img = _spread_sparse(img)
    return _to_rgb(img, x_range, y_range)


def _spread_sparse(img: Any, max_px: int = 3) -> Any:
    """Grow isolated points of a shaded image by up to ``max_px`` pixels (sparse plots only).

    The radius follows how much of the canvas is covered (dense plots are left untouched);
    empty pixels take a neighbour's colour (``scipy.ndimage.maximum_filter`` on the packed
    RGBA values), so colours are never mixed. Works for any number of categories at the cost
    of one 2-D filter (datashader's own ``spread`` needs a slow per-shape JIT compile).
    """
    from scipy import ndimage  # noqa: PLC0415

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


# ---------------------------------------------------------------------- gallery component
class Gallery(pn.custom.JSComponent):
    """Paged thumbnail grid; each tile is ``div.cs-thumb[data-particle-id=<id>]``.

    Clicking a tile sets :attr:`clicked` to the particle id (a Python-side event).
    """

    items = param.List(default=[], doc="dicts with id, xy, xz (PNG data URIs), label")
    clicked = param.String(default="", doc="id of the last clicked thumbnail")
    active = param.String(default="", doc="id drawn as current")

    _esm = """
    export function render({ model, el }) {
      const grid = document.createElement("div");
      grid.className = "cs-gallery-grid";
      el.appendChild(grid);
      function draw() {
        grid.innerHTML = "";
        if (!model.items.length) {
          const e = document.createElement("div");
          e.className = "cs-gallery-empty";
          e.textContent = "Select particles in the UMAP (box or lasso tool) to see them here.";
          grid.appendChild(e);
          return;
        }
        for (const it of model.items) {
          const t = document.createElement("div");
          t.className = "cs-thumb" + (it.id === model.active ? " cs-active" : "")
            + (it.excluded ? " cs-excluded" : "");
          t.dataset.particleId = it.id;
          t.title = it.id + " (" + it.label + ")";
          const imgs = document.createElement("div");
          imgs.className = "cs-thumb-imgs";
          for (const key of ["xy", "xz"]) {
            const im = document.createElement("img");
            im.src = it[key];
            im.alt = key;
            im.className = "cs-thumb-" + key;
            imgs.appendChild(im);
          }
          t.appendChild(imgs);
          const cap = document.createElement("span");
          cap.className = "cs-thumb-id";
          cap.textContent = it.id;
          t.appendChild(cap);
          const lab = document.createElement("span");
          lab.className = "cs-thumb-label";
          lab.textContent = it.label;
          t.appendChild(lab);
          t.addEventListener("click", () => model.send_msg({ id: it.id }));
          grid.appendChild(t);
        }
      }
      model.on("items", draw);
      model.on("active", draw);
      draw();
    }
    """

    _stylesheets = [
        """
        .cs-gallery-grid { display: flex; flex-wrap: wrap; gap: 6px; }
        .cs-gallery-empty { color: #777; font-style: italic; padding: 8px; }
        .cs-thumb { border: 2px solid #ddd; border-radius: 6px; padding: 3px; cursor: pointer;
                    background: #fafafa; display: flex; flex-direction: column;
                    align-items: center; font: 11px sans-serif; }
        .cs-thumb:hover { border-color: #4c8bf5; }
        .cs-thumb.cs-active { border-color: #ff9900; background: #fff4e0; }
        .cs-thumb.cs-excluded { opacity: 0.45; }
        .cs-thumb-imgs { display: flex; gap: 2px; }
        .cs-thumb-imgs img { image-rendering: pixelated; display: block; }
        .cs-thumb-id { font-family: monospace; margin-top: 2px; }
        .cs-thumb-label { color: #666; }
        """
    ]

    def _handle_msg(self, msg: Any) -> None:
        pid = str(msg.get("id", "")) if isinstance(msg, dict) else ""
        if pid:
            self.active = pid
            # Re-fire even when the same tile is clicked twice.
            self.param.update(clicked="")
            self.clicked = pid


# ---------------------------------------------------------------------- the app
def _err(msg: str) -> InputError:
    return InputError(msg)


class Explorer(param.Parameterized):
    """Cluster-curation app over a :class:`~cryosiam_nb.particles.Particles` object.

    The Particles object is modified in place by curation actions (use ``.particles.undo()``
    or the Undo button to revert). Python methods mirror every button.
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
        particles: Any,
        tomograms: Mapping[str, Any] | Any | None = None,
        color_by: str = "cluster",
        page_size: int = 16,
        thumb_px: int = 64,
        box: int | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        export_path: str | os.PathLike | None = None,
        overlays: Mapping[str, Any] | None = None,
        width: int = 620,
        height: int = 520,
        **params: Any,
    ):
        from cryosiam_nb.particles import Particles  # noqa: PLC0415

        if isinstance(particles, str | os.PathLike):
            particles = Particles.load(particles)
        if not isinstance(particles, Particles):
            raise _err(
                f"particles: expected a cryosiam_nb Particles object or a path to one, "
                f"got {type(particles).__name__}"
            )
        if "umap" not in particles.obsm:
            raise _err("particles: obsm['umap'] is missing; run tl.umap(particles) first")
        uv = np.asarray(particles.obsm["umap"], dtype=np.float64)
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise _err(f"particles: obsm['umap'] must be (N, 2), got {uv.shape}")
        if int(page_size) < 1:
            raise _err(f"page_size must be >= 1, got {page_size}")
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
            raise _err(f"overlays: no tomogram named {unknown} (tomograms: {list(self.tomograms)})")
        self.shapes = {str(k): tuple(int(s) for s in v) for k, v in (shapes or {}).items()}
        self.box = int(box) if box else self._default_box()
        self.export_path = str(export_path or Path.cwd() / "selection.star")
        fields = [c for c in COLOR_FIELDS if c in particles.obs.columns]
        if not fields:
            particles.obs["cluster"] = "all"
            fields = ["cluster"]
        self.param.color_by.objects = fields
        if color_by not in fields:
            raise _err(f"color_by: {color_by!r} is not a column of particles.obs ({fields})")
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
    def _tomogram_dict(tomograms: Any) -> dict[str, Any]:
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
            cats = sorted({str(c) for c in pd.unique(vals)} - {EXCLUDED_LABEL}, key=_natural)
            cols = _palette(len(cats))
            key = dict(zip(cats, cols))
            if excluded.any():
                cats.append(EXCLUDED_LABEL)
                key[EXCLUDED_LABEL] = _EXCLUDED_COLOR
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

    def select_lasso(self, polygon: Any) -> np.ndarray:
        """Select particles inside a lasso ``polygon`` (M, 2) in UMAP units."""
        return self._set_selection(points_in_lasso(self._uv, polygon), "lasso")

    def select_ids(self, ids: Any) -> np.ndarray:
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
            raise _err(f"page must be in 0..{self.n_pages - 1}, got {page}")
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
                raise _err(
                    f"no subtomograms in particles.obsm and no tomogram {tomo!r} given: pass "
                    f"tomograms={{'{tomo}': <array or path>}} to show thumbnails"
                )
            boxes.append(_crop(self._viewer(tomo).volume, (row.z, row.y, row.x), self.box))
        return np.stack(boxes) if boxes else np.zeros((0, self.box, self.box, self.box))

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
                xy, xz = _central_views(boxes[i])
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
                raise _err(f"tomogram {tomogram!r} was not given (have {list(self.tomograms)})")
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
            raise _err(f"unknown particle id {pid!r}")
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
        """Re-cluster the selected particles (spectral clustering of their embedding)."""
        names = self.particles.split(self.selected_ids, k=k, seed=seed)
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

    # ------------------------------------------------------------------ export
    def _export_table(
        self, scope: str, clusters: Sequence[str] | None, include_excluded: bool
    ) -> pd.DataFrame:
        obs = self.particles.obs
        if scope == "selection":
            pos = self._sel
        elif scope == "clusters":
            names = self.particles._require_clusters(clusters or [])
            if not names:
                raise _err("export: choose at least one cluster")
            pos = np.flatnonzero(obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False))
        elif scope == "all":
            pos = np.arange(len(obs))
        else:
            raise _err(f"export scope must be 'selection', 'clusters' or 'all', got {scope!r}")
        if not include_excluded and "excluded" in obs.columns:
            pos = pos[~obs["excluded"].to_numpy(dtype=bool)[pos]]
        if len(pos) == 0:
            raise _err(f"export: no particles to export (scope {scope!r}; excluded are skipped)")
        return self.particles.selection_to_table(pos)

    def _shape_of(self, tomogram: str) -> tuple[int, int, int]:
        if tomogram in self.shapes:
            return self.shapes[tomogram]
        if tomogram in self.tomograms:
            return self._viewer(tomogram).shape
        shapes = self.particles.uns.get("tomogram_shapes", {})
        if tomogram in shapes:
            return tuple(int(s) for s in shapes[tomogram])
        raise _err(
            f"RELION 5 export needs the (z, y, x) shape of tomogram {tomogram!r}: pass "
            f"tomograms= or shapes={{'{tomogram}': (nz, ny, nx)}} to the explorer"
        )

    def export(
        self,
        path: str | os.PathLike,
        fmt: str = "relion4",
        scope: str = "selection",
        clusters: Sequence[str] | None = None,
        include_excluded: bool = False,
    ) -> Path:
        """Write particle coordinates of the selection / chosen clusters / all particles.

        ``fmt``: ``"relion4"`` (RELION 3/4 + Warp STAR, voxel coordinates), ``"relion5"``
        (centred Å; needs tomogram shapes), ``"csv"`` (Å and voxels) or ``"copick"`` (``path``
        is the copick root folder). Excluded particles are skipped unless
        ``include_excluded``. STAR/CSV files carry the particle ids (``cryosiamNbParticle_id``
        / ``particle_id``). Returns the path written.
        """
        from cryosiam_nb import export as ex  # noqa: PLC0415

        key = _FORMAT_ALIASES.get(str(fmt).lower())
        if key is None and fmt in EXPORT_FORMATS:
            key = EXPORT_FORMATS[fmt][0]
        if key is None:
            raise _err(f"export format {fmt!r} unknown; use one of {sorted(_FORMAT_ALIASES)}")
        df = self._export_table(scope, clusters, include_excluded)
        vs = np.unique(df["voxel_size"].to_numpy(dtype=float))
        if len(vs) != 1:
            raise _err(
                f"export: the particles have several voxel sizes {vs.tolist()} Å; export the "
                "tomograms of one voxel size at a time (e.g. choose clusters or select per tomogram)"
            )
        voxel_size = float(vs[0])
        path = Path(path)
        extra = ("particle_id", "cluster", "species", "score")
        if key == "relion4":
            out = ex.write_star_relion4(df, path, voxel_size, extra=extra)
        elif key == "relion5":
            shapes = {t: self._shape_of(t) for t in df["tomogram"].astype(str).unique()}
            if len(set(shapes.values())) == 1:
                out = ex.write_star_relion5(
                    df, path, voxel_size, next(iter(shapes.values())), extra=extra
                )
            else:
                out = self._relion5_mixed(df, path, voxel_size, shapes, extra)
        elif key == "csv":
            out = ex.write_csv(df, path, voxel_size)
        else:
            written = ex.write_copick(df, path, voxel_size)
            out = path
            self.status = (
                f"exported {len(df)} particle(s) to {len(written)} copick file(s) in {path}"
            )
            return out
        self.status = f"exported {len(df)} particle(s) to {out}"
        return Path(out)

    @staticmethod
    def _relion5_mixed(
        df: pd.DataFrame, path: Path, voxel_size: float, shapes: dict, extra: Sequence[str]
    ) -> Path:
        """RELION 5 STAR for tomograms of different shapes: one writer call per shape, merged."""
        import starfile  # noqa: PLC0415

        from cryosiam_nb import export as ex  # noqa: PLC0415
        from cryosiam_nb.io import atomic_path  # noqa: PLC0415

        blocks = None
        parts = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (shape, names) in enumerate(_group_by_value(shapes).items()):
                sub = df[df["tomogram"].astype(str).isin(names)]
                f = ex.write_star_relion5(
                    sub, Path(tmp) / f"{i}.star", voxel_size, shape, extra=extra
                )
                blocks = starfile.read(f, always_dict=True)
                parts.append(blocks["particles"])
        assert blocks is not None
        merged = pd.concat(parts, ignore_index=True)
        if "rlnClassNumber" in merged and "cryosiamNbCluster" in merged:
            merged["rlnClassNumber"] = pd.Categorical(merged["cryosiamNbCluster"]).codes + 1
        blocks["particles"] = merged
        with atomic_path(path) as t:
            starfile.write(blocks, t)
        return path

    def save(self, path: str | os.PathLike) -> Path:
        """Save the curated Particles (zarr store, atomically)."""
        out = self.particles.save(path)
        self.status = f"saved {len(self.particles)} particle(s) to {out}"
        return Path(out)

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
        return _extent(self._uv[:, axis])

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

    # ------------------------------------------------------------------ widgets / layout
    def legend_html(self) -> str:
        """HTML legend of the colour-by categories with counts (and cluster annotations)."""
        f = self.color_by
        if f == "score":
            s = self._frame["score"]
            return (
                f"<div class='cs-legend'><b>score</b> (viridis, mean per pixel): "
                f"{np.nanmin(s):.3g} … {np.nanmax(s):.3g}</div>"
            )
        counts = self._frame[f].value_counts(sort=False)
        ann = self.particles.uns.get("cluster_annotations", {}) if f == "cluster" else {}
        rows = []
        for cat, col in self._color_keys.get(f, {}).items():
            note = f" <i>{_html(ann[cat])}</i>" if cat in ann else ""
            rows.append(
                f"<div class='cs-legend-item' data-category='{_html(cat)}'>"
                f"<span style='display:inline-block;width:10px;height:10px;"
                f"background:{col};margin-right:4px;border-radius:2px'></span>"
                f"{_html(cat)} <span style='color:#888'>({int(counts.get(cat, 0))})</span>"
                f"{note}</div>"
            )
        return f"<div class='cs-legend'><b>{f}</b>{''.join(rows)}</div>"

    def _build_widgets(self) -> dict[str, Any]:
        w: dict[str, Any] = {}
        w["color_by"] = pn.widgets.Select.from_param(self.param.color_by, label="colour by")
        w["clusters"] = pn.widgets.MultiSelect(
            label="clusters", options=self.clusters(), size=6, css_classes=["cs-clusters"]
        )
        w["name"] = pn.widgets.TextInput(label="new name / merge into", placeholder="e.g. ribosome")
        w["note"] = pn.widgets.TextInput(label="annotation", placeholder="e.g. 80S ribosome?")
        w["rename"] = pn.widgets.Button(label="Rename", css_classes=["cs-rename"])
        w["annotate"] = pn.widgets.Button(label="Annotate", css_classes=["cs-annotate"])
        w["merge"] = pn.widgets.Button(
            label="Merge clusters", color="primary", css_classes=["cs-merge"]
        )
        w["k"] = pn.widgets.IntInput(label="split into k (0 = auto)", value=0, start=0, end=50)
        w["split"] = pn.widgets.Button(label="Split selection", css_classes=["cs-split"])
        w["exclude"] = pn.widgets.Button(
            label="Exclude selection", color="warning", css_classes=["cs-exclude"]
        )
        w["include"] = pn.widgets.Button(label="Include selection", css_classes=["cs-include"])
        w["select_clusters"] = pn.widgets.Button(
            label="Select clusters", css_classes=["cs-select-clusters"]
        )
        w["undo"] = pn.widgets.Button(label="Undo", color="danger", css_classes=["cs-undo"])
        w["scope"] = pn.widgets.RadioButtonGroup(
            label="export", options=["selection", "clusters", "all"], value="selection"
        )
        w["format"] = pn.widgets.Select(label="format", options=list(EXPORT_FORMATS))
        w["path"] = pn.widgets.TextInput(
            label="export path", value=self.export_path, css_classes=["cs-export-path"]
        )
        w["export"] = pn.widgets.Button(label="Export", color="success", css_classes=["cs-export"])
        w["download"] = pn.widgets.FileDownload(
            callback=self._download, filename="selection.star", label="Download export"
        )
        w["save_path"] = pn.widgets.TextInput(
            label="save curated particles to",
            value=str(Path(self.export_path).with_name("particles_curated.zarr")),
        )
        w["save"] = pn.widgets.Button(label="Save particles", css_classes=["cs-save"])
        w["prev"] = pn.widgets.Button(label="◀ prev", width=80, css_classes=["cs-prev"])
        w["next"] = pn.widgets.Button(label="next ▶", width=80, css_classes=["cs-next"])
        w["page_info"] = pn.pane.HTML("", css_classes=["cs-page-info"])
        w["status"] = pn.pane.HTML("", css_classes=["cs-status"], sizing_mode="stretch_width")
        w["legend"] = pn.pane.HTML(self.legend_html(), width=200, css_classes=["cs-legend-pane"])
        w["gallery"] = Gallery(sizing_mode="stretch_width", css_classes=["cs-gallery"])
        if self.tomograms:
            w["tomogram"] = pn.widgets.Select(label="tomogram", options=list(self.tomograms))
        return w

    def _guard(self, fn: Callable[[], Any]) -> Callable[[Any], None]:
        """Wrap a button callback: user errors go to the status line instead of raising."""

        def cb(event: Any = None) -> None:
            try:
                fn()
            except (ValueError, KeyError, FileExistsError) as err:
                self.status = f"⚠ {err}"

        return cb

    def _wire(self) -> None:
        w = self._widgets
        w["rename"].on_click(
            self._guard(lambda: self.rename(*self._one_cluster(), w["name"].value))
        )
        w["annotate"].on_click(
            self._guard(lambda: self.annotate(self._one_cluster()[0], w["note"].value))
        )
        w["merge"].on_click(
            self._guard(lambda: self.merge(w["clusters"].value, into=w["name"].value or None))
        )
        w["split"].on_click(self._guard(lambda: self.split_selection(w["k"].value or None)))
        w["exclude"].on_click(self._guard(self.exclude_selection))
        w["include"].on_click(self._guard(self.include_selection))
        w["undo"].on_click(self._guard(self.undo))
        w["select_clusters"].on_click(
            self._guard(lambda: self.select_clusters(w["clusters"].value))
        )
        w["export"].on_click(self._guard(self._export_from_widgets))
        w["save"].on_click(self._guard(lambda: self.save(w["save_path"].value)))
        w["prev"].on_click(lambda e: self._turn(-1))
        w["next"].on_click(lambda e: self._turn(+1))
        w["format"].param.watch(self._on_format, "value")
        w["gallery"].param.watch(self._on_thumb_click, "clicked")
        if "tomogram" in w:
            w["tomogram"].param.watch(lambda e: self._show_viewer(e.new), "value")
        self.param.watch(self._refresh_gallery, ["selection_version", "page"])
        self.param.watch(self._refresh_clusters, ["data_version", "color_by"])
        self.param.watch(self._refresh_status, ["status"])

    def _one_cluster(self) -> tuple[str]:
        chosen = list(self._widgets["clusters"].value)
        if len(chosen) != 1:
            raise _err(f"choose exactly one cluster in the list (chosen: {chosen})")
        return (chosen[0],)

    def _turn(self, step: int) -> None:
        self.page = int(np.clip(self.page + step, 0, self.n_pages - 1))

    def _export_from_widgets(self) -> Path:
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        return self.export(w["path"].value, fmt, w["scope"].value, w["clusters"].value)

    def _on_format(self, event: Any) -> None:
        suffix = EXPORT_FORMATS[event.new][1]
        p = Path(self._widgets["path"].value)
        stem = p.with_suffix("") if p.suffix in (".star", ".csv") else p
        self._widgets["path"].value = str(stem) + suffix
        self._widgets["download"].filename = (
            "selection" + (suffix or ".zip") if suffix else "copick.zip"
        )

    def _download(self) -> io.BytesIO:
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / ("export" + (EXPORT_FORMATS[w["format"].value][1] or ""))
            try:
                self.export(target, fmt, w["scope"].value, w["clusters"].value)
            except ValueError as err:
                self.status = f"⚠ {err}"
                return io.BytesIO(b"")
            if target.is_dir():
                import shutil  # noqa: PLC0415

                archive = shutil.make_archive(str(Path(tmp) / "copick"), "zip", target)
                return io.BytesIO(Path(archive).read_bytes())
            return io.BytesIO(target.read_bytes())

    def _on_thumb_click(self, event: Any) -> None:
        if event.new:
            try:
                self.show_particle(event.new)
            except ValueError as err:
                self.status = f"⚠ {err}"

    def _refresh_gallery(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        w["gallery"].items = self.gallery_items()
        n = len(self._sel)
        w["page_info"].object = (
            f"<span class='cs-page'>page {self.page + 1} / {self.n_pages}</span> · "
            f"<span class='cs-n-selected' data-n='{n}'>{n} selected</span>"
        )
        self._update_viewer_highlight()

    def _refresh_clusters(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        names = self.clusters()
        w["clusters"].options = names
        w["clusters"].value = [c for c in w["clusters"].value if c in names]
        w["legend"].object = self.legend_html()
        obs = self.particles.obs
        for name, v in self._viewers.items():
            v.set_particles(obs.loc[obs["tomogram"].astype(str) == name, ["z", "y", "x"]])

    def _refresh_status(self, *_: Any) -> None:
        if "status" in self._widgets:
            self._widgets[
                "status"
            ].object = f"<div class='cs-status-text'>{_html(self.status)}</div>"

    def _show_viewer(self, name: str) -> None:
        if "viewer_holder" in self._widgets:
            self._widgets["viewer_holder"].objects = [self._viewer(name).panel()]
            self._update_viewer_highlight()

    def panel(self) -> pn.viewable.Viewable:
        """The Panel layout (build once; display inline in Jupyter or serve)."""
        if self._layout is not None:
            return self._layout
        self._widgets = self._build_widgets()
        w = self._widgets
        self._wire()
        curation = pn.Card(
            w["clusters"],
            pn.Row(w["select_clusters"], w["merge"]),
            w["name"],
            w["rename"],
            w["note"],
            w["annotate"],
            pn.layout.Divider(),
            w["k"],
            w["split"],
            pn.Row(w["exclude"], w["include"]),
            w["undo"],
            title="Curate",
            width=300,
        )
        export = pn.Card(
            w["scope"],
            w["format"],
            w["path"],
            pn.Row(w["export"], w["download"]),
            pn.layout.Divider(),
            w["save_path"],
            w["save"],
            title="Export",
            width=300,
        )
        n = len(self.particles)
        header = pn.pane.HTML(
            f"<div class='cs-header'><b>cryosiam_nb explorer</b> — {n:,} particles, "
            f"{len(self.clusters())} clusters</div>",
            sizing_mode="stretch_width",
        )
        sidebar = pn.Column(w["color_by"], curation, export, width=310)
        umap = pn.pane.HoloViews(self.umap_plot(), css_classes=["cs-umap"])
        gallery = pn.Column(
            pn.Row(pn.pane.HTML("<b>Selected particles</b>"), w["prev"], w["next"], w["page_info"]),
            w["gallery"],
            sizing_mode="stretch_width",
        )
        main_col = [pn.Row(umap, w["legend"]), gallery]
        if self.tomograms:
            first = next(iter(self.tomograms))
            w["viewer_holder"] = pn.Column(self._viewer(first).panel())
            main_col.append(pn.Column(w["tomogram"], w["viewer_holder"]))
        self._layout = pn.Column(
            header,
            w["status"],
            pn.Row(sidebar, pn.Column(*main_col, sizing_mode="stretch_width")),
            css_classes=["cs-explorer"],
            sizing_mode="stretch_width",
        )
        self._refresh_gallery()
        self._refresh_status()
        return self._layout

    def __panel__(self) -> pn.viewable.Viewable:
        return self.panel()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        # Jupyter shows the app inline when the object is the last expression of a cell.
        return self.panel()._repr_mimebundle_(include, exclude)

    def servable(self, title: str = "cryosiam_nb explorer") -> pn.viewable.Viewable:
        """Mark the layout servable (``panel serve my_script.py``)."""
        return self.panel().servable(title=title)


def _name_plot(plot: Any, element: Any) -> None:
    # A stable bokeh model name lets browser tests (and users' JS) find the UMAP figure.
    plot.state.name = "cs-umap"


def _html(s: Any) -> str:
    import html  # noqa: PLC0415

    return html.escape(str(s), quote=True)


def _natural(s: str) -> tuple:
    import re  # noqa: PLC0415

    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s))


def _group_by_value(d: Mapping[str, Any]) -> dict[Any, list[str]]:
    out: dict[Any, list[str]] = {}
    for k, v in d.items():
        out.setdefault(v, []).append(k)
    return out


def explorer(
    particles: Any,
    tomograms: Mapping[str, Any] | Any | None = None,
    color_by: str = "cluster",
    page_size: int = 16,
    **kwargs: Any,
) -> Explorer:
    """Build the cluster-curation app for ``particles`` (a Particles object or a saved store).

    Parameters
    ----------
    particles
        :class:`cryosiam_nb.particles.Particles` with ``obsm['umap']`` (N, 2) and, ideally,
        ``obs['cluster']`` and ``obsm['subtomograms']`` (N, B, B, B) for thumbnails.
    tomograms
        ``{name: tomogram}`` (DataArray / array / path) matching ``obs['tomogram']``: enables
        the slice viewer and thumbnails extracted around particle centres (voxels, z, y, x)
        when there are no stored subtomograms.
    color_by
        Initial colouring: ``cluster``, ``species``, ``size_category`` or ``score``.
    page_size
        Thumbnails per gallery page.

    Other keyword arguments go to :class:`Explorer` (``thumb_px``, ``box`` (voxels),
    ``shapes`` (tomogram (z, y, x) sizes for RELION 5 export), ``export_path``, ``overlays``
    (``{tomogram name: {overlay name: label volume}}`` or an ``xarray.Dataset`` per tomogram,
    drawn in the slice viewer), ``width``, ``height``). Display the returned object in Jupyter, or call ``.servable()``.
    """
    return Explorer(
        particles, tomograms=tomograms, color_by=color_by, page_size=page_size, **kwargs
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cryosiam_nb.pl.explorer particles.zarr [--tomogram name=path ...]``."""
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(
        prog="python -m cryosiam_nb.pl.explorer",
        description="Serve the cryosiam_nb particle-curation app.",
    )
    ap.add_argument("particles", help="Particles store (.zarr) written by Particles.save")
    ap.add_argument(
        "--tomogram",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="tomogram for the slice viewer / thumbnails (repeatable)",
    )
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--show", action="store_true", help="open a browser tab")
    ap.add_argument("--color-by", default="cluster")
    args = ap.parse_args(argv)

    from cryosiam_nb.particles import Particles  # noqa: PLC0415

    parts = Particles.load(args.particles)
    tomos = {}
    for item in args.tomogram:
        if "=" not in item:
            raise SystemExit(f"--tomogram {item!r}: expected NAME=PATH")
        name, p = item.split("=", 1)
        tomos[name] = p
    export_path = Path(args.particles).resolve().with_name("selection.star")

    def app() -> pn.viewable.Viewable:
        return Explorer(
            parts, tomograms=tomos or None, color_by=args.color_by, export_path=export_path
        ).panel()

    pn.extension()
    print(f"cryosiam_nb explorer: http://{args.address}:{args.port}/", file=sys.stderr)
    pn.serve(
        app,
        port=args.port,
        address=args.address,
        show=args.show,
        title="cryosiam_nb explorer",
        websocket_origin=[f"{args.address}:{args.port}", f"localhost:{args.port}"],
    )


if __name__ == "__main__":  # pragma: no cover - exercised by a subprocess test
    main()
