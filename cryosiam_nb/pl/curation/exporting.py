"""The explorer's export and save actions (the formats themselves live in :mod:`cryosiam_nb.export`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryosiam_nb import export as _export
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles

__all__ = ["EXPORT_FORMATS"]

#: Export menu label → (format name of :func:`cryosiam_nb.export.write`, default file name).
#: Every format has its own default name, so switching format never overwrites another
#: format's export.
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "STAR (RELION 3/4 + Warp)": ("relion4", "selection.star"),
    "STAR (RELION 5)": ("relion5", "selection_relion5.star"),
    "CSV (Å)": ("csv", "selection.csv"),
    "copick JSON": ("copick", "selection_copick"),
}
#: Columns the explorer keeps in STAR files (the particle ids make them traceable).
_STAR_EXTRA: tuple[str, ...] = ("particle_id", "cluster", "species", "score")


class ExportMixin:
    """``export`` / ``save`` of :class:`~cryosiam_nb.pl.curation.Explorer` (needs its state)."""

    particles: Particles
    shapes: dict[str, tuple[int, ...]]
    tomograms: dict[str, object]
    status: str
    _sel: np.ndarray

    def _export_table(
        self,
        scope: str,
        clusters: Sequence[str] | None,
        include_excluded: bool,
        tomogram: str | None = None,
    ) -> tuple[pd.DataFrame, int]:
        obs = self.particles.obs
        if scope == "selection":
            pos = self._sel
        elif scope == "clusters":
            names = self.particles._require_clusters(clusters or [])
            if not names:
                raise InputError("export: choose at least one cluster")
            pos = np.flatnonzero(obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False))
        elif scope == "all":
            pos = np.arange(len(obs))
        else:
            raise InputError(
                f"export scope must be 'selection', 'clusters' or 'all', got {scope!r}"
            )
        if tomogram is not None:
            pos = pos[obs["tomogram"].iloc[pos].astype(str).to_numpy() == str(tomogram)]
        n_skipped = 0
        if not include_excluded and "excluded" in obs.columns:
            keep = ~obs["excluded"].to_numpy(dtype=bool)[pos]
            n_skipped = int(len(pos) - keep.sum())
            pos = pos[keep]
        if len(pos) == 0:
            where = f", tomogram {tomogram!r}" if tomogram is not None else ""
            raise InputError(
                f"export: no particles to export (scope {scope!r}{where}; {n_skipped} "
                "excluded particle(s) skipped)"
            )
        return self.particles.selection_to_table(pos), n_skipped

    def _shape_of(self, tomogram: str) -> tuple[int, int, int]:
        """(z, y, x) size in voxels of a tomogram: ``shapes=``, the tomogram, or ``uns``."""
        if tomogram in self.shapes:
            return self.shapes[tomogram]
        if tomogram in self.tomograms:
            return self._viewer(tomogram).shape
        shapes = self.particles.uns.get("tomogram_shapes", {})
        if tomogram in shapes:
            return tuple(int(s) for s in shapes[tomogram])
        raise InputError(
            f"RELION 5 export needs the (z, y, x) shape of tomogram {tomogram!r}: pass "
            f"tomograms= or shapes={{'{tomogram}': (nz, ny, nx)}} to the explorer"
        )

    def export(
        self,
        path: str | os.PathLike[str],
        fmt: str = "relion4",
        scope: str = "selection",
        clusters: Sequence[str] | None = None,
        include_excluded: bool = False,
        overwrite: bool = True,
        tomogram: str | None = None,
    ) -> Path:
        """Write particle coordinates of the selection / chosen clusters / all particles.

        The file is written by :func:`cryosiam_nb.export.write`.

        Parameters
        ----------
        path
            Output file; for ``copick`` the copick root folder.
        fmt
            ``"relion4"`` (RELION 3/4 + Warp STAR, voxel coordinates; aliases ``"relion3"``,
            ``"warp"``, ``"star"``), ``"relion5"`` (centred Å; needs the tomogram shapes from
            ``shapes=``, ``tomograms=`` or ``uns["tomogram_shapes"]``), ``"csv"`` (Å and
            voxels), ``"copick"``, or a label of :data:`EXPORT_FORMATS`.
        scope
            ``"selection"``, ``"clusters"`` (those named in ``clusters``) or ``"all"``.
        clusters
            Cluster names for ``scope="clusters"``.
        include_excluded
            Also write particles flagged as excluded (skipped by default; the status line
            says how many were skipped).
        overwrite
            Replace an existing file; ``False`` raises ``FileExistsError`` (the UI's default).
        tomogram
            Write only the particles of this tomogram (the UI: the one shown in the slice
            viewer); default every tomogram of the scope.

        Returns
        -------
        pathlib.Path
            The path written. STAR/CSV files carry the particle ids
            (``cryosiamNbParticle_id`` / ``particle_id``); copick writes one pickable object
            per cluster (``cluster-<name>``). The status line gives the number of particles
            written per tomogram.
        """
        key = EXPORT_FORMATS[fmt][0] if fmt in EXPORT_FORMATS else _export.format_of(path, fmt)
        df, n_skipped = self._export_table(scope, clusters, include_excluded, tomogram)
        opts: dict[str, object] = {"overwrite": bool(overwrite)}
        if key in ("relion4", "relion5"):
            opts["extra"] = _STAR_EXTRA
        if key == "relion5":
            names = df["tomogram"].astype(str).unique()
            opts["tomogram_shape"] = {t: self._shape_of(t) for t in names}
        if key == "copick" and "cluster" in df.columns:
            opts["object_name"] = "cluster"
        out = _export.write(df, path, format=key, **opts)
        skipped = f"; skipped {n_skipped} excluded particle(s)" if n_skipped else ""
        per = df["tomogram"].astype(str).value_counts(sort=False)
        counts = ", ".join(f"{t}: {int(per[t])}" for t in sorted(per.index))
        runs = f" to {len(per)} copick run(s) in" if key == "copick" else " to"
        self.status = f"exported {len(df)} particle(s) ({counts}){runs} {out}{skipped}"
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the curated Particles (zarr store, written atomically); returns its path.

        The session's autosave file is removed: the saved store now holds its edits.
        """
        out = self.particles.save(path)
        self._forget_autosave()
        self.status = f"saved {len(self.particles)} particle(s) to {out}"
        return Path(out)
