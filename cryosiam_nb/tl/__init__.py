"""Tools namespace (scanpy style): each function takes the data object first.

- ``predict``: chunked sliding-window inference of a model on a tomogram.
- ``postprocess_semantic``, ``lamella_mask``: semantic / lamella post-processing.
- ``instances``: instance segmentation from foreground/boundary/distance maps.
- ``particles``: particle table from an instance volume.
- ``extract_subtomograms``: boxes centred on each particle.
- ``embed``, ``cluster``, ``subcluster``, ``umap``, ``knn_classifier``,
  ``mlp_classifier``: particle identification.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "predict": "cryosiam_nb.inference",
    "postprocess_semantic": "cryosiam_nb.inference",
    "lamella_mask": "cryosiam_nb.inference",
    "instances": "cryosiam_nb.segmentation",
    "particles": "cryosiam_nb.segmentation",
    "extract_subtomograms": "cryosiam_nb.segmentation",
    "embed": "cryosiam_nb.analysis",
    "cluster": "cryosiam_nb.analysis",
    "subcluster": "cryosiam_nb.analysis",
    "umap": "cryosiam_nb.analysis",
    "knn_classifier": "cryosiam_nb.analysis",
    "mlp_classifier": "cryosiam_nb.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'cryosiam_nb.tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_WHERE)


__all__ = sorted(_WHERE)
