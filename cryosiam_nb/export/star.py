"""STAR files: RELION 3/4 and Warp (``rlnCoordinateX/Y/Z``, pixels) and RELION 5 (centred Å).

Units (checked against RELION's own reader, ``ParticleSet::getPosition``):

- RELION 4 and Warp: ``rlnCoordinate{X,Y,Z}`` in pixels of the **unbinned tilt series**,
  i.e. voxel index × binning, where binning = voxel size / tilt-series pixel size.
- RELION 5: ``rlnCenteredCoordinate{X,Y,Z}Angst`` = (voxel index − size / 2) × voxel size.
  RELION turns it back into unbinned tilt-series pixels as
  ``Å / rlnTomoTiltSeriesPixelSize + rlnTomoSize / 2`` (float division; ``rlnTomoSize{X,Y,Z}``
  of the tomograms STAR are unbinned pixels), which gives voxel × binning again when
  ``rlnTomoSize`` = tomogram size × binning.

Both write ``rlnTomoTiltSeriesPixelSize`` (Å) and ``rlnTomoTomogramBinning`` in the optics
block; :func:`read_star` uses them to return voxels of the picking tomogram.

Text values are quoted (``"..."``) when they are empty, hold spaces or ``#``, start with ``_ $ [ ] ;``
or with a reserved word (``data_``, ``loop_``, ``save_``, ``global_``, ``stop_``), so that
starfile, RELION and CIF parsers (gemmi) read the exact value back. Values that no STAR
reader gets back (quotes, tabs, newlines, control characters, ``nan``/``NaN``/``<NA>``) are
refused with an :class:`~cryosiam_nb.io.InputError` naming the column and the value.

Cluster ids: ``rlnClassNumber`` is the 1-based integer code of the cluster name (sorted
names; RELION needs an integer), and ``cryosiamNbCluster`` holds the name itself prefixed
with ``c`` (``"0.1"`` → ``c0.1``, ``"1"`` → ``c1``) so that no reader takes it for a
number; :func:`read_star` strips the prefix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryosiam_nb.export._common import (
    NAME_COLUMNS,
    ShapeZYX,
    _existing,
    _prepare,
    column_or_index,
    text_column,
    tilt_series,
)
from cryosiam_nb.io import InputError, atomic_path

__all__ = [
    "CLUSTER_PREFIX",
    "write_star_relion4",
    "write_star_warp",
    "write_star_relion5",
    "read_star",
    "star_token",
]

#: Prefix of cluster names in ``cryosiamNbCluster`` (keeps "1" or "0.1" from reading as numbers).
CLUSTER_PREFIX = "c"
#: Default extra columns of the STAR writers.
_EXTRA: tuple[str, ...] = ("cluster", "species", "score")
#: Values starfile reads back as NaN even when quoted.
_NA_TOKENS = frozenset({"nan", "NaN", "<NA>"})
#: Characters no STAR reader gives back: quotes, whitespace other than space, control chars.
_BAD_CHARS = re.compile(r"[\"'\x00-\x1f\x7f-\x9f]|[^\S ]")
#: Values that must be quoted: empty, holding a space or '#' (starfile/pandas cuts a line at
#: any '#' outside quotes), starting with ``_ $ [ ] ;`` or a CIF/STAR reserved word.
_NEEDS_QUOTES = re.compile(r"^$| |#|^[_$\[\];]|^(?:data_|loop_|save_|global_|stop_)", re.I)
#: Labels read back as text, whatever they look like.
_TEXT_LABELS = ("rlnTomoName", "rlnMicrographName", "rlnOpticsGroupName")
_PREFIX = "cryosiamNb"


def star_token(value: str, column: str, what: str) -> str:
    """One STAR text value, quoted where needed so readers get ``value`` back exactly.

    Raises
    ------
    InputError
        ``value`` holds a quote, a tab/newline/control character or is ``nan``/``NaN``/``<NA>``
        (no STAR reader gives those back); the message names ``column`` and ``value``.
    """
    bad = sorted(set(_BAD_CHARS.findall(value)))
    if bad or value in _NA_TOKENS:
        why = f"holds {''.join(bad)!r}" if bad else "reads back as NaN"
        raise InputError(
            f"{what}: {column} value {value!r} {why}; STAR readers (starfile, RELION) cannot "
            "get it back: rename it (no quotes, tabs, newlines or control characters)"
        )
    return f'"{value}"' if _NEEDS_QUOTES.search(value) else value


def _quote_column(text: pd.Series, column: str, what: str) -> np.ndarray:
    """:func:`star_token` of every value of a text column (vectorised)."""
    bad = text.str.contains(_BAD_CHARS) | text.isin(_NA_TOKENS)
    if bad.any():
        star_token(text[bad].iloc[0], column, what)  # raises, naming the first bad value
    quote = text.str.contains(_NEEDS_QUOTES).to_numpy(dtype=bool)
    return np.where(quote, '"' + text + '"', text).astype(object)


def _write_star(blocks: dict[str, object], path: Path, overwrite: bool) -> Path:
    """Quote the text columns of the loop blocks and write them atomically with starfile."""
    out: dict[str, object] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            block = block.copy()
            for col in block.columns:
                if not pd.api.types.is_numeric_dtype(block[col]):  # text (object or str)
                    block[col] = _quote_column(block[col].astype(str), col, str(path))
        out[name] = block
    with atomic_path(path, overwrite=overwrite) as tmp:
        # The values are quoted above: starfile must not quote them again.
        starfile.write(out, tmp, quote_character="", float_format="%.6f")
    return path


def _extra_columns(parts: pd.DataFrame, df: pd.DataFrame, extra: Sequence[str]) -> None:
    """Add ``rlnClassNumber`` + prefixed ``cryosiamNbCluster`` and ``cryosiamNb<Name>`` columns.

    Name columns (:data:`~cryosiam_nb.export._common.NAME_COLUMNS`) and non-numeric columns
    are written as text, numeric ones as numbers.
    """
    for col in extra:
        values = column_or_index(df, col)
        if values is None:
            continue
        label = _PREFIX + col.capitalize()
        if col == "cluster":
            names = text_column(values)
            order = {n: i + 1 for i, n in enumerate(sorted(set(names) - {""}))}
            parts["rlnClassNumber"] = np.array([order.get(n, 0) for n in names], dtype=int)
            parts[label] = np.array([CLUSTER_PREFIX + n if n else "" for n in names], dtype=object)
        elif (
            col in NAME_COLUMNS
            or not pd.api.types.is_numeric_dtype(values)
            or pd.api.types.is_bool_dtype(values)
        ):
            parts[label] = text_column(values)
        else:
            parts[label] = values.to_numpy(dtype=float)


def _optics(pixel_size: float, binning: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnTomoTiltSeriesPixelSize": [pixel_size],
            "rlnTomoTomogramBinning": [binning],
        }
    )


def _write_pixel_star(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None,
    extra: Sequence[str],
    overwrite: bool,
    tilt_series_pixel_size: float | None,
    binning: float | None,
    micrograph_suffix: str | None,
) -> Path:
    """RELION 4 / Warp STAR body: unbinned tilt-series pixel coordinates."""
    p, df, names = _prepare(df, path, voxel_size, tomogram)
    px, b = tilt_series(voxel_size, tilt_series_pixel_size, binning, str(p))
    cols: dict[str, object] = {
        "rlnTomoParticleId": np.arange(1, len(df) + 1),
        "rlnTomoName": text_column(names),
    }
    if micrograph_suffix is not None:
        cols["rlnMicrographName"] = np.array([n + micrograph_suffix for n in names], dtype=object)
    for ax in "XYZ":
        cols[f"rlnCoordinate{ax}"] = df[ax.lower()].to_numpy(dtype=float) * b
    cols["rlnOpticsGroup"] = np.ones(len(df), dtype=int)
    parts = pd.DataFrame(cols)
    _extra_columns(parts, df, extra)
    return _write_star({"optics": _optics(px, b), "particles": parts}, p, overwrite)


def write_star_relion4(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = _EXTRA,
    overwrite: bool = True,
    tilt_series_pixel_size: float | None = None,
    binning: float | None = None,
) -> Path:
    """RELION 3/4 STAR: ``rlnCoordinateX/Y/Z`` in **unbinned tilt-series pixels**.

    Coordinate = voxel index × binning (binning = ``voxel_size`` / ``tilt_series_pixel_size``),
    what ``relion_tomo_import_particles`` expects. For RELION 3 (coordinates in the pixels of
    the tomogram itself) leave both unset: the tomogram is then taken as unbinned.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels of the picking tomogram) and a ``tomogram``
        column.
    path
        Output ``.star`` file (written atomically).
    voxel_size
        Voxel size of the picking tomogram in Å.
    tomogram
        Name for every row (default: the ``tomogram`` column), written as ``rlnTomoName``.
    extra
        Columns kept as ``cryosiamNb<Name>`` (``cluster`` also as a 1-based ``rlnClassNumber``;
        see the module docstring for the ``c`` prefix of cluster names).
    overwrite
        Replace an existing file; ``False`` raises ``FileExistsError``.
    tilt_series_pixel_size, binning
        Pixel size (Å) of the unbinned tilt series, or the tomogram's binning relative to it;
        give either (both must agree). Default: binning 1.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _write_pixel_star(
        df, path, voxel_size, tomogram, extra, overwrite, tilt_series_pixel_size, binning, None
    )


def write_star_warp(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    tomogram: str | None = None,
    extra: Sequence[str] = _EXTRA,
    overwrite: bool = True,
    tilt_series_pixel_size: float | None = None,
    binning: float | None = None,
) -> Path:
    """Warp/M STAR: as :func:`write_star_relion4`, plus ``rlnMicrographName`` = ``<tomo>.tomostar``.

    Coordinates are unbinned tilt-series pixels: tell Warp their pixel size is the
    tilt-series pixel size (``rlnTomoTiltSeriesPixelSize`` in the optics block).
    Parameters as :func:`write_star_relion4`.
    """
    return _write_pixel_star(
        df,
        path,
        voxel_size,
        tomogram,
        extra,
        overwrite,
        tilt_series_pixel_size,
        binning,
        ".tomostar",
    )


def _row_shapes(
    shape: ShapeZYX | Mapping[str, ShapeZYX], names: pd.Series, what: str
) -> np.ndarray:
    """(N, 3) tomogram (z, y, x) sizes per row from one shape or ``{name: shape}``."""
    if isinstance(shape, Mapping):
        table = {str(k): tuple(int(s) for s in v) for k, v in shape.items()}
        missing = sorted(set(names) - set(table))
        if missing:
            raise InputError(
                f"{what}: no tomogram shape for {missing} (have {sorted(table)}); give the "
                "(z, y, x) size of every tomogram"
            )
        bad = {k: v for k, v in table.items() if len(v) != 3}
        if bad:
            raise InputError(f"{what}: shapes must be (z, y, x) sizes of tomograms, got {bad}")
        return np.array([table[n] for n in names], dtype=float).reshape(len(names), 3)
    if len(shape) != 3:
        raise InputError(f"{what}: shape must be the (z, y, x) size of the tomogram, got {shape}")
    return np.broadcast_to(np.asarray(shape, dtype=float), (len(names), 3))


def write_star_relion5(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    voxel_size: float,
    shape: ShapeZYX | Mapping[str, ShapeZYX],
    tomogram: str | None = None,
    extra: Sequence[str] = _EXTRA,
    overwrite: bool = True,
    tilt_series_pixel_size: float | None = None,
    binning: float | None = None,
) -> Path:
    """RELION 5 STAR: ``rlnCenteredCoordinate{X,Y,Z}Angst`` relative to the tomogram centre.

    Centred coordinate = (voxel − size / 2) · ``voxel_size`` Å, per axis. RELION 5 divides it
    by ``rlnTomoTiltSeriesPixelSize`` and adds ``rlnTomoSize / 2`` (unbinned pixels), so the
    tomograms STAR must list ``rlnTomoSize{X,Y,Z}`` = ``shape`` × binning.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels) and a ``tomogram`` column.
    path
        Output ``.star`` file (written atomically).
    voxel_size
        Voxel size of the picking tomogram in Å.
    shape
        (z, y, x) size in voxels of the tomogram the centres refer to, or
        ``{tomogram name: (z, y, x)}`` when the tomograms differ in size.
    tomogram
        Name for every row (default: the ``tomogram`` column).
    extra
        Columns kept as ``cryosiamNb<Name>`` (``cluster`` also as a 1-based ``rlnClassNumber``).
    overwrite
        Replace an existing file; ``False`` raises ``FileExistsError``.
    tilt_series_pixel_size, binning
        Pixel size (Å) of the unbinned tilt series (``rlnTomoTiltSeriesPixelSize``) or the
        tomogram's binning; give either. Default: binning 1.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p, df, names = _prepare(df, path, voxel_size, tomogram)
    px, b = tilt_series(voxel_size, tilt_series_pixel_size, binning, str(p))
    size = _row_shapes(shape, names, str(p))
    centred = (df[["z", "y", "x"]].to_numpy(float) - size / 2) * float(voxel_size)
    parts = pd.DataFrame(
        {
            "rlnTomoName": text_column(names),
            "rlnCenteredCoordinateXAngst": centred[:, 2],
            "rlnCenteredCoordinateYAngst": centred[:, 1],
            "rlnCenteredCoordinateZAngst": centred[:, 0],
            "rlnOpticsGroup": np.ones(len(df), dtype=int),
        }
    )
    _extra_columns(parts, df, extra)
    general = {"rlnTomoSubTomosAre2DStacks": 0}
    blocks = {"general": general, "optics": _optics(px, b), "particles": parts}
    return _write_star(blocks, p, overwrite)


def _labels(path: Path) -> list[str]:
    """Every ``_label`` of a STAR file (header lines), in order."""
    with open(path, errors="replace") as fh:
        return [ln.split()[0][1:] for ln in fh if ln.startswith("_") and len(ln.split()[0]) > 1]


def read_star(
    path: str | os.PathLike[str],
    voxel_size: float | None = None,
    tomogram_shape: ShapeZYX | Mapping[str, ShapeZYX] | None = None,
) -> pd.DataFrame:
    """Read a STAR written by the writers of this module back into a table.

    Parameters
    ----------
    path
        A ``.star`` file written by :func:`write_star_relion4`, :func:`write_star_warp` or
        :func:`write_star_relion5`.
    voxel_size
        RELION 5 only, without ``tomogram_shape``: voxel size in Å to give centred voxels
        ``z, y, x`` (= centred Å / voxel size).
    tomogram_shape
        RELION 5 only: the (z, y, x) size(s) of the tomogram(s) in voxels, to undo the centring
        and return voxel indices ``z, y, x`` of the picking tomogram.

    Returns
    -------
    pandas.DataFrame
        ``tomogram``; ``z, y, x`` in voxels of the picking tomogram (RELION 4/Warp: pixel /
        binning) or ``z_A, y_A, x_A`` in centred Å (RELION 5); the ``cryosiamNb*`` columns
        under their lower-case names (names as text, cluster prefix removed). ``attrs`` hold
        ``tilt_series_pixel_size`` (Å), ``binning`` and ``voxel_size`` (Å) from the optics block.
    """
    p = _existing(path)
    try:
        text_labels = [lb for lb in _labels(p) if lb.startswith(_PREFIX) or lb in _TEXT_LABELS]
        blocks = starfile.read(p, always_dict=True, parse_as_string=text_labels)
    except Exception as exc:
        raise InputError(f"{p}: not a readable STAR file ({exc})") from exc
    parts = blocks.get("particles")
    if parts is None:
        parts = next(iter(blocks.values()))
    if not isinstance(parts, pd.DataFrame):
        raise InputError(f"{p}: no particle table (loop_) in the STAR file")
    optics = blocks.get("optics")
    px, b = float("nan"), 1.0
    if isinstance(optics, pd.DataFrame) and len(optics):
        if "rlnTomoTiltSeriesPixelSize" in optics:
            px = float(optics["rlnTomoTiltSeriesPixelSize"].iloc[0])
        if "rlnTomoTomogramBinning" in optics:
            b = float(optics["rlnTomoTomogramBinning"].iloc[0])
    if "rlnTomoName" in parts:
        names = parts["rlnTomoName"].astype(str)
    elif "rlnMicrographName" in parts:
        names = parts["rlnMicrographName"].astype(str).str.removesuffix(".tomostar")
    else:
        raise InputError(f"{p}: no rlnTomoName or rlnMicrographName column")
    out = pd.DataFrame({"tomogram": names.to_numpy()})
    if "rlnCoordinateX" in parts:
        for ax in "zyx":
            out[ax] = parts[f"rlnCoordinate{ax.upper()}"].to_numpy(dtype=float) / b
    elif "rlnCenteredCoordinateXAngst" in parts:
        for ax in "zyx":
            out[f"{ax}_A"] = parts[f"rlnCenteredCoordinate{ax.upper()}Angst"].to_numpy(float)
        vs = px * b if np.isfinite(px) else voxel_size
        if tomogram_shape is not None:
            if vs is None:
                raise InputError(f"{p}: no rlnTomoTiltSeriesPixelSize; give voxel_size=")
            size = _row_shapes(tomogram_shape, out["tomogram"], str(p))
            for i, ax in enumerate("zyx"):
                out[ax] = out[f"{ax}_A"] / vs + size[:, i] / 2
        elif voxel_size:
            for ax in "zyx":
                out[ax] = out[f"{ax}_A"] / voxel_size
    else:
        raise InputError(f"{p}: no rlnCoordinateX or rlnCenteredCoordinateXAngst column")
    for col in parts.columns:
        if not col.startswith(_PREFIX):
            continue
        name = col[len(_PREFIX) :].lower()
        values = parts[col]
        if name == "cluster":
            text = text_column(values)
            out[name] = [
                t[len(CLUSTER_PREFIX) :] if t.startswith(CLUSTER_PREFIX) else t for t in text
            ]
        elif name in NAME_COLUMNS:
            out[name] = text_column(values)
        else:
            try:
                out[name] = pd.to_numeric(values).to_numpy()
            except (TypeError, ValueError):
                out[name] = text_column(values)
    out.attrs.update(
        tilt_series_pixel_size=px, binning=b, voxel_size=px * b if np.isfinite(px) else voxel_size
    )
    return out
