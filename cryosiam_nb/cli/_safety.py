"""Data safety of the ``cryosiam-nb`` command: checks run before any work is done.

Every subcommand names its inputs and its outputs (with the kind of each output) and calls
:func:`check_outputs` first, so that a refusal costs nothing and never touches a file:

* an output that resolves to an input (same path, a symlink to it, a hard link to it, or a
  path inside an input store / an input inside an output store) is refused;
* an existing output is replaced only with ``--overwrite`` (no overwrite is the default),
  and only when it is an output of ours of the same kind (an MRC file, a zarr store, a
  particle table of ours, a simulated data set, a demo folder); anything else is refused;
* the output suffix decides the format (``.mrc`` / ``.rec`` / ``.map`` → MRC, ``.zarr`` →
  zarr); another suffix is refused.

:func:`describe_oserror` turns any ``OSError`` into the one-line ``<path>: <reason>`` that
``main`` prints, naming the user's output rather than a hidden ``.<name>.tmp-*`` sibling
made by :func:`cryosiam_nb.io.atomic_path`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryosiam_nb import io
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import FORMAT_NAME as PARTICLES_FORMAT

__all__ = [
    "VOLUME",
    "MAPS",
    "STORE",
    "TABLE",
    "DATASET",
    "DEMO",
    "check_outputs",
    "describe_oserror",
    "is_ours",
    "same_or_nested",
]

#: Output kinds: a volume written by :func:`cryosiam_nb.io.write` (MRC or zarr, by suffix).
VOLUME = "volume"
#: A prediction Dataset (several variables) written by ``tl.write_predictions`` (zarr).
MAPS = "maps"
#: A :class:`~cryosiam_nb.particles.Particles` store (zarr).
STORE = "store"
#: A particle table of ours (CSV with the ``# cryosiam_nb`` header).
TABLE = "table"
#: A folder of simulated tomograms (``manifest.json``) from ``simulate``.
DATASET = "dataset"
#: The output folder of ``demo`` (``report.html``).
DEMO = "demo"

_SUFFIXES: dict[str, tuple[str, ...]] = {
    VOLUME: (".zarr", *io.MRC_SUFFIXES),
    MAPS: (".zarr",),
    STORE: (".zarr",),
    TABLE: (".csv",),
}
_WHAT = {
    VOLUME: "an MRC file or zarr store",
    MAPS: "a zarr store of predictions (not a Particles store)",
    STORE: "a Particles zarr store",
    TABLE: "a particle table written by cryosiam_nb",
    DATASET: "a folder of simulated tomograms (with manifest.json)",
    DEMO: "a cryosiam-nb demo folder (with report.html)",
}
_ZARR_META = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
# ``.<name>.tmp-<pid>-<8 hex>`` / ``.<name>.old-<pid>-<8 hex>`` (io.atomic_path), and
# anything below it: the user only knows ``<name>``.
_HIDDEN = re.compile(
    r"(?P<sep>^|[/\\])\.(?P<name>[^/\\]+?)\.(?:tmp|old)-\d+-[0-9a-f]{8}(?:[/\\][^\s'\"]*)?"
)


# --------------------------------------------------------------------------- identity
def _real(p: Path) -> str:
    return os.path.normcase(os.path.realpath(p))


def same_or_nested(output: Path, input_: Path) -> str | None:
    """How writing ``output`` would hit ``input_``, or ``None`` when it cannot.

    Parameters
    ----------
    output, input_
        Paths as the user gave them (need not exist). Symlinks are resolved
        (``os.path.realpath``); existing files are also compared by inode
        (``os.path.samefile``), which catches hard links.

    Returns
    -------
    str or None
        ``"is"`` (the same path), ``"links to"`` (a symbolic link to it, or a path through
        one), ``"is a hard link of"`` (the same inode), ``"contains"`` (replacing the
        output store would delete the input inside it) or ``"is inside"`` (the output would
        be written into the input store).
    """
    ro, ri = _real(output), _real(input_)
    if ro == ri:
        return "is" if os.path.abspath(output) == os.path.abspath(input_) else "links to"
    if output.exists() and input_.exists():
        try:
            if os.path.samefile(output, input_):
                return "is a hard link of"
        except OSError:
            pass
    if ri.startswith(ro.rstrip(os.sep) + os.sep):
        return "contains"
    if ro.startswith(ri.rstrip(os.sep) + os.sep):
        return "is inside"
    return None


# --------------------------------------------------------------------------- ours?
def _is_zarr_store(p: Path) -> bool:
    return p.is_dir() and any((p / m).is_file() for m in _ZARR_META)


def _zarr_attrs(p: Path) -> dict:
    """The group/array attributes of a zarr v3 (``zarr.json``) or v2 (``.zattrs``) store."""
    try:
        if (p / "zarr.json").is_file():
            return dict(json.loads((p / "zarr.json").read_text()).get("attributes") or {})
        if (p / ".zattrs").is_file():
            return dict(json.loads((p / ".zattrs").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    return {}


def _is_particles_store(p: Path) -> bool:
    return _is_zarr_store(p) and _zarr_attrs(p).get("format") == PARTICLES_FORMAT


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def _is_our_table(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(4096)
    return b"cryosiam_nb" in head or b"x_A" in head


def is_ours(path: Path, kind: str) -> bool:
    """Whether an existing ``path`` is an output of ours of ``kind`` (so may be replaced).

    Parameters
    ----------
    path
        An existing path.
    kind
        One of :data:`VOLUME`, :data:`MAPS`, :data:`STORE`, :data:`TABLE`,
        :data:`DATASET`, :data:`DEMO`.

    Returns
    -------
    bool
        An empty folder counts as ours for folder kinds (nothing can be lost).
    """
    if path.is_symlink():
        return False  # replacing the link would not replace what it points to
    if kind == VOLUME and path.suffix.lower() in io.MRC_SUFFIXES:
        return io.is_mrc_file(path)
    if kind == STORE:
        return _is_particles_store(path) or _is_empty_dir(path)
    if kind in (VOLUME, MAPS):  # a volume never replaces a Particles store
        return (_is_zarr_store(path) and not _is_particles_store(path)) or _is_empty_dir(path)
    if kind == TABLE:
        return _is_our_table(path)
    if kind == DATASET:
        return _is_empty_dir(path) or (path.is_dir() and (path / "manifest.json").is_file())
    if kind == DEMO:
        return _is_empty_dir(path) or (path.is_dir() and (path / "report.html").is_file())
    raise ValueError(f"unknown output kind {kind!r}")


def _what(p: Path, kind: str) -> str:
    if kind == VOLUME:
        if p.suffix.lower() in io.MRC_SUFFIXES:
            return "an MRC file"
        return "a zarr volume store (not a Particles store)"
    return _WHAT[kind]


def _kind_of(p: Path) -> str:
    if p.is_symlink():
        return "a symbolic link"
    return "a directory" if p.is_dir() else "a file" if p.is_file() else "something else"


# --------------------------------------------------------------------------- the check
def check_outputs(
    inputs: Iterable[Path | None],
    outputs: Sequence[tuple[Path, str]],
    overwrite: bool,
) -> None:
    """Refuse, before any work, every output that could lose data.

    Parameters
    ----------
    inputs
        Paths the command reads (``None`` entries are skipped).
    outputs
        ``(path, kind)`` pairs the command will write.
    overwrite
        The ``--overwrite`` flag: replace existing outputs of ours.

    Raises
    ------
    InputError
        Wrong suffix for the kind; an output that is, contains or lies inside an input;
        two outputs on the same path; an existing output that is not ours to replace.
    FileExistsError
        An output exists and ``overwrite`` is False.
    """
    ins = [Path(p) for p in inputs if p is not None]
    seen: list[Path] = []
    for out, kind in outputs:
        out = Path(out)
        allowed = _SUFFIXES.get(kind)
        if allowed is not None and out.suffix.lower() not in allowed:
            raise InputError(
                f"{out}: unknown output format {out.suffix or '(no suffix)'!r} for "
                f"{_WHAT[kind]}; the suffix decides the format: {' / '.join(allowed)}"
            )
        for src in ins:
            how = same_or_nested(out, src)
            if how in ("is", "links to", "is a hard link of"):
                raise InputError(
                    f"{out}: {how} the input {src}; writing it would destroy the input — "
                    "choose another output path"
                )
            if how == "contains":
                raise InputError(
                    f"{out}: contains the input {src}; replacing it would delete the input "
                    "— choose another output path"
                )
            if how == "is inside":
                raise InputError(
                    f"{out}: lies inside the input {src}; writing it would modify the input "
                    "— choose another output path"
                )
        for other in seen:
            if same_or_nested(out, other):
                raise InputError(f"{out}: the same path as another output ({other})")
        seen.append(out)
        if not (out.exists() or out.is_symlink()):
            continue
        if not overwrite:
            raise FileExistsError(
                f"{out}: already exists; pass --overwrite to replace it (only a previous "
                f"output of cryosiam_nb, {_what(out, kind)}, is ever replaced)"
            )
        if not is_ours(out, kind):
            raise InputError(
                f"{out}: refusing to replace it: it is {_kind_of(out)}, not {_what(out, kind)} "
                "written by cryosiam_nb; remove it yourself or choose another output path"
            )


# --------------------------------------------------------------------------- messages
def unhide(text: str) -> str:
    """Replace hidden temporary siblings (``.<name>.tmp-<pid>-<hex>…``) by ``<name>``."""
    return _HIDDEN.sub(lambda m: m.group("sep") + m.group("name"), text)


def describe_oserror(exc: OSError, outputs: Sequence[Path] = ()) -> str:
    """One line ``<path>: <reason>`` for ``exc``, naming the user's path, never a temp one.

    Parameters
    ----------
    exc
        Any ``OSError`` (``PermissionError``, ``FileExistsError``, ``IsADirectoryError``,
        disk full, read-only file system...).
    outputs
        The command's outputs: the first names the error when ``exc`` carries no path.

    Returns
    -------
    str
        E.g. ``"/data/ro/out.mrc: Permission denied"``.
    """
    fname = exc.filename
    if isinstance(fname, bytes):
        fname = os.fsdecode(fname)
    if exc.strerror and isinstance(fname, str | os.PathLike):
        return f"{unhide(os.fspath(fname))}: {exc.strerror}"
    if exc.strerror:
        reason = exc.strerror
    else:
        reason = unhide(str(exc) or type(exc).__name__)
    reason = reason.replace("pass overwrite=True", "pass --overwrite")
    named = [str(o) for o in outputs if str(o) and str(o) in reason]
    if named or not outputs or re.match(r"^\S+: ", reason):
        return reason
    return f"{outputs[0]}: {reason}"
