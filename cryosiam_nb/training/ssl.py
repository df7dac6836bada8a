"""Self-supervised pretraining: DenseSimSiam (voxel level), SimSiam (subtomograms), and
contrastive refinement of subtomogram embeddings (SPEC §2, thesis §3.4).

>>> from cryosiam_nb import sim, training
>>> sims = [sim.simulate((64, 96, 96), seed=s, mode="fast") for s in range(4)]
>>> model, history = training.pretrain_dense(sims, preset="tiny", epochs=10, seed=0,
...                                           out="dense.pt")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cryosiam_nb.transforms import ssl_view_transform, subtomo_view_transform

from . import _losses
from .data import (
    CropPairDataset,
    SubtomoPairDataset,
    Tomogram,
    as_tomograms,
    extract_boxes,
    split_tomograms,
)
from .loop import fit, seed_all

try:
    from cryosiam_nb.io import InputError
except ImportError:  # pragma: no cover
    InputError = ValueError  # type: ignore[misc,assignment]

__all__ = [
    "pretrain_dense",
    "pretrain_subtomo",
    "refine_contrastive",
    "subtomograms_from_tomograms",
    "dense_ssl_loss",
]


def _models():
    from cryosiam_nb import models

    return models


def _data_summary(tomos: Sequence[Tomogram], train: Sequence[str], val: Sequence[str], image: str):
    shapes = sorted({tuple(int(s) for s in t.image.shape) for t in tomos})
    return {
        "n_tomograms": len(tomos),
        "train": list(train),
        "val": list(val),
        "input": image,
        "shapes": [list(s) for s in shapes],
        "normalisation": "clip 0.1/99.9 percentiles, scale to [0, 1]",
    }


def _voxel_size(tomos: Sequence[Tomogram]) -> float | None:
    vs = {t.voxel_size for t in tomos if t.voxel_size}
    return float(next(iter(vs))) if len(vs) == 1 else None


def dense_ssl_loss(
    out1: dict[str, torch.Tensor],
    out2: dict[str, torch.Tensor],
    box1: torch.Tensor,
    box2: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DenseSimSiam loss L_global + L_dense + L_level over the two views' overlap.

    ``box1``/``box2``: ``(N, 3, 2)`` crop boxes in region coordinates (voxels). Uses
    :func:`cryosiam_nb.training._losses.dense_simsiam_loss`."""
    return _losses.dense_simsiam_loss(out1, out2, box1, box2)


def _dense_step(model, batch, dev):
    o1, o2 = model.ssl_forward(batch["view_1"], batch["view_2"])
    return dense_ssl_loss(o1, o2, batch["box_1"], batch["box_2"])


def _loader(ds, batch_size: int, shuffle: bool, seed: int, workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers, drop_last=True
    )


def pretrain_dense(
    data: Any,
    preset: str = "tiny",
    epochs: int = 20,
    batch_size: int = 4,
    samples_per_epoch: int = 64,
    region_size: int | Sequence[int] | None = None,
    crop_size: int | Sequence[int] | None = None,
    min_overlap: float = 0.5,
    mask_fraction: Sequence[float] | None = (0.1, 0.5),
    lr: float = 0.05,
    warmup_epochs: int = 2,
    weight_decay: float = 1e-5,
    image: str = "clean",
    val_fraction: float = 0.1,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    model: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    **overrides: Any,
) -> tuple[Any, pd.DataFrame]:
    """DenseSimSiam self-supervised pretraining (SGD, warm-up + cosine).

    Parameters
    ----------
    data
        Training tomograms (see :func:`cryosiam_nb.training.data.as_tomograms`):
        simulations, a simulator dataset folder, or user volumes. The thesis trains on
        *clean* simulated tomograms (``image="clean"``).
    region_size, crop_size
        Voxels (z, y, x). Each sample is a random region; two crops of ``crop_size``
        overlapping by at least ``min_overlap`` per axis are its views. Defaults: crop =
        the preset patch size, region = 1.5 × crop (clipped to the smallest tomogram).
    mask_fraction
        Range of the fraction of voxels masked out independently in each view.
    lr
        Peak SGD learning rate (thesis: 0.5 with batch 10 on GPUs for 600 epochs).
    out
        Checkpoint path (``cryosiam_nb.models.save``); also ``<out>.state.pt`` for
        ``resume`` and ``<out>.history.csv``.
    model
        Continue from this dense model instead of building ``preset``.
    overrides
        Passed to ``cryosiam_nb.models.build("dense_ssl", preset, ...)``.

    Returns ``(model, history)``; the model's ``backbone`` is what heads fine-tune on.
    """
    models = _models()
    seed_all(seed)
    tomos = as_tomograms(data, image=image)
    train_names, val_names = split_tomograms([t.name for t in tomos], val_fraction, seed)
    by_name = {t.name: t for t in tomos}
    train_t = [by_name[n] for n in train_names]
    val_t = [by_name[n] for n in val_names]
    if model is None:
        model = models.build("dense_ssl", preset, **overrides)
    crop = tuple(model.patch_size) if crop_size is None else _tuple3(crop_size)
    min_shape = np.min([t.image.shape for t in tomos], axis=0)
    crop = tuple(int(min(c, s)) for c, s in zip(crop, min_shape))
    if region_size is None:
        region = tuple(int(min(round(1.5 * c), s)) for c, s in zip(crop, min_shape))
    else:
        region = _tuple3(region_size)
    view = ssl_view_transform("image", mask_fraction=mask_fraction)
    train_ds = CropPairDataset(
        train_t, region, crop, samples_per_epoch, view, min_overlap=min_overlap, seed=seed
    )
    loader = _loader(train_ds, batch_size, False, seed, num_workers)
    val_fn = None
    if val_t:
        val_ds = CropPairDataset(
            val_t,
            region,
            crop,
            max(batch_size, samples_per_epoch // 8),
            ssl_view_transform("image", mask_fraction=mask_fraction),
            min_overlap=min_overlap,
            seed=seed + 1,
        )
        val_fn = _val_loss_fn(val_ds, batch_size, _dense_step)
    history = fit(
        model,
        loader,
        _dense_step,
        epochs=epochs,
        lr=lr,
        optimizer="sgd",
        schedule="cosine",
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        val_fn=val_fn,
        out=out,
        resume=resume,
        device=device,
        seed=seed,
        progress=progress,
        desc="dense SSL",
        save_fn=_saver(
            voxel_size=_voxel_size(tomos),
            patch_size=list(crop),
            data_summary=_data_summary(tomos, train_names, val_names, image),
            training={
                "kind": "dense_ssl",
                "epochs": epochs,
                "batch_size": batch_size,
                "samples_per_epoch": samples_per_epoch,
                "region_size": list(region),
                "crop_size": list(crop),
                "mask_fraction": None if mask_fraction is None else list(mask_fraction),
                "lr": lr,
                "seed": seed,
            },
        ),
    )
    return model, history


def _tuple3(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise InputError(f"expected an int or 3 ints (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


def _saver(**metadata: Any):
    def save(model, path: Path) -> None:
        _models().save(model, path, **metadata)

    return save


def _val_loss_fn(val_ds, batch_size: int, step):
    def val(model, dev) -> dict[str, float]:
        val_ds.set_epoch(0)  # the same validation samples every time
        tot, n = 0.0, 0
        for batch in DataLoader(val_ds, batch_size=batch_size, shuffle=False):
            batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, _ = step(model, batch, dev)
            tot += float(loss) * len(batch["view_1"])
            n += len(batch["view_1"])
        return {"loss": tot / max(n, 1)}

    return val


# --------------------------------------------------------------------------- subtomograms
def subtomograms_from_tomograms(
    tomograms: Sequence[Tomogram],
    box: int,
    mask: str = "strict",
    grow: int = 2,
    min_voxels: int = 1,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Cubes ``(N, box, box, box)`` centred on every particle of simulated tomograms
    (their ``particles`` table, centres in voxels), from each tomogram's ``image``.

    ``mask="strict"`` zeroes voxels outside the particle's instance label (grown by
    ``grow`` voxels; needs an ``instances`` volume), ``"none"`` keeps the context.
    Returns the cubes and a table (tomogram, id, species, size_category) aligned with them."""
    if mask not in ("strict", "none"):
        raise InputError(f"mask={mask!r}: expected 'strict' or 'none'")
    cubes, rows = [], []
    for t in tomograms:
        p = t.particles
        if p is None or len(p) == 0:
            continue
        if "n_voxels" in p:
            p = p[p["n_voxels"] >= min_voxels]
        centres = p[["z", "y", "x"]].to_numpy(float)
        inst = t.labels.get("instances") if mask == "strict" else None
        if mask == "strict" and inst is None:
            raise InputError(f"tomogram {t.name!r}: mask='strict' needs an 'instances' volume")
        ids = p["id"].to_numpy() if "id" in p else None
        cubes.append(extract_boxes(t.image, centres, box, inst, ids, grow))
        meta = pd.DataFrame(
            {"tomogram": t.name, "id": ids if ids is not None else np.arange(len(p))}
        )
        for col in ("species", "size_category"):
            if col in p:
                meta[col] = p[col].to_numpy()
        rows.append(meta)
    if not cubes:
        raise InputError("no particles found in the training tomograms (need a particles table)")
    return np.concatenate(cubes), pd.concat(rows, ignore_index=True)


def _simsiam_step(model, batch, dev):
    o1, o2 = model.ssl_forward(batch["view_1"], batch["view_2"])
    return _losses.simsiam_loss(o1, o2), {}


def pretrain_subtomo(
    data: Any,
    preset: str = "tiny",
    box: int | None = None,
    epochs: int = 20,
    batch_size: int = 8,
    samples_per_epoch: int | None = None,
    lr: float = 0.05,
    warmup_epochs: int = 2,
    image: str = "clean",
    mask: str = "strict",
    max_translation: float | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    model: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[Any, pd.DataFrame]:
    """SimSiam pretraining on particle subtomograms (SGD, warm-up + cosine).

    ``data``: simulated tomograms with particle tables (see ``as_tomograms``), or an
    array of subtomograms ``(N, B, B, B)`` in [0, 1]. ``box`` in voxels (default: the
    preset's). Views: uniform random rotation, translation ≤ ``max_translation`` voxels
    (default min(10, box/4)), crop removing ≤ 20 %, one intensity transform.
    Returns ``(model, history)``; ``model.embed(x)`` gives L2-normalised embeddings."""
    models = _models()
    seed_all(seed)
    if model is None:
        if box is not None:
            overrides.setdefault("patch_size", (box, box, box))
        model = models.build("subtomo_ssl", preset, **overrides)
    box = int(model.patch_size[0])
    summary: dict[str, Any]
    vs = None
    if isinstance(data, np.ndarray):
        sub = data
        summary = {"n_subtomograms": len(sub), "source": "array"}
        train_idx, val_idx = _split_indices(len(sub), val_fraction, seed)
    else:
        tomos = as_tomograms(data, image=image)
        vs = _voxel_size(tomos)
        train_names, val_names = split_tomograms([t.name for t in tomos], val_fraction, seed)
        sub, meta = subtomograms_from_tomograms(tomos, box, mask=mask)
        tv = meta["tomogram"].isin(val_names).to_numpy()
        train_idx, val_idx = np.flatnonzero(~tv), np.flatnonzero(tv)
        summary = _data_summary(tomos, train_names, val_names, image)
        summary.update(n_subtomograms=int(len(sub)), mask=mask)
    if sub.ndim != 4 or sub.shape[1:] != (box, box, box):
        raise InputError(f"subtomograms must be (N, {box}, {box}, {box}), got {sub.shape}")
    shift = min(10.0, box / 4) if max_translation is None else float(max_translation)
    view = subtomo_view_transform(box, max_translation=shift)
    train_ds = SubtomoPairDataset(sub[train_idx], view, samples_per_epoch, seed=seed)
    loader = _loader(train_ds, min(batch_size, len(train_ds)), True, seed)
    val_fn = None
    if len(val_idx) >= 2:
        vds = SubtomoPairDataset(
            sub[val_idx], subtomo_view_transform(box, max_translation=shift), seed=seed + 1
        )
        val_fn = _val_loss_fn(vds, min(batch_size, len(vds)), _simsiam_step)
    history = fit(
        model,
        loader,
        _simsiam_step,
        epochs=epochs,
        lr=lr,
        optimizer="sgd",
        schedule="cosine",
        warmup_epochs=warmup_epochs,
        val_fn=val_fn,
        out=out,
        resume=resume,
        device=device,
        seed=seed,
        progress=progress,
        desc="subtomo SSL",
        save_fn=_saver(
            voxel_size=vs,
            patch_size=[box] * 3,
            data_summary=summary,
            training={
                "kind": "subtomo_ssl",
                "epochs": epochs,
                "batch_size": batch_size,
                "samples_per_epoch": samples_per_epoch,
                "lr": lr,
                "warmup_epochs": warmup_epochs,
                "image": image if summary.get("source") != "array" else None,
                "mask": mask,
                "max_translation": shift,
                "seed": seed,
            },
        ),
    )
    return model, history


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------- contrastive
class _ContrastivePairs(torch.utils.data.Dataset):
    """Pairs (i, j, y): y=1 same class; y=0 a different class of the same size category
    (hard negative; any other class when a category has one class only)."""

    def __init__(self, sub, labels, size_cat, n_pairs, view, seed):
        self.sub = np.asarray(sub, np.float32)
        self.labels = np.asarray(labels)
        self.cat = np.asarray(size_cat) if size_cat is not None else np.zeros(len(labels))
        self.n, self.view, self.seed, self.epoch = int(n_pairs), view, int(seed), 0

    def set_epoch(self, e: int) -> None:
        self.epoch = int(e)

    def __len__(self) -> int:
        return self.n

    def _pick(self, rng, mask, exclude=None):
        idx = np.flatnonzero(mask)
        if exclude is not None:
            idx = idx[idx != exclude]
        return int(rng.choice(idx)) if len(idx) else None

    def __getitem__(self, k):
        from .data import item_seed

        rng = np.random.default_rng(item_seed(self.seed, self.epoch, k))
        i = int(rng.integers(len(self.sub)))
        y = int(rng.random() < 0.5)
        j = None
        if y == 1:
            j = self._pick(rng, self.labels == self.labels[i], exclude=i)
        if j is None:
            y = 0
            j = self._pick(rng, (self.labels != self.labels[i]) & (self.cat == self.cat[i]))
            if j is None:
                j = self._pick(rng, self.labels != self.labels[i])
        if j is None:
            j, y = i, 1
        out = {"y": torch.tensor(float(y))}
        for n, idx in (("view_1", i), ("view_2", j)):
            x = torch.from_numpy(self.sub[idx][None].copy())
            self.view.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
            v = self.view({"image": x})["image"]
            out[n] = torch.as_tensor(v.as_tensor() if hasattr(v, "as_tensor") else v).float()
        return out


def _contrastive_step(margin: float):
    def step(model, batch, dev):
        e1 = model.embed(batch["view_1"])
        e2 = model.embed(batch["view_2"])
        return _losses.contrastive_loss(e1, e2, batch["y"], margin=margin), {}

    return step


def refine_contrastive(
    model: Any,
    subtomograms: np.ndarray,
    labels: Sequence[Any],
    size_categories: Sequence[Any] | None = None,
    epochs: int = 10,
    pairs_per_epoch: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    margin: float = 1.0,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[Any, pd.DataFrame]:
    """Contrastive refinement of a subtomogram SimSiam model (SPEC §2, eq. 17–18).

    Loss ``y·d² + (1−y)·max(0, margin − d)²`` on the Euclidean distance of L2-normalised
    embeddings; positives share a class, negatives are a *different class of the same
    size category* (hard negatives). ``subtomograms``: ``(N, B, B, B)``; ``labels``: N class
    names/ids; ``size_categories``: N size categories (optional). AdamW, one-cycle.
    Returns ``(model, history)``."""
    sub = np.asarray(subtomograms, np.float32)
    if len(labels) != len(sub):
        raise InputError(f"labels has {len(labels)} entries, subtomograms {len(sub)}")
    if size_categories is not None and len(size_categories) != len(sub):
        raise InputError(
            f"size_categories has {len(size_categories)} entries, subtomograms {len(sub)}"
        )
    if len(set(np.asarray(labels).tolist())) < 2:
        raise InputError("refine_contrastive needs at least two classes in labels")
    box = int(sub.shape[-1])
    view = subtomo_view_transform(box, max_translation=min(10.0, box / 4), intensity=False)
    ds = _ContrastivePairs(sub, labels, size_categories, pairs_per_epoch, view, seed)
    loader = _loader(ds, batch_size, False, seed)
    history = fit(
        model,
        loader,
        _contrastive_step(margin),
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        schedule="onecycle",
        out=out,
        resume=resume,
        device=device,
        seed=seed,
        progress=progress,
        desc="contrastive",
        save_fn=_saver(training={"kind": "contrastive", "epochs": epochs, "margin": margin}),
    )
    return model, history
