"""Particle identification on a :class:`~cryosiam_nb.particles.Particles` container.

- :mod:`.embed`: :func:`embed` (SimSiam embeddings of the subtomograms, batched, CPU/GPU,
  optionally averaged over exact box rotations :func:`cube_rotations`) and :func:`embed_pca`
  (PCA of the raw voxels, a template-free baseline).
- :mod:`.classify`: :func:`knn_classifier`, :func:`mlp_classifier` (a
  :class:`ParticleClassifier`), :func:`train_test_ids` and :func:`evaluate_classifier`
  (per-class and per-size-category F1 on a seeded, stratified held-out split).
- :mod:`.cluster`: :func:`cluster` (k-means), :func:`subcluster` (spectral, inside chosen
  clusters only), :func:`split` (the explorer's curation split), :func:`spectral_split`,
  :func:`estimate_n_clusters`, :func:`adjusted_rand`.
- :mod:`.umap`: :func:`umap` (2-D, CPU; subsample fit + batched transform).

Tools on a Particles object follow scanpy: they modify it in place and return None unless
``copy=True`` (then they return a modified copy); ``use_rep`` names the ``obsm`` key read and
``key_added`` where the result goes. Parameters are recorded in ``particles.uns``; clustering
steps also in ``particles.history`` so they can be undone.
"""

from cryosiam_nb.analysis.classify import (
    ParticleClassifier,
    evaluate_classifier,
    knn_classifier,
    mlp_classifier,
    train_test_ids,
)
from cryosiam_nb.analysis.cluster import (
    adjusted_rand,
    cluster,
    estimate_n_clusters,
    spectral_split,
    split,
    subcluster,
)
from cryosiam_nb.analysis.embed import ROTATION_GROUPS, cube_rotations, embed, embed_pca
from cryosiam_nb.analysis.umap import umap

__all__ = [
    "embed",
    "embed_pca",
    "cube_rotations",
    "ROTATION_GROUPS",
    "ParticleClassifier",
    "knn_classifier",
    "mlp_classifier",
    "train_test_ids",
    "evaluate_classifier",
    "cluster",
    "subcluster",
    "split",
    "spectral_split",
    "estimate_n_clusters",
    "adjusted_rand",
    "umap",
]
