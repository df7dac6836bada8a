"""CSV coordinates in Å (and voxels) with a comment header naming units and axis order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cryosiam_nb.export._common import _check_table, _existing, _names
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["write_csv", "read_csv"]

_CSV_HEADER = (
    "# cryosiam_nb particle coordinates\n"
    "# units: x_A, y_A, z_A in angstrom (voxel index * voxel_size); x_vox, y_vox, z_vox in voxels\n"
    "# voxel indices are 0-based; columns are written in (x, y, z) order, arrays inside\n"
    "# cryosiam_nb are (z, y, x)\n"
    "# voxel_size_A: {vs}\n"
)


def write_csv(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = ("particle_id", "cluster", "species", "size_category", "score"),
    overwrite: bool = True,
) -> Path:
    """CSV in Å (and voxels), with a ``#`` comment header naming units and axis order.

    Columns: ``tomogram``, ``x_A, y_A, z_A`` (Å = voxels · ``voxel_size``),
    ``x_vox, y_vox, z_vox`` (voxels), then the ``extra`` columns present.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels) and a ``tomogram`` column.
    path
        Output ``.csv`` file (written atomically).
    voxel_size
        Voxel size in Å (also written in the header as ``# voxel_size_A:``).
    tomogram
        Name for every row (default: the ``tomogram`` column).
    extra
        Columns copied as they are (``particle_id`` may also be the table's index).
    overwrite
        Replace an existing file; ``False`` raises ``FileExistsError``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    df = _check_table(df, str(p), voxel_size)
    out = pd.DataFrame({"tomogram": _names(df, tomogram).to_numpy()})
    for ax in "xyz":
        out[f"{ax}_A"] = df[ax].to_numpy(float) * voxel_size
    for ax in "xyz":
        out[f"{ax}_vox"] = df[ax].to_numpy(float)
    for col in extra:
        if col in df.columns:
            out[col] = df[col].to_numpy()
        elif col == "particle_id" and df.index.name == "particle_id":
            out[col] = df.index.to_numpy()
    with atomic_path(p, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(_CSV_HEADER.format(vs=float(voxel_size)))
            out.to_csv(fh, index=False)
    return p


def read_csv(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, float]:
    """Read a CSV written by :func:`write_csv`.

    Returns
    -------
    tuple of (pandas.DataFrame, float)
        The table with ``z, y, x`` in voxels (and the written columns), and the voxel size in Å
        from the header.
    """
    p = _existing(path)
    vs = None
    with open(p) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            if line.startswith("# voxel_size_A:"):
                vs = float(line.split(":", 1)[1])
    df = pd.read_csv(p, comment="#")
    for ax in "zyx":
        df[ax] = df[f"{ax}_vox"].astype(float)
    if vs is None:
        raise InputError(f"{p}: no '# voxel_size_A:' header line; not a cryosiam_nb CSV")
    return df, vs
