"""Tools namespace (scanpy style): the data object first, keyword-only options after it.

Dense maps (lazy ``xarray`` on the tomogram's grid, voxel size in ``attrs`` of every
variable):

- ``predict``: chunked sliding-window inference of a model on a tomogram.
- ``write_predictions``: stream predictions to a zarr store, chunk by chunk.
- ``outputs_of``: one head task's outputs of a multi-task prediction.
- ``postprocess_semantic``, ``lamella_mask``: semantic / lamella post-processing.
- ``maps_from_density``: a model-free foreground/boundary/distance baseline.
- ``maps_from_labels``: the same maps from ground-truth instance labels.

Instances and particles:

- ``instances``: instance segmentation from foreground/boundary/distance maps.
- ``particles``: particle table from an instance volume.
- ``extract_subtomograms``: boxes centred on each particle.

On a :class:`~cryosiam_nb.particles.Particles` object (in place; ``copy=True`` returns a
modified copy):

- ``embed``, ``embed_pca``: per-particle embeddings into ``obsm[key_added]``.
- ``cluster``, ``subcluster``, ``split``: clusters into ``obs[key_added]``.
- ``umap``: 2-D layout into ``obsm[key_added]``.
- ``knn_classifier``, ``mlp_classifier``, ``evaluate_classifier``, ``train_test_ids``,
  ``adjusted_rand``: particle identification against known labels.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "predict": "cryosiam_nb.inference",
    "write_predictions": "cryosiam_nb.inference",
    "outputs_of": "cryosiam_nb.inference",
    "postprocess_semantic": "cryosiam_nb.inference",
    "lamella_mask": "cryosiam_nb.inference",
    "maps_from_density": "cryosiam_nb.segmentation",
    "maps_from_labels": "cryosiam_nb.segmentation",
    "instances": "cryosiam_nb.segmentation",
    "particles": "cryosiam_nb.segmentation",
    "extract_subtomograms": "cryosiam_nb.segmentation",
    "embed": "cryosiam_nb.analysis",
    "embed_pca": "cryosiam_nb.analysis",
    "cluster": "cryosiam_nb.analysis",
    "subcluster": "cryosiam_nb.analysis",
    "split": "cryosiam_nb.analysis",
    "umap": "cryosiam_nb.analysis",
    "knn_classifier": "cryosiam_nb.analysis",
    "mlp_classifier": "cryosiam_nb.analysis",
    "evaluate_classifier": "cryosiam_nb.analysis",
    "train_test_ids": "cryosiam_nb.analysis",
    "adjusted_rand": "cryosiam_nb.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cryosiam_nb.tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_WHERE)


__all__ = sorted(_WHERE)
