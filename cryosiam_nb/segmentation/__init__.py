"""Instances from dense maps, the particle table, ground-truth maps and subtomograms.

Submodules, by job:

- :mod:`~cryosiam_nb.segmentation.watershed`: :func:`instances` (seeded watershed +
  multicut on foreground / boundary / distance maps, block-wise with the one stitching
  helper of :mod:`cryosiam_nb.inference.stitching`).
- :mod:`~cryosiam_nb.segmentation.table`: :func:`particles` (the particle table).
- :mod:`~cryosiam_nb.segmentation.density`: :func:`maps_from_density` (model-free baseline).
- :mod:`~cryosiam_nb.segmentation.ground_truth`: :func:`maps_from_labels` (perfect maps
  from labels) and :func:`synthetic_instances` (test labels).
- :mod:`~cryosiam_nb.segmentation.subtomograms`: the one subtomogram extractor.

Size categories and the distance scale live in :mod:`cryosiam_nb.constants`.
"""

from cryosiam_nb.segmentation.density import maps_from_density
from cryosiam_nb.segmentation.ground_truth import maps_from_labels, synthetic_instances
from cryosiam_nb.segmentation.subtomograms import crop_box, extract_subtomograms
from cryosiam_nb.segmentation.table import particles
from cryosiam_nb.segmentation.watershed import instances

__all__ = [
    "instances",
    "particles",
    "extract_subtomograms",
    "crop_box",
    "maps_from_labels",
    "maps_from_density",
    "synthetic_instances",
]
