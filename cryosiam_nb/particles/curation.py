"""Curation of a :class:`~cryosiam_nb.particles.Particles` object with an exact undo.

Every action (rename, annotate, merge, exclude, include, split bookkeeping, and the analysis
tools' clustering steps) appends one entry to ``history`` holding what is needed to revert
it; :meth:`CurationMixin.undo` reverts the last one exactly.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError

__all__ = ["CurationMixin", "natural_key", "CLUSTER_COLORS_KEY"]

#: ``uns`` key of the cluster → colour (``#rrggbb``) map the explorer keeps: colours follow a
#: cluster's identity (renames and merges carry them), never its sorted position.
CLUSTER_COLORS_KEY = "cluster_colors"


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
        raise InputError(f"{what} must be JSON-serialisable: {err}") from err


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _as_str_column(s: pd.Series) -> pd.Series:
    """Cluster labels as strings (missing stays missing), pandas' default string dtype."""
    vals = s.astype(object).to_numpy()
    out = np.array([np.nan if _json_value(v) is None else str(v) for v in vals], dtype=object)
    return pd.Series(out, index=s.index, name=s.name).astype("str")


def natural_key(name: str) -> tuple:
    """Sort key of a cluster name.

    Parameters
    ----------
    name : str
        A cluster name, e.g. ``"1.10"``.

    Returns
    -------
    tuple
        Digit runs compared numerically, the text between them as text (``"2"`` < ``"10"``,
        ``"1.2"`` < ``"1.10"``, ``"c2"`` < ``"c10"``); numbers sort before words.
    """
    return tuple(
        (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(name))
    )


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


class CurationMixin:
    """Curation methods of :class:`~cryosiam_nb.particles.Particles` (``obs``, ``uns``,
    ``history`` and ``_positions``/``clusters`` come from the class itself)."""

    obs: pd.DataFrame
    uns: dict[str, Any]
    history: list[dict[str, Any]]

    # ------------------------------------------------------------------ curation
    def _require_clusters(self, names: Iterable[str]) -> list[str]:
        if "cluster" not in self.obs.columns:
            raise InputError("particles have no 'cluster' column: run tl.cluster first")
        names = [str(n) for n in names]
        present = set(self.clusters())
        bad = [n for n in names if n not in present]
        if bad:
            raise InputError(
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

    def session_mark(self) -> int:
        """The history length now: pass it as ``undo(floor=...)`` to stop undo at this point.

        The explorer takes one when a session opens, so its Undo never walks into the
        pipeline's own steps (``tl.cluster``, ``tl.subcluster``) or earlier sessions.
        """
        return len(self.history)

    def undo(self, *, floor: int = 0) -> dict[str, Any]:
        """Revert the last curation action exactly (obs columns it changed and ``uns``).

        Parameters
        ----------
        floor : int
            Entries ``history[:floor]`` are not undoable (a :meth:`session_mark`); default 0
            (everything, including the analysis tools' clustering steps).

        Returns
        -------
        dict
            The history entry removed (``action``, ``params``, ``time``, ``undo``).
        """
        if not self.history:
            raise InputError("nothing to undo: history is empty")
        if len(self.history) <= int(floor):
            raise InputError(
                "nothing to undo in this session (earlier steps, e.g. "
                f"{self.history[-1]['action']!r}, belong to the pipeline or an earlier session)"
            )
        entry = self.history.pop()
        rec = entry["undo"]
        for c in rec["new_columns"]:
            if c in self.obs.columns:
                del self.obs[c]
        if rec["ids"]:
            pos = self.obs.index.get_indexer(rec["ids"])
            if (pos < 0).any():
                self.history.append(entry)
                raise InputError(f"cannot undo {entry['action']!r}: particles were removed")
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
        """Rename a cluster (undoable); its annotation follows it.

        Parameters
        ----------
        old : str
            An existing cluster.
        new : str
            The new name; it must not exist yet (use :meth:`merge_clusters` for that).
        """
        (old,) = self._require_clusters([old])
        new = str(new)
        if not new:
            raise InputError("new cluster name must be a non-empty string")
        if new == old:
            return
        if new in self.clusters():
            raise InputError(
                f"cluster {new!r} already exists; use merge_clusters([{old!r}, {new!r}])"
            )
        pos = np.flatnonzero((self.obs["cluster"] == old).to_numpy(dtype=bool, na_value=False))
        self._record("rename_cluster", {"old": old, "new": new}, pos, ["cluster"])
        self._set_cluster(pos, new)
        ann = self.uns.get("cluster_annotations", {})
        if old in ann:
            ann[new] = ann.pop(old)
        colors = self.uns.get(CLUSTER_COLORS_KEY)
        if isinstance(colors, dict) and old in colors:
            colors[new] = colors.pop(old)  # a renamed cluster keeps its colour

    def annotate_cluster(self, name: str, text: str) -> None:
        """Attach a free-text annotation to a cluster (undoable).

        Parameters
        ----------
        name : str
            An existing cluster.
        text : str
            The annotation (e.g. ``"ribosome?"``), kept in ``uns["cluster_annotations"]``.
        """
        (name,) = self._require_clusters([name])
        self._record("annotate_cluster", {"name": name, "text": str(text)}, np.zeros(0, int), [])
        self._annotations()[name] = str(text)

    def merge_clusters(self, names: Sequence[str], *, into: str | None = None) -> str:
        """Merge clusters into one (undoable); their annotations are joined.

        Parameters
        ----------
        names : sequence of str
            Two or more existing clusters.
        into : str, optional
            Name of the merged cluster (default the first of ``names``); it may be one of
            ``names`` or a new name.

        Returns
        -------
        str
            The name of the merged cluster.
        """
        if isinstance(names, str) or len(names) < 2:
            raise InputError(f"merge_clusters needs at least two cluster names, got {names!r}")
        names = self._require_clusters(names)
        into = names[0] if into is None else str(into)
        if into in self.clusters() and into not in names:
            raise InputError(f"target cluster {into!r} exists and is not among {names}")
        isin = self.obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False)
        pos = np.flatnonzero(isin)
        self._record("merge_clusters", {"names": names, "into": into}, pos, ["cluster"])
        self._set_cluster(pos, into)
        ann = self.uns.get("cluster_annotations", {})
        texts = [ann.pop(n) for n in names if n in ann]
        if texts:
            ann[into] = "; ".join(dict.fromkeys(texts))
        colors = self.uns.get(CLUSTER_COLORS_KEY)
        if isinstance(colors, dict) and into not in colors and names[0] in colors:
            colors[into] = colors[names[0]]  # a merge into a new name keeps the first's colour
        return into

    def _set_excluded(self, ids: Any, value: bool, action: str) -> int:
        pos = self._positions(ids, f"{action} ids")
        if pos.size == 0:
            raise InputError(f"{action}: empty selection")
        self._record(action, {"ids": self.obs.index[pos].tolist()}, pos, ["excluded"])
        if "excluded" not in self.obs.columns:
            self.obs["excluded"] = False
        col = self.obs["excluded"].to_numpy(dtype=bool, copy=True)
        col[pos] = value
        self.obs["excluded"] = col
        return int(pos.size)

    def exclude(self, ids: Any) -> int:
        """Mark particles as excluded (kept, flagged in ``obs["excluded"]``; undoable).

        Parameters
        ----------
        ids : boolean mask (N,), particle ids or integer positions
            The selection (non-empty).

        Returns
        -------
        int
            Number of particles in the selection.
        """
        return self._set_excluded(ids, True, "exclude")

    def include(self, ids: Any) -> int:
        """Clear the ``excluded`` flag of the given particles (undoable).

        Parameters
        ----------
        ids : boolean mask (N,), particle ids or integer positions
            The selection (non-empty).

        Returns
        -------
        int
            Number of particles in the selection.
        """
        return self._set_excluded(ids, False, "include")

    def apply_split(
        self,
        ids: Any,
        labels: Sequence[int] | np.ndarray,
        *,
        prefix: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        """Give the selected particles new cluster names from integer group labels (undoable).

        The bookkeeping half of a split: the labels come from a clustering tool
        (:func:`cryosiam_nb.analysis.split` computes them by spectral clustering). The
        action is recorded in ``history`` as ``"split"``.

        Parameters
        ----------
        ids : boolean mask (N,), particle ids or integer positions
            The selection (≥ 2 particles).
        labels : sequence of int, shape (len(ids),)
            Group 0..k-1 of each selected particle, group 0 the largest.
        prefix : str, optional
            New names are ``"<prefix>.1"``, ``"<prefix>.2"``, … for groups 0, 1, … (skipping
            names that already exist); default the selection's common cluster (``"3"`` →
            ``"3.1"``, ``"3.2"``) or ``"split"`` when it spans several clusters.
        params : dict, optional
            JSON-serialisable parameters of the clustering, stored in the history entry.

        Returns
        -------
        list of str
            The new cluster names, one per group.
        """
        pos = self._positions(ids, "split ids")
        if pos.size < 2:
            raise InputError(f"split needs at least 2 particles, got {pos.size}")
        labels = np.asarray(labels)
        if labels.shape != (pos.size,) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"split labels must be {pos.size} integers (one per selected particle), "
                f"got shape {labels.shape} dtype {labels.dtype}"
            )
        if labels.min() < 0:
            raise InputError("split labels must be ≥ 0")
        if prefix is None:
            current = (
                self.obs["cluster"].iloc[pos].dropna().unique().tolist()
                if "cluster" in self.obs.columns
                else []
            )
            prefix = str(current[0]) if len(current) == 1 else "split"
        names = _child_names(str(prefix), int(labels.max()) + 1, set(self.clusters()))
        entry = {
            "ids": self.obs.index[pos].tolist(),
            **dict(params or {}),
            "k_used": len(names),
            "names": names,
        }
        self._record("split", entry, pos, ["cluster"])
        self._set_cluster(pos, [names[i] for i in labels])
        return names
