"""Reading and writing tomograms: MRC (memory-mapped) and zarr / OME-Zarr, out of core.

A tomogram is an :class:`xarray.DataArray` with dims ``("z", "y", "x")``, coordinates in
Å (``index * voxel_size``), ``attrs["voxel_size"]`` in Å, backed by a dask array so that
nothing is read until it is needed.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import mrcfile
import numpy as np
import xarray as xr

__all__ = [
    "InputError",
    "VoxelSizeWarning",
    "read",
    "write",
    "atomic_path",
    "as_dataarray",
    "DIMS",
]

DIMS = ("z", "y", "x")
DEFAULT_CHUNKS = (64, 256, 256)
# MRC modes we read as real-valued volumes (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
_REAL_MODES = {0, 1, 2, 6, 12}
_MODE_NAMES = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}


class InputError(ValueError):
    """Bad user input: the message names the file (or argument) and the problem."""


class VoxelSizeWarning(UserWarning):
    """The voxel size in a file header looks unset (0 or 1 Å)."""


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and for directories (zarr stores). On any exception the temporary
    path is removed, so a failed write never leaves a half-written output behind.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


# --------------------------------------------------------------------------- helpers
def as_dataarray(
    data: Any, voxel_size: float | None = None, name: str | None = None
) -> xr.DataArray:
    """Wrap a numpy/dask array (z, y, x) as a tomogram DataArray with Å coordinates.

    An existing DataArray is returned unchanged unless ``voxel_size`` overrides its own.
    """
    if isinstance(data, xr.DataArray):
        if voxel_size is not None:
            data = data.assign_attrs(voxel_size=float(voxel_size))
            data = _with_coords(data, float(voxel_size))
        return data
    arr = data if isinstance(data, da.Array) else np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"expected a 3-D (z, y, x) volume, got an array of shape {arr.shape}")
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
) -> xr.DataArray:
    """Open a tomogram lazily as a dask-backed ``DataArray`` with dims (z, y, x).

    Parameters
    ----------
    path
        An ``.mrc`` / ``.rec`` / ``.map`` file (memory-mapped, never loaded whole) or a
        ``.zarr`` store (plain array, or OME-Zarr multiscale: level 0 is read).
    voxel_size
        Voxel size in Å. Overrides the header. A header voxel size of 0 or 1 Å is almost
        always "unset": a :class:`VoxelSizeWarning` asks for an explicit value.
    chunks
        Dask chunks in voxels (z, y, x); ``"auto"`` uses up to 64×256×256.
    check_values
        Sample up to ~1 M voxels and refuse a volume with no finite values.
    dtype
        Element type of the returned array (default float32); ``None`` keeps the file's
        own type, e.g. for label volumes.

    Raises
    ------
    InputError
        Missing path, not an MRC, truncated, not 3-D, complex mode, empty, all NaN/Inf.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir() or p.suffix.lower() == ".zarr":
        arr, header_vs = _open_zarr(p)
    else:
        arr, header_vs = _open_mrc(p)
    if arr.ndim != 3:
        raise InputError(
            f"{p}: expected a 3-D volume (z, y, x), found {arr.ndim}-D data of shape {arr.shape}"
        )
    if 0 in arr.shape:
        raise InputError(f"{p}: the volume is empty (shape {arr.shape})")

    if voxel_size is not None:
        vs = _check_voxel_size(float(voxel_size), f"{p}: voxel_size argument")
    else:
        vs = float(header_vs) if header_vs is not None else 0.0
        if not np.isfinite(vs) or vs <= 0 or abs(vs - 1.0) < 1e-6:
            warnings.warn(
                f"{p}: header voxel size is {vs:g} Å, which usually means 'unset'. "
                "Pass voxel_size=<Å> to read(); using 1.0 Å for now.",
                VoxelSizeWarning,
                stacklevel=2,
            )
            vs = 1.0

    token = f"read-{p.resolve()}-{p.stat().st_mtime_ns}" if p.is_file() else None
    d = da.from_array(
        arr, chunks=_normalise_chunks(chunks, arr.shape), asarray=False, name=token, lock=False
    )
    if dtype is not None and d.dtype != np.dtype(dtype):
        d = d.astype(dtype)
    out = xr.DataArray(
        d, dims=DIMS, name=name or p.stem, attrs={"voxel_size": vs, "source": str(p)}
    )
    out = _with_coords(out, vs)
    if check_values:
        _check_finite_sample(arr, p)
    return out


class MrcVolume:
    """Lazy, picklable view of the voxel block of an MRC file, for ``dask.array.from_array``.

    Opens a read-only ``numpy.memmap`` on first access in each process (so it works
    under ``dask.distributed`` worker processes) and copies out only what is sliced.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int, int], offset: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.offset = int(offset)
        self._mm: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def _memmap(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(
                self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape
            )
        return self._mm

    def __getitem__(self, key: Any) -> np.ndarray:
        mm = self._memmap()
        out = np.array(mm[key])
        # Pages of a file mapping count towards the process's RSS while mapped; drop them
        # (they stay in the OS page cache) so streaming a huge tomogram keeps RSS flat.
        raw = getattr(mm, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                raw.madvise(mmap.MADV_DONTNEED)
        return out


def _open_mrc(p: Path) -> tuple[Any, float | None]:
    try:
        with mrcfile.open(p, mode="r", header_only=True, permissive=False) as mrc:
            header = mrc.header.copy()
            ext = int(mrc.header.nsymbt)
            vs = float(mrc.voxel_size.x)
    except ValueError as exc:
        raise InputError(f"{p}: not a valid MRC file ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{p}: cannot be read as MRC ({exc})") from exc
    mode = int(header.mode)
    if mode not in _REAL_MODES:
        kind = _MODE_NAMES.get(mode, f"mode {mode}")
        raise InputError(
            f"{p}: unsupported MRC data mode {mode} ({kind}); a tomogram must be real-valued "
            "(int8, int16, uint16, float16 or float32)"
        )
    dtype = mrcfile.utils.data_dtype_from_header(header)
    nz, ny, nx = int(header.nz), int(header.ny), int(header.nx)
    offset = 1024 + ext
    expected = offset + nz * ny * nx * dtype.itemsize
    size = p.stat().st_size
    if size < expected:
        raise InputError(
            f"{p}: truncated MRC file: the header promises {nz}×{ny}×{nx} voxels "
            f"({expected} bytes) but the file has {size} bytes"
        )
    if nz <= 1:
        raise InputError(
            f"{p}: expected a 3-D volume (z, y, x), found a single 2-D image of {ny}×{nx} pixels"
        )
    return MrcVolume(p, dtype, (nz, ny, nx), offset), vs


def _open_zarr(p: Path) -> tuple[Any, float | None]:
    import zarr

    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:
        raise InputError(f"{p}: not a readable zarr store ({exc})") from exc
    if isinstance(node, zarr.Array):
        vs = node.attrs.get("voxel_size")
        return node, float(vs) if vs is not None else None
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if ms:
        ds0 = ms[0]["datasets"][0]
        arr = node[ds0["path"]]
        vs = None
        for t in ds0.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                vs = float(t["scale"][-1])
                unit = ms[0].get("axes", [{}])[-1].get("unit", "angstrom")
                if unit == "nanometer":
                    vs *= 10.0
        return arr, vs
    arrays = [k for k, v in node.members() if isinstance(v, zarr.Array)]
    if len(arrays) == 1:
        arr = node[arrays[0]]
        vs = arr.attrs.get("voxel_size", attrs.get("voxel_size"))
        return arr, float(vs) if vs is not None else None
    raise InputError(
        f"{p}: zarr group holds {len(arrays)} arrays ({', '.join(arrays) or 'none'}) and no "
        "OME-Zarr multiscales; open the array path directly, e.g. read('store.zarr/volume')"
    )


def _check_finite_sample(arr: Any, p: Path, max_voxels: int = 1_000_000) -> None:
    nz = arr.shape[0]
    per_slice = int(np.prod(arr.shape[1:]))
    n_slices = max(1, min(nz, max_voxels // max(per_slice, 1)))
    idx = np.unique(np.linspace(0, nz - 1, n_slices).round().astype(int))
    sample = np.asarray(arr[idx[0]]) if len(idx) == 1 else np.stack([arr[i] for i in idx])
    if not np.isfinite(sample.astype(np.float32, copy=False)).any():
        raise InputError(f"{p}: the volume holds no finite values (all NaN or Inf)")


# --------------------------------------------------------------------------- write
def write(
    data: xr.DataArray | Any,
    path: str | os.PathLike[str],
    overwrite: bool = False,
    voxel_size: float | None = None,
    chunks: Any = None,
    progress: bool = False,
) -> Path:
    """Write a volume to ``.mrc`` or ``.zarr``, streaming chunk by chunk, atomically.

    The volume is never materialised whole: MRC output is written into a memory-mapped
    file slab by slab; zarr output is written chunk by chunk by dask. The target appears
    only once complete (temporary sibling + rename).

    ``voxel_size`` (Å) defaults to ``data.attrs["voxel_size"]``; it goes to the MRC header
    or the zarr attributes.
    """
    p = Path(path)
    arr = as_dataarray(data)
    if arr.ndim != 3:
        raise InputError(f"{p}: can only write 3-D (z, y, x) volumes, got shape {arr.shape}")
    vs = float(voxel_size if voxel_size is not None else arr.attrs.get("voxel_size", 1.0))
    src = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
    if chunks is not None:
        src = src.rechunk(chunks)
    suffix = p.suffix.lower()
    with atomic_path(p, overwrite=overwrite) as tmp:
        if suffix == ".zarr":
            _write_zarr(src, tmp, vs, arr.name, progress)
        elif suffix in {".mrc", ".rec", ".map", ".mrcs"}:
            _write_mrc(src, tmp, vs, progress)
        else:
            raise InputError(f"{p}: unknown output format {suffix!r}; use .mrc or .zarr")
    return p


_MRC_DTYPES = {np.dtype(t) for t in (np.int8, np.int16, np.uint16, np.float16, np.float32)}


class _MrcBlockWriter:
    """``da.store`` target writing blocks into an MRC's memory map without growing RSS.

    After each block the mapping's pages are released (``MADV_DONTNEED``; on a shared
    file mapping the data stays in the page cache and reaches the file), so writing a
    tomogram larger than RAM keeps the process small. Also accumulates min/max/mean.
    """

    def __init__(self, mm: np.memmap):
        self.mm = mm
        self.lock = threading.Lock()
        self.lo, self.hi, self.total, self.n = np.inf, -np.inf, 0.0, 0

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        value = np.asarray(value)
        self.mm[key] = value
        raw = getattr(self.mm, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                raw.madvise(mmap.MADV_DONTNEED)
        if value.size:
            lo, hi = float(value.min()), float(value.max())
            total = float(value.sum(dtype=np.float64))
            with self.lock:
                self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
                self.total += total
                self.n += value.size


def _write_mrc(src: da.Array, tmp: Path, voxel_size: float, progress: bool) -> None:
    dtype = src.dtype if src.dtype in _MRC_DTYPES else np.dtype(np.float32)
    if src.dtype == np.uint8:
        dtype = np.dtype(np.int16)
    with mrcfile.new_mmap(tmp, shape=src.shape, mrc_mode=_mrc_mode(dtype), overwrite=True) as m:
        m.voxel_size = voxel_size
        # A fixed label (mrcfile's default carries a time stamp) keeps output reproducible.
        m.header.label[0] = b"cryosiam_nb"
        m.header.nlabl = 1
        writer = _MrcBlockWriter(m.data)
        data = src.astype(m.data.dtype)
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                da.store(data, writer, lock=False)
        else:
            da.store(data, writer, lock=False)
        m.header.dmin, m.header.dmax = writer.lo, writer.hi
        m.header.dmean = writer.total / max(writer.n, 1)


def _mrc_mode(dtype: np.dtype) -> int:
    return {
        np.dtype(np.int8): 0,
        np.dtype(np.int16): 1,
        np.dtype(np.float32): 2,
        np.dtype(np.uint16): 6,
        np.dtype(np.float16): 12,
    }[np.dtype(dtype)]


def _write_zarr(src: da.Array, tmp: Path, voxel_size: float, name: Any, progress: bool) -> None:
    import zarr

    chunks = tuple(int(c[0]) for c in src.chunks)
    z = zarr.create_array(
        store=str(tmp), shape=src.shape, chunks=chunks, dtype=src.dtype, zarr_format=3
    )
    z.attrs.update(
        {"voxel_size": voxel_size, "axes": list(DIMS), "unit": "angstrom", "name": str(name)}
    )
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            da.store(src, z, lock=False)
    else:
        da.store(src, z, lock=False)


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as pretty JSON atomically."""
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
