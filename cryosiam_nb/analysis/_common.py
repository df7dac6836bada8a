"""Helpers shared by the analysis tools: input checks, feature access, label ordering."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles


def check_particles(particles: Any, fn: str) -> Particles:
    """``particles`` if it is a non-empty :class:`Particles`, else an :class:`InputError`."""
    if not isinstance(particles, Particles):
        raise InputError(f"{fn}: expected a Particles object, got {type(particles).__name__}")
    if len(particles) == 0:
        raise InputError(f"{fn}: no particles (empty selection)")
    return particles


def target(particles: Any, copy: bool, fn: str) -> Particles:
    """The object a tool writes to: ``particles`` itself, or a deep copy when ``copy``."""
    particles = check_particles(particles, fn)
    return particles.copy() if copy else particles


def features(particles: Particles, use_rep: str, fn: str) -> np.ndarray:
    """``obsm[use_rep]`` as a float32 (N, D) array, with a clear error when it is missing."""
    if use_rep not in particles.obsm:
        hint = (
            "run tl.embed first" if use_rep == "embedding" else f"set particles.obsm[{use_rep!r}]"
        )
        raise InputError(
            f"{fn}: particles have no obsm[{use_rep!r}] ({hint}); "
            f"available: {sorted(particles.obsm)}"
        )
    x = np.asarray(particles.obsm[use_rep], dtype=np.float32)
    x = x.reshape(len(x), -1)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{fn}: obsm[{use_rep!r}] contains NaN or infinite values")
    return x


def subtomogram_stack(particles: Particles, subtomograms: Any, fn: str) -> Any:
    """The subtomogram stack (N, B, B, B) (numpy or dask, not read yet)."""
    if subtomograms is None:
        if "subtomograms" not in particles.obsm:
            raise InputError(
                f"{fn}: no subtomograms: pass subtomograms=... (tl.extract_subtomograms) "
                "or set particles.obsm['subtomograms']"
            )
        subtomograms = particles.obsm.lazy("subtomograms")
    if not hasattr(subtomograms, "shape"):
        subtomograms = np.asarray(subtomograms)
    shape = tuple(int(s) for s in subtomograms.shape)
    if len(shape) == 5 and shape[1] == 1:
        subtomograms = subtomograms[:, 0]
        shape = shape[:1] + shape[2:]
    if len(shape) != 4:
        raise InputError(
            f"{fn}: subtomograms must be (N, B, B, B) (z, y, x) or (N, 1, B, B, B), got {shape}"
        )
    if shape[0] != len(particles):
        raise InputError(
            f"{fn}: {shape[0]} subtomograms for {len(particles)} particles; they must align"
        )
    return subtomograms


def read_rows(stack: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a numpy or dask stack as float32 numpy (dask computes here)."""
    part = stack[start:stop]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part, dtype=np.float32)


def jsonable(obj: Any) -> Any:
    """``obj`` when JSON can hold it, else its ``repr``."""
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return repr(obj)


def ordered_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber integer labels 0..k-1 by decreasing group size (ties by first occurrence)."""
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    for new, i in enumerate(order):
        remap[uniq[i]] = new
    return remap[labels]
