"""STAR files: RELION 3/4 + Warp (``rlnCoordinateX/Y/Z`` voxels) and RELION 5 (centred Å)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryosiam_nb.export._common import ShapeZYX, _check_table, _existing, _names
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["write_star_relion4", "write_star_relion5", "read_star"]


def _write_star(blocks: dict[str, pd.DataFrame], path: Path, overwrite: bool) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        starfile.write(blocks, tmp)
    return path


def _extra_columns(parts: pd.DataFrame, df: pd.DataFrame, extra: Sequence[str]) -> None:
    """Add ``rlnClassNumber`` (1-based cluster code) and ``cryosiamNb<Name>`` columns."""
    if "cluster" in df.columns and "cluster" in extra:
        parts["rlnClassNumber"] = pd.Categorical(df["cluster"].astype(str)).codes + 1
    for col in extra:
        if col in df.columns:
            parts["cryosiamNb" + col.capitalize()] = df[col].astype(str).to_numpy()


def write_star_relion4(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = ("cluster", "species", "score"),
    overwrite: bool = True,
) -> Path:
    """RELION 3/4 and Warp STAR: ``rlnCoordinateX/Y/Z`` in voxels of the picking tomogram.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels) and a ``tomogram`` column.
    path
        Output ``.star`` file (written atomically).
    voxel_size
        Voxel size in Å, written as ``rlnImagePixelSize`` in an ``optics`` block.
    tomogram
        Name for every row (default: the ``tomogram`` column), written as ``rlnTomoName`` and
        ``rlnMicrographName``.
    extra
        Columns kept as ``cryosiamNb<Name>`` (``cluster`` also as a 1-based ``rlnClassNumber``).
    overwrite
        Replace an existing file; ``False`` raises ``FileExistsError``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    df = _check_table(df, str(p), voxel_size)
    names = _names(df, tomogram)
    parts = pd.DataFrame(
        {
            "rlnTomoName": names.to_numpy(),
            "rlnMicrographName": names.to_numpy(),
            "rlnCoordinateX": df["x"].to_numpy(dtype=float),
            "rlnCoordinateY": df["y"].to_numpy(dtype=float),
            "rlnCoordinateZ": df["z"].to_numpy(dtype=float),
            "rlnOpticsGroup": np.ones(len(df), dtype=int),
        }
    )
    _extra_columns(parts, df, extra)
    parts.insert(0, "rlnTomoParticleId", np.arange(1, len(df) + 1))
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [float(voxel_size)],
        }
    )
    return _write_star({"optics": optics, "particles": parts}, p, overwrite)


def _row_shapes(
    shape: ShapeZYX | Mapping[str, ShapeZYX], names: pd.Series, what: str
) -> np.ndarray:
    """(N, 3) tomogram (z, y, x) sizes per row from one shape or ``{name: shape}``."""
    if isinstance(shape, Mapping):
        table = {str(k): tuple(int(s) for s in v) for k, v in shape.items()}
        missing = sorted(set(names) - set(table))
        if missing:
            raise InputError(
                f"{what}: no tomogram shape for {missing} (have {sorted(table)}); give the "
                "(z, y, x) size of every tomogram"
            )
        bad = {k: v for k, v in table.items() if len(v) != 3}
        if bad:
            raise InputError(f"{what}: shapes must be (z, y, x) sizes of tomograms, got {bad}")
        return np.array([table[n] for n in names], dtype=float).reshape(len(names), 3)
    if len(shape) != 3:
        raise InputError(f"{what}: shape must be the (z, y, x) size of the tomogram, got {shape}")
    return np.broadcast_to(np.asarray(shape, dtype=float), (len(names), 3))


def write_star_relion5(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    shape: ShapeZYX | Mapping[str, ShapeZYX],
    tomogram: str | None = None,
    extra: Sequence[str] = ("cluster", "species", "score"),
    overwrite: bool = True,
) -> Path:
    """RELION 5 STAR: ``rlnCenteredCoordinate{X,Y,Z}Angst`` relative to the tomogram centre.

    Centred coordinate = (voxel − size / 2) · ``voxel_size`` Å, per axis.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels) and a ``tomogram`` column.
    path
        Output ``.star`` file (written atomically).
    voxel_size
        Voxel size in Å (``rlnTomoTiltSeriesPixelSize`` and ``rlnImagePixelSize``).
    shape
        (z, y, x) size in voxels of the tomogram the centres refer to, or
        ``{tomogram name: (z, y, x)}`` when the tomograms differ in size.
    tomogram
        Name for every row (default: the ``tomogram`` column).
    extra
        Columns kept as ``cryosiamNb<Name>`` (``cluster`` also as a 1-based ``rlnClassNumber``).
    overwrite
        Replace an existing file; ``False`` raises ``FileExistsError``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    df = _check_table(df, str(p), voxel_size)
    names = _names(df, tomogram)
    size = _row_shapes(shape, names, str(p))
    centred = df[["z", "y", "x"]].to_numpy(float) - size / 2
    parts = pd.DataFrame(
        {
            "rlnTomoName": names.to_numpy(),
            "rlnCenteredCoordinateXAngst": centred[:, 2] * voxel_size,
            "rlnCenteredCoordinateYAngst": centred[:, 1] * voxel_size,
            "rlnCenteredCoordinateZAngst": centred[:, 0] * voxel_size,
            "rlnOpticsGroup": np.ones(len(df), dtype=int),
        }
    )
    _extra_columns(parts, df, extra)
    general = {"rlnTomoSubTomosAre2DStacks": 0}
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnTomoTiltSeriesPixelSize": [float(voxel_size)],
            "rlnImagePixelSize": [float(voxel_size)],
        }
    )
    return _write_star({"general": general, "optics": optics, "particles": parts}, p, overwrite)


def read_star(path: str | os.PathLike[str], voxel_size: float | None = None) -> pd.DataFrame:
    """Read a STAR written by either writer back into a table.

    RELION 5 files need the tomogram shape to undo centring; it is not stored in the
    STAR, so they come back as ``z_A, y_A, x_A`` centred Å (and voxels only when
    ``voxel_size`` is given, still centred).

    Parameters
    ----------
    path
        A ``.star`` file written by :func:`write_star_relion4` or :func:`write_star_relion5`.
    voxel_size
        Voxel size in Å, used only to convert RELION 5 centred Å back to (centred) voxels.

    Returns
    -------
    pandas.DataFrame
        ``tomogram``, ``z, y, x`` (voxels; RELION 3/4) or ``z_A, y_A, x_A`` (centred Å;
        RELION 5), and the ``cryosiamNb*`` columns under their lower-case names.
    """
    p = _existing(path)
    try:
        blocks = starfile.read(p, always_dict=True)
    except Exception as exc:
        raise InputError(f"{p}: not a readable STAR file ({exc})") from exc
    parts = blocks.get("particles")
    if parts is None:
        parts = next(iter(blocks.values()))
    out = pd.DataFrame({"tomogram": parts["rlnTomoName"].astype(str)})
    if "rlnCoordinateX" in parts:
        for ax in "zyx":
            out[ax] = parts[f"rlnCoordinate{ax.upper()}"].astype(float)
    elif "rlnCenteredCoordinateXAngst" in parts:
        for ax in "zyx":
            out[f"{ax}_A"] = parts[f"rlnCenteredCoordinate{ax.upper()}Angst"].astype(float)
            if voxel_size:
                out[ax] = out[f"{ax}_A"] / voxel_size
    else:
        raise InputError(f"{p}: no rlnCoordinateX or rlnCenteredCoordinateXAngst column")
    for col in parts.columns:
        if col.startswith("cryosiamNb"):
            out[col[len("cryosiamNb") :].lower()] = parts[col].astype(str).to_numpy()
    return out
