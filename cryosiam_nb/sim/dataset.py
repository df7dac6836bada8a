"""``write_dataset`` / ``read_dataset``: many simulated tomograms on disk with a manifest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .core import SEMANTIC_CLASSES, VOLUME_VARIABLES, Simulation, _error, simulate

__all__ = ["write_dataset", "read_dataset", "dataset_table", "MANIFEST"]

MANIFEST = "manifest.json"


def _tomogram_seeds(seed: int, n: int) -> list[int]:
    children = np.random.SeedSequence(int(seed)).spawn(n)
    return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


def write_dataset(
    folder: str | Path,
    n: int,
    shape: Sequence[int] = (128, 256, 256),
    voxel_size: float = 10.0,
    sample: str | Sequence[str] = "general",
    seed: int = 0,
    format: str = "mrc",
    mode: str = "tilt",
    table_format: str = "csv",
    overwrite: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Simulate ``n`` tomograms and write them with their ground truth and a manifest.

    Layout (the whole folder appears atomically, only when complete)::

        folder/manifest.json
        folder/tomo_000/{clean,noisy,semantic,instances,lamella}.mrc   (or .zarr)
        folder/tomo_000/particles.csv                                   (or .parquet)

    ``sample`` is one sample type or a sequence cycled over the tomograms. Each tomogram
    gets its own seed derived from ``seed`` (``numpy.random.SeedSequence.spawn``), so its
    defocus and thickness vary unless fixed through ``kwargs`` (any :func:`simulate`
    argument). The same arguments write byte-identical files. Returns the manifest path.
    """
    from cryosiam_nb.io import atomic_path, write_json

    n = int(n)
    if n < 1:
        raise _error(f"n: need at least one tomogram, got {n}")
    if format not in ("mrc", "zarr"):
        raise _error(f"format: must be 'mrc' or 'zarr', got {format!r}")
    if table_format not in ("csv", "parquet"):
        raise _error(f"table_format: must be 'csv' or 'parquet', got {table_format!r}")
    samples = [sample] if isinstance(sample, str) else list(sample)
    if not samples:
        raise _error("sample: empty sequence of sample types")
    if "progress" in kwargs or "seed" in kwargs:
        raise _error("kwargs: pass seed/progress as write_dataset arguments")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise _error(f"{folder}: already exists (pass overwrite=True to replace it)")
    seeds = _tomogram_seeds(seed, n)
    entries = []
    with atomic_path(folder, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="simulating tomograms", unit="tomo")
        for i in it:
            name = f"tomo_{i:03d}"
            s = simulate(
                shape,
                voxel_size=voxel_size,
                sample=samples[i % len(samples)],
                seed=seeds[i],
                mode=mode,
                keep_tilt_series=False,
                progress=False,
                **kwargs,
            )
            files = s.write(tmp / name, format=format, table_format=table_format)
            params = {k: v for k, v in s.params.items() if not k.startswith("seconds")}
            entries.append(
                {
                    "name": name,
                    "seed": seeds[i],
                    "sample": s.params["sample"],
                    "files": {k: f"{name}/{v}" for k, v in files.items()},
                    "n_particles": int(len(s.particles)),
                    "params": params,
                }
            )
        manifest = {
            "generator": "cryosiam_nb.sim.write_dataset",
            "format_version": 1,
            "n": n,
            "seed": int(seed),
            "shape": [int(v) for v in shape],
            "voxel_size": float(voxel_size),
            "format": format,
            "volume_variables": list(VOLUME_VARIABLES),
            "semantic_classes": list(SEMANTIC_CLASSES),
            "units": {"voxel_size": "angstrom", "particles zyx": "voxels", "axes": "zyx"},
            "tomograms": entries,
        }
        write_json(manifest, tmp / MANIFEST)
    return folder / MANIFEST


def dataset_table(folder: str | Path) -> pd.DataFrame:
    """The manifest of a dataset written by :func:`write_dataset` as a table.

    One row per tomogram: ``name, sample, seed, n_particles, defocus_um, thickness_nm,
    voxel_size`` and absolute paths ``clean, noisy, semantic, instances, lamella,
    particles``.
    """
    man = _manifest(folder)
    rows = []
    try:
        for t in man["tomograms"]:
            row = {
                "name": t["name"],
                "sample": t["sample"],
                "seed": t["seed"],
                "n_particles": t["n_particles"],
                "defocus_um": t["params"]["defocus_um"],
                "thickness_nm": t["params"]["thickness_nm"],
                "voxel_size": t["params"]["voxel_size"],
            }
            for k, v in t["files"].items():
                row[k] = str((Path(folder) / v).resolve())
            rows.append(row)
    except (KeyError, TypeError) as exc:
        raise _error(f"{Path(folder) / MANIFEST}: malformed manifest ({exc})") from exc
    return pd.DataFrame(rows)


def _manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise _error(f"{path}: no manifest; is {folder} a dataset written by write_dataset?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _error(f"{path}: malformed manifest ({exc})") from exc


_LABEL_DTYPES = {"semantic": np.uint8, "instances": np.uint32, "lamella": np.uint8}


def read_dataset(folder: str | Path) -> list[Simulation]:
    """Open a dataset written by :func:`write_dataset` as a list of :class:`Simulation`.

    Volumes are lazy (dask-backed, read with :func:`cryosiam_nb.io.read`); label volumes
    get their integer dtypes back. ``Simulation.name`` is the tomogram's folder name and
    ``params`` its manifest entry; ``tilt_series`` is ``None``.
    """
    from cryosiam_nb.io import read

    folder = Path(folder)
    out = []
    for row in dataset_table(folder).to_dict("records"):
        vs = float(row["voxel_size"])
        arrays = {}
        for var in VOLUME_VARIABLES:
            da_ = read(row[var], voxel_size=vs, name=var)
            if var in _LABEL_DTYPES:
                da_ = da_.astype(_LABEL_DTYPES[var])
            da_.attrs = {"voxel_size": vs}
            arrays[var] = da_
        ds = xr.Dataset(arrays, attrs={"voxel_size": vs, "sample": row["sample"]})
        ds["semantic"].attrs["classes"] = list(SEMANTIC_CLASSES)
        table = Path(row["particles"])
        parts = pd.read_csv(table) if table.suffix == ".csv" else pd.read_parquet(table)
        if "id" in parts:
            parts["id"] = parts["id"].astype(np.uint32)
        entry = next(t for t in _manifest(folder)["tomograms"] if t["name"] == row["name"])
        out.append(
            Simulation(volumes=ds, particles=parts, params=dict(entry["params"]), name=row["name"])
        )
    return out
