"""cryosiam_nb: Jupyter-first CryoSiam for cryo-electron tomography.

Namespaces follow scanpy: ``io`` (read/write volumes), ``pp`` (preprocessing),
``tl`` (tools: predict, instances, particles, embed, cluster, umap),
``pl`` (plots and the interactive explorer), ``sim`` (simulator),
``models`` (networks and checkpoints), ``metrics``, ``export`` (particle coordinates for
RELION / Warp / copick), and the :class:`Particles` container at top level::

    import cryosiam_nb as cs
    p = cs.Particles.load("particles.zarr")
    cs.tl.umap(p)
    cs.pl.umap(p, color="cluster")

Arrays are ordered (z, y, x); voxel sizes are in Å.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "io",
    "workflow",
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
    "constants",
}


def __getattr__(name: str) -> Any:
    # Lazy sub-module import keeps ``import cryosiam_nb`` fast (torch is heavy).
    if name in _SUBMODULES:
        return import_module(f"cryosiam_nb.{name}")
    if name == "Particles":
        return import_module("cryosiam_nb.particles").Particles
    raise AttributeError(f"module 'cryosiam_nb' has no attribute {name!r}")


__all__ = sorted(_SUBMODULES) + ["Particles", "__version__"]
