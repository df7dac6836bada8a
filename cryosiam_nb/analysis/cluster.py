"""Clustering of particle embeddings.

- :func:`cluster`: first stage, seeded k-means over all particles.
- :func:`subcluster`: second stage, spectral (or k-means) inside chosen clusters only.
- :func:`split`: the explorer's curation action, spectral split of a selection.
- :func:`spectral_split`, :func:`estimate_n_clusters`: the spectral tools on an (N, D) array.
- :func:`adjusted_rand`: agreement of a clustering with known labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.analysis._common import check_particles, features, ordered_labels, target
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.particles.curation import _child_names

__all__ = [
    "cluster",
    "subcluster",
    "split",
    "spectral_split",
    "estimate_n_clusters",
    "adjusted_rand",
]


def estimate_n_clusters(
    embedding: np.ndarray, *, n_neighbors: int = 10, max_k: int = 10, seed: int = 0
) -> int:
    """Eigengap estimate of the number of clusters.

    Builds the symmetrised k-nearest-neighbour connectivity graph of ``embedding`` (the
    affinity ``SpectralClustering(affinity="nearest_neighbors")`` uses), takes the smallest
    eigenvalues of its normalised Laplacian and returns the ``k`` after which the gap between
    consecutive eigenvalues is largest.

    Parameters
    ----------
    embedding : numpy.ndarray, shape (N, D)
        Points to cluster (N ≥ 3).
    n_neighbors : int
        Neighbours per point in the graph (capped at N - 1).
    max_k : int
        Largest number of clusters considered.
    seed : int
        Seeds the sparse eigensolver's start vector (used above 500 points).

    Returns
    -------
    int
        The estimated number of clusters, ≥ 2.
    """
    from scipy.sparse import csgraph  # noqa: PLC0415
    from scipy.sparse.linalg import eigsh  # noqa: PLC0415
    from sklearn.neighbors import kneighbors_graph  # noqa: PLC0415

    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise InputError(f"need at least 3 particles to estimate a number of clusters, got {n}")
    nn = int(min(n_neighbors, n - 1))
    graph = kneighbors_graph(x, n_neighbors=nn, include_self=True)
    affinity = 0.5 * (graph + graph.T)
    lap = csgraph.laplacian(affinity, normed=True)
    m = int(min(max_k + 1, n))
    if n <= 500:
        vals = np.linalg.eigvalsh(lap.toarray())[:m]
    else:
        v0 = np.random.default_rng(seed).uniform(-1, 1, n)
        vals = np.sort(eigsh(lap, k=m, sigma=-1e-3, which="LM", v0=v0, return_eigenvectors=False))
    gaps = np.diff(vals)
    # gaps[i] = lambda_{i+1} - lambda_i: a large gap after i+1 eigenvalues → k = i + 1.
    if len(gaps) < 2:
        return 2
    return int(np.argmax(gaps[1:]) + 2)


def spectral_split(
    embedding: np.ndarray, *, k: int | None = None, n_neighbors: int = 10, seed: int = 0
) -> np.ndarray:
    """Spectral clustering of an array into ``k`` groups.

    ``sklearn.cluster.SpectralClustering(affinity="nearest_neighbors", assign_labels="kmeans")``.

    Parameters
    ----------
    embedding : numpy.ndarray, shape (N, D)
        Points to split (finite values, N ≥ 2).
    k : int, optional
        Number of groups, 2..N; default the eigengap estimate (:func:`estimate_n_clusters`).
    n_neighbors : int
        Neighbours per point in the affinity graph (capped at N - 1).
    seed : int
        Seeds the embedding and the k-means label assignment.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        Labels 0..k-1, numbered by decreasing group size (ties: first occurrence), so names
        derived from them are stable.
    """
    from sklearn.cluster import SpectralClustering  # noqa: PLC0415

    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise InputError(f"need at least 2 particles to split, got {n}")
    if not np.all(np.isfinite(x)):
        raise InputError("embedding contains NaN or infinite values")
    if k is None:
        k = estimate_n_clusters(x, n_neighbors=n_neighbors, seed=seed)
    k = int(k)
    if k < 2 or k > n:
        raise InputError(f"k must be between 2 and the number of particles ({n}), got {k}")
    model = SpectralClustering(
        n_clusters=k,
        affinity="nearest_neighbors",
        n_neighbors=int(min(n_neighbors, n - 1)),
        random_state=seed,
        assign_labels="kmeans",
        n_init=10,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = model.fit_predict(x)
    return ordered_labels(labels)


def cluster(
    particles: Particles,
    *,
    method: str = "kmeans",
    k: int = 40,
    seed: int = 0,
    n_init: int = 10,
    use_rep: str = "embedding",
    key_added: str = "cluster",
    copy: bool = False,
) -> Particles | None:
    """First-stage clustering of ``obsm[use_rep]`` with ``sklearn.cluster.KMeans``.

    Cluster names are strings ``"0"`` … ``"k-1"``, numbered by decreasing size; ``n_init``
    is fixed and ``seed`` seeds KMeans, so results repeat exactly. The action is recorded in
    ``history`` (:meth:`Particles.undo` restores the previous labels).

    Parameters
    ----------
    particles : Particles
        Particles with ``obsm[use_rep]``.
    method : {"kmeans"}
        Clustering method.
    k : int
        Number of clusters, 1..N.
    seed : int
        Seeds KMeans.
    n_init : int
        KMeans restarts (the best inertia is kept).
    use_rep : str
        ``obsm`` key of the features, (N, D).
    key_added : str
        ``obs`` column of the cluster names (str); parameters go to ``uns[key_added]``.
    copy : bool
        Work on and return a copy; ``particles`` is left untouched.

    Returns
    -------
    Particles or None
        The modified copy when ``copy=True``, else None.
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415

    particles = target(particles, copy, "cluster")
    if method != "kmeans":
        raise InputError(f"cluster: method must be 'kmeans', got {method!r}")
    x = features(particles, use_rep, "cluster")
    k = int(k)
    if k < 1 or k > len(x):
        raise InputError(f"cluster: k must be in 1..{len(x)} (number of particles), got {k}")
    km = KMeans(n_clusters=k, n_init=int(n_init), random_state=int(seed)).fit(x)
    labels = ordered_labels(km.labels_)
    params = {
        "method": method,
        "k": k,
        "seed": int(seed),
        "n_init": int(n_init),
        "use_rep": use_rep,
        "inertia": float(km.inertia_),
    }
    positions = np.arange(len(particles))
    particles._record("cluster", {**params, "key_added": key_added}, positions, [key_added])
    index = particles.obs.index
    particles.obs[key_added] = pd.Series(labels.astype(str), index=index).astype("str")
    particles.uns[key_added] = params
    return particles if copy else None


def _split_one(
    x: np.ndarray, c: str, method: str, kc: int | None, n_neighbors: int, seed: int
) -> np.ndarray:
    """Sub-labels 0..k-1 of the points ``x`` of cluster ``c``."""
    from sklearn.cluster import KMeans  # noqa: PLC0415

    if method == "spectral":
        return spectral_split(x, k=kc, n_neighbors=n_neighbors, seed=seed)
    if kc is None:
        kc = estimate_n_clusters(x, n_neighbors=n_neighbors, seed=seed)
    if int(kc) < 2 or int(kc) > len(x):
        raise InputError(f"subcluster: k for cluster {c!r} must be in 2..{len(x)}")
    km = KMeans(n_clusters=int(kc), n_init=10, random_state=int(seed)).fit(x)
    return ordered_labels(km.labels_)


def subcluster(
    particles: Particles,
    clusters: Sequence[str] | str,
    *,
    method: str = "spectral",
    k: int | None | dict[str, int | None] = None,
    n_neighbors: int = 10,
    seed: int = 0,
    use_rep: str = "embedding",
    key_added: str = "cluster",
    copy: bool = False,
) -> Particles | None:
    """Second-stage clustering inside the chosen clusters only; other clusters are untouched.

    Each chosen cluster ``c`` of ``obs[key_added]`` is split with
    ``SpectralClustering(affinity="nearest_neighbors", n_neighbors=n_neighbors)`` (or
    k-means) into groups named ``"c.1"``, ``"c.2"``, … (largest first), written back to the
    same column. Undoable (one ``history`` entry).

    Parameters
    ----------
    particles : Particles
        Particles clustered by :func:`cluster` (``obs[key_added]``) with ``obsm[use_rep]``.
    clusters : str or sequence of str
        The clusters to split (each with ≥ 3 particles).
    method : {"spectral", "kmeans"}
        How each cluster is split.
    k : int, dict or None
        Groups per cluster; ``None`` estimates it per cluster from the eigengap of the
        normalised Laplacian of the kNN graph; a dict ``{cluster: k or None}`` sets it per
        cluster.
    n_neighbors : int
        Neighbours per point of the kNN graph.
    seed : int
        Seeds the clustering.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    key_added : str
        ``obs`` column read and rewritten; the new names per cluster go to
        ``uns[key_added + "_subcluster"][c]["names"]``.
    copy : bool
        Work on and return a copy; ``particles`` is left untouched.

    Returns
    -------
    Particles or None
        The modified copy when ``copy=True``, else None.
    """
    particles = target(particles, copy, "subcluster")
    if method not in ("spectral", "kmeans"):
        raise InputError(f"subcluster: method must be 'spectral' or 'kmeans', got {method!r}")
    if key_added not in particles.obs.columns:
        raise InputError(f"subcluster: obs has no {key_added!r} column: run tl.cluster first")
    clusters = [clusters] if isinstance(clusters, str) else [str(c) for c in clusters]
    if not clusters:
        raise InputError("subcluster: no clusters chosen (empty selection)")
    labels = particles.obs[key_added]
    existing = set(labels.dropna().astype(str).unique())
    unknown = [c for c in clusters if c not in existing]
    if unknown:
        raise InputError(f"subcluster: unknown cluster(s) {unknown} in obs[{key_added!r}]")
    x = features(particles, use_rep, "subcluster")
    new_labels = labels.to_numpy(dtype=object, copy=True)
    changed: list[np.ndarray] = []
    record: dict[str, Any] = {}
    taken = set(existing)
    for c in clusters:
        pos = np.flatnonzero((labels == c).to_numpy(dtype=bool, na_value=False))
        kc = k.get(c) if isinstance(k, dict) else k
        if len(pos) < 3:
            raise InputError(f"subcluster: cluster {c!r} has {len(pos)} particle(s); need ≥ 3")
        sub = _split_one(x[pos], c, method, kc, n_neighbors, seed)
        names = _child_names(c, int(sub.max()) + 1, taken - {c})
        taken.update(names)
        new_labels[pos] = np.asarray(names, dtype=object)[sub]
        changed.append(pos)
        record[c] = {"k": len(names), "estimated": kc is None, "names": names}
    params = {
        "method": method,
        "clusters": clusters,
        "k": k if not isinstance(k, dict) else {str(a): b for a, b in k.items()},
        "n_neighbors": int(n_neighbors),
        "seed": int(seed),
        "use_rep": use_rep,
    }
    pos_all = np.sort(np.concatenate(changed))
    particles._record("subcluster", {**params, "key_added": key_added}, pos_all, [key_added])
    particles.obs[key_added] = pd.Series(new_labels, index=particles.obs.index).astype("str")
    shared = {p: params[p] for p in ("method", "n_neighbors", "seed")}
    particles.uns.setdefault(f"{key_added}_subcluster", {}).update(
        {c: {**record[c], **shared} for c in clusters}
    )
    return particles if copy else None


def split(
    particles: Particles,
    ids: Any,
    *,
    k: int | None = None,
    n_neighbors: int = 10,
    seed: int = 0,
    use_rep: str = "embedding",
    prefix: str | None = None,
) -> list[str]:
    """Re-cluster a selection of particles by spectral clustering (a curation action).

    The labels come from :func:`spectral_split` of ``obsm[use_rep]`` at the selection
    (read lazily: only those rows); :meth:`Particles.apply_split` names the groups, writes
    ``obs["cluster"]`` and records the action in ``history`` (undoable).

    Parameters
    ----------
    particles : Particles
        The particles (modified in place).
    ids : boolean mask (N,), particle ids or integer positions
        The selection to split (≥ 2 particles).
    k : int, optional
        Number of groups; default the eigengap estimate.
    n_neighbors : int
        Neighbours per point of the affinity graph.
    seed : int
        Seeds the clustering.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    prefix : str, optional
        New names are ``"<prefix>.1"``, ``"<prefix>.2"``, … (largest group first); default the
        selection's common cluster (``"3"`` → ``"3.1"``, ``"3.2"``) or ``"split"`` when it
        spans several clusters.

    Returns
    -------
    list of str
        The new cluster names.
    """
    particles = check_particles(particles, "split")
    pos = particles._positions(ids, "split ids")
    if pos.size < 2:
        raise InputError(f"split needs at least 2 particles, got {pos.size}")
    if use_rep not in particles.obsm:
        raise InputError(f"split needs obsm[{use_rep!r}]: run tl.embed first")
    emb = np.asarray(particles.obsm.lazy(use_rep)[pos].compute(), dtype=np.float64)
    labels = spectral_split(emb.reshape(len(pos), -1), k=k, n_neighbors=n_neighbors, seed=seed)
    params = {
        "k": None if k is None else int(k),
        "seed": int(seed),
        "n_neighbors": int(n_neighbors),
        "use_rep": use_rep,
    }
    return particles.apply_split(pos, labels, prefix=prefix, params=params)


def adjusted_rand(
    particles: Particles, *, labels_key: str = "cluster", truth_key: str = "species"
) -> float:
    """Adjusted Rand index between two ``obs`` columns (rows with both set).

    Parameters
    ----------
    particles : Particles
        The particles.
    labels_key : str
        ``obs`` column of the clustering.
    truth_key : str
        ``obs`` column of the known labels.

    Returns
    -------
    float
        ``sklearn.metrics.adjusted_rand_score``: 1 for identical partitions, ≈ 0 for random.
    """
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415

    particles = check_particles(particles, "adjusted_rand")
    for col in (labels_key, truth_key):
        if col not in particles.obs.columns:
            raise InputError(f"adjusted_rand: obs has no column {col!r}")
    both = particles.obs[[labels_key, truth_key]].dropna()
    if len(both) == 0:
        raise InputError(
            f"adjusted_rand: no particles with both {labels_key!r} and {truth_key!r} set"
        )
    return float(adjusted_rand_score(both[truth_key].astype(str), both[labels_key].astype(str)))
