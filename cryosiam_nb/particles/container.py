"""The :class:`Particles` class: particle table + aligned arrays + ``uns`` + curation history."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError
from cryosiam_nb.particles.arrays import AlignedArrays
from cryosiam_nb.particles.curation import CurationMixin, _as_str_column, _check_json, natural_key
from cryosiam_nb.particles.store import read_store, reopen_lazy, write_store

__all__ = ["Particles", "concat", "REQUIRED_COLUMNS"]

#: Columns every ``obs`` has: ``z, y, x`` in voxels, ``voxel_size`` in Å.
REQUIRED_COLUMNS = ("tomogram", "z", "y", "x", "voxel_size")


class Particles(CurationMixin):
    """Particle table (``obs``) + aligned arrays (``obsm``) + ``uns`` + curation ``history``.

    Coordinates ``z, y, x`` are in voxels of the tomogram; ``voxel_size`` (Å) is a column so
    particles from tomograms with different pixel sizes can be concatenated.

    Parameters
    ----------
    obs : pandas.DataFrame
        One row per particle with at least :data:`REQUIRED_COLUMNS`; the index becomes the
        (unique, str) particle ids; ``cluster`` is stored as str, ``excluded`` as bool.
    obsm : dict of str to array-like (N, ...), or AlignedArrays, optional
        Per-particle arrays, e.g. ``"embedding"`` (N, D), ``"umap"`` (N, 2),
        ``"subtomograms"`` (N, B, B, B); numpy, zarr or dask.
    uns : dict, optional
        JSON-serialisable metadata (deep-copied).
    history : list of dict, optional
        Curation history (deep-copied).
    """

    def __init__(
        self,
        obs: pd.DataFrame,
        obsm: dict[str, Any] | AlignedArrays | None = None,
        uns: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ):
        if not isinstance(obs, pd.DataFrame):
            raise InputError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
        obs = obs.copy()
        missing = [c for c in REQUIRED_COLUMNS if c not in obs.columns]
        if missing:
            raise InputError(
                f"obs is missing required column(s) {missing}; need {list(REQUIRED_COLUMNS)} "
                "(z, y, x in voxels, voxel_size in Å)"
            )
        obs.index = pd.Index([str(i) for i in obs.index], name="particle_id")
        if not obs.index.is_unique:
            dup = obs.index[obs.index.duplicated()].unique()[:5].tolist()
            raise InputError(f"particle ids must be unique; duplicated: {dup}")
        for c in ("z", "y", "x", "voxel_size"):
            if not pd.api.types.is_numeric_dtype(obs[c]):
                raise InputError(f"obs column {c!r} must be numeric, got {obs[c].dtype}")
        if len(obs) and not np.all(np.asarray(obs["voxel_size"], dtype=float) > 0):
            raise InputError("obs column 'voxel_size' (Å) must be > 0 for every particle")
        if "cluster" in obs.columns:
            obs["cluster"] = _as_str_column(obs["cluster"])
        if "excluded" in obs.columns:
            obs["excluded"] = obs["excluded"].fillna(False).astype(bool)
        self.obs: pd.DataFrame = obs
        if isinstance(obsm, AlignedArrays):
            if obsm._n != len(obs):
                raise InputError(f"obsm has {obsm._n} rows but obs has {len(obs)}")
            self.obsm = obsm
        else:
            self.obsm = AlignedArrays(len(obs), obsm)
        uns = {} if uns is None else uns
        _check_json(uns, "uns")
        self.uns: dict[str, Any] = copy.deepcopy(uns)
        self.history: list[dict[str, Any]] = copy.deepcopy(list(history or []))
        self._source: Path | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_table(
        cls,
        table: pd.DataFrame,
        *,
        tomogram: str | None = None,
        voxel_size: float | None = None,
        obsm: dict[str, Any] | None = None,
    ) -> Particles:
        """Build from a particle table (``tl.particles`` output or a simulator table).

        Ids become ``"<tomogram>:<particle_id>"``; the original integer id is kept as
        ``instance_id``; ``excluded`` starts False.

        Parameters
        ----------
        table : pandas.DataFrame
            Needs ``z, y, x`` (voxels) and an id column ``particle_id`` (or ``id``; the row
            number is used when neither exists).
        tomogram : str, optional
            Tomogram name; required when the table has no ``tomogram`` column.
        voxel_size : float, optional
            Å per voxel; required when the table has no ``voxel_size`` column.
        obsm : dict of str to array-like (N, ...), optional
            Per-particle arrays aligned with the table's rows.

        Returns
        -------
        Particles
        """
        if not isinstance(table, pd.DataFrame):
            raise InputError(f"table must be a pandas DataFrame, got {type(table).__name__}")
        df = table.copy()
        for c in ("z", "y", "x"):
            if c not in df.columns:
                raise InputError(f"particle table is missing column {c!r} (voxels)")
        if tomogram is not None:
            df["tomogram"] = str(tomogram)
        elif "tomogram" not in df.columns:
            raise InputError("particle table has no 'tomogram' column: pass tomogram=<name>")
        df["tomogram"] = df["tomogram"].astype(str)
        if voxel_size is None and "voxel_size" not in df.columns:
            raise InputError(
                "particle table has no 'voxel_size' column: pass voxel_size=<Å per voxel>"
            )
        if voxel_size is not None:
            if not float(voxel_size) > 0:
                raise InputError(f"voxel_size must be > 0 Å, got {voxel_size!r}")
            df["voxel_size"] = float(voxel_size)
        if "particle_id" in df.columns:
            raw_ids = df.pop("particle_id")
        elif "id" in df.columns:
            raw_ids = df.pop("id")
        else:
            raw_ids = pd.Series(np.arange(len(df)), index=df.index)
        ids = []
        for t, pid in zip(df["tomogram"].tolist(), raw_ids.tolist()):
            s = str(pid)
            ids.append(s if ":" in s else f"{t}:{s}")
        if pd.api.types.is_integer_dtype(raw_ids):
            df["instance_id"] = raw_ids.to_numpy()
        df.index = pd.Index(ids, name="particle_id")
        if "excluded" not in df.columns:
            df["excluded"] = False
        return cls(df, obsm=obsm)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.obs)

    @property
    def n_obs(self) -> int:
        """Number of particles."""
        return len(self.obs)

    @property
    def ids(self) -> pd.Index:
        """Particle ids (the obs index)."""
        return self.obs.index

    def __repr__(self) -> str:
        tomos = self.obs["tomogram"].nunique() if len(self) else 0
        lines = [f"Particles: {len(self)} particles from {tomos} tomogram(s)"]
        lines.append("    obs: " + ", ".join(map(str, self.obs.columns)))
        if len(self.obsm):
            lines.append("    obsm: " + ", ".join(f"{k} {self.obsm.shape(k)}" for k in self.obsm))
        if self.uns:
            lines.append("    uns: " + ", ".join(self.uns))
        if self.history:
            lines.append(f"    history: {len(self.history)} action(s)")
        return "\n".join(lines)

    def copy(self) -> Particles:
        """Deep copy of obs, obsm, uns and history.

        Returns
        -------
        Particles
            The copy; lazy (zarr / dask) obsm arrays stay lazy and are shared read-only.
        """
        out = Particles(self.obs, AlignedArrays(len(self)), self.uns, self.history)
        for k in self.obsm:
            v = self.obsm.raw(k)
            out.obsm._data[k] = v.copy() if isinstance(v, np.ndarray) else v
        return out

    def _positions(self, mask_or_ids: Any, what: str = "selection") -> np.ndarray:
        """Integer row positions of a boolean mask, ids, or integer positions."""
        if isinstance(mask_or_ids, (str, bytes)):
            mask_or_ids = [mask_or_ids]
        if isinstance(mask_or_ids, pd.Series) and mask_or_ids.dtype == bool:
            mask_or_ids = mask_or_ids.reindex(self.obs.index).fillna(False).to_numpy(bool)
        arr = np.asarray(list(mask_or_ids) if not hasattr(mask_or_ids, "dtype") else mask_or_ids)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise InputError(
                    f"boolean {what} has length {arr.size}, expected {len(self)} (one per particle)"
                )
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if np.issubdtype(arr.dtype, np.integer):
            if arr.min() < 0 or arr.max() >= len(self):
                raise InputError(f"{what} has positions outside 0..{len(self) - 1}")
            return arr.astype(np.int64)
        ids = [str(i) for i in arr.ravel()]
        pos = self.obs.index.get_indexer(ids)
        if (pos < 0).any():
            bad = [i for i, p in zip(ids, pos) if p < 0][:5]
            raise InputError(f"unknown particle id(s) in {what}: {bad}")
        return pos.astype(np.int64)

    def subset(self, mask_or_ids: Any) -> Particles:
        """New Particles with the selected rows.

        Parameters
        ----------
        mask_or_ids : boolean mask (N,), particle ids or integer positions
            The selection; row order follows it.

        Returns
        -------
        Particles
            ``uns`` is copied; ``history`` starts empty (undo records refer to the parent);
            lazy obsm arrays stay lazy.
        """
        pos = self._positions(mask_or_ids, "subset")
        return Particles(self.obs.iloc[pos], self.obsm.take(pos), self.uns, None)

    def selection_to_table(self, ids: Any) -> pd.DataFrame:
        """Rows of ``obs`` for a selection as a table with a ``particle_id`` column.

        Parameters
        ----------
        ids : boolean mask (N,), particle ids or integer positions
            The selection (non-empty).

        Returns
        -------
        pandas.DataFrame
            Suitable for :mod:`cryosiam_nb.export` (``z, y, x`` in voxels, ``tomogram``,
            ``voxel_size`` in Å).
        """
        pos = self._positions(ids, "selection")
        if pos.size == 0:
            raise InputError("selection is empty: no particles to export")
        return self.obs.iloc[pos].reset_index()

    def clusters(self) -> list[str]:
        """Cluster names present in ``obs['cluster']``.

        Returns
        -------
        list of str
            Sorted naturally (``"2"`` before ``"10"``, ``"1.2"`` before ``"1.10"``); empty
            without a ``cluster`` column.
        """
        if "cluster" not in self.obs.columns:
            return []
        names = self.obs["cluster"].dropna().unique().tolist()
        return sorted(map(str, names), key=natural_key)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write one self-describing zarr directory store at ``path`` (atomically).

        Layout in :mod:`cryosiam_nb.particles.store`; lazy obsm arrays are streamed chunk by
        chunk (dask computes here).

        Parameters
        ----------
        path : str or os.PathLike
            Target directory; an existing particles store there is replaced.

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        _check_json(self.uns, "uns")
        path = write_store(self.obs, self.obsm, self.uns, self.history, path)
        # Lazy arrays read from a store we just replaced must now point at the new one.
        if self._source is not None and self._source == path.resolve():
            reopen_lazy(self.obsm, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, lazy: bool = True) -> Particles:
        """Open a store written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
            The zarr directory store.
        lazy : bool
            Keep obsm arrays on disk (zarr-backed) until first accessed.

        Returns
        -------
        Particles
        """
        obs, obsm, uns, history = read_store(path, lazy=lazy)
        out = cls(obs, obsm, uns, history)
        out._source = Path(path).resolve()
        return out


def concat(items: Sequence[Particles], *, keys: Sequence[str] | None = None) -> Particles:
    """Concatenate particle sets (e.g. one per tomogram) into one.

    Only obsm keys present in every item (with matching trailing shapes) are kept; lazy
    arrays stay lazy (dask concatenation). ``uns`` is taken from the first item and
    ``uns["concat"]`` records the sizes; ``history`` starts empty.

    Parameters
    ----------
    items : sequence of Particles
        The sets; their ids must be unique across items unless ``keys`` is given.
    keys : sequence of str, optional
        One per item: prefix that item's ids with ``"<key>/"``.

    Returns
    -------
    Particles
    """
    import dask.array as da  # noqa: PLC0415

    items = list(items)
    if not items:
        raise InputError("concat needs at least one Particles object")
    for i, p in enumerate(items):
        if not isinstance(p, Particles):
            raise InputError(f"concat item {i} is a {type(p).__name__}, not Particles")
    if keys is not None and len(keys) != len(items):
        raise InputError(f"keys has {len(keys)} entries for {len(items)} items")
    obs_list = []
    for i, p in enumerate(items):
        o = p.obs
        if keys is not None:
            o = o.copy()
            o.index = pd.Index([f"{keys[i]}/{x}" for x in o.index], name="particle_id")
        obs_list.append(o)
    obs = pd.concat(obs_list, axis=0)
    if not obs.index.is_unique:
        dup = obs.index[obs.index.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"particle ids collide across items: {dup}; pass keys=[...] to make them unique"
        )
    if "excluded" in obs.columns:
        obs["excluded"] = obs["excluded"].fillna(False).astype(bool)
    common = [
        k
        for k in items[0].obsm
        if all(k in p.obsm and p.obsm.shape(k)[1:] == items[0].obsm.shape(k)[1:] for p in items)
    ]
    obsm: dict[str, Any] = {}
    for k in common:
        if any(p.obsm.is_lazy(k) for p in items):
            obsm[k] = da.concatenate([p.obsm.lazy(k) for p in items], axis=0)
        else:
            obsm[k] = np.concatenate([p.obsm[k] for p in items], axis=0)
    uns = copy.deepcopy(items[0].uns)
    uns["concat"] = {"n_items": len(items), "sizes": [len(p) for p in items]}
    return Particles(obs, obsm, uns, None)


Particles.concat = staticmethod(concat)  # type: ignore[attr-defined]
