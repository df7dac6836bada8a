"""Re-embed and re-cluster a selection in place: a UMAP (and k-means) of just those particles.

The curator selects a mixed cluster, presses *Re-embed selection*: the selected particles'
embeddings get their own seeded UMAP (:func:`cryosiam_nb.analysis.umap`) and k-means
labels (:func:`cryosiam_nb.analysis.cluster`), written to ``obs['cluster']`` of the selected
rows only through :meth:`~cryosiam_nb.particles.Particles.apply_split` (one undoable
``history`` entry, action ``"recluster"``). The UMAP plot then shows only the subset, in its
own coordinates fitted into the current view, so the curator can box-select, split, merge
or exclude inside it; *Full UMAP* (or undoing the re-cluster) goes back. Nothing outside the
selection changes: ``obsm['umap']`` is never rewritten (the sub-UMAP is view state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cryosiam_nb import analysis
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.curation.render import extent

__all__ = ["fit_into"]

#: Fewest particles a re-embed accepts (UMAP needs a neighbourhood).
MIN_RECLUSTER = 5


def fit_into(
    uv: np.ndarray, x_range: Sequence[float], y_range: Sequence[float], margin: float = 0.1
) -> np.ndarray:
    """Scale and shift 2-D points isotropically so they fill a box (minus a margin).

    Parameters
    ----------
    uv
        (N, 2) points (e.g. a UMAP of a subset, arbitrary units).
    x_range, y_range
        (min, max) of the target box (e.g. the UMAP plot's current view, UMAP units).
    margin
        Fraction of the box left free on each side.

    Returns
    -------
    numpy.ndarray
        (N, 2) float64 points centred in the box; the aspect ratio of ``uv`` is kept.
    """
    uv = np.asarray(uv, dtype=np.float64)
    lo, hi = uv.min(0), uv.max(0)
    span = np.maximum(hi - lo, 1e-12)
    box = np.array([x_range[1] - x_range[0], y_range[1] - y_range[0]], dtype=np.float64)
    scale = float(np.min(box * (1 - 2 * margin) / span))
    centre = np.array([sum(x_range) / 2, sum(y_range) / 2])
    return (uv - (lo + hi) / 2) * scale + centre


class ReclusterMixin:
    """Re-embed / re-cluster of :class:`~cryosiam_nb.pl.curation.Explorer` (needs its state)."""

    particles: Particles
    status: str
    seed: int
    _sel: np.ndarray
    _uv: np.ndarray

    def _init_recluster(self) -> None:
        self._uv_home = self._uv  # the stored UMAP (obsm['umap'])
        self._subview: dict[str, Any] | None = None
        self._view_range: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def subset_view(self) -> bool:
        """True while the UMAP shows a re-embedded subset (not ``obsm['umap']``)."""
        return self._subview is not None

    @property
    def subset_umap(self) -> np.ndarray | None:
        """The re-embedded subset's own UMAP, (n, 2) in the order of :attr:`subset_ids`."""
        return None if self._subview is None else self._subview["umap"]

    @property
    def subset_ids(self) -> list[str]:
        """Ids of the particles of the re-embedded subset ([] in the full view)."""
        if self._subview is None:
            return []
        return self.particles.obs.index[self._subview["rows"]].tolist()

    def recluster_selection(
        self,
        k: int | None = None,
        *,
        seed: int | None = None,
        n_neighbors: int = 15,
        max_fit: int = 20_000,
        use_rep: str = "embedding",
    ) -> list[str]:
        """UMAP and k-means of the selected particles' embeddings only; show the subset.

        Parameters
        ----------
        k
            k-means clusters of the subset: ``None`` / 0 estimates it
            (:func:`cryosiam_nb.analysis.estimate_n_clusters`); ``1`` re-embeds only
            (labels are kept, nothing is recorded).
        seed
            Seeds UMAP and k-means (default the explorer's ``seed``): reruns repeat exactly.
        n_neighbors
            UMAP neighbourhood size (capped at the subset size - 1).
        max_fit
            UMAP is fitted on at most this many of the selected particles (a seeded sample;
            the rest is embedded with ``transform``).
        use_rep
            ``obsm`` key of the embeddings, (N, D).

        Returns
        -------
        list of str
            The new cluster names of the selection (``"<cluster>.1"``, ... or
            ``"split.1"``, ...; largest first), or [] for ``k=1``.
        """
        pos = np.unique(np.asarray(self._sel, dtype=np.int64))
        if len(pos) < MIN_RECLUSTER:
            raise InputError(
                f"re-embed needs at least {MIN_RECLUSTER} selected particles, got {len(pos)}"
            )
        if use_rep not in self.particles.obsm:
            raise InputError(f"re-embed needs obsm[{use_rep!r}] (run tl.embed first)")
        seed = int(self.seed if seed is None else seed)
        # Only the embedding rows of the selection are read (lazily stored arrays too).
        emb = np.asarray(self.particles.obsm.lazy(use_rep)[pos].compute(), np.float32)
        sub = Particles(
            self.particles.obs.iloc[pos][["tomogram", "z", "y", "x", "voxel_size"]],
            obsm={use_rep: emb.reshape(len(pos), -1)},
        )
        analysis.umap(sub, n_neighbors=n_neighbors, seed=seed, max_fit=max_fit, progress=False)
        names: list[str] = []
        if k != 1:
            if not k:  # the eigengap estimate, on a seeded sample of at most 2,000
                rng = np.random.default_rng(seed)
                few = rng.permutation(len(pos))[:2000]
                k = analysis.estimate_n_clusters(sub.obsm[use_rep][few], seed=seed)
            analysis.cluster(sub, k=int(min(k, len(pos))), seed=seed, key_added="recluster")
            labels = sub.obs["recluster"].astype(int).to_numpy()
            params = {"method": "kmeans", "k": int(k), "seed": seed, "umap": sub.uns["umap"]}
            names = self.particles.apply_split(pos, labels, params=params)
            self.particles.history[-1]["action"] = "recluster"
        self._enter_subset(pos, np.asarray(sub.obsm["umap"]))
        what = f"into {names}" if names else "(labels kept)"
        self._after_edit(f"re-embedded {len(pos)} particle(s) on their own UMAP {what}")
        return names

    def _enter_subset(self, pos: np.ndarray, sub_uv: np.ndarray) -> None:
        x_range, y_range = self._view_range or (
            extent(self._uv_home[:, 0]),
            extent(self._uv_home[:, 1]),
        )
        uv = np.full_like(self._uv_home, np.nan, dtype=np.float64)
        uv[pos] = fit_into(sub_uv, x_range, y_range)
        self._subview = {"rows": pos, "umap": sub_uv, "mark": len(self.particles.history)}
        self._uv = uv  # rows outside the subset are NaN: never drawn, never selected

    def show_full_umap(self) -> None:
        """Leave the re-embedded subset view: the UMAP shows ``obsm['umap']`` again."""
        if self._subview is None:
            return
        self._subview = None
        self._uv = self._uv_home
        self._after_edit("back to the full UMAP")

    def _leave_subset_if_undone(self) -> None:
        """After an undo (before the plot table is rebuilt): leave the subset view when its
        re-cluster was undone."""
        if self._subview is not None and len(self.particles.history) < self._subview["mark"]:
            self._subview = None
            self._uv = self._uv_home
