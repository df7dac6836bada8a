"""copick projects: picks JSON per (run, object) and a ``copick_config.json`` at the root.

Layout (copick's filesystem backend, checked with copick 1.31)::

    <root>/copick_config.json                      config_type "filesystem", pickable_objects,
                                                   overlay_root "local://<root>"
    <root>/ExperimentRuns/<run>/Picks/<user>_<session>_<object>.json

copick finds the user, session and object of a picks file by splitting its name on ``_``,
and accepts object/user/session names only without ``<>:"/\\|?*``, whitespace, control
characters and ``_`` (``copick.util.escape.sanitize_name``). Such names given here are refused
with an :class:`~cryosiam_nb.io.InputError`; so are run (tomogram) names that are not one
plain folder name (``/``, ``..``, a leading ``.``, absolute paths), which would write outside
the root or be hidden from copick. Object names made from cluster names
(``object_name="cluster"``) are cleaned the copick way (``cluster-<name>``, invalid characters
→ ``-``); the cluster name itself is kept in the object's ``metadata["cryosiam_nb"]``.

``overlay_root`` is an absolute ``local://`` path (copick resolves relative paths against
the working directory): after moving the folder, update it in the config.

Point ``location`` is in Å (voxel index × voxel size, x y z); orientations are not known, so
``transformation_`` is the identity and ``trust_orientation`` is false.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.constants import INSTANCE_COLORS
from cryosiam_nb.export._common import _existing, _positive, _prepare, text_column
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["CONFIG_NAME", "DEFAULT_USER", "write_copick", "read_copick", "copick_name"]

#: File name of the copick project configuration at the root.
CONFIG_NAME = "copick_config.json"
#: copick user id of our picks (no ``_``: copick splits file names on it).
DEFAULT_USER = "cryosiam-nb"
#: Characters copick replaces in object/user/session names (``sanitize_name``).
_INVALID = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f\s_]')
#: Characters refused in run (folder) names.
_BAD_RUN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_META_KEY = "cryosiam_nb"


def copick_name(value: str, field: str, what: str) -> str:
    """``value`` when copick accepts it as an object/user/session name; else an InputError."""
    value = str(value)
    bad = sorted(set(_INVALID.findall(value)))
    if not value or bad or value.strip("-") != value:
        why = f"holds {''.join(bad)!r}" if bad else "is empty or starts/ends with '-'"
        raise InputError(
            f"{what}: copick {field} {value!r} {why}; copick splits picks file names on '_' "
            'and refuses <>:"/\\|?*, whitespace and control characters: use letters, digits, '
            "'-' and '.'"
        )
    return value


def _run_name(value: str, what: str) -> str:
    """``value`` when it is one plain folder name under ``ExperimentRuns``; else an InputError."""
    bad = sorted(set(_BAD_RUN.findall(value)))
    if not value or bad or value in (".", "..") or value.startswith(".") or value != value.strip():
        why = f"holds {''.join(bad)!r}" if bad else "is empty, '.', '..', hidden or space-padded"
        raise InputError(
            f"{what}: copick run name (tomogram) {value!r} {why}; a run is one folder "
            "<root>/ExperimentRuns/<run>: rename the tomogram"
        )
    return value


def _cluster_object(cluster: str) -> str:
    clean = _INVALID.sub("-", cluster).strip("-")
    return f"cluster-{clean}" if clean else "cluster-unassigned"


def _rgba(color: Any, what: str) -> list[int]:
    """``#rrggbb[aa]`` or an RGB(A) sequence (0-255) as copick's RGBA list."""
    if isinstance(color, str):
        h = color.lstrip("#")
        if len(h) not in (6, 8) or not all(c in "0123456789abcdefABCDEF" for c in h):
            raise InputError(f"{what}: colour {color!r} is not #rrggbb or #rrggbbaa")
        vals = [int(h[i : i + 2], 16) for i in range(0, len(h), 2)]
    else:
        vals = [int(v) for v in color]
    if len(vals) == 3:
        vals.append(255)
    if len(vals) != 4 or not all(0 <= v <= 255 for v in vals):
        raise InputError(f"{what}: colour {color!r} must be RGB(A) values 0-255")
    return vals


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable copick config ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("pickable_objects", []), list):
        raise InputError(f"{path}: not a copick config (no pickable_objects list)")
    return doc


def _config(
    root: Path, old: dict[str, Any], objects: dict[str, dict[str, Any]], user: str, session: str
) -> dict[str, Any]:
    """The config ``old`` with ``objects`` (name → fields) added or updated, labels unique."""
    overlay = "local://" + str(root.resolve())
    have = str(old.get("overlay_root", overlay)).removeprefix("local://")
    if Path(have).resolve() != root.resolve():
        raise InputError(
            f"{root / CONFIG_NAME}: overlay_root is {old['overlay_root']!r}, not this folder; "
            "copick would not find picks written here: export into that root, or set "
            "overlay_root to this folder if it was moved"
        )
    pickable = [dict(o) for o in old.get("pickable_objects", [])]
    by_name = {o.get("name"): o for o in pickable}
    used = {o.get("label") for o in pickable}
    for name, fields in objects.items():
        obj = by_name.get(name)
        if obj is None:
            label = 1
            while label in used:
                label += 1
            used.add(label)
            obj = {"name": name, "is_particle": True, "label": label}
            pickable.append(obj)
        label = int(obj.get("label") or 1)
        if fields["color"] is not None:
            obj["color"] = fields["color"]
        elif "color" not in obj:  # keep a colour set earlier (by us or by the user)
            obj["color"] = _rgba(INSTANCE_COLORS[(label - 1) % len(INSTANCE_COLORS)], name)
        if fields["radius"] is not None or "radius" not in obj:
            obj["radius"] = fields["radius"]
        if fields["cluster"] is not None:
            obj["metadata"] = {
                **(obj.get("metadata") or {}),
                _META_KEY: {"cluster": fields["cluster"]},
            }
    return {
        "config_type": "filesystem",
        "name": "cryosiam_nb picks",
        "description": "particle picks exported by cryosiam_nb",
        "version": "0.2.0",
        **{k: v for k, v in old.items() if k != "pickable_objects"},
        "pickable_objects": pickable,
        "overlay_root": overlay,
        "overlay_fs_args": old.get("overlay_fs_args", {"auto_mkdir": True}),
        "user_id": user,
        "session_id": session,
    }


def _radius(
    sub: pd.DataFrame, radius: float | Mapping[str, float] | None, key: str, vs: float
) -> float | None:
    """Object radius in Å: ``radius=`` (one value or per object/cluster), else the median
    equivalent-sphere radius of ``n_voxels``, else None."""
    if isinstance(radius, Mapping):
        radius = radius.get(key)
    if radius is not None:
        return _positive(radius, f"radius of {key!r}", "copick export")
    if "n_voxels" in sub.columns and sub["n_voxels"].notna().any():
        n = float(np.nanmedian(sub["n_voxels"].to_numpy(dtype=float)))
        return round((3 * n / (4 * np.pi)) ** (1 / 3) * vs, 1)
    return None


def write_copick(
    df: pd.DataFrame,
    folder: str | os.PathLike[str],
    voxel_size: float,
    object_name: str = "particle",
    user_id: str = DEFAULT_USER,
    session_id: str = "0",
    tomogram: str | None = None,
    overwrite: bool = True,
    radius: float | Mapping[str, float] | None = None,
    colors: Mapping[str, Any] | None = None,
) -> list[Path]:
    """copick picks under ``folder`` and its ``copick_config.json`` (merged with an existing one).

    One picks file per tomogram (copick "run") and object. Nothing is written when a name is
    refused.

    Parameters
    ----------
    df
        Table with centres ``z, y, x`` (voxels), a ``tomogram`` column and optionally
        ``score``, ``cluster`` and ``n_voxels``.
    folder
        copick root folder (``overlay_root`` of the config).
    voxel_size
        Voxel size in Å (``voxel_spacing``; locations are voxels · ``voxel_size``).
    object_name
        Pickable object name; ``"cluster"`` (with a ``cluster`` column) makes each cluster its
        own object ``cluster-<name>``.
    user_id, session_id
        copick user and session of the picks (no ``_``).
    tomogram
        Run name for every row (default: the ``tomogram`` column).
    overwrite
        Replace existing picks files; ``False`` raises ``FileExistsError``.
    radius
        Object radius in Å (one value, or per object or cluster name); default: the median
        equivalent-sphere radius from ``n_voxels``, else unset.
    colors
        Object colour per object or cluster name (``#rrggbb`` or RGB(A) 0-255); default: the
        instance palette by label.

    Returns
    -------
    list of pathlib.Path
        The picks files written.
    """
    root, df, runs = _prepare(df, folder, voxel_size, tomogram)
    what = str(root)
    user_id = copick_name(user_id, "user_id", what)
    session_id = copick_name(session_id, "session_id", what)
    per_cluster = object_name == "cluster" and "cluster" in df.columns
    if not per_cluster:
        object_name = copick_name(object_name, "object name", what)
    clusters = text_column(df["cluster"]) if per_cluster else None
    groups: list[tuple[str, str, np.ndarray]] = []
    objects: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    run_names = runs.to_numpy()
    for run in sorted(set(run_names)):
        _run_name(run, what)
    keys = sorted(set(clusters)) if per_cluster else [object_name]
    for key in keys:
        obj = _cluster_object(key) if per_cluster else key
        if seen.setdefault(obj, key) != key:
            raise InputError(
                f"{what}: clusters {seen[obj]!r} and {key!r} both become copick object {obj!r}; "
                "rename one"
            )
        rows = clusters == key if per_cluster else np.ones(len(df), dtype=bool)
        sub = df[rows]
        color = (colors or {}).get(key, (colors or {}).get(obj))
        objects[obj] = {
            "radius": _radius(sub, radius, key, float(voxel_size)),
            "color": None if color is None else _rgba(color, what),
            "cluster": key if per_cluster else None,
        }
        for run in sorted(set(run_names[rows])):
            groups.append((run, obj, np.flatnonzero(rows & (run_names == run))))
    cfg_path = root / CONFIG_NAME
    config = _config(root, _read_config(cfg_path), objects, user_id, session_id)
    targets = [
        root / "ExperimentRuns" / run / "Picks" / f"{user_id}_{session_id}_{obj}.json"
        for run, obj, _ in groups
    ]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t}: already exists (pass overwrite=True to replace it)")
    xyz = df[["x", "y", "z"]].to_numpy(dtype=float) * float(voxel_size)
    score = df["score"].to_numpy(dtype=float) if "score" in df.columns else np.ones(len(df))
    score = np.where(np.isfinite(score), score, 1.0)
    eye = np.eye(4).tolist()
    written: list[Path] = []
    for (run, obj, idx), p in zip(groups, targets, strict=True):
        points = [
            {
                "location": {"x": xyz[i, 0], "y": xyz[i, 1], "z": xyz[i, 2]},
                "transformation_": eye,
                "instance_id": k,
                "score": float(score[i]),
            }
            for k, i in enumerate(idx.tolist())
        ]
        doc: dict[str, Any] = {
            "pickable_object_name": obj,
            "user_id": user_id,
            "session_id": session_id,
            "run_name": run,
            "voxel_spacing": float(voxel_size),
            "unit": "angstrom",
            "points": points,
            "trust_orientation": False,
        }
        with atomic_path(p, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(doc, separators=(",", ":")))  # compact: 1e5+ points
        written.append(p)
    with atomic_path(cfg_path) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return written


def read_copick(path: str | os.PathLike[str], voxel_size: float | None = None) -> pd.DataFrame:
    """Read one copick picks JSON back into a table.

    Parameters
    ----------
    path
        ``<root>/ExperimentRuns/<run>/Picks/<user>_<session>_<object>.json``.
    voxel_size
        Voxel size in Å for files without ``voxel_spacing`` (copick leaves it optional); when
        the file has one, they must agree.

    Returns
    -------
    pandas.DataFrame
        ``tomogram`` (run), ``object``, ``z, y, x`` in voxels (Å / voxel spacing), ``z_A, y_A,
        x_A`` in Å, ``score``, and ``cluster`` when the root's ``copick_config.json`` records
        the object's cluster name.

    Raises
    ------
    InputError
        Not a picks JSON, a unit other than angstrom, or no voxel spacing (null/missing and no
        ``voxel_size=``).
    """
    p = _existing(path)
    try:
        doc = json.loads(p.read_text())
        points = doc["points"] or []
        run, obj = str(doc["run_name"]), str(doc["pickable_object_name"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{p}: not a copick picks JSON ({exc!r})") from exc
    if doc.get("unit", "angstrom") != "angstrom":
        raise InputError(f"{p}: unit {doc.get('unit')!r}; only angstrom locations are supported")
    vs = doc.get("voxel_spacing")
    if vs is None:
        if voxel_size is None:
            raise InputError(
                f"{p}: voxel_spacing is null or missing; give voxel_size= (Å) to convert the "
                "Å locations to voxels"
            )
        vs = voxel_size
    vs = _positive(vs, "voxel_spacing", str(p))
    if voxel_size is not None and not np.isclose(vs, float(voxel_size), rtol=1e-6):
        raise InputError(f"{p}: voxel_spacing {vs} Å disagrees with voxel_size={voxel_size} Å")
    loc = np.array([[pt["location"][ax] for ax in "zyx"] for pt in points], dtype=float).reshape(
        len(points), 3
    )
    out = pd.DataFrame({"tomogram": [run] * len(points), "object": [obj] * len(points)})
    for i, ax in enumerate("zyx"):
        out[ax] = loc[:, i] / vs
    for i, ax in enumerate("zyx"):
        out[f"{ax}_A"] = loc[:, i]
    out["score"] = [
        float(pt.get("score", 1.0) if pt.get("score") is not None else 1.0) for pt in points
    ]
    cfg = p.parents[3] / CONFIG_NAME if len(p.parents) > 3 else None
    if cfg is not None and cfg.is_file():
        for o in _read_config(cfg).get("pickable_objects", []):
            meta = (o.get("metadata") or {}).get(_META_KEY) or {}
            if o.get("name") == obj and "cluster" in meta:
                out["cluster"] = str(meta["cluster"])
    return out
