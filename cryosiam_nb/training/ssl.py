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

from cryosiam_nb import models
from cryosiam_nb.io import InputError
from cryosiam_nb.models import losses
from cryosiam_nb.segmentation.subtomograms import MASKINGS, extract_subtomograms
from cryosiam_nb.transforms import ssl_view_transform, subtomo_view_transform

from ._run import Run, run_metadata, split_train_val
from .data import CropPairDataset, SubtomoPairDataset, Tomogram, as_tomograms
from .loop import seed_all, split_terms

__all__ = [
    "pretrain_dense",
    "pretrain_subtomo",
    "refine_contrastive",
    "subtomograms_from_tomograms",
    "dense_ssl_loss",
]


#: the self-supervised recipe (SPEC §2): SGD with momentum, linear warm-up then cosine decay
_SSL_OPTIMISER = {"optimizer": "sgd", "schedule": "cosine"}


def dense_ssl_loss(
    out1: dict[str, torch.Tensor],
    out2: dict[str, torch.Tensor],
    box1: torch.Tensor,
    box2: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DenseSimSiam loss L_global + L_dense + L_level over the two views' overlap.

    Parameters
    ----------
    out1, out2
        ``model.ssl_forward(view_1, view_2)`` of a dense_ssl model.
    box1, box2
        ``(N, 3, 2)`` crop boxes ``[[z0, z1], [y0, y1], [x0, x1]]`` in region coordinates
        (voxels, end exclusive).

    Returns
    -------
    loss : torch.Tensor
        The scalar to back-propagate
        (:func:`cryosiam_nb.models.losses.dense_simsiam_loss`).
    terms : dict of str to float
        The individual terms, for the training history.
    """
    return split_terms(losses.dense_simsiam_loss(out1, out2, box1, box2))


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
    seed_all(seed)
    tomos = as_tomograms(data, image=image)
    train_t, val_t = split_train_val(tomos, val_fraction, seed)
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
    metadata = run_metadata(tomos, train_t, val_t, image)
    metadata["patch_size"] = list(crop)
    metadata["training"] = {
        "kind": "dense_ssl",
        "epochs": epochs,
        "batch_size": batch_size,
        "samples_per_epoch": samples_per_epoch,
        "region_size": list(region),
        "crop_size": list(crop),
        "mask_fraction": None if mask_fraction is None else list(mask_fraction),
        "lr": lr,
        "seed": seed,
    }
    history = Run(out, resume, device, seed, progress).fit(
        model,
        loader,
        _dense_step,
        metadata,
        epochs=epochs,
        lr=lr,
        warmup_epochs=warmup_epochs,
        **_SSL_OPTIMISER,
        weight_decay=weight_decay,
        val_fn=val_fn,
        desc="dense SSL",
    )
    return model, history


def _tuple3(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise InputError(f"expected an int or 3 ints (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


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
    *,
    masking: str = "strict",
    grow: int = 2,
    min_voxels: int = 1,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Cubes centred on every particle of the training tomograms, from each ``image``.

    The boxes come from :func:`cryosiam_nb.segmentation.subtomograms.extract_subtomograms`
    — the extractor ``tl.extract_subtomograms`` uses for ``tl.embed`` — with the same
    rounding (centres rounded half up) and masking, so a subtomogram model is trained on
    the boxes it embeds later.

    Parameters
    ----------
    tomograms
        Training tomograms with a ``particles`` table: centres ``z, y, x`` in voxels and
        the instance label in ``particle_id`` (or ``id``, as the simulator writes it).
    box
        Side of the cubes in voxels.
    masking
        ``"strict"`` (default), ``"convex_hull"`` or ``"none"``; the first two need an
        ``instances`` label volume (see ``extract_subtomograms``).
    grow
        Dilation in voxels of the ``"strict"`` mask.
    min_voxels
        Particles with fewer voxels (``n_voxels`` column) are skipped.

    Returns
    -------
    subtomograms : numpy.ndarray
        ``(N, box, box, box)`` float32.
    table : pandas.DataFrame
        Aligned with the cubes: ``tomogram``, ``id`` and, where known, ``species`` and
        ``size_category``.
    """
    if masking not in MASKINGS:
        raise InputError(f"masking={masking!r}: expected one of {MASKINGS}")
    cubes, rows = [], []
    for t in tomograms:
        p = t.particles
        if p is None or len(p) == 0:
            continue
        p = getattr(p, "obs", p)
        if "n_voxels" in p:
            p = p[p["n_voxels"] >= min_voxels]
        inst = t.labels.get("instances") if masking != "none" else None
        if masking != "none" and inst is None:
            raise InputError(
                f"tomogram {t.name!r}: masking={masking!r} needs an 'instances' volume"
            )
        id_col = "particle_id" if "particle_id" in p else "id" if "id" in p else None
        ids = p[id_col].to_numpy() if id_col else np.arange(len(p))
        table = pd.DataFrame(
            {"particle_id": ids, **{c: p[c].to_numpy(float) for c in ("z", "y", "x")}}
        )
        if masking != "none" and id_col is None:
            raise InputError(
                f"tomogram {t.name!r}: masking={masking!r} needs particle ids "
                "('particle_id' or 'id' column)"
            )
        cubes.append(
            extract_subtomograms(
                t.image,
                table,
                box=box,
                instances=inst,
                masking=masking,
                grow=grow,
                progress=False,
            )
        )
        meta = pd.DataFrame({"tomogram": t.name, "id": ids})
        for col in ("species", "size_category"):
            if col in p:
                meta[col] = p[col].to_numpy()
        rows.append(meta)
    if not cubes:
        raise InputError("no particles found in the training tomograms (need a particles table)")
    return np.concatenate(cubes), pd.concat(rows, ignore_index=True)


def _simsiam_step(model, batch, dev):
    o1, o2 = model.ssl_forward(batch["view_1"], batch["view_2"])
    return losses.simsiam_loss(o1, o2), {}


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
    masking: str = "strict",
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

    Views: uniform random rotation, translation ≤ ``max_translation`` voxels, crop
    removing ≤ 20 %, one intensity transform.

    Parameters
    ----------
    data
        Training tomograms with particle tables (see :func:`~.data.as_tomograms`; boxes
        cut by :func:`subtomograms_from_tomograms`, the extractor ``tl.embed`` is fed
        by), or an array of subtomograms ``(N, B, B, B)`` in [0, 1].
    preset
        Model preset when ``model`` is not given.
    box
        Side of the subtomograms in voxels (default: the preset's patch).
    epochs, batch_size, samples_per_epoch, lr, warmup_epochs
        Optimisation (SGD with momentum; ``samples_per_epoch`` default: all boxes).
    image
        Which volume of a simulation is cut (``"clean"`` or ``"noisy"``).
    masking
        ``"strict"``, ``"convex_hull"`` or ``"none"`` (see
        :func:`cryosiam_nb.segmentation.subtomograms.extract_subtomograms`).
    max_translation
        Largest view shift in voxels (default min(10, box / 4)).
    val_fraction
        Fraction of whole tomograms (or boxes, for an array) held out.
    seed
        Seeds the split, the model and every view.
    out, resume
        Checkpoint path (written every epoch) and whether to continue from it.
    model
        An existing subtomo_ssl model to train further.
    device
        Default: cuda → mps → cpu.
    progress
        Show progress bars.
    **overrides
        Passed to :func:`cryosiam_nb.models.build`.

    Returns
    -------
    model
        The trained model; ``model.embed(x)`` gives L2-normalised embeddings.
    history : pandas.DataFrame
        One row per epoch (loss, lr, validation loss).
    """
    seed_all(seed)
    if model is None:
        if box is not None:
            overrides.setdefault("patch_size", (box, box, box))
        model = models.build("subtomo_ssl", preset, **overrides)
    box = int(model.patch_size[0])
    metadata: dict[str, Any]
    if isinstance(data, np.ndarray):
        sub = data
        metadata = {
            "voxel_size": None,
            "data_summary": {"n_subtomograms": len(sub), "source": "array"},
        }
        train_idx, val_idx = _split_indices(len(sub), val_fraction, seed)
    else:
        tomos = as_tomograms(data, image=image)
        train_t, val_t = split_train_val(tomos, val_fraction, seed)
        sub, meta = subtomograms_from_tomograms(tomos, box, masking=masking)
        tv = meta["tomogram"].isin([t.name for t in val_t]).to_numpy()
        train_idx, val_idx = np.flatnonzero(~tv), np.flatnonzero(tv)
        metadata = run_metadata(tomos, train_t, val_t, image)
        metadata["data_summary"].update(n_subtomograms=int(len(sub)), masking=masking)
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
    metadata["patch_size"] = [box] * 3
    metadata["training"] = {
        "kind": "subtomo_ssl",
        "epochs": epochs,
        "batch_size": batch_size,
        "samples_per_epoch": samples_per_epoch,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
        "image": None if isinstance(data, np.ndarray) else image,
        "masking": masking,
        "max_translation": shift,
        "seed": seed,
    }
    history = Run(out, resume, device, seed, progress).fit(
        model,
        loader,
        _simsiam_step,
        metadata,
        epochs=epochs,
        lr=lr,
        warmup_epochs=warmup_epochs,
        **_SSL_OPTIMISER,
        val_fn=val_fn,
        desc="subtomo SSL",
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
        return losses.contrastive_loss(e1, e2, batch["y"], margin=margin), {}

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
    history = Run(out, resume, device, seed, progress).fit(
        model,
        loader,
        _contrastive_step(margin),
        {"training": {"kind": "contrastive", "epochs": epochs, "margin": margin}},
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        schedule="onecycle",
        desc="contrastive",
    )
    return model, history
