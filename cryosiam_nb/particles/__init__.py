"""The :class:`Particles` container: particle table + per-particle arrays + curation history.

Modelled on scanpy's AnnData:

- ``obs``: :class:`pandas.DataFrame` indexed by ``particle_id`` (str, unique, e.g. ``"tomo1:17"``)
  with at least ``tomogram``, ``z``, ``y``, ``x`` (voxels) and ``voxel_size`` (Å); optional
  ``species``, ``size_category``, ``cluster`` (str), ``excluded`` (bool), ``score``, ``note``.
- ``obsm``: arrays aligned with the rows of ``obs`` (first axis = particles): ``"embedding"``
  (N, D), ``"umap"`` (N, 2), optionally ``"subtomograms"`` (N, B, B, B, axes z, y, x).
- ``uns``: JSON-serialisable dict (cluster annotations, analysis parameters).
- ``history``: list of curation actions; every curation method records one and
  :meth:`Particles.undo` reverts the last one exactly.

``save(path)`` writes one self-describing zarr directory store (obs as a parquet blob, obsm as
zarr arrays, uns/history as JSON); ``Particles.load(path, lazy=True)`` opens obsm arrays lazily
(zarr-backed, read on first access; :meth:`AlignedArrays.lazy` gives a dask view without reading).

The container holds no analysis: embeddings, clustering and UMAP are tools in
:mod:`cryosiam_nb.analysis` (``tl``) that write into it.
"""

from cryosiam_nb.particles.arrays import AlignedArrays
from cryosiam_nb.particles.container import REQUIRED_COLUMNS, Particles, concat
from cryosiam_nb.particles.store import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "Particles",
    "AlignedArrays",
    "concat",
    "REQUIRED_COLUMNS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]
