"""The recipe's multi-task stage: ``tiny-multitask.pt`` and its model card.

Run through the recipe command (``python -m cryosiam_nb.training.recipe --only multitask``).
Data: :func:`~cryosiam_nb.training.multitask.varied_training_set` (general, transcription
and chromatin samples, voxel size 8–14 Å rescaled to 10 Å, varied thickness, defocus,
dose and crowding); validation on separately seeded tomograms.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosiam_nb.io import InputError

from .multitask import (
    train_multitask,
    tune_instance_defaults,
    varied_training_set,
)
from .multitask_card import _card, _stages_of

__all__ = [
    "train_shipped_multitask",
    "train_stage",
    "continue_shipped_multitask",
    "STAGES",
    "OPTIONAL_STAGES",
    "finish_shipped_multitask",
    "STRUCTURES",
    "calibration_set",
    "default_imaging_set",
    "recipe_validation_set",
]

#: extra structure counts per (256 nm)² for the general sample: every class occurs
STRUCTURES = {"general": {"vesicles": 6.0, "sheets": 2.0, "microtubules": 6.0, "actin": 16.0}}

#: the recipe's continuation stages, in order (each continues the previous checkpoint).
#: Stage 5 (stage 3 continued) then stage 6 (the instance head alone, small particles
#: weighted) raised every metric on validation tomograms 7201–7205 (never used for training
#: or calibration): semantic Dice 0.617 → 0.635, AP-50 0.291 → 0.312, small-particle F1
#: 0.521 → 0.614 (stage 5 alone lowered the small-particle F1 to 0.396; stage 6 with
#: small particles weighted 4×, α-only calibration). A further whole-network stage after
#: stage 6 (stage 5's settings on seeds 6400, then stage 6 on seeds 6500) lowered them
#: (semantic 0.606, membrane 0.507, PSNR 13.95 dB; not kept in the recipe).
#: Stage 9 (stage 5's data with the projection SNR down to 0.02, small particles 8×, 16
#: epochs at lr 5e-4) then stage 10 (stage 6 again, the same data and seed) raised, with
#: the instance post-processing tuned on :func:`calibration_set`, on validation tomograms
#: 7201–7205 at the default SNR 0.1 / at SNR 0.036 (2026-12-06): semantic Dice 0.665 /
#: 0.518 vs 0.662 / 0.475, membrane 0.747 / 0.550 vs 0.745 / 0.483, actin 0.237 vs 0.213
#: at 0.1, AP-50 0.314 / 0.123 vs 0.296 / 0.054, small-particle F1 0.689 / 0.316 vs 0.673 /
#: 0.139, PSNR 15.93 vs 15.63 dB at 0.1 (lamella 0.909 vs 0.918). Tuned on the stages'
#: own validation tomograms too (as before 2026-12-07), the instance post-processing chose
#: ``average_edt=False`` there: AP-50 0.388, but small-particle F1 0.555 at SNR 0.1; that
#: choice, not the weights, was the small-particle loss recorded for stage 9 alone
#: (small F1 0.580; 0.503 without stage 10). The recipe run that made the shipped weights
#: (``--stages stage9 stage10`` on the stages 1–6 weights, 2026-12-07) reproduced these
#: numbers exactly; held-out numbers are in the model card and README. 7201–7205 hold no
#: microtubule: on thick general validation tomograms 7206–7208 (128×192×192, measured
#: after the choice) stages 9–10 lowered the microtubule Dice (0.238 vs 0.352, the only one
#: with a microtubule) while raising membrane (0.775 vs 0.754) and AP-50 (0.169 vs 0.146).
#: There the new p(microtubule) separates better (AUC 0.900 vs 0.888, best-threshold Dice
#: 0.45 vs 0.42): the calibrated argmax under-calls it (offset +1: 0.41). Two thick
#: general tomograms (seeds 7105, 7106, one with a microtubule) added to the calibration
#: pool left the microtubule offset at 0 and the instance settings unchanged. The cause was
#: the pool, not the count: half of the stages' small, rescaled, varied-SNR validation
#: tomograms hold microtubules the argmax already calls, at 8–14 Å. Calibrated on
#: :func:`calibration_set` alone (10 Å only), each class weighed alike, the offset became
#: +0.5: on validation tomograms 7201–7216 at 10 Å (offline argmax + minimum sizes)
#: semantic 0.649 vs 0.637, microtubule 0.557 vs 0.450, but the same scenes simulated at
#: 12 / 14 Å and rescaled lost (semantic 0.577 / 0.506 vs 0.600 / 0.536, microtubule
#: 0.439 / 0.082 vs 0.625 / 0.213). The recipe keeps the whole pool and weighs each class
#: alike (``objective="class"``, 2026-12-07): 0.641 / 0.619 / 0.602 / 0.536 at 10 / 8 / 12
#: / 14 Å (the previous calibration 0.637 / 0.612 / 0.600 / 0.536), microtubule 0.449 at
#: 10 Å, DNA 0.175 vs 0.163.
STAGES = ("stage2", "stage3", "stage5", "stage6", "stage9", "stage10")
#: stages that run only when named (``--stages``): measured, not part of the shipped chain.
#: ``stage4`` (the whole network with small particles up-weighted, 24 epochs at lr 5e-4
#: after stage 3) lowered most validation metrics of the calibrated model (semantic Dice
#: 0.596 vs 0.620, AP-50 0.313 vs 0.345 on the calibration tomograms); so did the same
#: stage without the weight (semantic Dice 0.589 vs 0.617, AP-50 0.226 vs 0.291 on
#: validation tomograms 7201–7205). ``stage7`` (stage 6 again, 24 epochs at lr 5e-4)
#: lowered the small-particle F1 there (0.574 vs 0.614). ``stage8`` (the semantic head
#: alone after stage 6, 16 epochs) lowered the semantic Dice (0.621 vs 0.635; actin 0.049
#: vs 0.093) and left every instance score identical (the heads are independent).
#: Not a stage: stage 5's settings with the simulator's default actin density (4 filaments
#: instead of 40; seeds 6800, 16 epochs at lr 5e-4) on the shipped weights lowered how well
#: p(actin) separates actin on validation tomograms 7201/7203/7205 (AUC 0.913 vs 0.926,
#: best-threshold actin Dice 0.093 vs 0.110; 2026-12-06), so the dense-actin stages stay.
#: An actin CE weight of 25 instead of the capped 10 (stage 5's settings, seeds 6900, 16
#: epochs at lr 5e-4) matched its control there (AUC 0.922 vs 0.924, Dice 0.089 vs 0.091).
#: Not a stage: the thesis' cascade (semantic segmentation of the denoised tomogram). The
#: shipped weights fine-tuned 12 epochs at lr 5e-4 (backbone + semantic head, stage 5's
#: data on seeds 6700, CE class weights) on the shipped model's normalised denoised output,
#: then α + offsets calibrated on :func:`calibration_set` (denoised the same way), reached
#: on validation tomograms 7201/7203/7205 at SNR 0.1 semantic Dice 0.639, actin 0.148;
#: the same fine-tune on the noisy input 0.614 / 0.035; the shipped weights 0.666 / 0.213
#: (2026-12-06). Denoised input beats noisy input for the same training, but a short
#: fine-tune costs more than it gains: a cascade would need the whole recipe on it.
#: Not a stage: the semantic loss without its generalised-Dice term (MONAI's per-patch
#: weighting gives classes absent from a patch the weight of the rarest present one, which
#: could hold rare classes back). Two paired fine-tunes of the shipped weights (stage 9's
#: settings on seeds 6950, 12 epochs at lr 5e-4, seed 19), with and without the term, on
#: validation tomograms 7201/7203/7205, uncalibrated: p(actin) AUC 0.912 without vs 0.920
#: with, best-threshold actin Dice 0.107 vs 0.111, argmax semantic Dice 0.628 vs 0.630
#: (shipped: AUC 0.942, best-threshold 0.157; 2026-12-07). The term stays; and a further
#: whole-network fine-tune again lowered actin.
#: ``stage11`` (stage 9's settings on fresh seeds with 64³ training patches, the inference
#: window, instead of 32³: the whole microtubule cross-section, 25 voxels, and more of an
#: actin filament in view; one patch per step, 1280 steps at lr 5e-4, 40 min on 2 threads)
#: lowered every semantic score on validation tomograms 7201/7203/7205–7216, uncalibrated
#: against the shipped weights with their calibration undone (2026-12-07): p(actin) AUC
#: 0.913 vs 0.945, best-threshold actin Dice 0.104 vs 0.137, p(microtubule) AUC 0.954 vs
#: 0.966, argmax semantic Dice 0.559 vs 0.611 (membrane 0.537 vs 0.721) — the same loss
#: as the 32³ fine-tunes above, so the training patch is not what holds actin back.
OPTIONAL_STAGES = ("stage4", "stage7", "stage8", "stage11")
_ALL_STAGES = STAGES + OPTIONAL_STAGES


def _simulated(st: dict[str, Any], prefix: str, progress: bool) -> list:
    """The training (``prefix=""``) or validation (``"val_"``) tomograms of the stage whose
    settings are ``st`` (stage 1's: ``cfg["multitask"]``; a later stage's: stage 1's
    updated with the stage's own)."""
    return varied_training_set(
        st[f"{prefix}n"],
        st[f"{prefix}shape"],
        st[f"{prefix}seed"],
        voxel_range=tuple(st["voxel_range"]),
        structures=st.get("structures", STRUCTURES),
        mode=st.get("mode", "tilt"),
        snr_range=tuple(st["snr_range"]) if st.get("snr_range") else None,
        progress=progress,
    )


def recipe_validation_set(mc: dict[str, Any], progress: bool = True) -> list:
    """The validation tomograms of stage 1 and of every stage in :data:`STAGES` (a
    repeated stage's once): with :func:`calibration_set`, the pool the recipe calibrates
    on, however the checkpoint was reached (the whole recipe, ``--stages`` or
    ``--calibrate-only``)."""
    val = _simulated(mc, "val_", progress)
    for name in STAGES:
        st = _stage_settings(mc, name)
        if st:
            val = _new_tomograms(val, _simulated(st, "val_", progress))
    return val


def _stage_settings(mc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Stage ``name``'s settings (stage 1's updated with its own), or None when the recipe
    ``mc`` has no such stage or gives it no epochs."""
    st = {**mc, **mc.get(name, {})}
    return st if mc.get(name) and st.get("epochs") else None


def calibration_set(mc: dict[str, Any], progress: bool = True, voxel_size: float = 10.0) -> list:
    """The recipe's calibration tomograms (``mc["calibration_val"]``): the simulator's
    default imaging, normalised like inference input; validation seeds only (at
    ``voxel_size`` Å, see :func:`default_imaging_set`)."""
    return default_imaging_set(mc.get("calibration_val"), progress, voxel_size)


def default_imaging_set(
    spec: dict[str, Any] | None, progress: bool = True, voxel_size: float = 10.0
) -> list:
    """Tomograms of ``spec`` (``seeds``, ``samples``, ``shape`` in voxels at 10 Å, optional
    ``mode``) with the simulator's default imaging, normalised like inference input.

    At ``voxel_size`` Å other than the model's 10 Å, each scene is simulated over the same
    physical extent (the shape scaled by 10 / ``voxel_size``) and taken to 10 Å as
    inference takes such data (``pp.normalize``, then ``pp.rescale``); its labels are
    resampled onto that grid (nearest neighbour, the clean volume linearly)."""
    from tqdm.auto import tqdm

    from cryosiam_nb import pp, sim

    from .data import Tomogram, _normalise
    from .multitask import _rescaled

    cv = spec
    if not cv:
        return []
    vs = float(voxel_size)
    shape = tuple(int(n) for n in cv["shape"])
    if vs != 10.0:
        shape = tuple(max(16, int(round(n * 10.0 / vs))) for n in shape)
    out = []
    for seed, sample in tqdm(
        list(zip(cv["seeds"], cv["samples"])), desc=f"simulate {vs:g} Å", disable=not progress
    ):
        s = sim.simulate(
            shape,
            voxel_size=vs,
            sample=sample,
            seed=int(seed),
            mode=cv.get("mode", "tilt"),
            keep_tilt_series=False,
            progress=False,
        )
        v = s.volumes
        keys = ("semantic", "instances", "lamella")
        if vs == 10.0:
            image = _normalise(v["noisy"].values)
            labels = {k: np.asarray(v[k].values) for k in keys}
            labels["clean"] = _normalise(v["clean"].values)
            name, particles = f"sim_{seed}_{sample}_default", s.particles
        else:
            noisy = v["noisy"].assign_attrs(voxel_size=vs)
            image = np.asarray(pp.rescale(pp.normalize(noisy, invert=False), 10.0).values)
            labels = {k: _rescaled(np.asarray(v[k].values), image.shape, 0) for k in keys}
            clean = _rescaled(np.asarray(v["clean"].values, np.float32), image.shape, 1)
            labels["clean"] = _normalise(clean)
            name, particles = f"sim_{seed}_{sample}_default_{vs:g}A", None
        out.append(Tomogram(name, image.astype(np.float32), labels, 10.0, particles))
    return out


def _seconds_per_step(model_kwargs: dict[str, Any], tomos: list, mc: dict[str, Any]) -> float:
    """Wall time of one training step (forward + backward + AdamW) on real patches."""
    from torch.utils.data import DataLoader

    from cryosiam_nb import models

    from .data import PatchDataset
    from .multitask import _KEYS, multitask_loss

    m = models.build("multitask", "tiny", **model_kwargs).train()
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    ds = PatchDataset(tomos[:2], m.patch_size, 4 * mc["batch_size"], keys=list(_KEYS), seed=1)
    times = []
    for batch in DataLoader(ds, batch_size=mc["batch_size"]):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = multitask_loss(m(batch["image"]), batch)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def train_shipped_multitask(
    cfg: dict[str, Any],
    out: Path,
    command: str,
    progress: bool,
    epochs: int | None = None,
    budget_minutes: float | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train ``tiny-multitask.pt`` (+ card) in ``out``; returns its validation metrics."""
    mc = dict(cfg["multitask"])
    t_start = time.perf_counter()
    train = _simulated(mc, "", progress)
    val = _simulated(mc, "val_", progress)
    print(f"simulated {len(train)} + {len(val)} tomograms in {time.perf_counter() - t_start:.0f} s")
    kwargs: dict[str, Any] = {"voxel_size": 10.0}
    bb = None
    if mc.get("backbone"):
        from cryosiam_nb import models

        bb = models.load(mc["backbone"])
        kwargs.update(bb.config["backbone"])
    n_epochs = int(epochs or mc["epochs"])
    if budget_minutes and not epochs:
        sps = _seconds_per_step(kwargs, train, mc)
        steps_per_epoch = mc["samples_per_epoch"] // mc["batch_size"]
        left = budget_minutes * 60 - (time.perf_counter() - t_start)
        n_epochs = max(1, int(left * 0.85 / (sps * steps_per_epoch)))
        print(f"{sps:.2f} s/step → {n_epochs} epochs fit {budget_minutes:.0f} min")
    path = out / "tiny-multitask.pt"
    t0 = time.perf_counter()
    model, _ = train_multitask(
        train,
        backbone=bb,
        epochs=n_epochs,
        batch_size=mc["batch_size"],
        samples_per_epoch=mc["samples_per_epoch"],
        lr=mc.get("lr", 3e-3),
        foreground_fraction=mc.get("foreground_fraction", 0.6),
        val_every=mc.get("val_every", 10),
        val_data=val,
        seed=mc.get("seed_train", 0),
        out=path,
        resume=resume,
        progress=progress,
    )
    model.metadata["train_seconds"] = time.perf_counter() - t0
    model.metadata["train_threads"] = torch.get_num_threads()
    _save_with_metadata(model, path)
    for name in STAGES:
        val = _new_tomograms(val, train_stage(path, cfg, name, progress))
    cmd = command + f" --only multitask --epochs {n_epochs}"
    metrics = finish_shipped_multitask(path, cfg, cmd, progress, val)
    from .refiner import refine_shipped_multitask

    return {**metrics, **refine_shipped_multitask(cfg, out, cmd, progress, resume, chained=True)}


def _new_tomograms(val: list, more: list) -> list:
    """``val`` plus the tomograms of ``more`` not already in it (same name and image): stage
    10 repeats stage 6's validation tomograms, which must not count twice in the
    calibration."""
    by_name = {t.name: t for t in val}

    def repeated(t: Any) -> bool:
        u = by_name.get(t.name)
        return u is not None and np.array_equal(u.image, t.image)

    return list(val) + [t for t in more if not repeated(t)]


def train_stage(
    path: Path, cfg: dict[str, Any], name: str, progress: bool = True, resume: bool = False
) -> list:
    """Continue the checkpoint ``path`` (all weights) with the recipe's stage ``name``.

    ``stage2``: tomograms whose noise is set by a projection SNR drawn log-uniformly in
    ``snr_range`` (down to the low SNR of thick or low-dose data, which stage 1's dose
    range does not reach). ``stage3``: more microtubules and actin (``structures``),
    class-weighted CE (``class_weights="auto"``) and more class-balanced patches, for the
    rare thin classes. ``stage4``: as stage 3 with small particles up-weighted in the
    instance loss (``small_weight``). A semantic prior correction folded into the
    checkpoint by calibration is undone before training continues. Keys missing from a
    stage come from the stage-1 settings; a stage's ``patch_size`` (voxels per axis)
    replaces the preset's training patch.
    Overwrites ``path``; returns the stage's validation tomograms.
    """
    from cryosiam_nb import models

    mc = dict(cfg["multitask"])
    st = _stage_settings(mc, name)
    if not st:
        return []
    t_start = time.perf_counter()
    sims = [_simulated(st, p, progress) for p in ("", "val_")]
    first = models.load(path)
    first.remove_refiner()  # trained on the heads this stage changes; the recipe re-trains it
    old = first.metadata.pop("semantic_prior", {}).get("shift")
    if old:  # train the raw logits, not the calibrated ones
        from .calibration import shift_logits

        shift_logits(first, -np.asarray(old, np.float32))
    model, _ = train_multitask(
        sims[0],
        init=first,
        epochs=st["epochs"],
        batch_size=st["batch_size"],
        samples_per_epoch=st["samples_per_epoch"],
        patch_size=st.get("patch_size"),
        lr=st["lr"],
        foreground_fraction=st.get("foreground_fraction", 0.6),
        class_weights=st.get("class_weights"),
        small_weight=st.get("small_weight", 1.0),
        weights=st.get("loss_weights"),
        freeze=st.get("freeze", "none"),
        val_every=st["epochs"],
        val_data=sims[1],
        seed=_stage_seed(mc, name),
        out=path.with_name(path.stem + f".{name}.pt"),
        resume=resume,
        progress=progress,
    )
    model.metadata["train_seconds"] = first.metadata.get("train_seconds", 0.0) + (
        time.perf_counter() - t_start
    )
    model.metadata["train_threads"] = torch.get_num_threads()
    done = _stages_of(first.metadata)
    done[name] = model.metadata.get("training", {})
    model.metadata["stages"] = done
    if first.metadata.get("commands"):
        model.metadata["commands"] = list(first.metadata["commands"])
    _save_with_metadata(model, path)
    for side in path.parent.glob(f"{path.stem}.{name}.*"):  # the stage's checkpoint/state
        side.unlink()
    return sims[1]


def _stage_seed(mc: dict[str, Any], name: str) -> int:
    """Training seed of stage ``name``: its own ``seed_train`` when set (so that moving a
    stage between :data:`STAGES` and :data:`OPTIONAL_STAGES` keeps its seed), else
    stage 1's plus the stage's position."""
    if "seed_train" in mc.get(name, {}):
        return int(mc[name]["seed_train"])
    return int(mc.get("seed_train", 0)) + _ALL_STAGES.index(name) + 1


def continue_shipped_multitask(
    cfg: dict[str, Any],
    out: Path,
    command: str,
    stages: Sequence[str],
    progress: bool = True,
    resume: bool = False,
) -> dict[str, float]:
    """Run only the continuation ``stages`` (names in :data:`STAGES` or
    :data:`OPTIONAL_STAGES`) on the existing ``out/tiny-multitask.pt``, then re-calibrate
    it on the same pool as the whole recipe (:func:`recipe_validation_set` plus
    :func:`calibration_set`) and rewrite its card."""
    path = out / "tiny-multitask.pt"
    unknown = [s for s in stages if s not in _ALL_STAGES]
    if unknown:
        raise InputError(f"stages: unknown {unknown}; the recipe has {list(_ALL_STAGES)}")
    if not path.exists():
        raise InputError(f"{path}: no checkpoint to continue; train stage 1 first")
    mc = dict(cfg["multitask"])
    # the pool the whole recipe calibrates on: stage 1's and every chained stage's
    # validation tomograms (an optional stage run here adds its own)
    val = recipe_validation_set(mc, progress)
    for name in stages:
        val = _new_tomograms(val, train_stage(path, cfg, name, progress, resume))
    cmd = (
        command
        + " --only multitask "
        + ("--stages " + " ".join(stages) if stages else "--calibrate-only")
    )
    metrics = finish_shipped_multitask(path, cfg, cmd, progress, val)
    from .refiner import refine_shipped_multitask

    return {**metrics, **refine_shipped_multitask(cfg, out, cmd, progress, resume, chained=True)}


def _save_with_metadata(model: Any, path: Path) -> None:
    """Save ``model`` with its metadata (metrics kept as they are)."""
    from cryosiam_nb import models

    meta = {k: v for k, v in model.metadata.items() if k != "metrics"}
    models.save(model, path, **meta, metrics=dict(model.metadata.get("metrics", {})))


def _voxel_size_offsets(
    model: Any,
    mc: dict[str, Any],
    shift: np.ndarray,
    min_size: list[int],
    progress: bool,
    cal: tuple[list, list] = ([], []),
) -> dict[str, Any] | None:
    """The per-acquisition-voxel-size semantic offsets (``None`` without
    ``mc["voxel_calibration"]``): on the tomograms of its ``sets``
    (:func:`default_imaging_set`) simulated at each of its ``voxel_sizes``, on top of
    ``shift`` (not yet folded into ``model``), the minimum sizes fixed. ``cal``: the
    10 Å :func:`calibration_set` and its predictions (by ``model``), already made; a set
    equal to ``mc["calibration_val"]`` reuses them at 10 Å instead of simulating and
    predicting it again."""
    from .calibration import calibrate_voxel_size_offsets

    vc = mc.get("voxel_calibration") or {}
    sizes = [float(v) for v in vc.get("voxel_sizes", ())]
    if not sizes:
        return None
    sets: dict[float, list] = {}
    preds: dict[float, list] = {}
    for v in sizes:
        sets[v], preds[v] = [], []
        for spec in vc["sets"]:
            if v == 10.0 and cal[0] and spec == mc.get("calibration_val"):
                sets[v] += cal[0]
                preds[v] += cal[1]
                continue
            tomos = default_imaging_set(spec, progress, v)
            sets[v] += tomos
            preds[v] += [None] * len(tomos)  # predicted one by one during the calibration
    table, summary = calibrate_voxel_size_offsets(
        model, sets, min_size, base_shift=shift, progress=progress, predictions=preds
    )
    print("per-voxel-size semantic offsets (acquired at, rescaled to 10 Å):")
    print(summary.to_string(index=False))
    return table


def finish_shipped_multitask(
    path: Path, cfg: dict[str, Any], command: str, progress: bool = True, val: list | None = None
) -> dict[str, float]:
    """Calibrate the checkpoint on validation tomograms and write the model card.

    The validation tomograms (``val``: the stages' own, :func:`recipe_validation_set` when
    None) plus :func:`calibration_set` (the simulator's default imaging) are used to (1)
    choose the semantic prior correction α
    (:func:`~cryosiam_nb.training.calibration.calibrate_semantic_prior`, when the last
    stage used CE class weights) and per-class offsets on top of it
    (:func:`~cryosiam_nb.training.calibration.calibrate_class_bias`), both with each class
    weighed alike (objective ``"class"``), folded into the semantic logits' bias and
    recorded in ``metadata["semantic_prior"]`` (a previous correction is undone first),
    with the per-class minimum component sizes of ``tl.postprocess_semantic`` chosen in the
    same ascent (``metadata["semantic_defaults"]``); then, for each voxel size in
    ``voxel_calibration["voxel_sizes"]``, per-class offsets on top, on its default-imaging
    tomograms acquired at that size and rescaled to 10 Å
    (:func:`~cryosiam_nb.training.calibration.calibrate_voxel_size_offsets`, minimum sizes
    fixed; ``metadata["semantic_prior"]["by_voxel_size"]``, which ``tl.predict`` applies),
    (2) the lamella threshold, then (3) tune the instance post-processing on
    :func:`calibration_set` alone (all tomograms when it is empty), stored in
    ``metadata["instance_defaults"]``.
    """
    from cryosiam_nb import models
    from cryosiam_nb.inference import predict

    from .calibration import (
        SEMANTIC_MIN_SIZES,
        calibrate_class_bias,
        calibrate_lamella_threshold,
        calibrate_semantic_prior,
        prior_shift,
        shift_logits,
    )

    mc = dict(cfg["multitask"])
    if val is None:
        val = recipe_validation_set(mc, progress)
    cal = calibration_set(mc, progress)
    val = list(val) + cal
    model = models.load(path)
    if model.remove_refiner():  # calibrated on the old heads' output: re-trained afterwards
        print("the semantic refiner was dropped: the recipe trains a new one after calibrating")
    cw = (model.metadata.get("training", {}).get("class_weights") or {}).get("semantic")
    if cw:
        old = model.metadata.get("semantic_prior", {}).get("shift")
        if old:
            shift_logits(model, -np.asarray(old, np.float32))
        # a previous per-voxel-size table would shift every prediction below
        model.metadata.get("semantic_prior", {}).pop("by_voxel_size", None)
    # one prediction pass serves all three calibrations: the semantic shift below moves
    # only the semantic logits, not the lamella and instance heads read afterwards
    preds = [predict(t.image, model).compute() for t in val]
    # the instance post-processing is chosen on the calibration set alone (realistic size,
    # default imaging): the stages' small, varied-SNR validation tomograms pulled it to
    # settings that lost small particles. The semantic calibration keeps the whole pool:
    # on the calibration set alone (10 Å only) it fitted 10 Å and lost at 12–14 Å (STAGES)
    pool = slice(len(val) - len(cal), None) if cal else slice(None)
    if cw:
        alpha, prior_table = calibrate_semantic_prior(
            model, val, progress=progress, predictions=preds
        )
        print("semantic prior correction on validation tomograms (best first):")
        print(prior_table.to_string(index=False))
        base = prior_shift(cw, alpha)
        bias, bias_table = calibrate_class_bias(
            model,
            val,
            base_shift=base,
            progress=progress,
            predictions=preds,
            min_sizes=SEMANTIC_MIN_SIZES,
        )
        print("per-class logit offsets on validation tomograms (accepted moves):")
        print(bias_table.to_string(index=False))
        shift = base + bias
        min_size = [int(v) for v in bias_table.iloc[-1]["min_size"]]
        by_size = _voxel_size_offsets(
            model, mc, shift, min_size, progress, (cal, preds[pool] if cal else [])
        )
        shift_logits(model, shift)
        model.metadata["semantic_prior"] = {
            "alpha": alpha,
            "class_bias": [float(x) for x in bias],
            "shift": [float(x) for x in shift],
            "table": prior_table.to_dict(orient="records"),
            "class_bias_dice": float(bias_table.iloc[-1]["semantic_dice"]),
        }
        if by_size:
            model.metadata["semantic_prior"]["by_voxel_size"] = by_size
        model.metadata["semantic_defaults"] = {"min_size": min_size}
    lam_thr, lam_table = calibrate_lamella_threshold(
        model, val, progress=progress, predictions=preds
    )
    print("lamella mask threshold on validation tomograms (best first):")
    print(lam_table.to_string(index=False))
    model.metadata["lamella_defaults"] = {"threshold": lam_thr}
    best, table = tune_instance_defaults(
        model, val[pool], progress=progress, predictions=preds[pool]
    )
    print("instance post-processing on the calibration tomograms (best first):")
    print(table.head(5).to_string(index=False))
    model.metadata["instance_defaults"] = best
    metrics = dict(model.metadata.get("metrics", {}))
    metrics.update({f"tuned_{k}": float(table.iloc[0][k]) for k in ("ap50", "f1_small")})
    metrics["calibrated_lamella_dice"] = float(lam_table.iloc[0]["lamella_dice"])
    if model.metadata.get("semantic_prior"):  # on all calibration tomograms, best α + offsets
        metrics["calibrated_semantic_dice"] = model.metadata["semantic_prior"]["class_bias_dice"]
    model.metadata["metrics"] = metrics
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    model.metadata["commands"] = [*model.metadata.get("commands", []), f"{stamp} `{command}`"]
    _save_with_metadata(model, path)
    _card(path.with_suffix(".md"), model, mc, command, metrics, STRUCTURES)
    return metrics
