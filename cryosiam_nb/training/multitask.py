"""Joint training of the multi-task network: one backbone, every head task at once.

The thesis' shape (SPEC §2): one DenseSimSiam backbone whose dense voxel embedding feeds
the denoising, lamella, semantic (+ distance) and instance heads. Every training patch
carries the targets of all tasks (``clean``, ``lamella``, ``semantic``, ``instances``), so
one forward pass gives all losses and the loss is their weighted sum:

``L = w_denoise·(L1 + SSIM) + w_lamella·(CE + GDice + MSE) + w_semantic·(CE + GDice + MSE)
+ w_instance·(BCE + BCE + MSE)`` (terms as in :func:`cryosiam_nb.training.task_loss`).

Patches are sampled class-balanced (:class:`~cryosiam_nb.training.data.PatchDataset`
with ``balance=True``): a share of them is centred on a voxel of a class drawn uniformly
among the semantic classes present, so rare microtubules, actin and DNA are seen as often
as membranes.

:func:`varied_training_set` simulates the recipe's data: the three sample types, varied
thickness, defocus, dose, crowding and voxel size (8–14 Å), each rescaled to the
training voxel size (images linearly, labels by nearest neighbour, on the same grid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from cryosiam_nb import models
from cryosiam_nb.constants import HEAD_TASKS
from cryosiam_nb.io import InputError
from cryosiam_nb.transforms import finetune_geometric_transform

from ._run import Run, run_metadata, split_train_val
from .data import PatchDataset, Tomogram, as_tomograms
from .finetune import TASK_TARGETS, task_loss
from .loop import seed_all

__all__ = [
    "train_multitask",
    "multitask_loss",
    "evaluate_multitask",
    "varied_training_set",
    "tune_instance_defaults",
    "class_weights_of",
    "DEFAULT_WEIGHTS",
]

#: loss weight of each head task
DEFAULT_WEIGHTS: dict[str, float] = {
    "denoise": 1.0,
    "lamella": 1.0,
    "semantic": 1.0,
    "instance": 1.0,
}
_KEYS = tuple(TASK_TARGETS[t] for t in HEAD_TASKS)  # clean, lamella, semantic, instances


def multitask_loss(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
    denoise_loss: str = "l1_ssim",
    class_weights: Mapping[str, Sequence[float]] | None = None,
    small_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of every head task's loss for one batch.

    ``out`` holds the model's ``"<task>/<output>"`` maps; ``batch`` the targets under
    :data:`~cryosiam_nb.training.finetune.TASK_TARGETS` names; ``class_weights`` maps a
    classifying task (``"semantic"``, ``"lamella"``) to the CE weight of each class;
    ``small_weight`` up-weights instances under 150 voxels in the instance loss.
    Returns the loss and the per-task losses (``loss_<task>``) plus their terms
    (``<task>_<term>``) as floats.
    """
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    total = None
    logs: dict[str, float] = {}
    tasks = dict.fromkeys(k.split("/", 1)[0] for k in out)
    for t in tasks:
        if not w.get(t):
            continue
        sub = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(f"{t}/")}
        cw = (class_weights or {}).get(t)
        loss, terms = task_loss(t, sub, batch[TASK_TARGETS[t]], denoise_loss, cw, small_weight)
        total = w[t] * loss if total is None else total + w[t] * loss
        logs[f"loss_{t}"] = float(loss.detach())
        logs.update({f"{t}_{k}": v for k, v in terms.items()})
    if total is None:
        raise InputError("multitask_loss: every task weight is 0")
    return total, logs


def evaluate_multitask(
    model: Any,
    tomograms: Sequence[Tomogram],
    device: str | torch.device | None = None,
    instances: bool = True,
) -> dict[str, float]:
    """Validation metrics of every head from one :func:`cryosiam_nb.tl.predict` pass.

    Means over ``tomograms``: ``denoise_psnr``, ``denoise_ssim``; ``lamella_dice`` (sample
    class); ``semantic_dice_<class>`` and ``semantic_dice_mean`` (classes present);
    ``instance_dice_foreground``; with ``instances`` also ``instance_ap50`` and
    ``instance_f1`` (centroids within 4 voxels) after :func:`cryosiam_nb.tl.instances`
    with its defaults.
    """
    from cryosiam_nb import metrics
    from cryosiam_nb.inference import outputs_of, predict
    from cryosiam_nb.models.targets import instance_targets
    from cryosiam_nb.segmentation import instances as run_instances

    dev = device if device is not None else next(model.parameters()).device
    rows = []
    for t in tomograms:
        ds = predict(t.image, model, device=str(dev)).compute()
        r: dict[str, float] = {}
        ref = t.labels["clean"]
        r["denoise_psnr"] = metrics.psnr(ds["denoised"].values, ref, data_range=1.0)
        r["denoise_ssim"] = metrics.ssim(ds["denoised"].values, ref, data_range=1.0)
        lam = outputs_of(ds, "lamella")["labels"].values.astype(np.int64)
        r["lamella_dice"] = metrics.dice(lam, t.labels["lamella"].astype(np.int64), [1])["mean"]
        sem = outputs_of(ds, "semantic")
        names = [str(c) for c in sem.coords["class"].values]
        d = metrics.dice(
            sem["labels"].values.astype(np.int64),
            t.labels["semantic"].astype(np.int64),
            classes=dict(enumerate(names)),
        )
        r.update({f"semantic_dice_{k}": float(v) for k, v in d.items()})
        inst = outputs_of(ds, "instance")
        tg = instance_targets(t.labels["instances"].astype(np.int64))
        fg = (inst["foreground"].values > 0.5).astype(np.int64)
        r["instance_dice_foreground"] = metrics.dice(fg, tg["foreground"][0].astype(np.int64), [1])[
            "mean"
        ]
        if instances:
            lab = np.asarray(run_instances(inst, progress=False).values)
            gt = t.labels["instances"]
            r["instance_ap50"] = float(metrics.average_precision(lab, gt, [0.5])["AP50"])
            pc = np.array(ndimage.center_of_mass(lab > 0, lab, np.unique(lab[lab > 0])))
            tc = np.array(ndimage.center_of_mass(gt > 0, gt, np.unique(gt[gt > 0])))
            if len(pc) and len(tc):
                r["instance_f1"] = float(metrics.picking_scores(pc, tc, radius=4.0)["f1"])
        rows.append(r)
    df = pd.DataFrame(rows)
    return {k: float(np.nanmean(df[k].to_numpy(float))) for k in df.columns}


def _rescaled(arr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``arr`` resampled onto ``shape`` voxels over the same extent (grid-mode zoom)."""
    if tuple(arr.shape) == tuple(shape):
        return arr
    zoom = [s / a for s, a in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    return out.astype(arr.dtype, copy=False)


def varied_training_set(
    n: int,
    shape: Sequence[int],
    seed: int,
    voxel_size: float = 10.0,
    voxel_range: tuple[float, float] = (8.0, 14.0),
    samples: Sequence[str] = ("general", "general", "transcription", "chromatin"),
    structures: Mapping[str, Mapping[str, float]] | None = None,
    mode: str = "tilt",
    snr_range: tuple[float, float] | None = None,
    progress: bool = True,
) -> list[Tomogram]:
    """``n`` simulated tomograms with varied imaging and content, on one training grid.

    Tomogram ``i`` (seed ``seed + i``) uses sample ``samples[i % len(samples)]``, a voxel
    size drawn in ``voxel_range`` (Å), a sample thickness of 45–90 % of the volume height,
    defocus 2–5 µm, dose 60–140 e⁻/Å² (or, with ``snr_range``, a projection SNR drawn
    log-uniformly in it), crowding 0.15–0.35 and ``structures[sample]``
    extra structure counts. It is simulated on the grid covering the physical extent of
    ``shape`` voxels at ``voxel_size`` Å and rescaled to ``shape`` (images linear, labels
    nearest neighbour). Images are normalised like inference input (protein bright).
    """
    from tqdm.auto import tqdm

    from cryosiam_nb import sim

    from .data import _normalise

    out: list[Tomogram] = []
    shape = tuple(int(s) for s in shape)
    for i in tqdm(range(n), desc="simulate", disable=not progress):
        s_seed = int(seed) + i
        rng = np.random.default_rng([int(seed), i, 77])
        sample = samples[i % len(samples)]
        vs = float(rng.uniform(*voxel_range))
        sim_shape = tuple(max(16, int(round(s * voxel_size / vs))) for s in shape)
        dose = float(rng.uniform(60.0, 140.0))
        noise = {"dose": dose}
        if snr_range is not None:
            lo, hi = np.log(snr_range[0]), np.log(snr_range[1])
            noise = {"snr": float(np.exp(rng.uniform(lo, hi)))}
        height_nm = sim_shape[0] * vs / 10.0
        s = sim.simulate(
            sim_shape,
            voxel_size=vs,
            sample=sample,
            seed=s_seed,
            mode=mode,
            **noise,
            defocus_um=float(rng.uniform(2.0, 5.0)),
            thickness_nm=float(rng.uniform(0.45, 0.9) * height_nm),
            crowding=float(rng.uniform(0.15, 0.35)),
            structures=dict((structures or {}).get(sample, {})) or None,
            keep_tilt_series=False,
            progress=False,
        )
        v = s.volumes
        img = _normalise(_rescaled(np.asarray(v["noisy"].values, np.float32), shape, 1))
        labels = {
            "clean": _normalise(_rescaled(np.asarray(v["clean"].values, np.float32), shape, 1))
        }
        for k in ("semantic", "instances", "lamella"):
            labels[k] = _rescaled(np.asarray(v[k].values), shape, 0)
        t = Tomogram(
            f"sim_{s_seed}_{sample}_{vs:.1f}A", img, labels, float(voxel_size), s.particles
        )
        out.append(t)
    return out


def class_weights_of(
    tomograms: Sequence[Tomogram],
    n_classes: int,
    key: str = "semantic",
    power: float = 0.5,
    max_weight: float = 10.0,
) -> list[float]:
    """CE class weights from the label frequencies of ``tomograms[i].labels[key]``.

    ``w_c = (f_c / f_max) ** -power`` clipped to ``max_weight`` (the commonest class gets
    1); a class absent from every tomogram gets 1. Rare thin classes (microtubules, actin:
    under 1 % of the voxels) are otherwise drowned by background in the CE term.
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for t in tomograms:
        lab = np.asarray(t.labels[key])
        counts += np.bincount(lab[lab >= 0].ravel(), minlength=n_classes)[:n_classes]
    if counts.max() <= 0:
        raise InputError(f"class_weights_of: no {key!r} labels in the tomograms")
    f = counts / counts.max()
    w = np.ones(n_classes)
    present = f > 0
    w[present] = np.minimum(f[present] ** -float(power), float(max_weight))
    return [round(float(v), 4) for v in w]


def train_multitask(
    data: Any,
    backbone: Any = None,
    init: Any = None,
    preset: str = "tiny",
    epochs: int = 20,
    batch_size: int = 4,
    samples_per_epoch: int = 64,
    patch_size: int | Sequence[int] | None = None,
    lr: float = 3e-3,
    weights: Mapping[str, float] | None = None,
    foreground_fraction: float = 0.6,
    class_weights: str | Mapping[str, Sequence[float]] | None = None,
    small_weight: float = 1.0,
    freeze: str = "none",
    val_fraction: float = 0.15,
    val_every: int = 5,
    val_data: Any = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[Any, pd.DataFrame]:
    """Train the multi-task model (``models.build("multitask")``) on all heads jointly.

    Parameters
    ----------
    data
        Training tomograms with ``clean``, ``lamella``, ``semantic`` and ``instances``
        volumes (:func:`varied_training_set`, simulations, or ``as_tomograms`` input).
    backbone
        Optional pretrained model (or checkpoint / shipped name, e.g. ``"tiny-dense-ssl"``)
        whose backbone weights initialise the network.
    init
        Optional multi-task model (or checkpoint) whose weights — backbone and heads —
        initialise the network (a second training stage).
    weights
        Loss weight per head task (:data:`DEFAULT_WEIGHTS`); a head with weight 0 is frozen
        (its weights and BatchNorm statistics stay as they were).
    foreground_fraction
        Share of patches centred on a voxel of a class drawn uniformly among the semantic
        classes present (class balance); the rest are uniform.
    class_weights
        CE weight of each class per classifying task (``{"semantic": [...]}``), or
        ``"auto"``: semantic weights from the training labels (:func:`class_weights_of`);
        default unweighted.
    small_weight
        Instance loss weight (foreground and distance terms) on particles under 150 voxels
        and a 1-voxel shell around them (:func:`cryosiam_nb.models.targets.small_instance_weights`).
    val_data
        Validation tomograms; default a per-tomogram split of ``data`` (``val_fraction``).
    epochs, samples_per_epoch, batch_size, lr
        AdamW with a one-cycle schedule over ``epochs × samples_per_epoch / batch_size``
        steps; resumable from ``<out>.state.pt`` with ``resume=True``.

    Returns ``(model, history)``; ``model.metadata["metrics"]`` holds the final validation
    metrics of :func:`evaluate_multitask`.
    """
    seed_all(seed)
    tomos = as_tomograms(data, image="noisy")
    for t in tomos:
        missing = [k for k in _KEYS if k not in t.labels]
        if missing:
            raise InputError(f"tomogram {t.name!r}: multitask training needs {missing} volumes")
    if val_data is not None:
        train_t, val_t = tomos, as_tomograms(val_data, image="noisy")
    else:
        train_t, val_t = split_train_val(tomos, val_fraction, seed)
    kwargs = dict(overrides)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    bb = None
    if init is not None:
        bb = models.load(init) if isinstance(init, (str, Path)) else init
        for k, v in bb.config.get("backbone", {}).items():
            kwargs.setdefault(k, v)
        for k in ("filters", "kernel_size", "task_filters"):  # its head sizes too
            if k in bb.config.get("heads", {}):
                kwargs.setdefault(f"head_{k}", bb.config["heads"][k])
    elif backbone is not None:
        bb = models.load(backbone) if isinstance(backbone, (str, Path)) else backbone
        for k, v in bb.config.get("backbone", {}).items():
            kwargs.setdefault(k, v)
    kwargs.setdefault("voxel_size", train_t[0].voxel_size)
    model = models.build("multitask", preset, **kwargs)
    if init is not None:
        model.load_state_dict(bb.state_dict(), strict=True)
    elif bb is not None:
        model.backbone.load_state_dict(bb.backbone.state_dict(), strict=True)
    # heads with loss weight 0 are frozen: they run in every forward pass, and train mode
    # would otherwise move their BatchNorm statistics although nothing trains them
    w_all = {**DEFAULT_WEIGHTS, **(weights or {})}
    model.freeze(freeze, heads=[t for t in model.heads.tasks if not w_all.get(t)])
    smallest = np.min([t.image.shape for t in train_t], axis=0)
    psize = tuple(int(min(p, s)) for p, s in zip(model.patch_size, smallest))
    transform = finetune_geometric_transform(
        ["image", "clean"], ["lamella", "semantic", "instances"]
    )
    ds = PatchDataset(
        train_t,
        psize,
        samples_per_epoch,
        keys=list(_KEYS),
        transform=transform,
        seed=seed,
        foreground_key="semantic",
        foreground_fraction=foreground_fraction,
        balance=True,
    )
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=True)
    if class_weights == "auto":
        n_sem = len(model.part_classes["semantic"])
        cw: dict[str, list[float]] | None = {"semantic": class_weights_of(train_t, n_sem)}
    elif isinstance(class_weights, str):
        raise InputError(f"class_weights: 'auto', a mapping or None, got {class_weights!r}")
    else:
        cw = None if class_weights is None else {k: list(v) for k, v in class_weights.items()}
    val_fn = (lambda m, dev: evaluate_multitask(m, val_t, dev)) if val_t else None
    metadata = run_metadata(tomos + ([] if val_data is None else val_t), train_t, val_t, "noisy")
    metadata["patch_size"] = list(psize)
    metadata["training"] = {
        "kind": "multitask",
        "tasks": list(HEAD_TASKS),
        "loss_weights": {**DEFAULT_WEIGHTS, **(weights or {})},
        "epochs": epochs,
        "batch_size": batch_size,
        "samples_per_epoch": samples_per_epoch,
        "steps": epochs * (samples_per_epoch // batch_size),
        "lr": lr,
        "seed": seed,
        "freeze": freeze,
        "class_balanced": True,
        "foreground_fraction": foreground_fraction,
        "class_weights": cw,
        "small_weight": float(small_weight),
        "patch_size": list(psize),
        "backbone": str(backbone) if isinstance(backbone, (str, Path)) else None,
        "init": str(init) if isinstance(init, (str, Path)) else (None if init is None else "model"),
    }

    def step(m: Any, batch: dict[str, torch.Tensor], dev: torch.device):
        return multitask_loss(
            m(batch["image"]), batch, weights, class_weights=cw, small_weight=small_weight
        )

    history = Run(out, resume, device, seed, progress).fit(
        model,
        loader,
        step,
        metadata,
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        schedule="onecycle",
        val_fn=val_fn,
        val_every=val_every,
        desc="train multitask",
    )
    final = {c[4:]: float(history[c].iloc[-1]) for c in history.columns if c.startswith("val_")}
    model.metadata.update(metadata)
    model.metadata["metrics"] = final
    if out is not None:
        models.save(model, out, **metadata, metrics=final)
    return model, history


#: the instance post-processing settings :func:`tune_instance_defaults` tries
#: (``boundary_bias`` is not searched: the shipped model's boundary head stays near 0, so
#: multicut never splits on it and every bias ties; ``neck_distance`` gives the multicut
#: that evidence from the distance map instead: on validation tomograms 7201–7205 a neck
#: of 1 voxel raised the small-particle recall from 0.52 to 0.58 at the same AP-50;
#: ``average_edt`` gives small particles, whose predicted distance stays below the seed
#: threshold, a seed from their foreground blob; ``max_center_distance`` 2.5 and 4.5 tied
#: in every calibration, so it keeps ``tl.instances``' default)
INSTANCE_GRID: dict[str, tuple[Any, ...]] = {
    "threshold_foreground": (0.2, 0.3, 0.4, 0.5),
    "min_center_distance": (0.5, 1.0),
    "average_edt": (False, True),
    "neck_distance": (0.0, 1.0, 1.5, 2.0),
}


#: :func:`tune_instance_defaults` ranks settings whose small-particle F1 on the validation
#: tomograms is below this after those above it: the picking target (F1 ≥ 0.6) plus a
#: margin. The recipe tunes on :func:`~cryosiam_nb.training.multitask_recipe.calibration_set`
#: (default imaging, 96×192×192), where the chosen settings' small F1 predicted that on
#: validation tomograms 7201–7205 within 0.02 (stages 1–10: 0.682 vs 0.689; stages 1–6:
#: 0.656 vs 0.673), so 0.05 is the margin. (It was 0.7 while the pool also held the stages'
#: small varied-SNR tomograms, where small F1 read ~0.07 higher.)
SMALL_F1_FLOOR = 0.65


def tune_instance_defaults(
    model: Any,
    tomograms: Sequence[Tomogram],
    grid: Mapping[str, Sequence[float]] | None = None,
    small: int = 150,
    radius: float = 4.0,
    progress: bool = True,
    predictions: Sequence[Any] | None = None,
    min_f1_small: float | None = SMALL_F1_FLOOR,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Choose :func:`cryosiam_nb.tl.instances` settings on **validation** tomograms.

    Every combination of ``grid`` (default :data:`INSTANCE_GRID`) is scored by the mean of
    AP-50 and the picking F1 of particles under ``small`` voxels (centroids within
    ``radius`` voxels), averaged over ``tomograms`` (the F1 over those that have small
    particles); one ``tl.predict`` pass per tomogram.
    Settings whose small-particle F1 is below ``min_f1_small`` rank after every setting
    that reaches it (column ``f1_floor_met``; ``None`` ranks by the score alone), so a
    higher AP-50 cannot buy away small-particle picking.
    Returns the best settings and the whole table (one row per combination, best first).
    ``predictions``: the computed ``tl.predict`` Datasets of ``tomograms``, if already made.
    """
    import itertools

    from tqdm.auto import tqdm

    from cryosiam_nb import metrics
    from cryosiam_nb.inference import outputs_of, predict
    from cryosiam_nb.segmentation import instances as run_instances

    grid = dict(grid or INSTANCE_GRID)
    if predictions is None:
        predictions = [predict(t.image, model).compute() for t in tomograms]
    maps = [outputs_of(ds, "instance") for ds in predictions]
    names = list(grid)
    rows = []
    combos = list(itertools.product(*grid.values()))
    for combo in tqdm(combos, desc="tune instances", disable=not progress):
        kw = dict(zip(names, combo))
        scores = []
        for t, m in zip(tomograms, maps):
            lab = np.asarray(run_instances(m, progress=False, **kw).values)
            gt = t.labels["instances"]
            ap50 = float(metrics.average_precision(lab, gt, [0.5])["AP50"])
            pc = _centroids(lab)
            tc, size = _centroids(gt, sizes=True)
            keep = size < small
            # a tomogram without small particles (transcription, chromatin) has no small
            # F1: it is left out of the mean instead of counting as 0
            f1 = 0.0 if keep.any() else np.nan
            if len(pc) and keep.any():
                m_ = metrics.picking_scores(pc, tc, radius=radius)["matches"]
                tp = int(keep[m_[:, 1]].sum()) if len(m_) else 0
                fp = len(pc) - len(m_)
                prec, rec = tp / max(tp + fp, 1), tp / int(keep.sum())
                f1 = 2 * prec * rec / max(prec + rec, 1e-9)
            scores.append((ap50, f1))
        ap = float(np.mean([a for a, _ in scores]))
        f1s = [f for _, f in scores if np.isfinite(f)]
        f1 = float(np.mean(f1s)) if f1s else 0.0
        rows.append({**kw, "ap50": float(ap), "f1_small": float(f1), "score": float(ap + f1) / 2})
    import inspect

    defaults = {
        k: v.default for k, v in inspect.signature(run_instances).parameters.items() if k in grid
    }
    table = _rank_settings(pd.DataFrame(rows), defaults, min_f1_small)
    best = {k: _plain(table.iloc[0][k]) for k in names}
    return best, table


def _rank_settings(
    table: pd.DataFrame, defaults: Mapping[str, Any], min_f1_small: float | None
) -> pd.DataFrame:
    """Order tuning rows best first: those reaching ``min_f1_small`` (column
    ``f1_floor_met``), then by ``score``; on a tie the function's own ``defaults`` win (the
    row keeping most of them): a setting that changes nothing is not "tuned"."""
    table = table.copy()
    table["n_default"] = [
        sum(r[k] == v for k, v in defaults.items()) for r in table.to_dict("records")
    ]
    table["f1_floor_met"] = True if min_f1_small is None else table["f1_small"] >= min_f1_small
    table = table.sort_values(
        ["f1_floor_met", "score", "n_default"], ascending=False, kind="stable"
    )
    return table.reset_index(drop=True)


def _plain(v: Any) -> bool | float:
    """A table cell as a JSON-friendly setting (bools stay bools)."""
    return bool(v) if isinstance(v, (bool, np.bool_)) else float(v)


def _centroids(lab: np.ndarray, sizes: bool = False) -> Any:
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    pts = np.array(ndimage.center_of_mass(lab > 0, lab, ids)) if len(ids) else np.zeros((0, 3))
    return (pts, counts) if sizes else pts
