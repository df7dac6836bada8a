"""The tomograms of a dataset: a folder, a copick project, a Data Portal download, a list."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryosiam_nb.io import InputError

__all__ = ["list_inputs"]

_SUFFIXES = (".mrc", ".rec", ".map", ".zarr")


def list_inputs(
    inputs: str | os.PathLike[str] | Sequence[Any] | Mapping[str, Any],
) -> dict[str, Path]:
    """The tomograms of ``inputs`` as ``{name: path}``, in a stable (sorted) order.

    Parameters
    ----------
    inputs
        A folder (its ``*.mrc``, ``*.rec``, ``*.map`` files and ``*.zarr`` stores; a folder
        without any is searched as a copick project or CryoET Data Portal download by
        :func:`cryosiam_nb.io.list_tomograms`), a copick configuration ``.json``, the table
        of ``io.list_tomograms`` (names: the run, with type and voxel spacing when a run has
        several), one file, a list of paths, or a ``{name: path}`` mapping. Names default
        to file stems.

    Returns
    -------
    dict
        Tomogram name → path. Names are unique and usable as folder names.
    """
    import pandas as pd

    if isinstance(inputs, str | os.PathLike):
        root = Path(inputs)
        if not root.exists():
            raise InputError(f"{root}: no such file or directory")
        if root.suffix.lower() == ".json" or (root.is_dir() and (root / "ExperimentRuns").is_dir()):
            inputs = _copick_table(root)
        elif root.is_dir() and root.suffix.lower() != ".zarr":
            paths = sorted(p for p in root.iterdir() if p.suffix.lower() in _SUFFIXES)
            inputs = paths if paths else _copick_table(root)
        else:
            inputs = [root]
    if isinstance(inputs, pd.DataFrame):
        if "path" not in inputs or "run" not in inputs:
            raise InputError("inputs: a table needs 'run' and 'path' columns (io.list_tomograms)")
        t = inputs.reindex(columns=["run", "tomo_type", "voxel_spacing"]).astype(str)
        many = t["run"].duplicated(keep=False)
        names = t["run"].where(~many, t["run"] + "_" + t["tomo_type"] + "_" + t["voxel_spacing"])
        pairs = [(n, Path(p)) for n, p in zip(names, inputs["path"])]
    elif isinstance(inputs, Mapping):
        pairs = [(str(k), Path(v)) for k, v in inputs.items()]
    else:
        pairs = [(Path(p).stem, Path(p)) for p in inputs]
    if not pairs:
        raise InputError("inputs: no tomograms given")
    out: dict[str, Path] = {}
    for name, path in pairs:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if not name or name.startswith(".") or any(c in name for c in "/\\:"):
            raise InputError(f"{path}: tomogram name {name!r} cannot be a folder name")
        if name in out:
            raise InputError(f"{path}: tomogram name {name!r} is also used by {out[name]}")
        out[name] = path
    return dict(sorted(out.items()))


def _copick_table(root: Path) -> Any:
    from cryosiam_nb.io import list_tomograms

    try:
        return list_tomograms(root)
    except InputError as exc:
        raise InputError(
            f"{root}: no tomograms here (looked for {', '.join(_SUFFIXES)} files and for "
            f"copick / CryoET Data Portal layouts: {exc})"
        ) from exc
