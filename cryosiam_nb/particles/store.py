"""The on-disk format of :class:`~cryosiam_nb.particles.Particles`: one zarr directory store.

Layout: group attrs ``format``/``version``/``uns``/``n_obs``/``obsm_keys``; arrays
``obs_parquet`` (parquet bytes, exact pandas dtypes), ``history_json`` (UTF-8 JSON) and
``obsm/<key>`` (chunked along the particle axis).
"""

from __future__ import annotations

import io as _io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError, atomic_path
from cryosiam_nb.particles.arrays import AlignedArrays, row_chunks, to_dask

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "write_store", "read_store", "reopen_lazy"]

FORMAT_NAME = "cryosiam_nb.particles"
FORMAT_VERSION = 1


def write_store(
    obs: pd.DataFrame,
    obsm: AlignedArrays,
    uns: dict[str, Any],
    history: list[dict[str, Any]],
    path: str | os.PathLike,
) -> Path:
    """Write the parts of a Particles object as one zarr store at ``path``, atomically.

    Parameters
    ----------
    obs : pandas.DataFrame
        The particle table (N rows).
    obsm : AlignedArrays
        Per-particle arrays; lazy ones are streamed chunk by chunk (dask computes here).
    uns : dict
        JSON-serialisable metadata.
    history : list of dict
        JSON-serialisable curation history.
    path : str or os.PathLike
        Target directory; an existing zarr store there is replaced, anything else refused.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import dask.array as da  # noqa: PLC0415
    import zarr  # noqa: PLC0415

    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / "zarr.json").exists()):
        raise InputError(f"{path}: exists and is not a zarr store; refusing to overwrite")
    with atomic_path(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        buf = _io.BytesIO()
        obs.to_parquet(buf, engine="pyarrow", index=True)
        g.create_array("obs_parquet", data=np.frombuffer(buf.getvalue(), dtype=np.uint8))
        hist = json.dumps(history).encode("utf-8")
        g.create_array("history_json", data=np.frombuffer(hist, dtype=np.uint8))
        for key in obsm:
            value = obsm.raw(key)
            chunks = row_chunks(value)
            arr = g.create_array(f"obsm/{key}", shape=value.shape, dtype=value.dtype, chunks=chunks)
            if isinstance(value, np.ndarray):
                arr[...] = value
            else:
                da.store(to_dask(value).rechunk(chunks), arr, lock=False)
        g.attrs.update(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "n_obs": len(obs),
                "obsm_keys": list(obsm),
                "uns": uns,
            }
        )
    return path


def read_store(
    path: str | os.PathLike, lazy: bool = True
) -> tuple[pd.DataFrame, AlignedArrays, dict[str, Any], list[dict[str, Any]]]:
    """Read a store written by :func:`write_store`.

    Parameters
    ----------
    path : str or os.PathLike
        The zarr directory store.
    lazy : bool
        Keep obsm arrays on disk (zarr-backed) until first accessed.

    Returns
    -------
    (pandas.DataFrame, AlignedArrays, dict, list)
        ``obs``, ``obsm``, ``uns`` and ``history``.
    """
    import zarr  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such particles store")
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as err:
        raise InputError(f"{path}: not a readable zarr store ({err})") from err
    if attrs.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not a cryosiam_nb particles store (format attr missing)")
    if int(attrs.get("version", 0)) > FORMAT_VERSION:
        raise InputError(
            f"{path}: store version {attrs.get('version')} is newer than supported "
            f"({FORMAT_VERSION}); upgrade cryosiam_nb"
        )
    obs = pd.read_parquet(_io.BytesIO(bytes(g["obs_parquet"][...])), engine="pyarrow")
    history = json.loads(bytes(g["history_json"][...]).decode("utf-8"))
    obsm = AlignedArrays(len(obs))
    for key in attrs.get("obsm_keys", []):
        arr = g[f"obsm/{key}"]
        obsm[key] = arr if lazy else np.asarray(arr[...])
    return obs, obsm, attrs.get("uns", {}), history


def reopen_lazy(obsm: AlignedArrays, path: str | os.PathLike) -> None:
    """Point the lazy arrays of ``obsm`` at the store just written at ``path``.

    Parameters
    ----------
    obsm : AlignedArrays
        Arrays whose lazy values came from the store that ``path`` replaced (modified).
    path : str or os.PathLike
        The new store.
    """
    import zarr  # noqa: PLC0415

    g = zarr.open_group(str(path), mode="r")
    for key in obsm:
        if obsm.is_lazy(key):
            obsm._data[key] = g[f"obsm/{key}"]
