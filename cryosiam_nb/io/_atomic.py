"""Atomic replacement of files and directories (zarr stores)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only on success.

    Works for files and for directories (zarr stores). A file is put in place with one
    ``os.replace``. A directory is swapped in atomically where the OS can
    (``renameat2(RENAME_EXCHANGE)`` on Linux); elsewhere the old one is moved aside, the
    new one renamed in and, should that fail, the old one is put back. On any exception
    the temporary path is removed, so a failed write never leaves a half-written output
    behind and never removes the old one. Stale ``.<name>.tmp-*`` / ``.<name>.old-*``
    siblings left by crashed runs are cleaned up first (a missing ``path`` whose old copy
    was left aside is restored from it). An ``OSError`` about the hidden temporary path
    is re-raised naming ``path``.

    Parameters
    ----------
    path
        The final output path (file or directory).
    overwrite
        Replace an existing ``path`` on success; with ``False`` an existing ``path`` is a
        ``FileExistsError`` before anything is written.

    Yields
    ------
    pathlib.Path
        The temporary sibling to write into.
    """
    target = Path(path)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
    _clean_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _put_in_place(tmp, target)
    except OSError as exc:
        _remove(tmp)
        fname = str(exc.filename or "")
        if fname.startswith(str(tmp)) or f".{target.name}.old-" in fname:
            raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _put_in_place(tmp: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
    elif not (tmp.is_dir() or target.is_dir()):
        os.replace(tmp, target)  # one atomic step for a file
    elif _exchange(tmp, target):
        _remove(tmp)  # now holds the old one
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0  # EINVAL / ENOSYS (file system or kernel without it): fall back


def _pid_alive(name: str, marker: str) -> bool:
    """Whether the writer process encoded in a ``.<name>.<marker><pid>-<hex>`` name still runs."""
    try:
        pid = int(name.split(marker, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_stale(target: Path) -> None:
    parent, base = target.parent, glob.escape(f".{target.name}")
    olds = sorted(
        (Path(s) for s in glob.glob(os.path.join(glob.escape(str(parent)), base + ".old-*"))),
        key=lambda s: s.stat().st_mtime,
    )
    olds = [o for o in olds if not _pid_alive(o.name, ".old-")]
    if olds and not (target.exists() or target.is_symlink()):
        # A crash between "move the old one aside" and "rename the new one in".
        os.rename(olds.pop(), target)
    for s in olds:
        _remove(s)
    for s in glob.glob(os.path.join(glob.escape(str(parent)), base + ".tmp-*")):
        if not _pid_alive(Path(s).name, ".tmp-"):
            _remove(Path(s))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
