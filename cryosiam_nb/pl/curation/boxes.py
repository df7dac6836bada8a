"""Subtomogram boxes of the explorer: gallery order and thumbnails, and the average preview.

Boxes come from ``obsm['subtomograms']`` (N, B, B, B; read lazily, row by row) or are cut
from the tomograms around the particle centres (voxels, z, y, x) with the shared
:func:`~cryosiam_nb.segmentation.subtomograms.crop_box` /
:func:`~cryosiam_nb.segmentation.subtomograms.extract_subtomograms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.curation.thumbnails import central_views, thumbnail_png
from cryosiam_nb.segmentation.subtomograms import crop_box, extract_subtomograms

__all__ = ["GALLERY_ORDERS"]

#: Gallery orders: nearest the selection's UMAP centroid first, a seeded random sample, or
#: the table (obs) order.
GALLERY_ORDERS: tuple[str, ...] = ("centroid", "random", "table")
_BATCH = 256


class BoxesMixin:
    """Gallery and average preview of :class:`~cryosiam_nb.pl.curation.Explorer`."""

    particles: Particles
    tomograms: dict[str, Any]
    box: int
    thumb_px: int
    page_size: int
    status: str
    _sel: np.ndarray
    _uv: np.ndarray

    # ------------------------------------------------------------------ gallery order
    def _ordered(self) -> np.ndarray:
        """The selection's row positions in gallery order (see :data:`GALLERY_ORDERS`)."""
        sel = self._sel
        if len(sel) < 2 or self.order == "table":
            return sel
        if self.order == "random":
            rng = np.random.default_rng(self.seed)
            return sel[rng.permutation(len(sel))]
        uv = self._uv[sel]
        d2 = ((uv - uv.mean(0)) ** 2).sum(1)
        return sel[np.argsort(d2, kind="stable")]

    @property
    def n_pages(self) -> int:
        """Number of gallery pages for the current selection (≥ 1)."""
        return max(1, -(-len(self._sel) // self.page_size))

    def page_ids(self, page: int | None = None) -> list[str]:
        """Particle ids shown on gallery ``page`` (default: the current page), in gallery order."""
        page = self.page if page is None else int(page)
        if page < 0 or page >= self.n_pages:
            raise InputError(f"page must be in 0..{self.n_pages - 1}, got {page}")
        if self._order_cache is None:
            self._order_cache = self._ordered()
        pos = self._order_cache[page * self.page_size : (page + 1) * self.page_size]
        return self.particles.obs.index[pos].tolist()

    # ------------------------------------------------------------------ boxes
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
            tomo = self._tomogram_of(str(row["tomogram"]))
            boxes.append(crop_box(self._viewer(tomo).volume, (row.z, row.y, row.x), self.box))
        if not boxes:
            return np.zeros((0, self.box, self.box, self.box), np.float32)
        return np.stack(boxes).astype(np.float32, copy=False)

    def _tomogram_of(self, tomo: str) -> str:
        if tomo not in self.tomograms:
            raise InputError(
                f"no subtomograms in particles.obsm and no tomogram {tomo!r} given: pass "
                f"tomograms={{'{tomo}': <array or path>}} to show thumbnails"
            )
        return tomo

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
        rows = obs.loc[ids]
        items = []
        for i, pid in enumerate(ids):
            row = rows.iloc[i]
            if boxes is not None:
                xy, xz = central_views(boxes[i])
                xy_png, xz_png = thumbnail_png(xy, self.thumb_px), thumbnail_png(xz, self.thumb_px)
            else:
                blank = np.zeros((4, 4), np.float32)
                xy_png = xz_png = thumbnail_png(blank, self.thumb_px)
            label = str(row["cluster"]) if "cluster" in obs.columns else str(row["tomogram"])
            excluded = bool(row["excluded"]) if "excluded" in obs.columns else False
            items.append(
                {"id": str(pid), "xy": xy_png, "xz": xz_png, "label": label, "excluded": excluded}
            )
        return items

    # ------------------------------------------------------------------ average preview
    def average(
        self, ids: Any = None, *, max_particles: int | None = None, seed: int | None = None
    ) -> tuple[np.ndarray, int, int]:
        """Mean subtomogram of a set of particles, computed out of core.

        Parameters
        ----------
        ids
            Particle ids / mask / positions; default the current selection. Excluded
            particles are left out.
        max_particles
            Average at most this many (a seeded random sample; default ``self.max_average``).
        seed
            Seed of that sample (default ``self.seed``).

        Returns
        -------
        tuple
            ``(mean, n_used, n_total)``: the (B, B, B) float32 mean box (axes z, y, x), the
            number of particles averaged and the number asked for (after exclusion).
        """
        pos = self._sel if ids is None else self.particles._positions(ids, "average ids")
        obs = self.particles.obs
        if "excluded" in obs.columns and len(pos):
            pos = pos[~obs["excluded"].to_numpy(dtype=bool)[pos]]
        n_total = int(len(pos))
        if n_total == 0:
            raise InputError("average: no (non-excluded) particles selected")
        cap = int(max_particles or self.max_average)
        if n_total > cap:
            rng = np.random.default_rng(self.seed if seed is None else seed)
            pos = rng.choice(pos, cap, replace=False)
        pos = np.sort(pos)
        if "subtomograms" in self.particles.obsm:
            lazy = self.particles.obsm.lazy("subtomograms")
            # dask streams the rows chunk by chunk: only one chunk of boxes is in memory.
            mean = lazy[pos].astype(np.float32).mean(axis=0).compute()
            return np.asarray(mean, np.float32), int(len(pos)), n_total
        total = np.zeros((self.box,) * 3, np.float64)
        sub = obs.iloc[pos]
        for tomo, grp in sub.groupby(sub["tomogram"].astype(str), sort=False):
            vol = self._viewer(self._tomogram_of(tomo)).volume
            for i in range(0, len(grp), _BATCH):
                chunk = grp.iloc[i : i + _BATCH]
                boxes = extract_subtomograms(vol, chunk, box=self.box, progress=False)
                total += boxes.sum(0, dtype=np.float64)
        return (total / len(pos)).astype(np.float32), int(len(pos)), n_total

    def average_views(self, ids: Any = None, px: int = 96) -> dict[str, Any]:
        """The average's central xy / xz / yz slices as PNG data URIs, with the counts."""
        mean, n_used, n_total = self.average(ids)
        c = mean.shape[0] // 2
        views = {"xy": mean[c], "xz": mean[:, c, :], "yz": mean[:, :, c].T}
        out: dict[str, Any] = {k: thumbnail_png(v, px) for k, v in views.items()}
        out.update(n_used=n_used, n_total=n_total, box=int(mean.shape[0]))
        return out
