"""One curation session of the explorer: its undo floor, output folder, save and autosave.

A served explorer gives every browser session its own working copy of the particles
(:class:`~cryosiam_nb.particles.Particles.copy`), an Undo that stops at the session's start
(:meth:`~cryosiam_nb.particles.Particles.session_mark`), writes confined to one output
folder (the client picks a file *name*, never a path) and an autosave file
``<output>/.autosave/session-<time>-<id>.parquet`` rewritten after every edit; a new session
offers to restore the newest autosave it finds (a reload, a crashed tab).

The autosave holds the curated obs columns (``cluster``, ``excluded`` and any other column
an edit of this session touched) indexed by particle id, and as parquet key-value metadata
(JSON) the ``uns`` and the session's history entries, so Undo keeps working after a restore.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError, atomic_path
from cryosiam_nb.particles import Particles
from cryosiam_nb.particles.arrays import AlignedArrays

__all__ = ["safe_name", "session_copy", "AUTOSAVE_DIR"]

#: Folder (inside the output folder) of the autosave files.
AUTOSAVE_DIR = ".autosave"
_META_KEY = b"cryosiam_nb_session"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def safe_name(name: str, what: str = "file name") -> str:
    """Check a client-chosen output name: one plain file/folder name, nothing else.

    Parameters
    ----------
    name
        E.g. ``"selection.star"``.
    what
        Used in the error message.

    Returns
    -------
    str
        ``name`` stripped of surrounding blanks.

    Raises
    ------
    InputError
        Empty, absolute, containing a path separator, ``..``, a leading dot or characters
        other than letters, digits and ``. _ + = -``.
    """
    n = str(name).strip()
    if not n:
        raise InputError(f"{what}: empty")
    if os.path.isabs(n) or "/" in n or "\\" in n or n.startswith("."):
        raise InputError(
            f"{what} {n!r}: give a plain name; files are written only inside the output folder"
        )
    if ".." in n or not _NAME_OK.match(n):
        raise InputError(f"{what} {n!r}: use letters, digits and . _ + = - only (no '..')")
    return n


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class SessionMixin:
    """Session state of :class:`~cryosiam_nb.pl.curation.Explorer` (needs its ``particles``)."""

    particles: Particles
    status: str

    def _init_session(
        self, output_dir: str | os.PathLike[str] | None, autosave: bool, label: str | None
    ) -> None:
        self.output_dir = Path(output_dir or Path.cwd()).resolve()
        self._floor = self.particles.session_mark()
        self._autosave = bool(autosave)
        self._autosave_path: Path | None = None
        self._session_label = label or secrets.token_hex(4)
        self._started = _now()
        self._touched: set[str] = {"cluster", "excluded"}

    # ------------------------------------------------------------------ confined writes
    def out_path(self, name: str, what: str = "file name") -> Path:
        """``output_dir / name`` for a client-chosen ``name`` (see :func:`safe_name`)."""
        p = (self.output_dir / safe_name(name, what)).resolve()
        if p.parent != self.output_dir:
            raise InputError(f"{what} {name!r}: outside the output folder {self.output_dir}")
        return p

    # ------------------------------------------------------------------ undo limit
    @property
    def n_session_edits(self) -> int:
        """Number of undoable actions of this session."""
        return max(0, len(self.particles.history) - self._floor)

    # ------------------------------------------------------------------ autosave
    @property
    def autosave_dir(self) -> Path:
        """Folder of the autosave files (``<output_dir>/.autosave``)."""
        return self.output_dir / AUTOSAVE_DIR

    def _autosave_columns(self) -> list[str]:
        for e in self.particles.history[self._floor :]:
            rec = e.get("undo", {})
            self._touched.update(rec.get("columns", {}))
            self._touched.update(rec.get("new_columns", []))
        return [c for c in sorted(self._touched) if c in self.particles.obs.columns]

    def autosave_now(self) -> Path | None:
        """Write this session's autosave file (no-op when autosave is off); returns its path."""
        if not self._autosave:
            return None
        import pyarrow as pa  # noqa: PLC0415 - pandas' parquet engine
        import pyarrow.parquet as pq  # noqa: PLC0415

        if self._autosave_path is None:
            stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
            self._autosave_path = (
                self.autosave_dir / f"session-{stamp}-{self._session_label}.parquet"
            )
        self.autosave_dir.mkdir(parents=True, exist_ok=True)
        obs = self.particles.obs
        cols = self._autosave_columns()
        df = pd.DataFrame({c: obs[c].to_numpy() for c in cols})
        df.insert(0, "particle_id", obs.index.astype(str).to_numpy())
        meta = {
            "version": 1,
            "n_particles": len(obs),
            "started": self._started,
            "updated": _now(),
            "n_edits": self.n_session_edits,
            "uns": self.particles.uns,
            "history": self.particles.history[self._floor :],
        }
        table = pa.Table.from_pandas(df, preserve_index=False)
        md = dict(table.schema.metadata or {})
        md[_META_KEY] = json.dumps(meta, allow_nan=True).encode()
        with atomic_path(self._autosave_path) as tmp:
            pq.write_table(table.replace_schema_metadata(md), tmp)
        return self._autosave_path

    def autosave_candidates(self) -> list[dict[str, Any]]:
        """Autosave files of other sessions over the same particles, newest first.

        Returns
        -------
        list of dict
            ``path``, ``started``, ``updated`` (UTC ISO), ``n_edits``.
        """
        out = []
        if not self.autosave_dir.is_dir():
            return out
        for p in self.autosave_dir.glob("session-*.parquet"):
            if p == self._autosave_path:
                continue
            try:
                meta = _read_meta(p)
            except (OSError, ValueError):
                continue
            if meta.get("n_particles") != len(self.particles) or not meta.get("n_edits"):
                continue
            out.append({"path": p, **{k: meta.get(k) for k in ("started", "updated", "n_edits")}})
        return sorted(out, key=lambda d: str(d["updated"]), reverse=True)

    def restore_autosave(self, path: str | os.PathLike[str]) -> int:
        """Load an autosave file into this session (its file is then taken over and removed).

        Returns
        -------
        int
            Number of edits restored (they can be undone one by one).
        """
        import pyarrow.parquet as pq  # noqa: PLC0415

        path = Path(path)
        if path.parent.resolve() != self.autosave_dir.resolve():
            raise InputError(f"autosave {path}: not in {self.autosave_dir}")
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[_META_KEY])
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"autosave {path}: unreadable ({err})") from err
        df = table.to_pandas()
        obs = self.particles.obs
        ids = df.pop("particle_id").astype(str).to_numpy()
        if len(ids) != len(obs) or not np.array_equal(ids, obs.index.astype(str).to_numpy()):
            raise InputError(f"autosave {path}: its particle ids differ from these particles")
        for c in df.columns:
            if c == "cluster":
                obs[c] = df[c].to_numpy(dtype=object)
                self.particles._set_cluster(np.zeros(0, np.int64), [])  # back to str dtype
            else:
                obs[c] = df[c].to_numpy()
        self.particles.uns = meta.get("uns", {})
        self.particles.history = self.particles.history[: self._floor] + meta.get("history", [])
        self._touched.update(df.columns)
        path.unlink(missing_ok=True)
        self._after_edit(f"restored {meta.get('n_edits', 0)} autosaved edit(s) from {path.name}")
        return int(meta.get("n_edits", 0))

    def discard_autosave(self, path: str | os.PathLike[str]) -> None:
        """Delete an autosave file of another session."""
        path = Path(path)
        if path.parent.resolve() != self.autosave_dir.resolve() or path.suffix != ".parquet":
            raise InputError(f"autosave {path}: not in {self.autosave_dir}")
        path.unlink(missing_ok=True)

    def _forget_autosave(self) -> None:
        if self._autosave_path is not None:
            self._autosave_path.unlink(missing_ok=True)
            self._autosave_path = None


def _read_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    md = pq.read_schema(path).metadata or {}
    if _META_KEY not in md:
        raise ValueError("not an explorer autosave")
    return json.loads(md[_META_KEY])


def session_copy(particles: Particles) -> Particles:
    """A browser session's working copy of ``particles``, without re-validating a million rows.

    ``obs`` is copied, ``uns`` and ``history`` deep-copied; ``obsm`` is a new mapping over
    the same arrays (the explorer never writes them; lazy ones stay lazy), so a copy of 1M
    particles takes a fraction of a second instead of the seconds of
    :meth:`~cryosiam_nb.particles.Particles.copy` (which rebuilds the id index and the
    cluster column).

    Returns
    -------
    Particles
        Edits to its ``obs`` / ``uns`` / ``history`` never reach ``particles``.
    """
    out = copy.copy(particles)
    out.obs = particles.obs.copy()
    out.obsm = AlignedArrays(len(particles), {k: particles.obsm.raw(k) for k in particles.obsm})
    out.uns = copy.deepcopy(particles.uns)
    out.history = copy.deepcopy(particles.history)
    return out
