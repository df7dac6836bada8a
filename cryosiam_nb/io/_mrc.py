"""MRC reading (memory-mapped, header checked) and writing (preallocated, streamed)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import dask.array as da
import mrcfile
import numpy as np

from ._errors import InputError

MRC_SUFFIXES = (".mrc", ".rec", ".map")
# MRC modes we read as real-valued volumes (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
_REAL_MODES = {0, 1, 2, 6, 12}
_MODE_NAMES = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}
_GZIP, _BZ2 = b"\x1f\x8b", b"BZh"
_MRC_DTYPES = {np.dtype(t) for t in (np.int8, np.int16, np.uint16, np.float16, np.float32)}


class MrcVolume:
    """Lazy, picklable view of the voxel block of an MRC file, for ``dask.array.from_array``.

    Opens a read-only ``numpy.memmap`` on first access in each process (so it works
    under ``dask.distributed`` worker processes) and copies out only what is sliced.
    The shape is the file's storage order (sections, rows, columns).
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


def compression_of(p: Path) -> str | None:
    """``"gzip"`` / ``"bzip2"`` when ``p`` is compressed (by magic bytes or suffix), else None."""
    try:
        with open(p, "rb") as f:
            magic = f.read(3)
    except OSError:
        magic = b""
    if magic[:2] == _GZIP or p.suffix.lower() == ".gz":
        return "gzip"
    if magic[:3] == _BZ2 or p.suffix.lower() == ".bz2":
        return "bzip2"
    return None


def is_mrc_file(p: Path) -> bool:
    """True when ``p`` is a file with an MRC2014 header (``MAP `` stamp) or compressed MRC."""
    if not p.is_file():
        return False
    if compression_of(p):
        return True
    with open(p, "rb") as f:
        head = f.read(212)
    return len(head) == 212 and head[208:212] == b"MAP "


def open_mrc(p: Path) -> tuple[Any, tuple[int, int, int], tuple[float, float, float]]:
    """Open an MRC lazily (memory map) or, when gzip/bzip2 compressed, in memory.

    Returns
    -------
    tuple
        ``(stored, order, voxel_zyx)``: the voxel block in storage order, the transpose
        that makes it (z, y, x), and the header voxel size along (z, y, x) in Å
        (0 where unset).
    """
    kind = compression_of(p)
    try:
        with mrcfile.open(p, mode="r", header_only=kind is None, permissive=False) as mrc:
            header = mrc.header.copy()
            data = None if kind is None else np.asarray(mrc.data)
    except ValueError as exc:
        what = f"a {kind}-compressed file that is not a valid MRC" if kind else "not a valid MRC"
        raise InputError(f"{p}: {what} file ({exc})") from exc
    except (OSError, EOFError) as exc:
        if kind:
            raise InputError(f"{p}: {kind}-compressed MRC cannot be decompressed ({exc})") from exc
        raise InputError(f"{p}: cannot be read as MRC ({exc})") from exc
    stored, order, vs = _check_header(p, header)
    if data is not None:
        return data.reshape(stored), order, vs
    dtype = mrcfile.utils.data_dtype_from_header(header)
    offset = 1024 + int(header.nsymbt)
    expected = offset + int(np.prod(stored)) * dtype.itemsize
    size = p.stat().st_size
    if size < expected:
        raise InputError(
            f"{p}: truncated MRC file: the header promises {stored[0]}×{stored[1]}×{stored[2]} "
            f"voxels ({expected} bytes) but the file has {size} bytes"
        )
    return MrcVolume(p, dtype, stored, offset), order, vs


def _check_header(
    p: Path, h: Any
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[float, float, float]]:
    mode = int(h.mode)
    if mode not in _REAL_MODES:
        kind = _MODE_NAMES.get(mode, f"mode {mode}")
        raise InputError(
            f"{p}: unsupported MRC data mode {mode} ({kind}); a tomogram must be real-valued "
            "(int8, int16, uint16, float16 or float32)"
        )
    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    if min(nx, ny, nz) < 0:
        raise InputError(
            f"{p}: corrupt MRC header: negative dimensions (nx, ny, nz) = ({nx}, {ny}, {nz})"
        )
    ispg = int(h.ispg)
    if 401 <= ispg <= 630:
        raise InputError(
            f"{p}: a volume stack (space group {ispg}, {nz // max(int(h.mz), 1)} volumes); "
            "cryosiam_nb reads single tomograms — split the stack into one file per volume"
        )
    axes = (int(h.mapc), int(h.mapr), int(h.maps))
    if axes == (0, 0, 0):
        axes = (1, 2, 3)
    if sorted(axes) != [1, 2, 3]:
        raise InputError(
            f"{p}: corrupt MRC header: mapc/mapr/maps = {axes} is not a permutation of 1, 2, 3"
        )
    stored = (nz, ny, nx)  # sections, rows, columns
    spatial_of_stored = (axes[2], axes[1], axes[0])  # 1 = x, 2 = y, 3 = z
    order = tuple(spatial_of_stored.index(a) for a in (3, 2, 1))
    zyx = tuple(stored[i] for i in order)
    if zyx[0] <= 1:
        raise InputError(
            f"{p}: expected a 3-D volume (z, y, x), found a single 2-D image of "
            f"{zyx[1]}×{zyx[2]} pixels"
        )
    cella = (float(h.cella.x), float(h.cella.y), float(h.cella.z))
    grid = (int(h.mx), int(h.my), int(h.mz))
    vx, vy, vz = (c / m if m > 0 else 0.0 for c, m in zip(cella, grid))
    return stored, order, (vz, vy, vx)  # type: ignore[return-value]


# --------------------------------------------------------------------------- write
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


def preallocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes of disk for ``path`` so that a full disk is an ``OSError`` here.

    Without it, writing through a memory map onto a full disk kills the process with
    SIGBUS. Uses ``os.posix_fallocate``; where the file system cannot, compares the free
    space instead.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            unsupported = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}
            if exc.errno not in unsupported:
                raise OSError(
                    exc.errno, f"{os.strerror(exc.errno)} (needs {size} bytes)", str(path)
                ) from exc
        finally:
            os.close(fd)
    free = shutil.disk_usage(Path(path).parent).free
    if free < size - Path(path).stat().st_size:
        raise OSError(
            errno.ENOSPC, f"No space left on device (needs {size} bytes, {free} free)", str(path)
        )


def write_mrc(src: da.Array, tmp: Path, voxel_size: float, progress: bool) -> None:
    """Stream ``src`` (z, y, x) into a new MRC at ``tmp`` (preallocated, memory-mapped)."""
    dtype = src.dtype if src.dtype in _MRC_DTYPES else np.dtype(np.float32)
    if src.dtype == np.uint8:
        dtype = np.dtype(np.int16)
    size = 1024 + int(np.prod(src.shape)) * np.dtype(dtype).itemsize
    with mrcfile.new_mmap(tmp, shape=src.shape, mrc_mode=_mrc_mode(dtype), overwrite=True) as m:
        preallocate(tmp, size)
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
