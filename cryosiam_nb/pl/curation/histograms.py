"""Per-cluster / per-selection histograms of numeric particle properties (size, score).

:meth:`HistogramMixin.histogram_data` bins an ``obs`` column for a set of particles with the
bin edges of the whole dataset (so a cluster and the whole set compare bin for bin);
:meth:`HistogramMixin.histograms` draws them with HoloViews: the set's counts over the whole
dataset's distribution (grey, scaled to the set's total).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.viewer import ensure_bokeh

__all__ = ["HIST_FIELDS"]

#: Numeric ``obs`` columns offered first: size (voxels, kDa) and score.
HIST_FIELDS: tuple[str, ...] = ("n_voxels", "mass_kda", "score")
_SKIP = {"z", "y", "x", "z_A", "y_A", "x_A", "voxel_size", "excluded"}


def _name_hist(field: str):
    def hook(plot: Any, element: Any) -> None:
        # A stable bokeh model name lets browser tests find each histogram figure.
        plot.state.name = f"cs-hist-{field}"

    return hook


class HistogramMixin:
    """Size / score histograms of :class:`~cryosiam_nb.pl.curation.Explorer`."""

    particles: Particles
    active: str
    _sel: np.ndarray

    def histogram_fields(self) -> list[str]:
        """Numeric ``obs`` columns that can be histogrammed (:data:`HIST_FIELDS` first).

        Coordinates (voxels / Å), ``voxel_size`` and bbox columns are left out.
        """
        obs = self.particles.obs
        num = [
            str(c)
            for c in obs.columns
            if pd.api.types.is_numeric_dtype(obs[c])
            and not pd.api.types.is_bool_dtype(obs[c])
            and str(c) not in _SKIP
            and not str(c).startswith("bbox_")
        ]
        return [f for f in HIST_FIELDS if f in num] + [f for f in num if f not in HIST_FIELDS]

    def histogram_rows(self, scope: str = "selection") -> tuple[np.ndarray, str]:
        """Row positions and a description of ``scope``.

        ``"selection"``: the current selection; ``"cluster"``: the cluster of the active
        particle (the one shown in the slice viewer), else the selection's common cluster.
        """
        obs = self.particles.obs
        if scope == "selection":
            if len(self._sel) == 0:
                raise InputError("histograms: nothing selected")
            return np.asarray(self._sel), f"selection ({len(self._sel):,})"
        if scope != "cluster":
            raise InputError(f"histogram scope must be 'selection' or 'cluster', got {scope!r}")
        if "cluster" not in obs.columns:
            raise InputError("histograms: particles have no 'cluster' column")
        if self.active and self.active in obs.index:
            name = obs.at[self.active, "cluster"]
        else:
            names = obs["cluster"].iloc[self._sel].dropna().unique()
            if len(names) != 1:
                raise InputError(
                    "histograms of a cluster: click a thumbnail (the active particle) or "
                    "select particles of one cluster"
                )
            name = names[0]
        pos = np.flatnonzero((obs["cluster"] == name).to_numpy(dtype=bool, na_value=False))
        return pos, f"cluster {name} ({len(pos):,})"

    def histogram_data(self, field: str, ids: Any = None, bins: int = 30) -> dict[str, np.ndarray]:
        """Histogram of ``obs[field]`` over a set of particles and over all of them.

        Parameters
        ----------
        field
            A numeric ``obs`` column (e.g. ``n_voxels`` in voxels, ``score``).
        ids
            Particle ids / mask / positions; default the current selection.
        bins
            Number of bins, spanning the whole dataset's finite range.

        Returns
        -------
        dict
            ``edges`` (bins + 1), ``counts`` (the set) and ``all`` (every particle), int64;
            NaN values are left out.
        """
        obs = self.particles.obs
        if field not in obs.columns or field not in self.histogram_fields():
            raise InputError(f"histogram: {field!r} is not a numeric obs column")
        pos = self._sel if ids is None else self.particles._positions(ids, "histogram ids")
        values = obs[field].to_numpy(dtype=np.float64, na_value=np.nan)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        edges = np.histogram_bin_edges(finite, bins=int(bins), range=(lo, hi or lo + 1))
        sub = values[pos]
        counts = np.histogram(sub[np.isfinite(sub)], bins=edges)[0]
        return {"edges": edges, "counts": counts, "all": np.histogram(finite, bins=edges)[0]}

    def histograms(
        self,
        scope: str = "selection",
        fields: Sequence[str] | None = None,
        bins: int = 30,
        width: int = 280,
        height: int = 180,
    ) -> hv.Layout:
        """HoloViews histograms of size / score columns for the selection or active cluster.

        Parameters
        ----------
        scope
            ``"selection"`` or ``"cluster"`` (see :meth:`histogram_rows`).
        fields
            ``obs`` columns (default :meth:`histogram_fields`, at most four).
        bins
            Bins per histogram (edges of the whole dataset).
        width, height
            Size of each plot, pixels.

        Returns
        -------
        holoviews.Layout
            One overlay per field: the set's counts (blue) over the whole dataset's
            distribution scaled to the set's size (grey); figures are named
            ``cs-hist-<field>``.
        """
        ensure_bokeh()
        pos, what = self.histogram_rows(scope)
        fields = list(fields) if fields else self.histogram_fields()[:4]
        if not fields:
            raise InputError("histograms: particles have no numeric obs column (size, score)")
        plots = []
        for f in fields:
            d = self.histogram_data(f, pos, bins)
            scale = d["counts"].sum() / max(int(d["all"].sum()), 1)
            allh = hv.Histogram((d["edges"], d["all"] * scale), kdims=[f], vdims=["count"])
            subh = hv.Histogram((d["edges"], d["counts"]), kdims=[f], vdims=["count"])
            plots.append(
                (
                    allh.opts(color="#bbbbbb", line_alpha=0, alpha=0.6)
                    * subh.opts(color="#4c72b0", alpha=0.7)
                ).opts(
                    hv.opts.Overlay(
                        title=f"{f}: {what}",
                        width=width,
                        height=height,
                        hooks=[_name_hist(f)],
                        fontsize={"title": 9},
                    )
                )
            )
        return hv.Layout(plots).cols(1)
