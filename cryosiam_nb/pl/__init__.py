"""Plotting namespace (scanpy style): each function takes the data object first.

- ``slices``, ``orthoslices``: static slices of a tomogram and its overlays (matplotlib).
- ``slice_viewer``: interactive orthogonal slice viewer (Panel + HoloViews + datashader).
- ``umap``: the particles' UMAP coloured by any ``obs`` column (matplotlib).
- ``explorer``: the UMAP cluster-curation app (Panel + HoloViews + datashader).
- ``loss_curves``: training curves.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "slices": "cryosiam_nb.pl.static",
    "orthoslices": "cryosiam_nb.pl.static",
    "slice_viewer": "cryosiam_nb.pl.viewer",
    "explorer": "cryosiam_nb.pl.curation",
    "loss_curves": "cryosiam_nb.pl.static",
    "umap": "cryosiam_nb.pl.embedding",
    "tune_instances": "cryosiam_nb.pl.widgets",
    "tune_lamella": "cryosiam_nb.pl.widgets",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        # Cache the function: later look-ups skip this hook. (The app lives in the
        # sub-package ``pl.curation`` so that no sub-module shadows a function name.)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cryosiam_nb.pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_WHERE)


__all__ = sorted(_WHERE)
