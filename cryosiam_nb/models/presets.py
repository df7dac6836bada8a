"""Model size presets and :func:`build`.

``"paper"`` — the sizes of the thesis / CryoSiam v1.0 release (SPEC §2): ResNet filters
(64, 128, 256, 512) with bottleneck blocks (res5 has 2048 channels), FPN 128, 64-d voxel
embedding with a 64→16→64 dense predictor, 256-d global embedding with a 256→64→256
predictor, L2 level loss, heads 64→32→64→out, patch 128³, subtomogram SimSiam 1024-d
(predictor 256) on 64³ boxes.

``"tiny"`` — for training on a 2-core CPU in minutes: filters (8, 16, 32, 64) (res5 256
channels), FPN 16, 16-d voxel embedding (predictor 16→4→16), 64-d global embedding
(predictor 64→16→64), L2 level loss, heads 16→8→16→out, patch 32³; subtomogram SimSiam
64-d (predictor 16) on 32³ boxes. About 0.4 M parameters (most in the global MLP).
Full-resolution 3-D convolutions dominate the cost, so the tiny widths are kept small.

A preset between the two was measured and not kept (2026-12-06): tiny's widths doubled
(filters 16-128, FPN 32, dense embedding 32, heads 16/32; 1.63 M parameters, 6.6 MB)
through the multi-task recipe's stages 2-6 and calibration. On validation tomograms
7201-7205 (never trained or calibrated on) against the shipped tiny-multitask: semantic
Dice 0.666 vs 0.661, membrane 0.769 vs 0.750, actin 0.141 vs 0.193, DNA 0.184 vs 0.148,
AP-50 0.328 vs 0.301, small-particle F1 0.690 vs 0.676, PSNR 16.4 vs 16.0 dB, lamella
0.925 vs 0.918, at 321 vs 92 kFLOP per voxel (the four separate tiny models: 204) and
1.6x the wall time per tomogram (prediction and post-processing, 2 threads). Small gains
at 3.5x the compute, and the rare class that fails (actin) got worse, so the laptop
default stays tiny.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from cryosiam_nb.constants import HEAD_TASKS, SEMANTIC_CLASSES, TASKS

from .networks import (
    HEAD_LAYOUTS,
    CryoSiamModel,
    DenseSimSiam,
    MultiTaskHeads,
    SimSiam,
    TaskHeads,
)

__all__ = ["PRESETS", "build", "build_from_config", "default_class_names", "combine"]

#: What every preset's encoder shares (SPEC §2): MONAI ResNet, bottleneck blocks, one block
#: per stage, 7³ first convolution with stride 1 and no max-pool, one input channel.
_ENCODER: dict[str, Any] = {
    "in_channels": 1,
    "block": "bottleneck",
    "layers": [1, 1, 1, 1],
    "conv1_kernel": 7,
    "no_max_pool": True,
}


def _preset(
    filters: list[int],
    fpn: int,
    dim: int,
    pred_dim: int,
    dense_dim: int,
    dense_pred_dim: int,
    subtomo_dim: int,
    subtomo_pred_dim: int,
    head_filters: list[int],
    patch: int,
    subtomo_box: int,
) -> dict[str, Any]:
    """One preset: only the sizes that differ between presets are arguments."""
    return {
        "backbone": {
            **_ENCODER,
            "filters": filters,
            "fpn_channels": fpn,
            "dim": dim,
            "pred_dim": pred_dim,
            "dense_dim": dense_dim,
            "dense_pred_dim": dense_pred_dim,
            "levels": [2],
            "encoder_fc": False,
        },
        "subtomo": {
            **_ENCODER,
            "filters": filters,
            "dim": subtomo_dim,
            "pred_dim": subtomo_pred_dim,
        },
        "heads": {"filters": head_filters, "kernel_size": 3},
        "patch_size": [patch] * 3,
        "subtomo_box": subtomo_box,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _preset(
        filters=[8, 16, 32, 64],
        fpn=16,
        dim=64,
        pred_dim=16,
        dense_dim=16,
        dense_pred_dim=4,
        subtomo_dim=64,
        subtomo_pred_dim=16,
        head_filters=[8, 16],
        patch=32,
        subtomo_box=32,
    ),
    "paper": _preset(
        filters=[64, 128, 256, 512],
        fpn=128,
        dim=256,
        pred_dim=64,
        dense_dim=64,
        dense_pred_dim=16,
        subtomo_dim=1024,
        subtomo_pred_dim=256,
        head_filters=[32, 64],
        patch=128,
        subtomo_box=64,
    ),
}


def default_class_names(task: str, n_classes: int | None = None) -> tuple[str, ...] | None:
    """Class names a task uses by default (semantic: the simulator's; lamella: outside/sample)."""
    if task == "semantic":
        names = SEMANTIC_CLASSES
        if n_classes is None or n_classes == len(names):
            return names
        return tuple(f"class_{i}" for i in range(n_classes))
    if task == "lamella":
        if n_classes is None or n_classes == 2:
            return ("outside", "sample")
        return tuple(f"class_{i}" for i in range(n_classes))
    return None


def _override_names(task: str) -> dict[str, str]:
    """Flat override name → section of the config it changes."""
    section = "subtomo" if task == "subtomo_ssl" else "backbone"
    names = {k: section for k in PRESETS["paper"][section]}
    if task == "subtomo_ssl":
        names["hidden_dim"] = section
    else:
        names["global_hidden"] = section
    if task in HEAD_LAYOUTS or task == "multitask":
        names.update(head_filters="heads", head_kernel_size="heads")
    if task == "multitask":
        names.update(head_task_filters="heads")
    if task in ("semantic", "lamella", "multitask"):
        names.update(n_classes="top", class_names="top")
    names.update(patch_size="top", voxel_size="top")
    return names


def build(task: str, preset: str = "tiny", **overrides: Any) -> CryoSiamModel:
    """Build an untrained model for ``task`` with the sizes of ``preset``.

    ``task``: "dense_ssl", "denoise", "semantic", "lamella", "instance", "multitask" (one
    backbone, the heads of every task in :data:`~cryosiam_nb.constants.HEAD_TASKS`;
    ``n_classes`` / ``class_names`` are the semantic head's) or "subtomo_ssl".
    ``preset``: "tiny" or "paper" (see module docstring). ``overrides`` change single sizes,
    e.g. ``filters=(16, 32, 64, 128)``, ``dense_dim=16``, ``levels=(2, 4)``,
    ``head_filters=(16, 32)``, ``head_task_filters={"semantic": (32, 32)}`` (multitask:
    some tasks' heads wider or narrower than ``head_filters``), ``n_classes=3`` /
    ``class_names=(...)`` (semantic, lamella),
    ``patch_size=(64, 64, 64)`` (voxels, z y x), ``voxel_size=10.0`` (Å).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[preset])
    valid = _override_names(task)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"build({task!r}): unknown override(s) {unknown}; valid for this task: {sorted(valid)}"
        )
    sub = task == "subtomo_ssl"
    config: dict[str, Any] = {"task": task, "preset": preset}
    net = p["subtomo"] if sub else p["backbone"]
    heads = p["heads"]
    n_classes = None
    class_names = None
    patch = [p["subtomo_box"]] * 3 if sub else p["patch_size"]
    voxel_size = None
    for key, val in overrides.items():
        where = valid[key]
        if key in ("head_filters", "head_kernel_size"):
            heads[key.removeprefix("head_")] = _plain(val)
        elif key == "head_task_filters":
            heads["task_filters"] = {str(t): [int(f) for f in v] for t, v in val.items()}
        elif key == "n_classes":
            n_classes = int(val)
        elif key == "class_names":
            class_names = [str(c) for c in val]
        elif key == "patch_size":
            patch = _patch(val)
        elif key == "voxel_size":
            voxel_size = None if val is None else float(val)
        elif where in ("backbone", "subtomo"):
            net[key] = _plain(val)
    if task in ("semantic", "lamella", "multitask"):
        part = "semantic" if task == "multitask" else task
        if class_names is not None and n_classes is not None and len(class_names) != n_classes:
            raise ValueError(f"class_names has {len(class_names)} names but n_classes={n_classes}")
        if class_names is None:
            default_n = n_classes or (2 if part == "lamella" else len(SEMANTIC_CLASSES))
            class_names = list(default_class_names(part, default_n) or ())
        n_classes = len(class_names)
        heads["out_channels"] = n_classes
    config["subtomo" if sub else "backbone"] = net
    if task in HEAD_LAYOUTS or task == "multitask":
        config["heads"] = heads
    if task == "multitask":
        heads.pop("out_channels", None)
        heads["fused"] = True
        config["part_classes"] = {
            "semantic": list(class_names or ()),
            "lamella": list(default_class_names("lamella", 2) or ()),
        }
    config["patch_size"] = list(patch)
    config["voxel_size"] = voxel_size
    config["class_names"] = class_names
    return build_from_config(config)


def build_from_config(
    config: dict[str, Any], metadata: dict[str, Any] | None = None
) -> CryoSiamModel:
    """Rebuild a model from ``model.config`` (as stored in checkpoints)."""
    task = config.get("task")
    if task not in TASKS:
        raise ValueError(f"config task={task!r}: expected one of {TASKS}")
    config = copy.deepcopy(config)
    if task == "subtomo_ssl":
        backbone: Any = SimSiam(**config["subtomo"])
    else:
        backbone = DenseSimSiam(**config["backbone"])
    heads: TaskHeads | MultiTaskHeads | None = None
    if task == "multitask":
        h = config["heads"]
        heads = MultiTaskHeads(
            in_channels=config["backbone"]["dense_dim"],
            filters=tuple(h["filters"]),
            n_classes={k: len(v) for k, v in config["part_classes"].items()},
            kernel_size=int(h.get("kernel_size", 3)),
            tasks=tuple(h.get("tasks", HEAD_TASKS)),
            fused=bool(h.get("fused", False)),
            task_filters=h.get("task_filters"),
        )
    elif task in HEAD_LAYOUTS:
        h = config["heads"]
        heads = TaskHeads(
            task,
            in_channels=config["backbone"]["dense_dim"],
            filters=tuple(h["filters"]),
            n_classes=h.get("out_channels"),
            kernel_size=int(h.get("kernel_size", 3)),
        )
    model = CryoSiamModel(
        task,
        backbone,
        heads,
        config=config,
        patch_size=config["patch_size"],
        voxel_size=config.get("voxel_size"),
        class_names=config.get("class_names"),
        metadata=metadata,
    )
    # Channels-last weights pair with channels-last activations (oneDNN on CPU, cuDNN on GPU).
    return model.to(memory_format=torch.channels_last_3d)


def _plain(val: Any) -> Any:
    if isinstance(val, tuple | list):
        return [_plain(v) for v in val]
    return val


def _patch(val: Any) -> list[int]:
    if isinstance(val, int):
        val = (val, val, val)
    out = [int(v) for v in val]
    if len(out) != 3 or min(out) < 8:
        raise ValueError(f"patch_size={val!r}: need 3 sizes (z, y, x) of at least 8 voxels")
    return out


def combine(models: Sequence[CryoSiamModel]) -> CryoSiamModel:
    """One multi-task model from head models whose backbones hold identical weights.

    The result shares the first model's backbone (no copy) and every model's heads
    (``heads.<task>``), so :func:`cryosiam_nb.tl.predict` runs the backbone once per
    window for all of them. Models with different backbones (e.g. the separately
    fine-tuned ``tiny-*`` models) cannot be combined: run them one by one.
    """
    models = list(models)
    if not models:
        raise ValueError("combine: no models given")
    if len(models) == 1 and models[0].task == "multitask":
        return models[0]
    first = models[0]
    parts: dict[str, CryoSiamModel] = {}
    for m in models:
        if m.task not in HEAD_LAYOUTS:
            raise ValueError(f"combine: {m.task!r} model has no dense heads to combine")
        if m.task in parts:
            raise ValueError(f"combine: two {m.task!r} models given")
        if m.config.get("backbone") != first.config.get("backbone") or tuple(m.patch_size) != tuple(
            first.patch_size
        ):
            raise ValueError(
                f"combine: the {m.task!r} model's backbone or patch size differs from the "
                f"{first.task!r} model's; run them separately"
            )
        a, b = m.backbone.state_dict(), first.backbone.state_dict()
        if m is not first and any(not torch.equal(a[k], b[k]) for k in b):
            raise ValueError(
                f"combine: the {m.task!r} and {first.task!r} models have different backbone "
                "weights (fine-tuned separately); run them separately"
            )
        parts[m.task] = m
    heads = MultiTaskHeads.from_parts({t: m.heads for t, m in parts.items()})
    config = copy.deepcopy(first.config)
    config["task"] = "multitask"
    config["heads"] = {**first.config["heads"], "tasks": list(parts)}
    config["heads"].pop("out_channels", None)
    # parts with other head widths than the first: recorded, so the config rebuilds them
    widths = {t: list(m.config["heads"]["filters"]) for t, m in parts.items()}
    other = {t: f for t, f in widths.items() if f != list(first.config["heads"]["filters"])}
    if other:
        config["heads"]["task_filters"] = other
    config["part_classes"] = {
        t: list(m.class_names or ()) for t, m in parts.items() if t in ("semantic", "lamella")
    }
    sem = parts.get("semantic")
    return CryoSiamModel(
        "multitask",
        first.backbone,
        heads,
        config=config,
        patch_size=first.patch_size,
        voxel_size=first.voxel_size,
        class_names=None if sem is None else sem.class_names,
        metadata={"combined_from": [m.task for m in models]},
    ).eval()
