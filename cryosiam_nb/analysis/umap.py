"""2-D UMAP of particle embeddings (CPU; subsample fit + batched transform above ``max_fit``)."""

from __future__ import annotations

import warnings

import numpy as np

from cryosiam_nb.analysis._common import target
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles

__all__ = ["umap"]


def umap(
    particles: Particles,
    *,
    n_neighbors: int = 10,
    min_dist: float = 0.0,
    seed: int = 0,
    pca: int | None = None,
    max_fit: int = 200_000,
    metric: str = "euclidean",
    batch_size: int = 50_000,
    progress: bool = True,
    use_rep: str = "embedding",
    key_added: str = "umap",
    copy: bool = False,
) -> Particles | None:
    """2-D UMAP of ``obsm[use_rep]`` → ``obsm[key_added]``, on CPU.

    ``umap.UMAP(n_neighbors, min_dist, random_state=seed)``, optionally after ``pca``
    components (``sklearn`` PCA fitted on the same points as UMAP). With more than
    ``max_fit`` particles UMAP is fitted on a seeded random subsample of ``max_fit`` and the
    rest is embedded with ``transform`` in batches of ``batch_size`` (bounded memory; a lazy
    ``obsm[use_rep]`` is read batch by batch). Seeded runs repeat exactly.

    Parameters
    ----------
    particles : Particles
        Particles with ``obsm[use_rep]`` (N ≥ 3).
    n_neighbors : int
        UMAP neighbourhood size (capped at the number of fitted points - 1).
    min_dist : float
        UMAP minimum distance between embedded points.
    seed : int
        Seeds the subsample, PCA and UMAP.
    pca : int, optional
        Reduce to this many principal components first.
    max_fit : int
        Most particles UMAP is fitted on (≥ 3).
    metric : str
        UMAP input metric.
    batch_size : int
        Particles per ``transform`` batch above ``max_fit``.
    progress : bool
        Show a progress bar for the transform batches.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    key_added : str
        ``obsm`` key of the result; parameters go to ``uns[key_added]``.
    copy : bool
        Work on and return a copy; ``particles`` is left untouched.

    Returns
    -------
    Particles or None
        The modified copy when ``copy=True``, else None. ``obsm[key_added]`` is float32
        (N, 2).
    """
    import umap as umap_lib  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    particles = target(particles, copy, "umap")
    obsm = particles.obsm
    if use_rep not in obsm:
        raise InputError(
            f"umap: particles have no obsm[{use_rep!r}] (run tl.embed first); "
            f"available: {sorted(obsm)}"
        )
    n = len(particles)
    if n < 3:
        raise InputError(f"umap: need at least 3 particles, got {n}")
    if int(max_fit) < 3:
        raise InputError(f"umap: max_fit must be ≥ 3, got {max_fit}")
    src = obsm.raw(use_rep)
    lazy = obsm.is_lazy(use_rep)

    def take(idx: np.ndarray | slice, count: int) -> np.ndarray:
        block = obsm.lazy(use_rep)[idx].compute() if lazy else src[idx]
        block = np.asarray(block, dtype=np.float32).reshape(count, -1)
        if not np.all(np.isfinite(block)):
            raise InputError(f"umap: obsm[{use_rep!r}] contains NaN or infinite values")
        return block

    rng = np.random.default_rng(seed)
    subsample = n > max_fit
    fit_idx = np.sort(rng.choice(n, size=int(max_fit), replace=False)) if subsample else None
    fit_x = take(fit_idx, len(fit_idx)) if subsample else take(slice(0, n), n)
    reducer_pca = None
    if pca is not None:
        from sklearn.decomposition import PCA  # noqa: PLC0415

        n_comp = int(min(pca, fit_x.shape[0], fit_x.shape[1]))
        reducer_pca = PCA(n_components=n_comp, random_state=int(seed)).fit(fit_x)
        fit_x = reducer_pca.transform(fit_x).astype(np.float32)
    nn = int(min(n_neighbors, len(fit_x) - 1))
    model = umap_lib.UMAP(
        n_neighbors=nn,
        min_dist=float(min_dist),
        n_components=2,
        metric=metric,
        random_state=int(seed),
        low_memory=True,
        transform_seed=int(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        fitted = model.fit_transform(fit_x).astype(np.float32)
        if subsample:
            out = np.empty((n, 2), dtype=np.float32)
            out[fit_idx] = fitted
            rest = np.ones(n, dtype=bool)
            rest[fit_idx] = False
            rest_idx = np.flatnonzero(rest)
            del fit_x
            for s in tqdm(
                range(0, len(rest_idx), batch_size), desc="umap transform", disable=not progress
            ):
                idx = rest_idx[s : s + batch_size]
                block = take(idx, len(idx))
                if reducer_pca is not None:
                    block = reducer_pca.transform(block).astype(np.float32)
                out[idx] = model.transform(block)
        else:
            out = fitted
    obsm[key_added] = out
    particles.uns[key_added] = {
        "n_neighbors": nn,
        "min_dist": float(min_dist),
        "seed": int(seed),
        "pca": None if pca is None else int(pca),
        "metric": metric,
        "use_rep": use_rep,
        "max_fit": int(max_fit),
        "n_fit": int(len(fit_idx)) if subsample else n,
    }
    return particles if copy else None
