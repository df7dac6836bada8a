"""Steps shared by the export writers: table checks, names, tilt-series pixel size.

Every writer starts with :func:`_prepare` (path, checked table, tomogram name per row); the
RELION writers also call :func:`tilt_series` for the tilt-series pixel size and binning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError

#: A tomogram size in voxels, axis order (z, y, x).
ShapeZYX = Sequence[int]

#: Table columns that hold names (text), never numbers: written and read back as strings,
#: so "1", "0.10" or "#a" come back exactly (CSV: ``dtype=str``; STAR: quoted text columns).
NAME_COLUMNS: tuple[str, ...] = (
    "tomogram",
    "particle_id",
    "cluster",
    "species",
    "size_category",
    "semantic_class",
    "object",
)


def _check_table(df: pd.DataFrame, what: str, voxel_size: float | None = None) -> pd.DataFrame:
    """``df`` when it has finite centres ``z, y, x`` (voxels) and rows; else an InputError."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise InputError(f"{what}: the particle selection is empty; nothing to export")
    missing = [c for c in ("z", "y", "x") if c not in df.columns]
    if missing:
        raise InputError(f"{what}: the table lacks centre columns {missing} (voxels, z y x)")
    if not np.isfinite(df[["z", "y", "x"]].to_numpy(dtype=float)).all():
        raise InputError(f"{what}: some particle centres are NaN or infinite")
    if voxel_size is not None:
        _positive(voxel_size, "voxel_size", what)
    return df


def _positive(value: float, name: str, what: str) -> float:
    """``value`` as a float when it is a finite number > 0 (Å or a factor); else an InputError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{what}: {name} must be a positive number, got {value!r}")
    return v


def _names(df: pd.DataFrame, tomogram: str | None) -> pd.Series:
    """The tomogram name of every row: ``tomogram=`` or the table's ``tomogram`` column."""
    if tomogram is not None:
        return pd.Series([str(tomogram)] * len(df), index=df.index)
    if "tomogram" in df.columns:
        return df["tomogram"].astype(str)
    raise InputError("export: give tomogram=<name> or a 'tomogram' column in the table")


def _prepare(
    df: pd.DataFrame,
    path: str | PathLike[str],
    voxel_size: float,
    tomogram: str | None,
) -> tuple[Path, pd.DataFrame, pd.Series]:
    """The first steps of every writer: the output path, the checked table, row names."""
    p = Path(path)
    df = _check_table(df, str(p), voxel_size)
    return p, df, _names(df, tomogram)


def column_or_index(df: pd.DataFrame, col: str) -> pd.Series | None:
    """Table column ``col``, or the index when it is named ``col``; ``None`` when absent."""
    if col in df.columns:
        return df[col]
    if df.index.name == col:
        return pd.Series(df.index.to_numpy(), index=df.index)
    return None


def text_column(values: pd.Series | np.ndarray) -> np.ndarray:
    """Names as ``str`` (object array); missing values (NaN/None) become ``""``."""
    s = pd.Series(values).astype(object)
    return s.where(s.notna(), "").astype(str).to_numpy(dtype=object)


def tilt_series(
    voxel_size: float,
    tilt_series_pixel_size: float | None,
    binning: float | None,
    what: str,
) -> tuple[float, float]:
    """(tilt-series pixel size in Å, binning) of a tomogram with voxels of ``voxel_size`` Å.

    ``binning`` = voxel size / tilt-series pixel size (≥ 1). Give either; with neither the
    tomogram is taken as unbinned (pixel size = voxel size, binning 1). When both are given
    they must agree.
    """
    vs = _positive(voxel_size, "voxel_size", what)
    px = (
        None
        if tilt_series_pixel_size is None
        else _positive(tilt_series_pixel_size, "tilt_series_pixel_size", what)
    )
    b = None if binning is None else _positive(binning, "binning", what)
    if px is None and b is None:
        px, b = vs, 1.0
    elif px is None:
        px = vs / b
    elif b is None:
        b = vs / px
    elif not math.isclose(vs / px, b, rel_tol=1e-6):
        raise InputError(
            f"{what}: binning={b} disagrees with voxel_size / tilt_series_pixel_size "
            f"= {vs} / {px} = {vs / px:g}"
        )
    if b < 1 - 1e-6:
        raise InputError(
            f"{what}: the tilt-series pixel size ({px} Å) is larger than the tomogram voxel "
            f"size ({vs} Å); binning must be ≥ 1"
        )
    return float(px), float(b)


def _existing(path: str | PathLike[str]) -> Path:
    """``path`` as a Path, or an InputError naming it when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    return p
