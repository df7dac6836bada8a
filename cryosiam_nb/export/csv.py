"""CSV coordinates in Å (and voxels) with a comment header naming units and axis order.

Text values (tomogram, particle id, cluster, species, ...) are always written in double
quotes and numbers never are, so a row whose name starts with ``#`` is not a comment and
an empty name stays an empty string. Cluster ids and other names are text: read them with
``dtype=str`` (as :func:`read_csv` does) or a reader will turn ``"0.1"`` into 0.1.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cryosiam_nb.export._common import (
    NAME_COLUMNS,
    _existing,
    _prepare,
    column_or_index,
    text_column,
)
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["write_csv", "read_csv"]

_CSV_HEADER = (
    "# cryosiam_nb particle coordinates\n"
    "# units: x_A, y_A, z_A in angstrom (voxel index * voxel_size); x_vox, y_vox, z_vox in voxels\n"
    "# voxel indices are 0-based; columns are written in (x, y, z) order, arrays inside\n"
    "# cryosiam_nb are (z, y, x)\n"
    "# quoted values are text (names, cluster ids): read them as strings\n"
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
    ``x_vox, y_vox, z_vox`` (voxels), then the ``extra`` columns present. Name columns
    (``tomogram``, ``particle_id``, ``cluster``, ...) are quoted text, missing names are
    empty strings; numbers are unquoted.

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
    p, df, names = _prepare(df, path, voxel_size, tomogram)
    out = pd.DataFrame({"tomogram": text_column(names)})
    for ax in "xyz":
        out[f"{ax}_A"] = df[ax].to_numpy(float) * voxel_size
    for ax in "xyz":
        out[f"{ax}_vox"] = df[ax].to_numpy(float)
    for col in extra:
        values = column_or_index(df, col)
        if values is None:
            continue
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        out[col] = values.to_numpy() if numeric and col not in NAME_COLUMNS else text_column(values)
    with atomic_path(p, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(_CSV_HEADER.format(vs=float(voxel_size)))
            out.to_csv(fh, index=False, quoting=csv.QUOTE_NONNUMERIC)
    return p


def read_csv(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, float]:
    """Read a CSV written by :func:`write_csv`: every row, names as exact text.

    Only the leading comment header is skipped (a value starting with ``#`` is data); name
    columns come back as ``str`` (``"0.1"`` stays ``"0.1"``, an empty name stays ``""``),
    the other columns as numbers where they parse.

    Returns
    -------
    tuple of (pandas.DataFrame, float)
        The table with ``z, y, x`` in voxels (and the written columns), and the voxel size in Å
        from the header.
    """
    p = _existing(path)
    vs = None
    n_header = 0
    with open(p) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            n_header += 1
            if line.startswith("# voxel_size_A:"):
                vs = float(line.split(":", 1)[1])
    if vs is None:
        raise InputError(f"{p}: no '# voxel_size_A:' header line; not a cryosiam_nb CSV")
    try:
        df = pd.read_csv(p, skiprows=n_header, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{p}: not a readable CSV ({exc})") from exc
    missing = [f"{ax}_vox" for ax in "zyx" if f"{ax}_vox" not in df.columns]
    if missing:
        raise InputError(f"{p}: the CSV lacks the voxel columns {missing}")
    for col in df.columns:
        if col in NAME_COLUMNS:
            continue
        try:
            df[col] = pd.to_numeric(df[col].mask(df[col] == ""))
        except (TypeError, ValueError):
            pass
    for ax in "zyx":
        df[ax] = df[f"{ax}_vox"].astype(float)
    return df, vs
