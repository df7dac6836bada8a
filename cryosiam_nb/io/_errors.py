"""The exception and warning types of :mod:`cryosiam_nb.io` (shared by its modules)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message names the file (or argument) and the problem."""


class VoxelSizeWarning(UserWarning):
    """The voxel size in a file header looks unset (0 or 1 Å)."""
