"""The UMAP cluster-curation app (Panel + HoloViews + datashader).

``explorer(particles, tomograms=...)`` returns an :class:`Explorer`. Display it in
JupyterLab (it has ``__panel__``) or serve it::

    python -m cryosiam_nb.pl.curation particles.zarr --tomogram tomo1=tomo1.mrc

The UMAP scatter is aggregated server-side by datashader at screen resolution, so
millions of particles stay smooth. Box / lasso selections are resolved server-side over
the full data (vectorised numpy / ``matplotlib.path``) into particle ids, shown as a paged
gallery of subtomogram thumbnails (central xy and xz slices) and as markers in the
tomogram slice viewer. Curation (rename, annotate, merge, split, exclude, undo) calls the
:class:`cryosiam_nb.particles.Particles` methods; export calls :func:`cryosiam_nb.export.write`.

Every UI action has a Python method (``select_box``, ``select_lasso``, ``merge``,
``split_selection``, ``exclude_selection``, ``undo``, ``export``, ``save``...), so the app
can be scripted and tested without a browser. Coordinates: UMAP units for selections,
voxels (z, y, x) for particle centres, Å for voxel sizes.

Modules by job: :mod:`.geometry` (box / lasso hit tests), :mod:`.thumbnails` (PNG
thumbnails), :mod:`.render` (datashader rendering, stable palette), :mod:`.gallery` (the JS
components: thumbnail grid, clickable legend, keyboard shortcuts), :mod:`.boxes` (gallery
order, thumbnails, average subtomogram preview), :mod:`.session` (undo floor, output
folder, autosave), :mod:`.app` (the :class:`Explorer`), :mod:`.exporting` (export / save
actions, per tomogram), :mod:`.recluster` (UMAP + k-means of a selection, shown on its own),
:mod:`.histograms` (size / score histograms), :mod:`.markers` (the slice viewer's capped
markers), :mod:`.layout` (widgets and layout), :mod:`.server` (:func:`serve`: token,
one working copy per browser session; the command line).
"""

from cryosiam_nb.pl.curation.app import Explorer, explorer
from cryosiam_nb.pl.curation.exporting import EXPORT_FORMATS
from cryosiam_nb.pl.curation.gallery import Gallery
from cryosiam_nb.pl.curation.geometry import points_in_box, points_in_lasso
from cryosiam_nb.pl.curation.render import COLOR_FIELDS, EXCLUDED_LABEL, palette, render_umap
from cryosiam_nb.pl.curation.server import live_sessions, main, serve
from cryosiam_nb.pl.curation.session import safe_name
from cryosiam_nb.pl.curation.thumbnails import thumbnail_png

__all__ = [
    "Explorer",
    "explorer",
    "Gallery",
    "EXPORT_FORMATS",
    "COLOR_FIELDS",
    "EXCLUDED_LABEL",
    "points_in_box",
    "points_in_lasso",
    "thumbnail_png",
    "render_umap",
    "palette",
    "main",
    "serve",
    "live_sessions",
    "safe_name",
]
