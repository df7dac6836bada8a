"""Fine-tuning the task heads on a (pretrained) DenseSimSiam backbone (SPEC §2 heads).

Tasks and their training targets (volumes of the training tomograms):

* ``"denoise"`` — input ``noisy``, target ``clean``; loss L1 + SSIM (release) or MSE;
  validation PSNR / SSIM against ``clean`` (and the PSNR of the noisy input).
* ``"semantic"`` — ``semantic`` labels; CE + generalised Dice + distance MSE; Dice per class.
* ``"lamella"`` — ``lamella`` mask (2 classes); same loss; Dice of the sample class.
* ``"instance"`` — ``instances`` labels → foreground / boundary / signed distance targets;
  BCE + MSE + BCE; Dice of foreground and boundary.

Freeze modes: ``"encoder"`` (decoder, projector and heads train — thesis default),
``"backbone"`` (only the heads train) or ``"none"`` (everything trains).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cryosiam_nb.transforms import finetune_geometric_transform

from . import _losses
from .data import PatchDataset, Tomogram, as_tomograms, split_tomograms
from .loop import fit, seed_all
from .ssl import _data_summary, _saver, _voxel_size

try:
    from cryosiam_nb.io import InputError
except ImportError:  # pragma: no cover
    InputError = ValueError  # type: ignore[misc,assignment]

__all__ = ["finetune", "evaluate", "predict_volume", "TASK_TARGETS", "task_loss"]

#: training-target volume of each task
TASK_TARGETS = {
    "denoise": "clean",
    "semantic": "semantic",
    "lamella": "lamella",
    "instance": "instances",
}
_FOREGROUND = {"semantic": "semantic", "instance": "instances", "lamella": None, "denoise": None}


def _models():
    from cryosiam_nb import models

    return models


def task_loss(
    task: str, out: dict[str, torch.Tensor], target: torch.Tensor, denoise_loss: str = "l1_ssim"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of a head task for a batch (``target``: ``(N, 1, Z, Y, X)``).

    Uses :mod:`cryosiam_nb.training._losses`: denoise L1 + SSIM (or ``"mse"``); semantic and
    lamella CE + generalised Dice + MSE on tanh(distance) vs clipped signed distances;
    instance BCE(foreground) + MSE(distance) + BCE(boundary)."""
    L = _losses
    if task == "denoise":
        res = L.denoise_loss(out["denoised"], target, kind=denoise_loss)
    elif task in ("semantic", "lamella"):
        n = out["logits"].shape[1]
        res = L.semantic_loss(out, target, n_classes=n)
    elif task == "instance":
        res = L.instance_loss(out, target)
    else:
        raise InputError(f"task={task!r}: expected one of {sorted(TASK_TARGETS)}")
    if isinstance(res, tuple):
        loss, parts = res
        return loss, {k: float(v) for k, v in dict(parts).items()}
    return res, {}


def _step(task: str, denoise_loss: str):
    key = TASK_TARGETS[task]

    def step(model, batch, dev):
        return task_loss(task, model(batch["image"]), batch[key], denoise_loss)

    return step


@torch.no_grad()
def predict_volume(
    model: Any,
    volume: np.ndarray,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Whole-volume head outputs (un-activated, ``(C, Z, Y, X)`` numpy) of a small in-memory
    volume (z, y, x) by MONAI sliding-window inference with Gaussian blending. For large
    tomograms use ``cryosiam_nb.tl.predict`` (chunked, out of core) instead."""
    from monai.inferers import sliding_window_inference

    from cryosiam_nb.device import pick_device

    dev = pick_device(device) if device is not None else next(model.parameters()).device
    vol = np.asarray(volume, np.float32)
    roi = tuple(int(min(p, s)) for p, s in zip(patch_size or model.patch_size, vol.shape))
    x = torch.from_numpy(vol)[None, None].to(dev)
    was_training = model.training
    model.eval()
    res = sliding_window_inference(
        x, roi, sw_batch_size=2, predictor=model, overlap=overlap, mode="gaussian"
    )
    model.train(was_training)
    return {k: v[0].float().cpu().numpy() for k, v in res.items()}


def evaluate(
    model: Any,
    tomograms: Sequence[Tomogram],
    task: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Validation metrics of a head model on whole tomograms (means over tomograms).

    denoise: ``psnr``, ``ssim``, ``psnr_input`` (the noisy input itself, for reference);
    semantic / lamella: ``dice_<class>`` and ``dice_mean`` (over classes present);
    instance: ``dice_foreground``, ``dice_boundary``."""
    from cryosiam_nb import metrics

    task = task or model.task
    rows: list[dict[str, float]] = []
    for t in tomograms:
        out = predict_volume(model, t.image, device=device)
        r: dict[str, float] = {}
        if task == "denoise":
            ref = t.labels["clean"]
            den = out["denoised"][0]
            r["psnr"] = metrics.psnr(den, ref, data_range=1.0)
            r["ssim"] = metrics.ssim(den, ref, data_range=1.0)
            r["psnr_input"] = metrics.psnr(t.image, ref, data_range=1.0)
        elif task in ("semantic", "lamella"):
            pred = out["logits"].argmax(0).astype(np.int64)
            names = model.class_names or tuple(str(i) for i in range(out["logits"].shape[0]))
            classes = dict(enumerate(names))
            d = metrics.dice(pred, t.labels[TASK_TARGETS[task]].astype(np.int64), classes=classes)
            r.update({f"dice_{k}": float(v) for k, v in d.items()})
        elif task == "instance":
            tg = _losses.instance_targets(
                torch.from_numpy(t.labels["instances"].astype(np.int64))[None, None]
            )
            fg = (out["foreground"][0] > 0).astype(np.int64)
            bd = (out["boundary"][0] > 0).astype(np.int64)
            r["dice_foreground"] = metrics.dice(
                fg, tg["foreground"][0, 0].numpy().astype(np.int64), classes=[1]
            )["mean"]
            r["dice_boundary"] = metrics.dice(
                bd, tg["boundary"][0, 0].numpy().astype(np.int64), classes=[1]
            )["mean"]
        rows.append(r)
    df = pd.DataFrame(rows)
    return {
        k: float(np.nanmean(df[k].to_numpy(float))) if df[k].notna().any() else float("nan")
        for k in df.columns
    }


def _load_backbone(backbone: Any) -> Any:
    models = _models()
    if backbone is None:
        return None
    if isinstance(backbone, (str, Path)):
        return models.load(backbone)
    return backbone


def finetune(
    task: str,
    data: Any,
    backbone: Any = None,
    freeze: str = "encoder",
    preset: str = "tiny",
    epochs: int = 20,
    batch_size: int = 2,
    samples_per_epoch: int = 32,
    patch_size: int | Sequence[int] | None = None,
    lr: float = 1e-3,
    image: str = "noisy",
    augment: bool = True,
    foreground_fraction: float = 0.5,
    denoise_loss: str = "l1_ssim",
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    val_every: int = 5,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[Any, pd.DataFrame]:
    """Fine-tune the heads of ``task`` on a backbone (AdamW, one-cycle).

    Parameters
    ----------
    task
        ``"denoise"``, ``"semantic"``, ``"lamella"`` or ``"instance"``.
    data
        Training tomograms (``as_tomograms``): simulations / a simulator folder (input
        ``image``, default the noisy volume; targets from the other volumes), or user
        dicts ``{"image": "tomo.mrc", "semantic": "labels.mrc", "voxel_size": Å}``.
    backbone
        A pretrained model (or checkpoint path / shipped name such as
        ``"tiny-dense-ssl"``) whose ``backbone`` is copied; ``None`` trains from scratch.
    freeze
        ``"encoder"``, ``"backbone"`` or ``"none"``.
    patch_size
        Training patch in voxels (z, y, x); default the preset's.
    augment
        Random flips / 90° rotations / small affine, labels moved with nearest neighbour.
    val_fraction
        Fraction of whole tomograms held out (seeded split); metrics via :func:`evaluate`
        every ``val_every`` epochs and at the end.

    Returns ``(model, history)``; the model's ``metadata["metrics"]`` holds the final
    validation metrics.
    """
    if task not in TASK_TARGETS:
        raise InputError(f"task={task!r}: expected one of {sorted(TASK_TARGETS)}")
    if freeze not in ("encoder", "backbone", "none"):
        raise InputError(f"freeze={freeze!r}: expected 'encoder', 'backbone' or 'none'")
    models = _models()
    seed_all(seed)
    tomos = as_tomograms(data, image=image)
    key = TASK_TARGETS[task]
    for t in tomos:
        if key not in t.labels:
            raise InputError(
                f"tomogram {t.name!r}: task {task!r} needs a {key!r} volume, has {list(t.labels)}"
            )
    if task in ("semantic", "lamella") and class_names is None:
        n = int(max(int(t.labels[key].max()) for t in tomos)) + 1
        if task == "lamella":
            n = max(n, 2)
        default = models.presets.default_class_names(task, None)
        if default is not None and n <= len(default):
            class_names = default
        else:
            class_names = tuple(f"class_{i}" for i in range(n))
    kwargs = dict(overrides)
    if class_names is not None:
        kwargs["class_names"] = tuple(class_names)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    bb = _load_backbone(backbone)
    if bb is not None and "backbone" in getattr(bb, "config", {}):
        # the head model must match the pretrained backbone's architecture
        for k, v in bb.config["backbone"].items():
            kwargs.setdefault(k, v)
    model = models.build(task, preset, **kwargs)
    if bb is not None:
        missing = model.backbone.load_state_dict(bb.backbone.state_dict(), strict=True)
        del missing
    model.freeze(freeze)
    train_names, val_names = split_tomograms([t.name for t in tomos], val_fraction, seed)
    by_name = {t.name: t for t in tomos}
    train_t = [by_name[n] for n in train_names]
    val_t = [by_name[n] for n in val_names]
    psize = tuple(
        int(min(p, s))
        for p, s in zip(model.patch_size, np.min([t.image.shape for t in tomos], axis=0))
    )
    transform = None
    if augment:
        lab_keys = [key] if task != "denoise" else []
        img_keys = ["image", key] if task == "denoise" else ["image"]
        transform = finetune_geometric_transform(img_keys, lab_keys)
    ds = PatchDataset(
        train_t,
        psize,
        samples_per_epoch,
        keys=[key],
        transform=transform,
        seed=seed,
        foreground_key=_FOREGROUND[task],
        foreground_fraction=foreground_fraction,
    )
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=True)
    val_fn = (lambda m, dev: evaluate(m, val_t, task, dev)) if val_t else None
    metadata: dict[str, Any] = {
        "voxel_size": _voxel_size(tomos),
        "patch_size": list(psize),
        "data_summary": _data_summary(tomos, train_names, val_names, image),
        "training": {
            "kind": "finetune",
            "task": task,
            "freeze": freeze,
            "epochs": epochs,
            "batch_size": batch_size,
            "samples_per_epoch": samples_per_epoch,
            "lr": lr,
            "seed": seed,
            "backbone": str(backbone) if isinstance(backbone, (str, Path)) else None,
        },
    }
    history = fit(
        model,
        loader,
        _step(task, denoise_loss),
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        schedule="onecycle",
        val_fn=val_fn,
        val_every=val_every,
        out=out,
        resume=resume,
        device=device,
        seed=seed,
        progress=progress,
        desc=f"finetune {task}",
        save_fn=_final_saver(metadata),
    )
    final = {c[4:]: float(history[c].iloc[-1]) for c in history.columns if c.startswith("val_")}
    model.metadata.update(metadata)
    model.metadata["metrics"] = final
    if out is not None:
        models.save(model, out, **metadata, metrics=final)
    return model, history


def _final_saver(metadata: dict[str, Any]):
    return _saver(**metadata)
