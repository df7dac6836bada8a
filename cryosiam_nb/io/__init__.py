"""Reading and writing tomograms: MRC (memory-mapped) and zarr / OME-Zarr, out of core.

Every ``.zarr`` volume :func:`write` produces is an OME-Zarr image with a 2× pyramid (0.4 on
zarr v2 by default, readable by ome-zarr-py, napari and copick; 0.5 on zarr v3 with
``zarr_format=3``). :func:`read` opens MRC, any OME-Zarr 0.1–0.5 image (choose a pyramid
``level``), plain zarr arrays and one-volume xarray stores; :func:`list_tomograms` lists the
tomograms of a copick project or a CryoET Data Portal download.

A tomogram is an :class:`xarray.DataArray` with dims ``("z", "y", "x")``, coordinates in
Å (``index * voxel_size``), ``attrs["voxel_size"]`` in Å, backed by a dask array so that
nothing is read until it is needed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from cryosiam_nb.constants import DIMS

from ._atomic import atomic_path
from ._datasets import list_tomograms
from ._errors import InputError, VoxelSizeWarning
from ._mrc import MRC_SUFFIXES, MrcVolume, is_mrc_file, open_mrc, write_mrc
from ._zarr import (
    OME_VERSION,
    UNIT_TO_ANGSTROM,
    downsample_method,
    open_zarr,
    pyramid_shapes,
    write_ome_zarr,
)

__all__ = [
    "InputError",
    "VoxelSizeWarning",
    "read",
    "write",
    "atomic_path",
    "as_dataarray",
    "as_volume",
    "voxel_size_of",
    "write_json",
    "list_tomograms",
    "pyramid_shapes",
    "MrcVolume",
    "MRC_SUFFIXES",
    "OME_VERSION",
    "UNIT_TO_ANGSTROM",
]

DEFAULT_CHUNKS = (64, 256, 256)


# --------------------------------------------------------------------------- helpers
def as_volume(data: Any, name: str = "data") -> np.ndarray | da.Array:
    """The (z, y, x) array inside ``data`` (numpy, dask or xarray), checked to be 3-D.

    Parameters
    ----------
    data
        A numpy or dask array or an ``xarray.DataArray`` with dims ``("z", "y", "x")``.
    name
        What to call the input in error messages (a file name or an argument name).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        The array itself (dask stays lazy; nothing is computed).
    """
    if isinstance(data, xr.DataArray):
        if tuple(data.dims) != DIMS:
            raise InputError(f"{name}: expected dims ('z', 'y', 'x'), got {tuple(data.dims)}")
        data = data.data
    arr = data if isinstance(data, da.Array) else np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"{name}: expected a 3-D (z, y, x) volume, got shape {arr.shape}")
    if 0 in arr.shape:
        raise InputError(f"{name}: the volume is empty (shape {arr.shape})")
    return arr


def voxel_size_of(*objs: Any) -> float | None:
    """The voxel size (Å) carried by the first of ``objs`` that has one, else ``None``.

    The one carrier of the voxel size is ``attrs["voxel_size"]`` (a float in Å) of a
    ``DataArray`` or ``Dataset``; a :class:`~cryosiam_nb.particles.Particles` object carries
    it per particle in ``obs["voxel_size"]`` and is not looked at here.

    Parameters
    ----------
    *objs
        Objects to look at in order (``None`` entries are skipped).

    Returns
    -------
    float or None
        Voxel size in Å.
    """
    for o in objs:
        vs = getattr(o, "attrs", {}).get("voxel_size") if o is not None else None
        if vs is not None:
            return float(vs)
    return None


def as_dataarray(
    data: Any, voxel_size: float | None = None, name: str | None = None
) -> xr.DataArray:
    """Wrap a numpy/dask array (z, y, x) as a tomogram DataArray with Å coordinates.

    Parameters
    ----------
    data
        numpy / dask array or ``DataArray``, axes (z, y, x).
    voxel_size
        Voxel size in Å. Overrides the one a ``DataArray`` carries; for a bare array
        without it the voxel size is 1 Å.
    name
        Name of the returned DataArray (and of the input in error messages).

    Returns
    -------
    xarray.DataArray
        Dims ``("z", "y", "x")``, coordinates ``index * voxel_size`` (Å),
        ``attrs["voxel_size"]`` (Å). Lazy input stays lazy.
    """
    if isinstance(data, xr.DataArray):
        as_volume(data, name or str(data.name or "data"))
        if voxel_size is not None:
            data = data.assign_attrs(voxel_size=float(voxel_size))
            data = _with_coords(data, float(voxel_size))
        return data
    arr = as_volume(data, name or "data")
    vs = 1.0 if voxel_size is None else float(voxel_size)
    out = xr.DataArray(arr, dims=DIMS, name=name, attrs={"voxel_size": vs})
    return _with_coords(out, vs)


def _with_coords(arr: xr.DataArray, voxel_size: float) -> xr.DataArray:
    coords = {d: np.arange(n, dtype=np.float64) * voxel_size for d, n in zip(DIMS, arr.shape)}
    return arr.assign_coords(coords)


def _check_voxel_size(value: float, source: str) -> float:
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{source}: voxel size must be a positive number of Å, got {value!r}")
    return float(value)


def _normalise_chunks(chunks: Any, shape: tuple[int, ...]) -> Any:
    if chunks is None or chunks == "auto":
        return tuple(min(c, s) for c, s in zip(DEFAULT_CHUNKS, shape))
    return chunks


# --------------------------------------------------------------------------- read
def read(
    path: str | os.PathLike[str],
    voxel_size: float | None = None,
    chunks: Any = "auto",
    name: str | None = None,
    check_values: bool = True,
    dtype: Any = np.float32,
    level: int = 0,
) -> xr.DataArray:
    """Open a tomogram lazily as a dask-backed ``DataArray`` with dims (z, y, x).

    Parameters
    ----------
    path
        An ``.mrc`` / ``.rec`` / ``.map`` file (memory-mapped, never loaded whole; a
        gzip/bzip2-compressed MRC, detected by its magic bytes, is decompressed into
        memory) or a ``.zarr`` store: an OME-Zarr image (NGFF 0.1–0.5, zarr v2 or v3,
        e.g. a copick tomogram ``ExperimentRuns/<run>/VoxelSpacing<Å>/<type>.zarr`` or a
        CryoET Data Portal one; see :func:`list_tomograms`), one level of it
        (``image.zarr/0``), a plain zarr array, or a store holding one 3-D array (an
        xarray Dataset store of one variable; for several use ``store.zarr/<name>``).
        MRC axes are put in (z, y, x) order whatever the header's mapc/mapr/maps; OME-Zarr
        axes by their names (singleton t / c axes are dropped).
    voxel_size
        Voxel size in Å. Overrides the header / OME-Zarr scale. A voxel size of 0 or 1 Å
        (or none at all, e.g. OME-Zarr 0.3 which has no scale) is almost always "unset": a
        :class:`VoxelSizeWarning` asks for an explicit value. OME-Zarr units (Å, nm, µm,
        ...; see :data:`UNIT_TO_ANGSTROM`) are converted to Å. An anisotropic voxel size is
        refused unless this is given.
    chunks
        Dask chunks in voxels (z, y, x); ``"auto"`` uses up to 64×256×256.
    name
        Name of the returned DataArray (default: the file stem).
    check_values
        Sample up to ~1 M voxels: refuse a volume with no finite values, warn when all
        sampled voxels are equal (a constant volume).
    dtype
        Element type of the returned array (default float32); ``None`` keeps the file's
        own type, e.g. for label volumes.
    level
        Pyramid level of an OME-Zarr image: 0 is full resolution, ``i`` is downsampled
        ``2**i`` times (its voxel size is that level's scale), negative counts from the
        smallest. Only 0 for MRC and plain arrays.

    Returns
    -------
    xarray.DataArray
        Dims ``("z", "y", "x")``, dask-backed (nothing is read until computed),
        coordinates ``index * voxel_size`` in Å, ``attrs["voxel_size"]`` (Å) and
        ``attrs["source"]`` (the path); an OME-Zarr image also ``attrs["level"]``.

    Raises
    ------
    InputError
        Missing path, not an MRC, truncated, negative dimensions, volume stack, not 3-D,
        complex mode, anisotropic voxel size, empty, all NaN/Inf, no such pyramid level,
        unknown OME-Zarr unit, non-spatial OME-Zarr axes longer than 1.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    order: tuple[int, ...] = (0, 1, 2)
    extra: dict[str, Any] = {}
    what = "header"
    if p.is_dir() or p.suffix.lower() == ".zarr":
        zv = open_zarr(p, level)
        arr, order, what = zv.array, zv.order, zv.what
        vs_zyx = zv.voxel_size_zyx if zv.voxel_size_zyx is not None else (0.0, 0.0, 0.0)
        if zv.level is not None:
            extra["level"] = zv.level
    else:
        if level not in (0, -1):
            raise InputError(f"{p}: an MRC file has no pyramid level {level}; use level=0")
        arr, order, vs_zyx = open_mrc(p)
    if arr.ndim != 3:
        raise InputError(
            f"{p}: expected a 3-D volume (z, y, x), found {arr.ndim}-D data of shape {arr.shape}"
        )
    if 0 in arr.shape:
        raise InputError(f"{p}: the volume is empty (shape {arr.shape})")

    if voxel_size is not None:
        vs = _check_voxel_size(float(voxel_size), f"{p}: voxel_size argument")
    else:
        vs = _header_voxel_size(p, vs_zyx, what)

    token = f"read-{p.resolve()}-{p.stat().st_mtime_ns}" if p.is_file() else None
    zyx_chunks = _normalise_chunks(chunks, tuple(arr.shape[i] for i in order))
    if isinstance(zyx_chunks, tuple) and len(zyx_chunks) == 3:
        stored_chunks: Any = [0, 0, 0]
        for j, i in enumerate(order):
            stored_chunks[i] = zyx_chunks[j]
        stored_chunks = tuple(stored_chunks)
    else:
        stored_chunks = zyx_chunks
    d = da.from_array(arr, chunks=stored_chunks, asarray=False, name=token, lock=False)
    if tuple(order) != (0, 1, 2):
        d = d.transpose(order)
    if dtype is not None and d.dtype != np.dtype(dtype):
        d = d.astype(dtype)
    out = xr.DataArray(
        d, dims=DIMS, name=name or p.stem, attrs={"voxel_size": vs, "source": str(p), **extra}
    )
    out = _with_coords(out, vs)
    if check_values:
        _check_finite_sample(arr, p)
    return out


def _header_voxel_size(p: Path, vs_zyx: tuple[float, ...], what: str = "header") -> float:
    """One isotropic voxel size (Å) from the (z, y, x) sizes of the header (or the OME-Zarr
    scale: ``what``); warn when unset."""
    vals = [float(v) for v in vs_zyx if np.isfinite(v) and v > 0]
    if vals and max(vals) > min(vals) * (1 + 1e-3):
        z, y, x = (float(v) for v in vs_zyx)
        raise InputError(
            f"{p}: anisotropic voxel size in the {what} (z={z:g}, y={y:g}, x={x:g} Å); "
            "cryosiam_nb needs cubic voxels — pass voxel_size=<Å> to read() if the header is "
            "wrong, or resample the tomogram"
        )
    vs = float(vs_zyx[-1]) if vs_zyx[-1] > 0 else (vals[0] if vals else 0.0)
    if not np.isfinite(vs) or vs <= 0 or abs(vs - 1.0) < 1e-6:
        warnings.warn(
            f"{p}: voxel size in the {what} is {vs:g} Å, which usually means 'unset'. "
            "Pass voxel_size=<Å> to read(); using 1.0 Å for now.",
            VoxelSizeWarning,
            stacklevel=3,
        )
        vs = 1.0
    return vs


def _check_finite_sample(arr: Any, p: Path, max_voxels: int = 1_000_000) -> None:
    nz = arr.shape[0]
    per_slice = int(np.prod(arr.shape[1:]))
    n_slices = max(1, min(nz, max_voxels // max(per_slice, 1)))
    idx = np.unique(np.linspace(0, nz - 1, n_slices).round().astype(int))
    sample = np.asarray(arr[idx[0]]) if len(idx) == 1 else np.stack([arr[i] for i in idx])
    finite = np.isfinite(sample.astype(np.float32, copy=False))
    if not finite.any():
        raise InputError(f"{p}: the volume holds no finite values (all NaN or Inf)")
    values = sample[finite]
    if values.size > 1 and values.min() == values.max():
        warnings.warn(
            f"{p}: the volume looks constant (every sampled voxel is {float(values.flat[0]):g})",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- write
def write(
    data: xr.DataArray | Any,
    path: str | os.PathLike[str],
    overwrite: bool = False,
    voxel_size: float | None = None,
    chunks: Any = None,
    progress: bool = False,
    *,
    zarr_format: int = 2,
    levels: int | None = None,
    downsample: str = "auto",
) -> Path:
    """Write a volume to ``.mrc`` or ``.zarr``, streaming chunk by chunk, atomically.

    The volume is never materialised whole: MRC output is preallocated on disk (a full
    disk is an ``OSError`` naming ``path``, not a crash) and written into a memory map
    block by block; zarr output is written chunk by chunk by dask as an OME-Zarr image
    (axes z, y, x in Å, a scale transform per level) with a pyramid of 2× downsampled
    levels (level 1 in the same pass over ``data``, smaller ones from the level above on
    disk, so ``data`` is computed once). The target appears
    only once complete (temporary sibling + rename); on any error nothing is left
    behind and an existing ``path`` is untouched.

    Parameters
    ----------
    data
        Volume (z, y, x): ``DataArray`` (lazy or not), numpy or dask array. Dask computes
        here, one chunk at a time.
    path
        Output file; its suffix decides the format: ``.mrc`` / ``.rec`` / ``.map`` → MRC,
        ``.zarr`` → zarr. Anything else is an :class:`InputError`.
    overwrite
        Replace an existing ``path`` (only once the new one is complete). Only an
        existing output of the same kind (an MRC file, a zarr store) is ever replaced,
        and never the file ``data`` was read from.
    voxel_size
        Voxel size in Å written to the MRC header or the OME-Zarr scale (level ``i``:
        ``voxel_size * 2**i``); defaults to ``data.attrs["voxel_size"]``.
    chunks
        Chunks (voxels, z y x) of a zarr output; default the input's dask chunks, or up
        to 64×256×256 for an in-memory array.
    progress
        Show a progress bar.
    zarr_format
        2 (default): OME-Zarr 0.4 on zarr v2, what copick (``zarr < 3``), the CryoET Data
        Portal and most viewers read; 3: OME-Zarr 0.5 on zarr v3.
    levels
        Pyramid levels of a zarr output, level 0 included; ``None`` halves until the
        smallest axis is below 64 voxels (at most 8 levels); 1 writes no pyramid.
    downsample
        How levels are made: ``"auto"`` averages 2×2×2 blocks of float volumes and takes
        every second voxel of integer / boolean ones (labels keep their values);
        ``"mean"`` or ``"stride"`` force one.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        Unknown suffix, not a 3-D volume, ``path`` is the input or is not ours to replace.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    OSError
        Disk full, read-only folder, ... (the message names ``path``).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".zarr", *MRC_SUFFIXES):
        raise InputError(
            f"{p}: unknown output format {suffix or '(no suffix)'!r}; the suffix decides the "
            "format: .mrc / .rec / .map (MRC) or .zarr"
        )
    arr = as_dataarray(data)
    if arr.ndim != 3:
        raise InputError(f"{p}: can only write 3-D (z, y, x) volumes, got shape {arr.shape}")
    if suffix == ".zarr":
        if zarr_format not in OME_VERSION:
            raise InputError(f"{p}: zarr_format must be 2 or 3, got {zarr_format!r}")
        pyramid_shapes(tuple(arr.shape), levels)  # refuses levels < 1
        downsample_method(arr.dtype, downsample)  # refuses unknown methods
    _check_replaceable(p, suffix, arr, overwrite)
    vs = float(voxel_size if voxel_size is not None else arr.attrs.get("voxel_size", 1.0))
    if isinstance(arr.data, da.Array):
        src = arr.data
    else:  # in memory: store in viewer-friendly chunks, not one 128 MiB block
        src = da.from_array(np.asarray(arr.data), chunks=_normalise_chunks("auto", arr.shape))
    if chunks is not None:
        src = src.rechunk(chunks)
    with atomic_path(p, overwrite=overwrite) as tmp:
        if suffix == ".zarr":
            write_ome_zarr(
                src,
                tmp,
                vs,
                str(arr.name if arr.name is not None else p.stem),
                zarr_format=zarr_format,
                levels=levels,
                method=downsample,
                progress=progress,
            )
        else:
            write_mrc(src, tmp, vs, progress)
    return p


def _check_replaceable(p: Path, suffix: str, arr: xr.DataArray, overwrite: bool) -> None:
    """Refuse to write over the input itself or over anything that is not our kind of output."""
    src = arr.attrs.get("source")
    if src is not None and (p.exists() or Path(src).exists()):
        with_src = Path(src)
        same = p.exists() and with_src.exists() and os.path.samefile(p, with_src)
        if same or p.resolve() == with_src.resolve():
            raise InputError(
                f"{p}: is the file this volume is read from; write to a different path"
            )
    if not (p.exists() or p.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace it)")
    if suffix == ".zarr":
        ours = p.is_dir() and any(
            (p / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
        )
        what = "a zarr store"
    else:
        ours = is_mrc_file(p)
        what = "an MRC file"
    if not ours:
        kind = "a directory" if p.is_dir() else "a file" if p.is_file() else "something"
        raise InputError(
            f"{p}: refusing to replace it: it is {kind} but not {what}; remove it yourself "
            "or choose another output path"
        )


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as pretty JSON atomically (numpy scalars/arrays become plain JSON).

    Parameters
    ----------
    obj
        A JSON-serialisable object.
    path
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    return p


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
