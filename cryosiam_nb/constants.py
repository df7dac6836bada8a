"""Constants shared by every module: one definition each.

Arrays are ordered (z, y, x); voxel sizes are in Å; sizes of instances are in voxels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "DIMS",
    "SEMANTIC_CLASSES",
    "SEMANTIC_COLORS",
    "INSTANCE_COLORS",
    "SIZE_CATEGORIES",
    "KDA_CATEGORIES",
    "size_category",
    "kda_category",
    "TASKS",
    "DENSE_TASKS",
    "HEAD_TASKS",
    "DISTANCE_SCALE",
]

#: Axis order of every volume.
DIMS: tuple[str, str, str] = ("z", "y", "x")

#: Semantic classes in label order (label value = index; 0 is background).
SEMANTIC_CLASSES: tuple[str, ...] = (
    "background",
    "membrane",
    "microtubule",
    "particle",
    "actin",
    "dna",
)

#: Colour of each semantic class (background transparent), used by every plot and viewer.
SEMANTIC_COLORS: dict[str, str] = {
    "background": "#00000000",
    "membrane": "#ff8c00",
    "microtubule": "#2ca02c",
    "particle": "#d62728",
    "actin": "#17becf",
    "dna": "#ffd700",
}

#: Instance ids cycle through these (id % 20); 0 is transparent.
INSTANCE_COLORS: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
    "#393b79",
    "#637939",
)

#: SPEC §5 size categories of an instance volume in voxels: (name, lower incl., upper excl.).
SIZE_CATEGORIES: tuple[tuple[str, float, float], ...] = (
    ("tiny", 0.0, 150.0),
    ("small", 150.0, 900.0),
    ("medium", 900.0, 2000.0),
    ("big", 2000.0, 6000.0),
    ("very big", 6000.0, np.inf),
)

#: The thesis' molecular-weight bins (kDa), same names as :data:`SIZE_CATEGORIES`.
KDA_CATEGORIES: tuple[tuple[str, float, float], ...] = (
    ("tiny", 0.0, 40.0),
    ("small", 40.0, 200.0),
    ("medium", 200.0, 600.0),
    ("big", 600.0, 1000.0),
    ("very big", 1000.0, np.inf),
)

#: Every model task (``models.build(task)``).
TASKS: tuple[str, ...] = (
    "dense_ssl",
    "denoise",
    "semantic",
    "lamella",
    "instance",
    "multitask",
    "subtomo_ssl",
)
#: Tasks whose models ``tl.predict`` runs densely over a tomogram.
DENSE_TASKS: tuple[str, ...] = (
    "denoise",
    "semantic",
    "lamella",
    "instance",
    "multitask",
    "dense_ssl",
)
#: The head tasks of a ``"multitask"`` model, in the order its heads run: one backbone
#: pass feeds them all.
HEAD_TASKS: tuple[str, ...] = ("denoise", "lamella", "semantic", "instance")

#: Distance maps are predicted through tanh, clipped at ±5 voxels and divided by 5:
#: a network value of 1 means 5 voxels.
DISTANCE_SCALE: float = 5.0


def _category(value: Any, table: tuple[tuple[str, float, float], ...], what: str) -> Any:
    v = np.asarray(value, dtype=np.float64)
    if np.any(~(v >= 0)):
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    out = np.empty(v.shape, dtype=object)
    for name, lo, hi in table:
        out[(v >= lo) & (v < hi)] = name
    return out.item() if out.ndim == 0 else out


def size_category(n_voxels: Any) -> Any:
    """SPEC §5 size category of instance volume(s) in voxels.

    tiny < 150 ≤ small < 900 ≤ medium < 2000 ≤ big < 6000 ≤ very big. A scalar gives a
    ``str``; an array gives an object array of ``str`` of the same shape.
    """
    return _category(n_voxels, SIZE_CATEGORIES, "n_voxels")


def kda_category(mass_kda: Any) -> Any:
    """The thesis' molecular-weight category of mass(es) in kDa (scalar → ``str``)."""
    return _category(mass_kda, KDA_CATEGORIES, "mass_kda")
