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

from cryosiam_nb import models
from cryosiam_nb.io import InputError
from cryosiam_nb.models import losses
from cryosiam_nb.models.targets import instance_targets
from cryosiam_nb.transforms import finetune_geometric_transform

from ._run import Run, run_metadata, split_train_val
from .data import PatchDataset, Tomogram, as_tomograms
from .loop import seed_all, split_terms

__all__ = ["finetune", "evaluate", "TASK_TARGETS", "task_loss"]

#: training-target volume of each task
TASK_TARGETS = {
    "denoise": "clean",
    "semantic": "semantic",
    "lamella": "lamella",
    "instance": "instances",
}
_FOREGROUND = {"semantic": "semantic", "instance": "instances", "lamella": None, "denoise": None}


def task_loss(
    task: str,
    out: dict[str, torch.Tensor],
    target: torch.Tensor,
    denoise_loss: str = "l1_ssim",
    class_weights: Sequence[float] | None = None,
    small_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of a head task for a batch (:mod:`cryosiam_nb.models.losses`).

    Parameters
    ----------
    task
        ``"denoise"``, ``"semantic"``, ``"lamella"`` or ``"instance"``.
    out
        Raw head outputs of the model for the batch.
    target
        ``(N, 1, Z, Y, X)``: the clean volume (denoise), class labels (semantic /
        lamella) or instance labels (instance; targets made by
        :func:`cryosiam_nb.models.targets.instance_targets`).
    denoise_loss
        ``"l1_ssim"`` (L1 + SSIM) or ``"mse"``.
    class_weights
        Semantic / lamella: CE weight of each class (default unweighted).
    small_weight
        Instance: weight of the foreground and distance terms on instances under 150
        voxels (:class:`~cryosiam_nb.models.losses.InstanceLoss`); default 1 (unweighted).

    Returns
    -------
    loss : torch.Tensor
        Scalar to back-propagate: denoise L1 + SSIM (or MSE); semantic and lamella CE +
        generalised Dice + MSE on tanh(distance) vs clipped signed distances; instance
        BCE(foreground) + BCE(boundary) + MSE(distance).
    terms : dict of str to float
        The individual terms.
    """
    if task == "denoise":
        res = losses.DenoiseLoss(denoise_loss)(out["denoised"], target)
    elif task in ("semantic", "lamella"):
        res = losses.SemanticLoss(out["logits"].shape[1], class_weights=class_weights)(out, target)
    elif task == "instance":
        res = losses.InstanceLoss(small_weight=small_weight)(out, instances=target)
    else:
        raise InputError(f"task={task!r}: expected one of {sorted(TASK_TARGETS)}")
    return split_terms(res)


def _step(task: str, denoise_loss: str):
    key = TASK_TARGETS[task]

    def step(model, batch, dev):
        return task_loss(task, model(batch["image"]), batch[key], denoise_loss)

    return step


def evaluate(
    model: Any,
    tomograms: Sequence[Tomogram],
    task: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Validation metrics of a head model on whole tomograms (means over tomograms).

    The outputs come from :func:`cryosiam_nb.tl.predict` with its defaults (the model's
    patch, overlap and Gaussian blending), so validation measures what inference gives.

    Parameters
    ----------
    model
        A head model (task denoise, semantic, lamella or instance).
    tomograms
        Validation tomograms with the task's target volume in ``labels``.
    task
        Default ``model.task``.
    device
        Where to run the model; default the device its parameters are on.

    Returns
    -------
    dict of str to float
        denoise: ``psnr``, ``ssim``, ``psnr_input`` (the noisy input itself, for
        reference); semantic / lamella: ``dice_<class>`` and ``dice_mean`` (over classes
        present); instance: ``dice_foreground``, ``dice_boundary`` (probability > 0.5
        against :func:`cryosiam_nb.models.targets.instance_targets`).
    """
    from cryosiam_nb import metrics
    from cryosiam_nb.inference import predict

    task = task or model.task
    dev = device if device is not None else next(model.parameters()).device
    rows: list[dict[str, float]] = []
    for t in tomograms:
        out = predict(t.image, model, device=str(dev)).compute()
        r: dict[str, float] = {}
        if task == "denoise":
            ref = t.labels["clean"]
            den = out["denoised"].values
            r["psnr"] = metrics.psnr(den, ref, data_range=1.0)
            r["ssim"] = metrics.ssim(den, ref, data_range=1.0)
            r["psnr_input"] = metrics.psnr(t.image, ref, data_range=1.0)
        elif task in ("semantic", "lamella"):
            pred = out["labels"].values.astype(np.int64)
            names = model.class_names or tuple(str(i) for i in range(out["probabilities"].shape[0]))
            classes = dict(enumerate(names))
            d = metrics.dice(pred, t.labels[TASK_TARGETS[task]].astype(np.int64), classes=classes)
            r.update({f"dice_{k}": float(v) for k, v in d.items()})
        elif task == "instance":
            tg = instance_targets(t.labels["instances"].astype(np.int64))
            for key in ("foreground", "boundary"):
                pred = (out[key].values > 0.5).astype(np.int64)
                ref = tg[key][0].astype(np.int64)
                r[f"dice_{key}"] = metrics.dice(pred, ref, classes=[1])["mean"]
        rows.append(r)
    df = pd.DataFrame(rows)
    return {
        k: float(np.nanmean(df[k].to_numpy(float))) if df[k].notna().any() else float("nan")
        for k in df.columns
    }


def _load_backbone(backbone: Any) -> Any:
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
    train_t, val_t = split_train_val(tomos, val_fraction, seed)
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
    metadata = run_metadata(tomos, train_t, val_t, image)
    metadata["patch_size"] = list(psize)
    metadata["training"] = {
        "kind": "finetune",
        "task": task,
        "freeze": freeze,
        "epochs": epochs,
        "batch_size": batch_size,
        "samples_per_epoch": samples_per_epoch,
        "lr": lr,
        "seed": seed,
        "backbone": str(backbone) if isinstance(backbone, (str, Path)) else None,
    }
    history = Run(out, resume, device, seed, progress).fit(
        model,
        loader,
        _step(task, denoise_loss),
        metadata,
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        schedule="onecycle",
        val_fn=val_fn,
        val_every=val_every,
        desc=f"finetune {task}",
    )
    final = {c[4:]: float(history[c].iloc[-1]) for c in history.columns if c.startswith("val_")}
    model.metadata.update(metadata)
    model.metadata["metrics"] = final
    if out is not None:
        models.save(model, out, **metadata, metrics=final)
    return model, history
