"""copick picks JSON (``location`` in Å, one file per run and object)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.export._common import _check_table, _existing, _names
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["write_copick", "read_copick"]


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

    One file per tomogram (copick "run") and object. ``location`` is in Å; orientations are
    not known, so ``transformation_`` is the identity and ``trust_orientation`` is false.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels), a ``tomogram`` column and optionally
        ``score`` and ``cluster``.
    folder
        copick root folder.
    voxel_size
        Voxel size in Å (``voxel_spacing``; locations are voxels · ``voxel_size``).
    object_name
        Pickable object name; ``"cluster"`` (with a ``cluster`` column) makes each cluster its
        own object ``cluster-<name>``.
    user_id, session_id
        copick user and session of the picks.
    tomogram
        Run name for every row (default: the ``tomogram`` column).
    overwrite
        Replace existing files; ``False`` raises ``FileExistsError``.

    Returns
    -------
    list of pathlib.Path
        The JSON files written.
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
    """Read one copick picks JSON back into a table.

    Returns
    -------
    pandas.DataFrame
        ``tomogram`` (run), ``object``, ``z, y, x`` in voxels (Å / ``voxel_spacing``) and
        ``score``.
    """
    p = _existing(path)
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
