"""Particle-coordinate export for subtomogram averaging: RELION 3/4, Warp, RELION 5, CSV, copick.

:func:`write` is the one entry point (used by the CLI, the demo and the explorer): it takes a
:class:`~cryosiam_nb.particles.Particles` object or a table, finds the voxel size and
dispatches to the writer of the format. The per-format writers live in the submodules
``star``, ``csv`` and ``copick`` and are re-exported here.

Input of every writer is a pandas table with particle centres ``z, y, x`` in **voxels**
(0-based voxel indices of the tomogram the particles were picked in, axis order z, y, x),
a ``tomogram`` column (name), and a voxel size in Å. Points are written (x, y, z) only
here, at export.

Conventions (documented in each writer):
- RELION 3/4: ``rlnCoordinateX/Y/Z`` in pixels of the unbinned tilt series (voxel × binning,
  binning = voxel size / ``tilt_series_pixel_size``; binning 1 when neither is given).
- Warp: as RELION 4, with ``rlnMicrographName`` = ``<tomogram>.tomostar``.
- RELION 5: ``rlnCenteredCoordinate{X,Y,Z}Angst`` = (voxel − size / 2) · voxel size, i.e. Å
  relative to the centre of the tomogram of ``shape`` (z, y, x) voxels;
  ``rlnTomoTiltSeriesPixelSize`` = the tilt-series pixel size, so RELION's
  ``Å / pixel size + rlnTomoSize / 2`` lands on the particle.
- Cluster ids: STAR ``rlnClassNumber`` (1-based int) + ``cryosiamNbCluster`` = ``c<name>``;
  CSV quoted text (read with ``dtype=str``).
- CSV: ``x_A, y_A, z_A`` in Å (= voxels · voxel size) plus voxel columns, with a comment
  header stating units and axis order.
- copick: ``copick_config.json`` + one picks JSON per (run, object): ``location`` in Å,
  identity transformation; unsafe run/object/user/session names are refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.export._common import ShapeZYX, _check_table
from cryosiam_nb.export.copick import CONFIG_NAME, DEFAULT_USER, read_copick, write_copick
from cryosiam_nb.export.csv import read_csv, write_csv
from cryosiam_nb.export.star import (
    read_star,
    write_star_relion4,
    write_star_relion5,
    write_star_warp,
)
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles

__all__ = [
    "FORMATS",
    "format_of",
    "write",
    "write_star_relion4",
    "write_star_warp",
    "write_star_relion5",
    "write_csv",
    "write_copick",
    "read_star",
    "read_csv",
    "read_copick",
    "CONFIG_NAME",
    "DEFAULT_USER",
]

#: Format names accepted by :func:`write` (aliases included) → the writer's name.
FORMATS: dict[str, str] = {
    "relion4": "relion4",
    "relion3": "relion4",
    "star": "relion4",
    "warp": "warp",
    "relion5": "relion5",
    "csv": "csv",
    "copick": "copick",
}
#: File suffixes :func:`write` infers a format from when ``format`` is not given.
_SUFFIXES: dict[str, str] = {".star": "relion4", ".csv": "csv"}


def format_of(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The writer name (``relion4``, ``warp``, ``relion5``, ``csv``, ``copick``) for an export.

    Parameters
    ----------
    path
        Target file (or copick root folder).
    format
        A name or alias of :data:`FORMATS` (``relion3``/``star`` mean ``relion4``);
        ``None`` infers it from the suffix of ``path`` (``.star`` → ``relion4``,
        ``.csv`` → ``csv``).

    Returns
    -------
    str
        One of ``relion4``, ``warp``, ``relion5``, ``csv``, ``copick``.
    """
    if format is None:
        suffix = Path(path).suffix.lower()
        if suffix not in _SUFFIXES:
            raise InputError(
                f"{path}: cannot tell the export format from the suffix {suffix!r}; give "
                f"format= one of {sorted(set(FORMATS.values()))}"
            )
        return _SUFFIXES[suffix]
    key = FORMATS.get(str(format).lower())
    if key is None:
        raise InputError(f"export format {format!r} unknown; use one of {sorted(FORMATS)}")
    return key


def _table_voxel_size(df: pd.DataFrame, voxel_size: float | None, what: str) -> float:
    """The one voxel size (Å) of an export: ``voxel_size=`` or the table's column."""
    col = None
    values = df["voxel_size"].to_numpy(dtype=float) if "voxel_size" in df.columns else None
    if values is not None and len(values) and not np.isnan(values).all():  # all NaN: unknown
        vs = np.unique(values)
        if len(vs) != 1 or not np.isfinite(vs[0]):
            raise InputError(
                f"{what}: the particles have several voxel sizes {vs.tolist()} Å; export the "
                "tomograms of one voxel size at a time (e.g. choose clusters or select per tomogram)"
            )
        col = float(vs[0])
    if voxel_size is None:
        if col is None:
            raise InputError(f"{what}: give voxel_size= (Å) or a 'voxel_size' column in the table")
        return col
    voxel_size = float(voxel_size)
    if col is not None and not np.isclose(col, voxel_size, rtol=1e-6):
        raise InputError(
            f"{what}: voxel_size={voxel_size} Å disagrees with the table's voxel_size column "
            f"({col} Å)"
        )
    return voxel_size


def write(
    data: Particles | pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    voxel_size: float | None = None,
    tomogram_shape: ShapeZYX | Mapping[str, ShapeZYX] | None = None,
    tomogram: str | None = None,
    extra: Sequence[str] | None = None,
    tilt_series_pixel_size: float | None = None,
    binning: float | None = None,
    object_name: str = "particle",
    user_id: str = DEFAULT_USER,
    session_id: str = "0",
    radius: float | Mapping[str, float] | None = None,
    colors: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write particle coordinates in one of the subtomogram-averaging formats.

    Dispatches to :func:`write_star_relion4` (RELION 3/4 STAR), :func:`write_star_warp`
    (Warp STAR), :func:`write_star_relion5` (RELION 5 STAR), :func:`write_csv` (Å and voxels)
    or :func:`write_copick` (copick project); the file is the same as that writer's.

    Parameters
    ----------
    data
        A :class:`~cryosiam_nb.particles.Particles` object (its ``obs``, with the particle ids
        as a ``particle_id`` column) or a table with particle centres ``z, y, x`` in voxels
        (0-based indices of the picking tomogram) and a ``tomogram`` column. Every row is
        written; select rows first (``particles.subset(...)``) to write fewer.
    path
        Output file; for ``copick`` the root folder (``<path>/copick_config.json``,
        ``<path>/ExperimentRuns/<run>/Picks/``).
    format
        ``"relion4"`` (aliases ``"relion3"``, ``"star"``), ``"warp"``, ``"relion5"``, ``"csv"``
        or ``"copick"``. ``None`` infers it from the suffix: ``.star`` → ``relion4``,
        ``.csv`` → ``csv``.
    voxel_size
        Voxel size of the picking tomogram in Å. Default: the table's ``voxel_size`` column
        (which must hold one value); when both are given they must agree.
    tomogram_shape
        RELION 5 only: the (z, y, x) size in voxels of the tomogram(s) the centres refer to, one
        shape or ``{tomogram name: shape}``. Default for a Particles object:
        ``uns["tomogram_shapes"]``.
    tomogram
        Tomogram name for every row (default: the ``tomogram`` column).
    extra
        STAR/CSV: table columns to keep (STAR: as ``cryosiamNb<Name>`` plus ``rlnClassNumber``
        for ``cluster``). Default: the writer's own default.
    tilt_series_pixel_size, binning
        STAR only: pixel size (Å) of the unbinned tilt series the tomogram was reconstructed
        from, or the tomogram's binning (voxel size / tilt-series pixel size); give either.
        Default: the tomogram is unbinned (binning 1). Default for a Particles object:
        ``uns["tilt_series_pixel_size"]`` when set.
    object_name
        copick only: the pickable object name; ``"cluster"`` writes one object per cluster.
    user_id, session_id
        copick only: user and session of the picks (no ``_``).
    radius, colors
        copick only: object radius (Å) and colour, one value or per object/cluster name.
    overwrite
        Replace an existing file (written atomically); ``False`` raises ``FileExistsError``.

    Returns
    -------
    pathlib.Path
        The file written (for ``copick``: the root folder).

    Raises
    ------
    InputError
        Unknown or uninferable format, empty table, missing centre columns, no or several voxel
        sizes, missing tomogram shape for RELION 5, inconsistent tilt-series pixel size and
        binning, names a format cannot hold (see the writers).
    """
    key = format_of(path, format)
    p = Path(path)
    if isinstance(data, Particles):
        df = data.obs.reset_index()
        if tomogram_shape is None and key == "relion5":
            tomogram_shape = data.uns.get("tomogram_shapes") or None
        if tilt_series_pixel_size is None and binning is None:
            tilt_series_pixel_size = data.uns.get("tilt_series_pixel_size")
    elif isinstance(data, pd.DataFrame):
        df = data
    else:
        raise InputError(
            f"{p}: expected a Particles object or a pandas DataFrame, got {type(data).__name__}"
        )
    _check_table(df, str(p))
    vs = _table_voxel_size(df, voxel_size, str(p))
    opts: dict[str, Any] = {"tomogram": tomogram, "overwrite": overwrite}
    if extra is not None and key != "copick":
        opts["extra"] = tuple(extra)
    if key in ("relion4", "warp", "relion5"):
        opts.update(tilt_series_pixel_size=tilt_series_pixel_size, binning=binning)
    if key == "relion4":
        return write_star_relion4(df, p, vs, **opts)
    if key == "warp":
        return write_star_warp(df, p, vs, **opts)
    if key == "relion5":
        if tomogram_shape is None:
            raise InputError(
                f"{p}: RELION 5 export needs the (z, y, x) shape of the tomogram(s): give "
                "tomogram_shape=(nz, ny, nx) or {name: (nz, ny, nx)}"
            )
        return write_star_relion5(df, p, vs, tomogram_shape, **opts)
    if key == "csv":
        return write_csv(df, p, vs, **opts)
    write_copick(
        df,
        p,
        vs,
        object_name=object_name,
        user_id=user_id,
        session_id=session_id,
        radius=radius,
        colors=colors,
        **opts,
    )
    return p
