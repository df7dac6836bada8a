"""The explorer's slice viewer: particle markers capped per view, found by binary search.

A slice through a million picks must stay interactive: :class:`CappedViewer` keeps, per
axis, the particles sorted by their centre (voxels), so the markers within ``marker_slab``
of a slice are one ``numpy.searchsorted`` range (no scan of the table), and draws at most
``max_markers`` of them: the highlighted (selected) ones first, the rest an even subsample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.pl.viewer import SliceViewer

__all__ = ["CappedViewer"]

_DEPTH = {"xy": "z", "xz": "y", "yz": "x"}


class CappedViewer(SliceViewer):
    """Slice viewer drawing at most ``max_markers`` particle markers per view."""

    def __init__(self, *args: Any, max_markers: int = 2000, **kw: Any):
        super().__init__(*args, **kw)
        self.max_markers = int(max_markers)

    def set_particles(self, particles: pd.DataFrame | None) -> None:
        """Replace the particle markers (z, y, x in voxels; index = ids) and index them."""
        super().set_particles(particles)
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for axis in "zyx":
            vals = self._particles[axis].to_numpy(dtype=np.float64)
            order = np.argsort(vals, kind="stable")
            self._sorted[axis] = (vals[order], order)

    def rows_near(self, view: str, pos: int, slab: int) -> np.ndarray:
        """Row positions of the particles within ± ``slab`` voxels of slice ``pos`` of ``view``
        (xy: z, xz: y, yz: x), sorted."""
        vals, order = self._sorted[_DEPTH[view]]
        lo = np.searchsorted(vals, pos - slab, side="left")
        hi = np.searchsorted(vals, pos + slab, side="right")
        return np.sort(order[lo:hi])

    def _markers(self, view: str, z: int, y: int, x: int, show: bool, slab: int, **kw: Any):
        df = self._particles
        if not show or len(df) <= self.max_markers:
            return super()._markers(view, z, y, x, show, slab, **kw)
        pos = {"xy": z, "xz": y, "yz": x}[view]
        near = self.rows_near(view, pos, slab)
        if len(near) > self.max_markers:
            hl = df.index.get_indexer(list(map(str, self.highlight)))
            hl = np.intersect1d(hl[hl >= 0], near)[: self.max_markers]
            rest = np.setdiff1d(near, hl, assume_unique=True)
            room = self.max_markers - len(hl)
            keep = hl
            if room > 0 and len(rest):
                keep = np.r_[hl, rest[np.linspace(0, len(rest) - 1, room).astype(int)]]
            near = np.sort(keep)
        self._particles = df.iloc[near]
        try:
            return super()._markers(view, z, y, x, show, slab, **kw)
        finally:
            self._particles = df
