"""Plotting namespace: static figures and the interactive Panel explorer.

- ``slices``: side-by-side / orthogonal slices of a tomogram and its overlays.
- ``explorer``: the UMAP cluster-curation app (Panel + HoloViews + datashader).
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "slices": "cryosiam_nb.pl.static",
    "orthoslices": "cryosiam_nb.pl.static",
    "slice_viewer": "cryosiam_nb.pl.viewer",
    "explorer": "cryosiam_nb.pl.explorer",
    "loss_curves": "cryosiam_nb.pl.static",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'cryosiam_nb.pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_WHERE)


__all__ = sorted(_WHERE)
