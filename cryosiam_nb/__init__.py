"""cryosiam_nb: Jupyter-first CryoSiam for cryo-electron tomography.

Namespaces follow scanpy: ``io`` (read/write volumes), ``pp`` (preprocessing),
``tl`` (tools: predict, instances, particles, embed, cluster, umap),
``pl`` (plots and the interactive explorer), ``sim`` (simulator),
``models`` (networks and checkpoints), ``metrics``.

Arrays are ordered (z, y, x); voxel sizes are in Å.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "io",
    "pp",
    "tl",
    "pl",
    "sim",
    "models",
    "metrics",
    "export",
    "training",
    "transforms",
    "particles",
}


def __getattr__(name: str) -> Any:
    # Lazy sub-module import keeps ``import cryosiam_nb`` fast (torch is heavy).
    if name in _SUBMODULES:
        return import_module(f"cryosiam_nb.{name}")
    raise AttributeError(f"module 'cryosiam_nb' has no attribute {name!r}")


__all__ = sorted(_SUBMODULES) + ["__version__"]
