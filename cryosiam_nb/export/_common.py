"""Table checks shared by the export writers (centres ``z, y, x`` in voxels, voxel size Å)."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError

#: A tomogram size in voxels, axis order (z, y, x).
ShapeZYX = Sequence[int]


def _check_table(df: pd.DataFrame, what: str, voxel_size: float | None = None) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise InputError(f"{what}: the particle selection is empty; nothing to export")
    missing = [c for c in ("z", "y", "x") if c not in df.columns]
    if missing:
        raise InputError(f"{what}: the table lacks centre columns {missing} (voxels, z y x)")
    if not np.isfinite(df[["z", "y", "x"]].to_numpy(dtype=float)).all():
        raise InputError(f"{what}: some particle centres are NaN or infinite")
    if voxel_size is not None and (not np.isfinite(voxel_size) or voxel_size <= 0):
        raise InputError(f"{what}: voxel_size must be a positive number of Å, got {voxel_size!r}")
    return df


def _names(df: pd.DataFrame, tomogram: str | None) -> pd.Series:
    if tomogram is not None:
        return pd.Series([str(tomogram)] * len(df), index=df.index)
    if "tomogram" in df.columns:
        return df["tomogram"].astype(str)
    raise InputError("export: give tomogram=<name> or a 'tomogram' column in the table")


def _existing(path: str | PathLike[str]) -> Path:
    """``path`` as a Path, or an InputError naming it when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    return p
