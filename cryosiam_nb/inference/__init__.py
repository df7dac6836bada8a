"""Out-of-core, dask-chunked sliding-window inference and dense post-processing.

Modules:

- :mod:`~cryosiam_nb.inference.prediction`: :func:`predict` (lazy Dataset on the
  tomogram's grid); :mod:`~cryosiam_nb.inference.writing`: :func:`write_predictions`
  (streams it to zarr). Window planning, the model runner and the chunk tasks are in
  ``_windows``, the ordered dask graph of one pass in ``_graph``, a multi-task model's
  refiner pass (over the stitched outputs of the first) in ``_refine``.
- :mod:`~cryosiam_nb.inference.semantic`: :func:`postprocess_semantic`.
- :mod:`~cryosiam_nb.inference.lamella`: :func:`lamella_mask`.
- :mod:`~cryosiam_nb.inference.stitching`: the one block-stitching helper (connected
  components of labels that meet across block faces, ``scipy.sparse.csgraph``) and the
  relabelling helpers, used here and by :mod:`cryosiam_nb.segmentation`.
"""

from cryosiam_nb.inference.lamella import lamella_mask
from cryosiam_nb.inference.prediction import (
    DEFAULT_OVERLAP,
    DEFAULT_WINDOW,
    inference_window,
    outputs_of,
    predict,
    write_predictions,
)
from cryosiam_nb.inference.semantic import postprocess_semantic

__all__ = [
    "predict",
    "write_predictions",
    "outputs_of",
    "postprocess_semantic",
    "lamella_mask",
    "inference_window",
    "DEFAULT_WINDOW",
    "DEFAULT_OVERLAP",
]
