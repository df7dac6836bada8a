"""Weights-only reading of checkpoint files (the safety part of :mod:`.checkpoints`).

Checkpoints are pickles. They are read with ``torch.load(weights_only=True)``, which can
only rebuild tensors and plain containers; the few extra plain types that the published
files contain (Lightning's ``AttributeDict`` — read back as a ``dict`` —, ``pathlib``
paths, numpy scalars/arrays) are allow-listed. Anything else needs ``trusted=True``.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosiam_nb.io import InputError

_LIGHTNING_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
)


def _safe_globals() -> list[Any]:
    """Plain types allowed in addition to torch's weights-only defaults."""
    core = np._core.multiarray  # numpy >= 2; files written with numpy 1 name numpy.core
    safe: list[Any] = [(dict, name) for name in _LIGHTNING_ATTRIBUTE_DICTS]
    safe += [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    safe += [np.ndarray, np.dtype, core.scalar, core._reconstruct]
    safe += [(core.scalar, "numpy.core.multiarray.scalar")]
    safe += [(core._reconstruct, "numpy.core.multiarray._reconstruct")]
    for name in dir(np.dtypes):
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and name.endswith("DType"):
            safe.append(obj)
    safe += [collections.OrderedDict, collections.defaultdict]
    return safe


def load_checkpoint_dict(path: str | os.PathLike[str], trusted: bool = False) -> dict[str, Any]:
    """Read a checkpoint file into a dict (CPU tensors), refusing arbitrary pickled objects.

    Parameters
    ----------
    path
        A PyTorch checkpoint (zip format, or the legacy plain-pickle format).
    trusted
        Fall back to a full unpickle (``weights_only=False``) for files that need other
        objects (e.g. a legacy pickle of custom classes); do this only for files from a
        source you trust, since unpickling can run arbitrary code.

    Returns
    -------
    dict
        The checkpoint's top-level dict.

    Raises
    ------
    InputError
        Not a file, not a PyTorch checkpoint (e.g. a text file), unreadable, needs
        arbitrary objects and ``trusted`` is False, or holds no dict.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint file not found")
    with open(p, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise InputError(f"{p}: not a PyTorch checkpoint (the file is empty)")
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        looks = "a text file" if _looks_like_text(p) else f"a file starting with {magic!r}"
        raise InputError(
            f"{p}: not a PyTorch checkpoint (it is {looks}; expected a torch.save() file)"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trusted:
            raise InputError(_refusal(p, err)) from None
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as err2:  # noqa: BLE001 - any unpickling failure of a bad file
            raise InputError(f"{p}: not a readable PyTorch checkpoint ({err2})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{p}: not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(ckpt, Mapping):
        raise InputError(f"{p}: a checkpoint must hold a dict, found {type(ckpt).__name__}")
    return dict(ckpt)


def _looks_like_text(p: Path) -> bool:
    with open(p, "rb") as f:
        chunk = f.read(4096)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in chunk


def _refusal(p: Path, err: Exception) -> str:
    """The message for a checkpoint that a weights-only load refuses."""
    try:
        needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:  # noqa: BLE001 - legacy (non-zip) file: read the names off the error
        needed = re.findall(r"GLOBAL ([\w.]+)", str(err))
    allowed = {g[1] for g in _safe_globals() if isinstance(g, tuple)}
    needed = [n for n in needed if n not in allowed] or ["see detail"]
    detail = str(err).strip().splitlines()
    return (
        f"{p}: refused to load — the checkpoint needs arbitrary pickled objects "
        f"({', '.join(needed)}). Unpickling them can execute arbitrary code, so only "
        "tensors and plain data are loaded by default. If you trust where this file "
        "comes from, call load(..., trusted=True). Detail: "
        f"{detail[-1] if detail else repr(err)}"
    )
