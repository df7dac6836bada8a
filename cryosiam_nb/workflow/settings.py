"""The models of each step and the settings that decide a tomogram's outputs (recorded in
its completion marker and compared on resume)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryosiam_nb.io import InputError

__all__ = ["DEFAULT_MODELS", "DENSE_STEPS"]

#: The dense steps: each reads the outputs of one head of a ``tl.predict`` pass.
DENSE_STEPS = ("denoise", "lamella", "semantic", "instance")
#: The model used for each step (a shipped name, a checkpoint path or a loaded model). The
#: four dense steps name one multi-task model: one ``tl.predict`` pass gives them all.
DEFAULT_MODELS: dict[str, str] = {
    **dict.fromkeys(DENSE_STEPS, "tiny-multitask"),
    "subtomo": "tiny-subtomo",
}
_PICKERS = ("auto", "model", "density")


def _model_id(spec: Any) -> str:
    """A stable identity of a model spec (recorded in the marker, compared on resume)."""
    if isinstance(spec, str | os.PathLike):
        p = Path(spec)
        return f"{p.resolve()}:{p.stat().st_size}" if p.is_file() else str(spec)
    h = hashlib.sha1()
    for k, v in spec.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(spec).__name__}:{getattr(spec, 'task', '?')}:{h.hexdigest()[:16]}"


@lru_cache(maxsize=16)
def _load_cached(spec: str) -> Any:
    from cryosiam_nb import models

    return models.load(spec)


def _model(spec: Any) -> Any:
    return _load_cached(str(spec)) if isinstance(spec, str | os.PathLike) else spec


def _resolve_models(models: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{step: spec}`` for every step: :data:`DEFAULT_MODELS`, then ``models["dense"]``
    (one model for the four dense steps), then the per-step entries of ``models``."""
    given = dict(models or {})
    for key in given:
        if key != "dense" and key not in DEFAULT_MODELS:
            steps = ["dense", *DEFAULT_MODELS]
            raise InputError(f"models: unknown step {key!r} (steps: {steps})")
    out = dict(DEFAULT_MODELS)
    if "dense" in given:
        out.update(dict.fromkeys(DENSE_STEPS, given.pop("dense")))
    out.update(given)
    return out


def _settings(
    models: dict[str, Any],
    voxel_size: float | None,
    invert: bool,
    lamella_params: Mapping[str, Any] | None,
    instance_params: Mapping[str, Any] | None,
    picker: str,
    rotations: int,
    tta: bool | int = False,
) -> dict[str, Any]:
    """Everything that decides a tomogram's outputs, JSON-able (compared on resume)."""
    if picker not in _PICKERS:
        raise InputError(f"picker: expected one of {_PICKERS}, got {picker!r}")
    n_tta = 8 if tta is True else tta if isinstance(tta, int) else -1
    if not 0 <= n_tta <= 8:
        raise InputError(f"tta: True, False or a number of flips from 0 to 8, got {tta!r}")
    # the lamella model's calibrated threshold (lamella_params override it)
    lam_meta = getattr(_model(models["lamella"]), "metadata", {}) or {}
    lam = {
        "threshold": 0.9,
        "sigma": (10.0, 5.0, 5.0),
        **dict(lam_meta.get("lamella_defaults") or {}),
        **dict(lamella_params or {}),
    }
    if set(lam) - {"threshold", "sigma", "cls"}:
        raise InputError(
            f"lamella_params: unknown {sorted(set(lam) - {'threshold', 'sigma', 'cls'})}"
        )
    if not 0.0 < float(lam["threshold"]) < 1.0:
        raise InputError(f"lamella_params: threshold must be in (0, 1), got {lam['threshold']}")
    params = {"min_size": 10, **dict(instance_params or {})}
    bad = [k for k in params if k in ("maps", "roi", "out", "progress", "touching")]
    if bad:
        raise InputError(f"instance_params: {bad} are set by the workflow itself")
    # the instance model's tuned post-processing (instance_params override it); not used
    # by density picking
    meta = {} if picker == "density" else getattr(_model(models["instance"]), "metadata", {})
    tuned = dict((meta or {}).get("instance_defaults") or {})
    # the semantic model's tuned post-processing (per-class minimum component sizes)
    sem_meta = getattr(_model(models["semantic"]), "metadata", {}) or {}
    return {
        "models": {k: _model_id(v) for k, v in models.items()},
        "voxel_size": None if voxel_size is None else float(voxel_size),
        "invert": bool(invert),
        "lamella_params": json.loads(json.dumps(lam)),
        "instance_params": json.loads(json.dumps(params)),
        "instance_defaults": json.loads(json.dumps(tuned)),
        "picker": picker,
        "rotations": int(rotations),
        # only when on: markers written without test-time augmentation stay resumable
        **({"tta": n_tta} if n_tta > 1 else {}),
        # only when the model has some: markers written before them stay resumable
        **(
            {"semantic_defaults": json.loads(json.dumps(sem_meta["semantic_defaults"]))}
            if sem_meta.get("semantic_defaults")
            else {}
        ),
    }
