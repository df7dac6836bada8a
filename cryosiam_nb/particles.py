"""The :class:`Particles` container: particle table + per-particle arrays + curation history.

Modelled on scanpy's AnnData:

- ``obs``: :class:`pandas.DataFrame` indexed by ``particle_id`` (str, unique, e.g. ``"tomo1:17"``)
  with at least ``tomogram``, ``z``, ``y``, ``x`` (voxels) and ``voxel_size`` (Å); optional
  ``species``, ``size_category``, ``cluster`` (str), ``excluded`` (bool), ``score``, ``note``.
- ``obsm``: arrays aligned with the rows of ``obs`` (first axis = particles): ``"embedding"``
  (N, D), ``"umap"`` (N, 2), optionally ``"subtomograms"`` (N, B, B, B, axes z, y, x).
- ``uns``: JSON-serialisable dict (cluster annotations, analysis parameters).
- ``history``: list of curation actions; every curation method records one and
  :meth:`Particles.undo` reverts the last one exactly.

``save(path)`` writes one self-describing zarr directory store (obs as a parquet blob, obsm as
zarr arrays, uns/history as JSON); ``Particles.load(path, lazy=True)`` opens obsm arrays lazily
(zarr-backed, read on first access; :meth:`AlignedArrays.lazy` gives a dask view without reading).
"""

from __future__ import annotations

import copy
import datetime as _dt
import io as _io
import json
import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError, atomic_path

__all__ = ["Particles", "AlignedArrays", "concat", "spectral_split", "estimate_n_clusters"]

FORMAT_NAME = "cryosiam_nb.particles"
FORMAT_VERSION = 1
REQUIRED_COLUMNS = ("tomogram", "z", "y", "x", "voxel_size")
_CURATION_COLUMNS = ("cluster", "excluded", "note")


def _input_error(msg: str) -> InputError:
    return InputError(msg)


def _is_lazy(arr: Any) -> bool:
    return not isinstance(arr, np.ndarray)


def _to_dask(arr: Any) -> Any:
    import dask.array as da  # noqa: PLC0415

    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, np.ndarray):
        return da.from_array(arr, chunks=_row_chunks(arr))
    return da.from_zarr(arr)


def _row_chunks(arr: Any, target_bytes: int = 16 * 2**20) -> tuple[int, ...]:
    """Chunk along the particle axis only, about ``target_bytes`` per chunk."""
    shape = tuple(int(s) for s in arr.shape)
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    rows = max(1, min(max(shape[0], 1), target_bytes // max(row, 1)))
    return (rows,) + shape[1:]


class AlignedArrays(MutableMapping):
    """Dict of arrays whose first axis is aligned with the particles (rows of ``obs``).

    Values may be numpy arrays or lazy (zarr / dask) arrays. Item access returns a numpy array
    (a lazy array is read once and cached); :meth:`lazy` returns a dask view without reading.
    """

    def __init__(self, n_obs: int, data: dict[str, Any] | None = None):
        self._n = int(n_obs)
        self._data: dict[str, Any] = {}
        for key, value in (data or {}).items():
            self[key] = value

    def _check(self, key: str, value: Any) -> Any:
        if not isinstance(key, str) or not key:
            raise _input_error(f"obsm key must be a non-empty str, got {key!r}")
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            value = np.asarray(value)
        if len(value.shape) == 0 or int(value.shape[0]) != self._n:
            raise _input_error(
                f"obsm[{key!r}] must have {self._n} rows (one per particle), "
                f"got shape {tuple(value.shape)}"
            )
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = self._check(key, value)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._data:
            raise KeyError(f"obsm has no {key!r} (available: {sorted(self._data)})")
        value = self._data[key]
        if _is_lazy(value):
            import dask.array as da  # noqa: PLC0415

            value = value.compute() if isinstance(value, da.Array) else value[...]
            value = np.asarray(value)
            self._data[key] = value
        return value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        parts = []
        for k, v in self._data.items():
            kind = "lazy" if _is_lazy(v) else "numpy"
            parts.append(f"{k}: {tuple(v.shape)} {np.dtype(v.dtype)} ({kind})")
        return "AlignedArrays(" + ", ".join(parts) + ")"

    def raw(self, key: str) -> Any:
        """The stored value (numpy, zarr or dask) without reading it."""
        return self._data[key]

    def lazy(self, key: str) -> Any:
        """A dask array view of ``obsm[key]`` (reads nothing until computed)."""
        if key not in self._data:
            raise KeyError(f"obsm has no {key!r} (available: {sorted(self._data)})")
        return _to_dask(self._data[key])

    def is_lazy(self, key: str) -> bool:
        """True while ``obsm[key]`` has not been read into memory."""
        return _is_lazy(self._data[key])

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``obsm[key]`` without reading it."""
        return tuple(int(s) for s in self._data[key].shape)

    def take(self, positions: np.ndarray) -> AlignedArrays:
        """Rows at integer ``positions`` (lazy arrays stay lazy)."""
        out = AlignedArrays(len(positions))
        for key, value in self._data.items():
            if _is_lazy(value):
                out._data[key] = _to_dask(value)[positions]
            else:
                out._data[key] = value[positions]
        return out


def _json_value(v: Any) -> Any:
    """Convert a pandas/numpy scalar into a JSON value (missing → None)."""
    if v is None:
        return None
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise _input_error(f"{what} must be JSON-serialisable: {err}") from err


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def estimate_n_clusters(
    embedding: np.ndarray, n_neighbors: int = 10, max_k: int = 10, seed: int = 0
) -> int:
    """Eigengap estimate of the number of clusters.

    Builds the symmetrised k-nearest-neighbour connectivity graph of ``embedding`` (N, D)
    (the affinity used by ``SpectralClustering(affinity="nearest_neighbors")``), takes the
    smallest eigenvalues of its normalised Laplacian and returns the ``k`` (≥ 2) after which the
    gap between consecutive eigenvalues is largest.
    """
    from scipy.sparse import csgraph  # noqa: PLC0415
    from scipy.sparse.linalg import eigsh  # noqa: PLC0415
    from sklearn.neighbors import kneighbors_graph  # noqa: PLC0415

    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise _input_error(f"need at least 3 particles to estimate a number of clusters, got {n}")
    nn = int(min(n_neighbors, n - 1))
    graph = kneighbors_graph(x, n_neighbors=nn, include_self=True)
    affinity = 0.5 * (graph + graph.T)
    lap = csgraph.laplacian(affinity, normed=True)
    m = int(min(max_k + 1, n))
    if n <= 500:
        vals = np.linalg.eigvalsh(lap.toarray())[:m]
    else:
        v0 = np.random.default_rng(seed).uniform(-1, 1, n)
        vals = np.sort(eigsh(lap, k=m, sigma=-1e-3, which="LM", v0=v0, return_eigenvectors=False))
    gaps = np.diff(vals)
    # gaps[i] = lambda_{i+1} - lambda_i: a large gap after i+1 eigenvalues → k = i + 1.
    if len(gaps) < 2:
        return 2
    return int(np.argmax(gaps[1:]) + 2)


def spectral_split(
    embedding: np.ndarray, k: int | None = None, n_neighbors: int = 10, seed: int = 0
) -> np.ndarray:
    """Spectral clustering of ``embedding`` (N, D) into ``k`` groups (eigengap estimate if None).

    Uses ``sklearn.cluster.SpectralClustering(affinity="nearest_neighbors")``. Labels are
    renumbered 0..k-1 by decreasing group size (ties: first occurrence), so names are stable.
    """
    from sklearn.cluster import SpectralClustering  # noqa: PLC0415

    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise _input_error(f"need at least 2 particles to split, got {n}")
    if not np.all(np.isfinite(x)):
        raise _input_error("embedding contains NaN or infinite values")
    if k is None:
        k = estimate_n_clusters(x, n_neighbors=n_neighbors, seed=seed)
    k = int(k)
    if k < 2 or k > n:
        raise _input_error(f"k must be between 2 and the number of particles ({n}), got {k}")
    nn = int(min(n_neighbors, n - 1))
    model = SpectralClustering(
        n_clusters=k,
        affinity="nearest_neighbors",
        n_neighbors=nn,
        random_state=seed,
        assign_labels="kmeans",
        n_init=10,
    )
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = model.fit_predict(x)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    for new, i in enumerate(order):
        remap[uniq[i]] = new
    return remap[labels]


class Particles:
    """Particle table (``obs``) + aligned arrays (``obsm``) + ``uns`` + curation ``history``.

    Coordinates ``z, y, x`` are in voxels of the tomogram; ``voxel_size`` (Å) is a column so
    particles from tomograms with different pixel sizes can be concatenated.
    """

    def __init__(
        self,
        obs: pd.DataFrame,
        obsm: dict[str, Any] | AlignedArrays | None = None,
        uns: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ):
        if not isinstance(obs, pd.DataFrame):
            raise _input_error(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
        obs = obs.copy()
        missing = [c for c in REQUIRED_COLUMNS if c not in obs.columns]
        if missing:
            raise _input_error(
                f"obs is missing required column(s) {missing}; need {list(REQUIRED_COLUMNS)} "
                "(z, y, x in voxels, voxel_size in Å)"
            )
        obs.index = pd.Index([str(i) for i in obs.index], name="particle_id")
        if not obs.index.is_unique:
            dup = obs.index[obs.index.duplicated()].unique()[:5].tolist()
            raise _input_error(f"particle ids must be unique; duplicated: {dup}")
        for c in ("z", "y", "x", "voxel_size"):
            if not pd.api.types.is_numeric_dtype(obs[c]):
                raise _input_error(f"obs column {c!r} must be numeric, got {obs[c].dtype}")
        if len(obs) and not np.all(np.asarray(obs["voxel_size"], dtype=float) > 0):
            raise _input_error("obs column 'voxel_size' (Å) must be > 0 for every particle")
        if "cluster" in obs.columns:
            obs["cluster"] = _as_str_column(obs["cluster"])
        if "excluded" in obs.columns:
            obs["excluded"] = obs["excluded"].fillna(False).astype(bool)
        self.obs: pd.DataFrame = obs
        if isinstance(obsm, AlignedArrays):
            if obsm._n != len(obs):
                raise _input_error(f"obsm has {obsm._n} rows but obs has {len(obs)}")
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
        tomogram: str | None = None,
        voxel_size: float | None = None,
        obsm: dict[str, Any] | None = None,
    ) -> Particles:
        """Build from a particle table (``tl.particles`` output or a simulator table).

        ``table`` needs ``z, y, x`` (voxels) and an id column ``particle_id`` (or ``id``; the row
        number is used when neither exists). ``tomogram`` (name) and ``voxel_size`` (Å) fill the
        columns when the table lacks them (``voxel_size`` also from ``table.attrs``). Ids become
        ``"<tomogram>:<particle_id>"``; the original integer id is kept as ``instance_id``.
        """
        if not isinstance(table, pd.DataFrame):
            raise _input_error(f"table must be a pandas DataFrame, got {type(table).__name__}")
        df = table.copy()
        for c in ("z", "y", "x"):
            if c not in df.columns:
                raise _input_error(f"particle table is missing column {c!r} (voxels)")
        if tomogram is not None:
            df["tomogram"] = str(tomogram)
        elif "tomogram" not in df.columns:
            raise _input_error("particle table has no 'tomogram' column: pass tomogram=<name>")
        df["tomogram"] = df["tomogram"].astype(str)
        if voxel_size is None and "voxel_size" not in df.columns:
            voxel_size = table.attrs.get("voxel_size")
            if voxel_size is None:
                raise _input_error(
                    "particle table has no 'voxel_size' column: pass voxel_size=<Å per voxel>"
                )
        if voxel_size is not None:
            if not float(voxel_size) > 0:
                raise _input_error(f"voxel_size must be > 0 Å, got {voxel_size!r}")
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
        """Deep copy (lazy obsm arrays stay lazy and shared read-only)."""
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
                raise _input_error(
                    f"boolean {what} has length {arr.size}, expected {len(self)} (one per particle)"
                )
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if np.issubdtype(arr.dtype, np.integer):
            if arr.min() < 0 or arr.max() >= len(self):
                raise _input_error(f"{what} has positions outside 0..{len(self) - 1}")
            return arr.astype(np.int64)
        ids = [str(i) for i in arr.ravel()]
        pos = self.obs.index.get_indexer(ids)
        if (pos < 0).any():
            bad = [i for i, p in zip(ids, pos) if p < 0][:5]
            raise _input_error(f"unknown particle id(s) in {what}: {bad}")
        return pos.astype(np.int64)

    def subset(self, mask_or_ids: Any) -> Particles:
        """New Particles with the rows selected by a boolean mask, particle ids or positions.

        Row order follows the selection; ``uns`` is copied; ``history`` starts empty (undo
        records refer to the parent object).
        """
        pos = self._positions(mask_or_ids, "subset")
        return Particles(self.obs.iloc[pos], self.obsm.take(pos), self.uns, None)

    def selection_to_table(self, ids: Any) -> pd.DataFrame:
        """Rows of ``obs`` for the given ids/mask as a table with a ``particle_id`` column.

        Suitable for :mod:`cryosiam_nb.export` (``z, y, x`` in voxels, ``tomogram``,
        ``voxel_size`` in Å).
        """
        pos = self._positions(ids, "selection")
        if pos.size == 0:
            raise _input_error("selection is empty: no particles to export")
        return self.obs.iloc[pos].reset_index()

    def clusters(self) -> list[str]:
        """Cluster names present in ``obs['cluster']`` (sorted naturally)."""
        if "cluster" not in self.obs.columns:
            return []
        names = self.obs["cluster"].dropna().unique().tolist()
        return sorted(map(str, names), key=_natural_key)

    # ------------------------------------------------------------------ curation
    def _require_clusters(self, names: Iterable[str]) -> list[str]:
        if "cluster" not in self.obs.columns:
            raise _input_error("particles have no 'cluster' column: run tl.cluster first")
        names = [str(n) for n in names]
        present = set(self.clusters())
        bad = [n for n in names if n not in present]
        if bad:
            raise _input_error(
                f"unknown cluster(s) {bad}; existing: {self.clusters()[:20]}"
                + (" ..." if len(present) > 20 else "")
            )
        return names

    def _record(
        self, action: str, params: dict[str, Any], positions: np.ndarray, columns: Sequence[str]
    ) -> None:
        """Append a history entry holding what is needed to undo an action about to happen.

        ``columns`` are the obs columns the action changes at ``positions``; their old values
        (or, for columns that do not exist yet, just their names) and a copy of ``uns`` are kept.
        """
        _check_json(params, f"parameters of {action}")
        old_cols: dict[str, list[Any]] = {}
        new_cols: list[str] = []
        for c in columns:
            if c in self.obs.columns:
                old_cols[c] = [_json_value(v) for v in self.obs[c].iloc[positions].tolist()]
            else:
                new_cols.append(c)
        entry = {
            "action": action,
            "params": params,
            "time": _now(),
            "undo": {
                "ids": self.obs.index[positions].tolist() if old_cols else [],
                "columns": old_cols,
                "new_columns": new_cols,
                "uns": copy.deepcopy(self.uns),
            },
        }
        self.history.append(entry)

    def undo(self) -> dict[str, Any]:
        """Revert the last curation action exactly; returns its history entry."""
        if not self.history:
            raise _input_error("nothing to undo: history is empty")
        entry = self.history.pop()
        rec = entry["undo"]
        for c in rec["new_columns"]:
            if c in self.obs.columns:
                del self.obs[c]
        if rec["ids"]:
            pos = self.obs.index.get_indexer(rec["ids"])
            if (pos < 0).any():
                self.history.append(entry)
                raise _input_error(f"cannot undo {entry['action']!r}: particles were removed")
            for c, values in rec["columns"].items():
                col = self.obs[c]
                if c == "excluded":
                    vals = np.asarray(values, dtype=bool)
                else:
                    vals = np.array([np.nan if v is None else v for v in values], dtype=object)
                new = col.to_numpy(dtype=object, copy=True)
                new[pos] = vals
                self.obs[c] = pd.Series(new, index=self.obs.index).astype(col.dtype)
        self.uns = copy.deepcopy(rec["uns"])
        return entry

    def _set_cluster(self, positions: np.ndarray, names: Sequence[str] | str) -> None:
        if "cluster" not in self.obs.columns:
            self.obs["cluster"] = pd.Series(np.nan, index=self.obs.index, dtype=object)
        new = self.obs["cluster"].to_numpy(dtype=object, copy=True)
        new[positions] = names
        self.obs["cluster"] = _as_str_column(pd.Series(new, index=self.obs.index))

    def _annotations(self) -> dict[str, str]:
        return self.uns.setdefault("cluster_annotations", {})

    def rename_cluster(self, old: str, new: str) -> None:
        """Rename cluster ``old`` to ``new`` (which must not exist yet; use merge for that)."""
        (old,) = self._require_clusters([old])
        new = str(new)
        if not new:
            raise _input_error("new cluster name must be a non-empty string")
        if new == old:
            return
        if new in self.clusters():
            raise _input_error(
                f"cluster {new!r} already exists; use merge_clusters([{old!r}, {new!r}])"
            )
        pos = np.flatnonzero((self.obs["cluster"] == old).to_numpy(dtype=bool, na_value=False))
        self._record("rename_cluster", {"old": old, "new": new}, pos, ["cluster"])
        self._set_cluster(pos, new)
        ann = self.uns.get("cluster_annotations", {})
        if old in ann:
            ann[new] = ann.pop(old)

    def annotate_cluster(self, name: str, text: str) -> None:
        """Attach a free-text annotation (e.g. "ribosome?") to cluster ``name`` in ``uns``."""
        (name,) = self._require_clusters([name])
        self._record("annotate_cluster", {"name": name, "text": str(text)}, np.zeros(0, int), [])
        self._annotations()[name] = str(text)

    def merge_clusters(self, names: Sequence[str], into: str | None = None) -> str:
        """Merge clusters ``names`` into one named ``into`` (default: the first name).

        Returns the name of the merged cluster.
        """
        if isinstance(names, str) or len(names) < 2:
            raise _input_error(f"merge_clusters needs at least two cluster names, got {names!r}")
        names = self._require_clusters(names)
        into = names[0] if into is None else str(into)
        if into in self.clusters() and into not in names:
            raise _input_error(f"target cluster {into!r} exists and is not among {names}")
        isin = self.obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False)
        pos = np.flatnonzero(isin)
        self._record("merge_clusters", {"names": names, "into": into}, pos, ["cluster"])
        self._set_cluster(pos, into)
        ann = self.uns.get("cluster_annotations", {})
        texts = [ann.pop(n) for n in names if n in ann]
        if texts:
            ann[into] = "; ".join(dict.fromkeys(texts))
        return into

    def _set_excluded(self, ids: Any, value: bool, action: str) -> int:
        pos = self._positions(ids, f"{action} ids")
        if pos.size == 0:
            raise _input_error(f"{action}: empty selection")
        self._record(action, {"ids": self.obs.index[pos].tolist()}, pos, ["excluded"])
        if "excluded" not in self.obs.columns:
            self.obs["excluded"] = False
        col = self.obs["excluded"].to_numpy(dtype=bool, copy=True)
        col[pos] = value
        self.obs["excluded"] = col
        return int(pos.size)

    def exclude(self, ids: Any) -> int:
        """Mark particles (ids, mask or positions) as excluded (kept, flagged in ``excluded``)."""
        return self._set_excluded(ids, True, "exclude")

    def include(self, ids: Any) -> int:
        """Clear the ``excluded`` flag of the given particles."""
        return self._set_excluded(ids, False, "include")

    def split(
        self,
        ids: Any,
        k: int | None = None,
        seed: int = 0,
        n_neighbors: int = 10,
        key: str = "embedding",
        prefix: str | None = None,
    ) -> list[str]:
        """Re-cluster the given particles by spectral clustering of ``obsm[key]``.

        New names are ``"<prefix>.1"``, ``"<prefix>.2"``, ... (largest group first); ``prefix``
        defaults to the particles' common cluster (e.g. ``"3"`` → ``"3.1"``, ``"3.2"``) or
        ``"split"`` when they come from several clusters. ``k=None`` estimates the number of
        groups from the eigengap. Returns the new cluster names.
        """
        pos = self._positions(ids, "split ids")
        if pos.size < 2:
            raise _input_error(f"split needs at least 2 particles, got {pos.size}")
        if key not in self.obsm:
            raise _input_error(f"split needs obsm[{key!r}]: run tl.embed first")
        emb = np.asarray(self.obsm.lazy(key)[pos].compute(), dtype=np.float64)
        emb = emb.reshape(len(pos), -1)
        labels = spectral_split(emb, k=k, n_neighbors=n_neighbors, seed=seed)
        if prefix is None:
            current = (
                self.obs["cluster"].iloc[pos].dropna().unique().tolist()
                if "cluster" in self.obs.columns
                else []
            )
            prefix = str(current[0]) if len(current) == 1 else "split"
        names = _child_names(prefix, int(labels.max()) + 1, set(self.clusters()))
        params = {
            "ids": self.obs.index[pos].tolist(),
            "k": None if k is None else int(k),
            "k_used": len(names),
            "seed": int(seed),
            "n_neighbors": int(n_neighbors),
            "key": key,
            "names": names,
        }
        self._record("split", params, pos, ["cluster"])
        self._set_cluster(pos, [names[i] for i in labels])
        return names

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write one self-describing zarr directory store at ``path`` (atomically).

        Layout: group attrs ``format``/``version``/``uns``/``n_obs``; arrays ``obs_parquet``
        (parquet bytes, exact pandas dtypes), ``history_json`` (UTF-8 JSON) and ``obsm/<key>``.
        Lazy obsm arrays are streamed chunk by chunk.
        """
        import dask.array as da  # noqa: PLC0415
        import zarr  # noqa: PLC0415

        path = Path(path)
        if path.exists() and not (path.is_dir() and (path / "zarr.json").exists()):
            raise _input_error(f"{path}: exists and is not a zarr store; refusing to overwrite")
        _check_json(self.uns, "uns")
        with atomic_path(path) as tmp:
            g = zarr.open_group(str(tmp), mode="w")
            buf = _io.BytesIO()
            self.obs.to_parquet(buf, engine="pyarrow", index=True)
            g.create_array("obs_parquet", data=np.frombuffer(buf.getvalue(), dtype=np.uint8))
            hist = json.dumps(self.history).encode("utf-8")
            g.create_array("history_json", data=np.frombuffer(hist, dtype=np.uint8))
            for key in self.obsm:
                value = self.obsm.raw(key)
                chunks = _row_chunks(value)
                arr = g.create_array(
                    f"obsm/{key}", shape=value.shape, dtype=value.dtype, chunks=chunks
                )
                if isinstance(value, np.ndarray):
                    arr[...] = value
                else:
                    da.store(_to_dask(value).rechunk(chunks), arr, lock=False)
            g.attrs.update(
                {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "n_obs": len(self),
                    "obsm_keys": list(self.obsm),
                    "uns": self.uns,
                }
            )
        # Lazy arrays read from a store we just replaced must now point at the new one.
        if self._source is not None and self._source == path.resolve():
            g = zarr.open_group(str(path), mode="r")
            for key in self.obsm:
                if self.obsm.is_lazy(key):
                    self.obsm._data[key] = g[f"obsm/{key}"]
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, lazy: bool = True) -> Particles:
        """Open a store written by :meth:`save`.

        With ``lazy=True`` obsm arrays stay on disk (zarr-backed) until first accessed.
        """
        import zarr  # noqa: PLC0415

        path = Path(path)
        if not path.exists():
            raise _input_error(f"{path}: no such particles store")
        try:
            g = zarr.open_group(str(path), mode="r")
            attrs = dict(g.attrs)
        except Exception as err:
            raise _input_error(f"{path}: not a readable zarr store ({err})") from err
        if attrs.get("format") != FORMAT_NAME:
            raise _input_error(f"{path}: not a cryosiam_nb particles store (format attr missing)")
        if int(attrs.get("version", 0)) > FORMAT_VERSION:
            raise _input_error(
                f"{path}: store version {attrs.get('version')} is newer than supported "
                f"({FORMAT_VERSION}); upgrade cryosiam_nb"
            )
        obs = pd.read_parquet(_io.BytesIO(bytes(g["obs_parquet"][...])), engine="pyarrow")
        history = json.loads(bytes(g["history_json"][...]).decode("utf-8"))
        obsm = AlignedArrays(len(obs))
        for key in attrs.get("obsm_keys", []):
            arr = g[f"obsm/{key}"]
            obsm[key] = arr if lazy else np.asarray(arr[...])
        out = cls(obs, obsm, attrs.get("uns", {}), history)
        out._source = path.resolve()
        return out


def _as_str_column(s: pd.Series) -> pd.Series:
    """Cluster labels as strings (missing stays missing), pandas' default string dtype."""
    vals = s.astype(object).to_numpy()
    out = np.array([np.nan if _json_value(v) is None else str(v) for v in vals], dtype=object)
    return pd.Series(out, index=s.index, name=s.name).astype("str")


def _natural_key(name: str) -> tuple:
    parts = []
    for p in str(name).split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


def _child_names(prefix: str, n: int, existing: set[str]) -> list[str]:
    """``n`` names ``prefix.i`` that don't collide with ``existing`` (except ``prefix`` itself)."""
    names: list[str] = []
    i = 1
    while len(names) < n:
        name = f"{prefix}.{i}"
        if name not in existing:
            names.append(name)
        i += 1
    return names


def concat(items: Sequence[Particles], keys: Sequence[str] | None = None) -> Particles:
    """Concatenate particle sets (e.g. one per tomogram) into one.

    Ids must be unique across ``items``; pass ``keys`` to prefix each item's ids with
    ``"<key>/"`` when they are not. Only obsm keys present in every item (with matching
    trailing shapes) are kept; lazy arrays stay lazy. ``uns`` is taken from the first item and
    ``uns["concat"]`` records the sizes; ``history`` starts empty.
    """
    import dask.array as da  # noqa: PLC0415

    items = list(items)
    if not items:
        raise _input_error("concat needs at least one Particles object")
    for i, p in enumerate(items):
        if not isinstance(p, Particles):
            raise _input_error(f"concat item {i} is a {type(p).__name__}, not Particles")
    if keys is not None and len(keys) != len(items):
        raise _input_error(f"keys has {len(keys)} entries for {len(items)} items")
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
        raise _input_error(
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
