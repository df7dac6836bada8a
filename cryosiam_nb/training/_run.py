"""What the trainers share: the per-tomogram train/validation split, the checkpoint
metadata (training voxel size, patch, data summary, settings) and the call of
:func:`~cryosiam_nb.training.loop.fit` that writes it with every checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from cryosiam_nb import models

from .data import Tomogram, split_tomograms
from .loop import StepFn, fit

__all__ = ["Run", "split_train_val", "run_metadata", "saver"]


def split_train_val(
    tomos: Sequence[Tomogram], val_fraction: float, seed: int
) -> tuple[list[Tomogram], list[Tomogram]]:
    """Training and validation tomograms (per-tomogram split, :func:`split_tomograms`)."""
    train_names, val_names = split_tomograms([t.name for t in tomos], val_fraction, seed)
    by_name = {t.name: t for t in tomos}
    return [by_name[n] for n in train_names], [by_name[n] for n in val_names]


def _voxel_size(tomos: Sequence[Tomogram]) -> float | None:
    vs = {t.voxel_size for t in tomos if t.voxel_size}
    return float(next(iter(vs))) if len(vs) == 1 else None


def run_metadata(
    tomos: Sequence[Tomogram],
    train: Sequence[Tomogram],
    val: Sequence[Tomogram],
    image: str,
) -> dict[str, Any]:
    """Checkpoint metadata of a run on ``tomos``.

    Parameters
    ----------
    tomos
        All tomograms of the run.
    train, val
        Its training and validation tomograms.
    image
        Which volume was the network input (``"clean"`` or ``"noisy"`` for simulations).

    Returns
    -------
    dict
        ``voxel_size`` (Å, None unless every tomogram with one has the same) and
        ``data_summary`` (tomogram count, split, input, shapes (z, y, x) and normalisation).
    """
    shapes = sorted({tuple(int(s) for s in t.image.shape) for t in tomos})
    return {
        "voxel_size": _voxel_size(tomos),
        "data_summary": {
            "n_tomograms": len(tomos),
            "train": [t.name for t in train],
            "val": [t.name for t in val],
            "input": image,
            "shapes": [list(s) for s in shapes],
            "normalisation": "clip 0.1/99.9 percentiles, scale to [0, 1]",
        },
    }


def saver(metadata: dict[str, Any]) -> Callable[[nn.Module, Path], None]:
    """``save_fn`` for :func:`fit`: ``cryosiam_nb.models.save(model, path, **metadata)``."""

    metadata = dict(metadata)

    def save(model: nn.Module, path: Path) -> None:
        models.save(model, path, **metadata)

    return save


@dataclass(frozen=True)
class Run:
    """Where and how a trainer runs: checkpoint ``out`` (and ``resume`` from it), device,
    seed and progress bars — the arguments every trainer passes on to :func:`fit`."""

    out: str | Path | None
    resume: bool
    device: str | torch.device | None
    seed: int
    progress: bool

    def fit(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        step: StepFn,
        metadata: dict[str, Any],
        **options: Any,
    ) -> pd.DataFrame:
        """:func:`fit` with this run's settings; every checkpoint carries ``metadata``.

        ``options`` are the other keywords of :func:`fit` (epochs, lr, optimiser,
        schedule, validation, ``desc``). Returns the per-epoch history.
        """
        return fit(
            model,
            loader,
            step,
            out=self.out,
            resume=self.resume,
            device=self.device,
            seed=self.seed,
            progress=self.progress,
            save_fn=saver(metadata),
            **options,
        )
