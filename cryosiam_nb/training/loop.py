"""Generic training loop: optimiser + schedule, AMP on CUDA, resume, progress, loss curves.

* SSL (``optimizer="sgd"``): SGD momentum 0.9, weight decay 1e-5, linear warm-up then
  cosine decay (SPEC §2 training recipe).
* Heads (``optimizer="adamw"``): AdamW with a one-cycle schedule.

The loop calls ``step_fn(model, batch, device) -> (loss, logs)`` for every batch and
``val_fn(model, device) -> dict`` after every ``val_every`` epochs. With ``out`` set it
writes, atomically, after every epoch:

* ``out`` — the model checkpoint (``cryosiam_nb.models.save``),
* ``<out>.state.pt`` — optimiser, scheduler, epoch, step and history, for ``resume=True``,
* ``<out>.history.csv`` — one row per epoch (loss, lr, validation metrics), and
  ``<out>.history.png`` (:func:`cryosiam_nb.pl.loss_curves`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cryosiam_nb.device import autocast, pick_device
from cryosiam_nb.io import InputError, atomic_path

__all__ = [
    "fit",
    "make_optimizer",
    "make_scheduler",
    "state_path",
    "history_path",
    "seed_all",
    "split_terms",
]

StepFn = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, dict[str, float]]]


def split_terms(res: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """A loss dict of :mod:`cryosiam_nb.models.losses` → what a training step returns.

    Parameters
    ----------
    res
        ``{"loss": scalar tensor, <term>: scalar tensor, ...}``.

    Returns
    -------
    loss : torch.Tensor
        ``res["loss"]``, to back-propagate.
    terms : dict of str to float
        The other terms as floats (detached), for the training history.
    """
    return res["loss"], {k: float(v.detach()) for k, v in res.items() if k != "loss"}


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator."""
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) & 0xFFFFFFFF)


def state_path(out: str | Path) -> Path:
    """Path of the resumable training state that goes with checkpoint ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pt")


def history_path(out: str | Path) -> Path:
    """Path of the per-epoch loss/metric CSV that goes with checkpoint ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".history.csv")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    optimizer: str,
    lr: float,
    weight_decay: float | None = None,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum, wd 1e-5 default) or ``"adamw"`` (wd 1e-2 default)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("nothing to train: every parameter is frozen")
    if optimizer == "sgd":
        wd = 1e-5 if weight_decay is None else weight_decay
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    if optimizer == "adamw":
        wd = 1e-2 if weight_decay is None else weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise InputError(f"optimizer={optimizer!r}: expected 'sgd' or 'adamw'")


def make_scheduler(
    opt: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    max_lr: float | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``"cosine"``: linear warm-up over ``warmup_steps`` then cosine to 0;
    ``"onecycle"``: :class:`torch.optim.lr_scheduler.OneCycleLR`; ``"constant"``."""
    total_steps = max(1, int(total_steps))
    if schedule == "cosine":
        warm = max(0, min(int(warmup_steps), total_steps - 1))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            t = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if schedule == "onecycle":
        lr = max_lr if max_lr is not None else opt.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total_steps + 1, pct_start=0.3
        )
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise InputError(f"schedule={schedule!r}: expected 'cosine', 'onecycle' or 'constant'")


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _save_history(history: pd.DataFrame, out: Path) -> None:
    csv = history_path(out)
    with atomic_path(csv) as tmp:
        history.to_csv(tmp, index=False)
    from cryosiam_nb.pl import loss_curves

    try:
        png = csv.with_suffix(".png")
        fig = loss_curves(history)
        if hasattr(fig, "savefig"):
            with atomic_path(png) as tmp:
                fig.savefig(tmp, format="png", dpi=80)
            import matplotlib.pyplot as plt

            plt.close(fig)
    except Exception as err:  # noqa: BLE001 - a plot must never stop training
        warnings.warn(f"could not draw loss curves: {err}", stacklevel=2)


def _default_save(model: nn.Module, path: Path) -> None:
    from cryosiam_nb import models

    models.save(model, path)


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    step_fn: StepFn,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    warmup_epochs: int = 0,
    weight_decay: float | None = None,
    val_fn: Callable[[nn.Module, torch.device], dict[str, float]] | None = None,
    val_every: int = 1,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    grad_clip: float | None = 5.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    save_fn: Callable[[nn.Module, Path], None] | None = None,
) -> pd.DataFrame:
    """Train ``model`` in place for ``epochs`` epochs; return the per-epoch history.

    ``loader`` is re-iterated every epoch; if its dataset has ``set_epoch`` it is called
    first. ``resume=True`` continues from ``<out>.state.pt`` (weights, optimiser, schedule),
    counting epochs and optimiser steps from where it stopped; ``epochs`` is the total.
    The device is chosen cuda → mps → cpu unless given; AMP (float16) runs on CUDA only.
    Returns a DataFrame with columns ``epoch, step, loss, lr, seconds`` plus the means of
    ``logs`` from ``step_fn`` and the validation metrics (``val_*``).
    """
    from tqdm.auto import tqdm

    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    dev = pick_device(device)
    seed_all(seed)
    model.to(dev)
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 1
    if steps_per_epoch < 1:
        raise InputError("the training data loader is empty")
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = make_scheduler(
        opt, schedule, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, max_lr=lr
    )
    use_amp = dev.type == "cuda" if amp is None else bool(amp and dev.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    records: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    outp = Path(out) if out is not None else None
    save = save_fn or _default_save

    if resume:
        if outp is None:
            raise InputError("resume=True needs out=<checkpoint path>")
        sp = state_path(outp)
        if not sp.exists():
            raise InputError(f"{sp}: no training state to resume from")
        st = torch.load(sp, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        # the schedule follows the (possibly longer) total requested now: replay its steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(int(st["step"])):
                sched.step()
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, step = int(st["epoch"]), int(st["step"])
        records = list(st["history"])
        torch.set_rng_state(st["torch_rng"])

    for epoch in range(start_epoch, epochs):
        ds = getattr(loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            batch = _to_device(batch, dev)
            opt.zero_grad(set_to_none=True)
            with autocast(dev, enabled=use_amp):
                loss, logs = step_fn(model, batch, dev)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], grad_clip
                )
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            n += 1
            lv = float(loss.detach())
            sums["loss"] = sums.get("loss", 0.0) + lv
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{lv:.4f}")
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        rec.update({k: v / max(n, 1) for k, v in sums.items()})
        rec["lr"] = float(opt.param_groups[0]["lr"])
        if val_fn is not None and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
            model.eval()
            with torch.no_grad():
                metrics = val_fn(model, dev)
            rec.update(
                {f"val_{k}" if not k.startswith("val_") else k: v for k, v in metrics.items()}
            )
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        if outp is not None:
            save(model, outp)
            with atomic_path(state_path(outp)) as tmp:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if use_amp else None,
                        "epoch": epoch + 1,
                        "step": step,
                        "history": records,
                        "torch_rng": torch.get_rng_state(),
                    },
                    tmp,
                )
            _save_history(pd.DataFrame(records), outp)
    model.eval()
    return pd.DataFrame(records)
