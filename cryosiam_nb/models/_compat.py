"""Shared helpers: the project's InputError and atomic writes (from ``cryosiam_nb.io``)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

try:  # io.py is the owner of both; fall back to plain equivalents until it is present.
    from cryosiam_nb.io import InputError, atomic_path
except ImportError:  # pragma: no cover - only while cryosiam_nb.io does not exist yet
    InputError = ValueError  # type: ignore[misc,assignment]

    @contextlib.contextmanager
    def atomic_path(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            os.replace(tmp, target)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise


__all__ = ["InputError", "atomic_path"]
