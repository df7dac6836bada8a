"""Tomograms of a copick project or a CryoET Data Portal download, as a table.

Layouts recognised (every tomogram is an OME-Zarr image that :func:`cryosiam_nb.io.read`
opens, at any pyramid ``level``):

- copick (file-system projects)::

    <root>/ExperimentRuns/<run>/VoxelSpacing<Å, 3 decimals>/<tomo_type>.zarr

  (``<tomo_type>_<feature>_features.zarr`` feature stores and the run's
  ``Segmentations/`` are not tomograms and are skipped);
- CryoET Data Portal (``<dataset id>/<run>/...`` as downloaded)::

    <run>/Reconstructions/VoxelSpacing<Å>/Tomograms/<tomogram id>/<run>.zarr
    <run>/Tomograms/VoxelSpacing<Å>/CanonicalTomogram/<run>.zarr      (older releases)

  (``Annotations/`` segmentation masks are skipped).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ._errors import InputError

_VS_DIR = re.compile(r"^VoxelSpacing(\d+(?:\.\d*)?|\.\d+)$")
_NOT_TOMOGRAMS = {"Annotations", "Segmentations", "Picks", "Meshes"}
_PORTAL_PARENTS = {"Reconstructions", "Tomograms"}
_ZARR_META = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
#: Columns of :func:`list_tomograms`.
COLUMNS = ("run", "voxel_spacing", "tomo_type", "path", "layout", "dataset")


def list_tomograms(
    root: str | os.PathLike[str],
    *,
    voxel_spacing: float | None = None,
    tomo_type: str | None = None,
) -> Any:
    """Table of the tomograms under a copick project or a CryoET Data Portal download.

    Parameters
    ----------
    root
        A copick project folder (holding ``ExperimentRuns/``), a copick configuration JSON
        (its local ``static_root`` and ``overlay_root`` are searched; ``local://`` URLs or
        plain paths), a Data Portal dataset / run folder, or any folder above them.
    voxel_spacing
        Keep only this voxel spacing (Å, from the ``VoxelSpacing<Å>`` folder name;
        matched to 0.1 %).
    tomo_type
        Keep only this tomogram type (copick: the store's name, e.g. ``"wbp"`` or
        ``"denoised"``; Data Portal: the tomogram id folder, e.g. ``"100"``, or
        ``"CanonicalTomogram"``).

    Returns
    -------
    pandas.DataFrame
        One row per tomogram, sorted by run, voxel spacing, type, with columns ``run``,
        ``voxel_spacing`` (Å, float), ``tomo_type``, ``path`` (the ``.zarr`` store, for
        ``io.read(path, level=...)``), ``layout`` (``"copick"``, ``"portal"`` or
        ``"other"``) and ``dataset`` (Data Portal dataset folder, else ``None``). A tomogram
        found in both a copick static and overlay root is listed once (static first).

    Raises
    ------
    InputError
        ``root`` missing, an unreadable or non-local copick configuration, or no tomogram
        found (the message names the layouts looked for and, with filters, what exists).
    """
    import pandas as pd

    base = Path(root)
    if not base.exists():
        raise InputError(f"{base}: no such file or directory")
    roots = _config_roots(base) if base.is_file() else [base]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, float, str]] = set()
    for r in roots:
        for row in _scan(r):
            key = (row["run"], round(row["voxel_spacing"], 3), row["tomo_type"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    if not rows:
        raise InputError(
            f"{base}: found no tomograms; expected a copick project "
            "(ExperimentRuns/<run>/VoxelSpacing<Å>/<type>.zarr) or a CryoET Data Portal "
            "download (<run>/Reconstructions/VoxelSpacing<Å>/Tomograms/<id>/<run>.zarr)"
        )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    keep = pd.Series(True, index=table.index)
    if voxel_spacing is not None:
        vs = float(voxel_spacing)
        keep &= (table["voxel_spacing"] - vs).abs() <= 1e-3 * max(vs, 1e-9)
    if tomo_type is not None:
        keep &= table["tomo_type"] == str(tomo_type)
    if not keep.any():
        have = sorted({(float(v), str(t)) for v, t in zip(table.voxel_spacing, table.tomo_type)})
        raise InputError(
            f"{base}: no tomogram with voxel_spacing={voxel_spacing!r}, tomo_type={tomo_type!r}; "
            f"found (voxel spacing Å, type): {', '.join(f'({v:g}, {t})' for v, t in have)}"
        )
    table = table[keep].sort_values(["run", "voxel_spacing", "tomo_type"], kind="stable")
    return table.reset_index(drop=True)


def _config_roots(cfg: Path) -> list[Path]:
    """The local static and overlay roots of a copick configuration file."""
    try:
        conf = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg}: not a readable copick configuration JSON ({exc})") from exc
    if not isinstance(conf, dict):
        raise InputError(f"{cfg}: a copick configuration is a JSON object")
    roots = []
    for key in ("static_root", "overlay_root"):
        url = conf.get(key)
        if not url:
            continue
        proto, sep, rest = str(url).partition("://")
        if sep and proto not in ("local", "file"):
            raise InputError(
                f"{cfg}: {key} is {url!r}; only local copick roots (local:// or a path) "
                "can be listed — download the data first"
            )
        path = Path(rest if sep else url)
        if not path.is_dir():
            raise InputError(f"{cfg}: {key} {str(path)!r} is not a folder")
        roots.append(path)
    if not roots:
        raise InputError(f"{cfg}: the copick configuration names no static_root or overlay_root")
    return roots


def _scan(root: Path) -> list[dict[str, Any]]:
    """Every tomogram store below ``root`` (zarr stores are not descended into)."""
    rows = []
    visited: set[str] = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle
            dirnames[:] = []
            continue
        visited.add(real)
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d in _NOT_TOMOGRAMS:
                continue  # hidden (e.g. half-written .x.zarr.tmp-*) or not tomograms
            if d.endswith(".zarr"):
                has_meta = any((here / d / m).is_file() for m in _ZARR_META)
                row = _row(here / d) if has_meta else None  # an empty / half-made folder
                if row is not None:
                    rows.append(row)
                continue
            keep.append(d)
        dirnames[:] = keep
    return rows


def _row(store: Path) -> dict[str, Any] | None:
    """The table row of a tomogram store, or None when it is in no known layout."""
    parts = store.parts
    vs_at = next((i for i in range(len(parts) - 2, -1, -1) if _VS_DIR.match(parts[i])), None)
    if vs_at is None or store.stem.endswith("_features"):
        return None
    vs_dir = Path(*parts[: vs_at + 1])
    voxel_spacing = float(_VS_DIR.match(parts[vs_at]).group(1))  # type: ignore[union-attr]
    parent = vs_dir.parent
    if parent.name in _PORTAL_PARENTS:
        run_dir, layout = parent.parent, "portal"
        dataset: str | None = run_dir.parent.name or None
    else:
        run_dir = parent
        layout = "copick" if run_dir.parent.name == "ExperimentRuns" else "other"
        dataset = None
    inner = list(parts[vs_at + 1 :])
    if layout == "portal" and inner and inner[0] == "Tomograms":
        inner = inner[1:]
    stem = inner[-1][: -len(".zarr")]
    if len(inner) > 1 and stem == run_dir.name:
        inner = inner[:-1]
    else:
        inner[-1] = stem
    return {
        "run": run_dir.name,
        "voxel_spacing": voxel_spacing,
        "tomo_type": "/".join(inner),
        "path": str(store),
        "layout": layout,
        "dataset": dataset,
    }
