"""Particle-coordinate export for subtomogram averaging: RELION 3/4 + Warp, RELION 5, CSV, copick.

Input everywhere is a pandas table with particle centres ``z, y, x`` in **voxels**
(0-based voxel indices of the tomogram the particles were picked in, axis order z, y, x),
a ``tomogram`` column (name), and a voxel size in Å. Points are written (x, y, z) only
here, at export.

Conventions (documented in each writer):
- RELION 3/4 + Warp: ``rlnCoordinateX/Y/Z`` in voxels (pixels of the picking tomogram),
  ``rlnTomoName`` and ``rlnMicrographName`` = tomogram name.
- RELION 5: ``rlnCenteredCoordinate{X,Y,Z}Angst`` = (coordinate − size / 2) · voxel size,
  i.e. Å relative to the centre of the tomogram of ``shape`` (z, y, x) voxels.
- CSV: ``x_A, y_A, z_A`` in Å (= voxels · voxel size) plus voxel columns, with a comment
  header stating units and axis order.
- copick: one picks JSON per (run, object): ``location`` in Å, identity transformation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryosiam_nb.io import InputError, atomic_path

__all__ = [
    "write_star_relion4",
    "write_star_relion5",
    "write_csv",
    "write_copick",
    "read_star",
    "read_csv",
    "read_copick",
]

_CSV_HEADER = (
    "# cryosiam_nb particle coordinates\n"
    "# units: x_A, y_A, z_A in angstrom (voxel index * voxel_size); x_vox, y_vox, z_vox in voxels\n"
    "# voxel indices are 0-based; columns are written in (x, y, z) order, arrays inside\n"
    "# cryosiam_nb are (z, y, x)\n"
    "# voxel_size_A: {vs}\n"
)


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


def _write_star(blocks: dict[str, pd.DataFrame], path: Path, overwrite: bool) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        starfile.write(blocks, tmp)
    return path


def write_star_relion4(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = ("cluster", "species", "score"),
    overwrite: bool = True,
) -> Path:
    """RELION 3/4 and Warp STAR: ``rlnCoordinateX/Y/Z`` in voxels of the picking tomogram.

    ``voxel_size`` (Å) is written as ``rlnImagePixelSize`` in an optics block.
    ``extra`` columns present in the table are kept as ``cryosiamNb<Name>``.
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
    if "cluster" in df.columns and "cluster" in extra:
        codes = pd.Categorical(df["cluster"].astype(str)).codes + 1
        parts["rlnClassNumber"] = codes
    for col in extra:
        if col in df.columns:
            parts["cryosiamNb" + col.capitalize()] = df[col].astype(str).to_numpy()
    parts.insert(0, "rlnTomoParticleId", np.arange(1, len(df) + 1))
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [float(voxel_size)],
        }
    )
    return _write_star({"optics": optics, "particles": parts}, p, overwrite)


def write_star_relion5(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    shape: tuple[int, int, int],
    tomogram: str | None = None,
    extra: Sequence[str] = ("cluster", "species", "score"),
    overwrite: bool = True,
) -> Path:
    """RELION 5 STAR: ``rlnCenteredCoordinate{X,Y,Z}Angst`` relative to the tomogram centre.

    ``shape`` is the (z, y, x) size in voxels of the tomogram the centres refer to;
    centred coordinate = (voxel − size / 2) · ``voxel_size`` Å.
    """
    p = Path(path)
    df = _check_table(df, str(p), voxel_size)
    if len(shape) != 3:
        raise InputError(f"{p}: shape must be the (z, y, x) size of the tomogram, got {shape}")
    names = _names(df, tomogram)
    nz, ny, nx = (float(s) for s in shape)
    parts = pd.DataFrame(
        {
            "rlnTomoName": names.to_numpy(),
            "rlnCenteredCoordinateXAngst": (df["x"].to_numpy(float) - nx / 2) * voxel_size,
            "rlnCenteredCoordinateYAngst": (df["y"].to_numpy(float) - ny / 2) * voxel_size,
            "rlnCenteredCoordinateZAngst": (df["z"].to_numpy(float) - nz / 2) * voxel_size,
            "rlnOpticsGroup": np.ones(len(df), dtype=int),
        }
    )
    if "cluster" in df.columns and "cluster" in extra:
        parts["rlnClassNumber"] = pd.Categorical(df["cluster"].astype(str)).codes + 1
    for col in extra:
        if col in df.columns:
            parts["cryosiamNb" + col.capitalize()] = df[col].astype(str).to_numpy()
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
    """Read a STAR written by either writer back into a table with ``z, y, x`` voxels.

    RELION 5 files need the tomogram shape to undo centring; it is not stored in the
    STAR, so they come back as ``z_A, y_A, x_A`` centred Å (and voxels only when
    ``voxel_size`` is given, still centred).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
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


def write_csv(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = ("particle_id", "cluster", "species", "size_category", "score"),
    overwrite: bool = True,
) -> Path:
    """CSV in Å (and voxels), with a ``#`` comment header naming units and axis order."""
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
    """Read a CSV written by :func:`write_csv`; returns (table with z, y, x voxels, voxel size Å)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
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


def write_copick(
    df: pd.DataFrame,
    folder: str | os.PathLike[str],
    voxel_size: float,
    object_name: str = "particle",
    user_id: str = "cryosiam_nb",
    session_id: str = "0",
    tomogram: str | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """copick picks: ``<folder>/ExperimentRuns/<run>/Picks/<user>_<session>_<object>.json``.

    One file per tomogram (copick "run"). ``location`` is in Å; orientations are not
    known, so ``transformation_`` is the identity and ``trust_orientation`` is false.
    When the table has a ``cluster`` column and ``object_name`` is ``"cluster"``, each
    cluster becomes its own pickable object.
    """
    root = Path(folder)
    df = _check_table(df, str(root), voxel_size)
    runs = _names(df, tomogram)
    written: list[Path] = []
    groups: list[tuple[str, str, pd.DataFrame]] = []
    for run, sub in df.groupby(runs.to_numpy(), sort=True):
        if object_name == "cluster" and "cluster" in sub.columns:
            for cl, sub2 in sub.groupby(sub["cluster"].astype(str), sort=True):
                groups.append((str(run), f"cluster-{cl}", sub2))
        else:
            groups.append((str(run), object_name, sub))
    for run, obj, sub in groups:
        points = []
        for i, (_, row) in enumerate(sub.iterrows()):
            points.append(
                {
                    "location": {
                        "x": float(row["x"]) * voxel_size,
                        "y": float(row["y"]) * voxel_size,
                        "z": float(row["z"]) * voxel_size,
                    },
                    "transformation_": np.eye(4).tolist(),
                    "instance_id": i,
                    "score": float(row["score"])
                    if "score" in row and pd.notna(row["score"])
                    else 1.0,
                }
            )
        doc: dict[str, Any] = {
            "pickable_object_name": obj,
            "user_id": user_id,
            "session_id": session_id,
            "run_name": run,
            "voxel_spacing": float(voxel_size),
            "unit": "angstrom",
            "points": points,
            "trust_orientation": False,
        }
        p = root / "ExperimentRuns" / run / "Picks" / f"{user_id}_{session_id}_{obj}.json"
        with atomic_path(p, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(doc, indent=1))
        written.append(p)
    return written


def read_copick(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read one copick picks JSON back into a table with z, y, x in voxels."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc})") from exc
    vs = float(doc.get("voxel_spacing") or 1.0)
    rows = [
        {
            "tomogram": doc["run_name"],
            "object": doc["pickable_object_name"],
            "z": pt["location"]["z"] / vs,
            "y": pt["location"]["y"] / vs,
            "x": pt["location"]["x"] / vs,
            "score": pt.get("score", 1.0),
        }
        for pt in doc["points"]
    ]
    return pd.DataFrame(rows)
