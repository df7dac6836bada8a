"""The particle table of an instance volume (``tl.particles``), one row per instance."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from cryosiam_nb.constants import SEMANTIC_CLASSES, size_category
from cryosiam_nb.io import InputError, as_volume, voxel_size_of

__all__ = ["particles", "TABLE_COLUMNS"]

#: Columns of :func:`particles`, in order.
TABLE_COLUMNS = [
    "particle_id",
    "tomogram",
    "z",
    "y",
    "x",
    "z_A",
    "y_A",
    "x_A",
    "voxel_size",
    "n_voxels",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "size_category",
    "semantic_class",
]


def _chunk_stats(lab: np.ndarray, origin: Sequence[int], sem: np.ndarray | None) -> pd.DataFrame:
    z, y, x = np.nonzero(lab)
    if z.size == 0:
        return pd.DataFrame()
    df = pd.DataFrame(
        {
            "id": lab[z, y, x].astype(np.int64),
            "z": z + origin[0],
            "y": y + origin[1],
            "x": x + origin[2],
        }
    )
    g = df.groupby("id")
    stats = g.agg(
        n=("z", "size"),
        sz=("z", "sum"),
        sy=("y", "sum"),
        sx=("x", "sum"),
        z0=("z", "min"),
        y0=("y", "min"),
        x0=("x", "min"),
        z1=("z", "max"),
        y1=("y", "max"),
        x1=("x", "max"),
    )
    if sem is not None:
        df["c"] = sem[z, y, x].astype(np.int64)
        cc = df.groupby(["id", "c"]).size().unstack(fill_value=0)
        cc.columns = [f"c{int(c)}" for c in cc.columns]
        stats = stats.join(cc)
    return stats


def particles(
    instances: xr.DataArray | np.ndarray | da.Array,
    *,
    tomogram: str | xr.DataArray | None = None,
    semantic: xr.DataArray | np.ndarray | da.Array | None = None,
    name: str | None = None,
    voxel_size: float | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Particle table from an instance label volume (z, y, x), one row per instance.

    Parameters
    ----------
    instances
        Integer instance labels (z, y, x), 0 = background: numpy, dask or ``DataArray``.
        Dask-backed input (and numpy input over 128³ voxels) is processed chunk by chunk
        here (per-label sums accumulated; dask computes one chunk at a time).
    tomogram
        A name (str) or the tomogram ``DataArray`` (its ``name`` is used, and its voxel
        size when ``instances`` has none).
    semantic
        Optional semantic labels (z, y, x) on the same grid: the majority class inside each
        instance becomes ``semantic_class``.
    name
        Tomogram name; overrides the one from ``tomogram``.
    voxel_size
        Å per voxel; overrides ``attrs["voxel_size"]`` of ``instances`` / ``tomogram``.
    class_names
        Names of the semantic label values; default
        :data:`cryosiam_nb.constants.SEMANTIC_CLASSES`.
    progress
        Show a progress bar over chunks.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`: ``particle_id`` (the instance label), ``tomogram``
        (name), ``z, y, x`` (centroid, voxels, float), ``z_A, y_A, x_A`` (centroid in Å =
        voxels × voxel size), ``voxel_size`` (Å per voxel, the table's one carrier of it;
        NaN with NaN Å columns when unknown), ``n_voxels``, ``bbox_z0 … bbox_x1``
        (inclusive-exclusive voxel bounds), ``size_category``
        (:func:`cryosiam_nb.constants.size_category` of ``n_voxels``), ``semantic_class``
        (majority class name inside the instance when ``semantic`` is given, else None).
    """
    from tqdm.auto import tqdm

    lab = as_volume(instances, "instances")
    if not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"instances: expected integer labels, got dtype {lab.dtype}")
    sem = None
    if semantic is not None:
        sem = as_volume(semantic, "semantic")
        if sem.shape != lab.shape:
            raise InputError(f"semantic: shape {sem.shape} differs from instances {lab.shape}")
    if name is None:
        if isinstance(tomogram, str):
            name = tomogram
        elif tomogram is not None and getattr(tomogram, "name", None) is not None:
            name = str(tomogram.name)
        else:
            name = str(getattr(instances, "attrs", {}).get("tomogram", "tomogram"))
    vs = voxel_size if voxel_size is not None else voxel_size_of(instances, tomogram)
    if class_names is None and sem is not None:
        class_names = SEMANTIC_CLASSES
    if not isinstance(lab, da.Array) and lab.size > 128**3:
        lab = da.from_array(lab, chunks=(128, 128, 128))  # bounded temporary memory
    if isinstance(lab, da.Array):
        if sem is not None:
            sem = sem if isinstance(sem, da.Array) else da.from_array(sem, chunks=lab.chunks)
            sem = sem.rechunk(lab.chunks)
        starts = [np.cumsum((0,) + c[:-1]) for c in lab.chunks]
        parts = []
        blocks = list(product(*[range(len(c)) for c in lab.chunks]))
        for idx in tqdm(blocks, desc="particles (chunks)", disable=not progress):
            blk = np.asarray(lab.blocks[idx].compute())
            sblk = np.asarray(sem.blocks[idx].compute()) if sem is not None else None
            parts.append(_chunk_stats(blk, [starts[a][i] for a, i in enumerate(idx)], sblk))
        parts = [p for p in parts if len(p)]
        if parts:
            allp = pd.concat(parts).fillna(0)
            agg = {c: "sum" for c in allp.columns}
            agg.update({c: "min" for c in ("z0", "y0", "x0")})
            agg.update({c: "max" for c in ("z1", "y1", "x1")})
            stats = allp.groupby(level=0).agg(agg)
        else:
            stats = pd.DataFrame()
    else:
        stats = _chunk_stats(lab, (0, 0, 0), None if sem is None else np.asarray(sem))
    if len(stats) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})
    stats = stats.sort_index()
    n = stats["n"].to_numpy().astype(np.int64)
    df = pd.DataFrame(
        {
            "particle_id": stats.index.to_numpy().astype(np.int64),
            "tomogram": name,
            "z": stats["sz"].to_numpy() / n,
            "y": stats["sy"].to_numpy() / n,
            "x": stats["sx"].to_numpy() / n,
        }
    )
    for ax in "zyx":
        df[f"{ax}_A"] = df[ax] * (vs if vs is not None else np.nan)
    df["voxel_size"] = float(vs) if vs is not None else np.nan
    df["n_voxels"] = n
    for ax in "zyx":
        df[f"bbox_{ax}0"] = stats[f"{ax}0"].to_numpy().astype(np.int64)
    for ax in "zyx":
        df[f"bbox_{ax}1"] = stats[f"{ax}1"].to_numpy().astype(np.int64) + 1
    df["size_category"] = size_category(n)
    if sem is not None:
        ccols = [c for c in stats.columns if c.startswith("c") and c[1:].isdigit()]
        cls_ids = np.array([int(c[1:]) for c in ccols])
        best = cls_ids[np.argmax(stats[ccols].to_numpy(), axis=1)]
        if class_names is not None:
            df["semantic_class"] = [
                class_names[c] if 0 <= c < len(class_names) else str(c) for c in best
            ]
        else:
            df["semantic_class"] = [str(c) for c in best]
    else:
        df["semantic_class"] = None
    return df[TABLE_COLUMNS]
