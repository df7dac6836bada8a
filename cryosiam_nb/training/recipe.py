"""The one documented command that trains every shipped tiny model on simulated data::

    python -m cryosiam_nb.training.recipe --out cryosiam_nb/weights

Steps (fixed seeds; ``--quick`` for a 1–2 min smoke run):

1. simulate ``general`` tomograms (tilt-series mode — per-tilt CTF, shot noise, weighted
   back-projection, the same imaging as the demo and benchmarks —, 10 Å/voxel, extra
   membranes, microtubules and actin so that every class occurs) — a per-tomogram
   train/validation split;
2. DenseSimSiam pretraining on the *clean* volumes → ``tiny-dense-ssl.pt``;
3. heads on that backbone (whole network fine-tuned) from the *noisy* volumes →
   ``tiny-denoise.pt``, ``tiny-lamella.pt``, ``tiny-semantic.pt``, ``tiny-instance.pt``
   (the lamella head on extra tomograms with thinner, 24 nm samples so that the outside
   of the sample is well represented);
4. SimSiam on strictly masked particle subtomograms → ``tiny-subtomo.pt``.

Each checkpoint gets a model card ``tiny-<task>.md`` (command, data, seed, voxel size,
validation metrics); validation metrics are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .refiner import QUICK_REFINER, refiner_recipe

__all__ = ["main", "simulate_training_set", "RECIPE", "QUICK", "SIM_STRUCTURES"]

#: structure counts per (256 nm)² passed to the simulator: small tomograms still get
#: membranes, microtubules and actin.
SIM_STRUCTURES = {"vesicles": 12.0, "sheets": 3.0, "microtubules": 8.0, "actin": 20.0}

#: the multi-task stages 3 and 4's data and class balance: 2.3× the microtubules and 2.5× the
#: actin per tomogram; every tomogram's projection SNR drawn log-uniformly in 0.05–0.4 (none
#: from stage 1's dose range, whose SNR is 0.35–0.83, so the rare classes are learnt
#: without forgetting low-SNR input), CE weighted by class frequency, 80 % class-balanced
#: patches
_RARE_CLASSES: dict[str, Any] = {
    "structures": {
        "general": {"vesicles": 6.0, "sheets": 2.0, "microtubules": 14.0, "actin": 40.0}
    },
    "snr_range": (0.05, 0.4),
    "class_weights": "auto",
    "foreground_fraction": 0.8,
    "epochs": 40,
    "lr": 1e-3,
}

#: stage 3's data and training with twice the default DNA in the transcription sample
_MORE_DNA: dict[str, Any] = {
    **_RARE_CLASSES,
    "structures": {**_RARE_CLASSES["structures"], "transcription": {"dna": 8.0}},
}
#: train the instance head alone: backbone frozen, the other heads' loss weight 0 (their
#: weights and BatchNorm statistics are kept), particles under 150 voxels weighted 4×
#: (stage 6 raises it to 8×)
_INSTANCE_HEAD_ONLY: dict[str, Any] = {
    "freeze": "backbone",
    "loss_weights": {"denoise": 0.0, "lamella": 0.0, "semantic": 0.0, "instance": 1.0},
    "small_weight": 4.0,
}

#: stage 6 (and stage 10, the same after stage 9): the instance head alone (backbone
#: frozen, other heads untouched), particles under 150 voxels weighted 8× in the instance
#: loss (on validation tomograms 7201–7205, with the neck-aware calibration, 8× against 4×:
#: small-particle F1 0.676 vs 0.637, recall 0.658 vs 0.575, AP-50 0.301 vs 0.316, mean of
#: AP-50 and small F1 0.489 vs 0.477; 6× tuned to 0.426)
_STAGE6: dict[str, Any] = {
    "n": 16,
    "seed": 6100,
    "val_n": 2,
    "val_seed": 6140,
    **_MORE_DNA,
    **_INSTANCE_HEAD_ONLY,
    "small_weight": 8.0,
    "epochs": 16,
    "seed_train": 6,
}

#: the multi-task recipe's calibration tomograms (``multitask_recipe.calibration_set``):
#: the simulator's default imaging at a realistic size, validation seeds only
_CALIBRATION_SET: dict[str, Any] = {
    "seeds": (7101, 7102, 7103, 7104),
    "samples": ("general", "transcription", "general", "chromatin"),
    "shape": (96, 192, 192),
}
#: four thick general scenes beside it (per-voxel-size offsets, the refiner's calibration)
_THICK_GENERAL_SET: dict[str, Any] = {
    "seeds": (7105, 7106, 7107, 7108),
    "samples": ("general",) * 4,
    "shape": (128, 192, 192),
}

RECIPE: dict[str, Any] = {
    "sim": {"n": 8, "shape": (48, 96, 96), "voxel_size": 10.0, "seed": 2024, "mode": "tilt"},
    "dense_ssl": {
        "epochs": 12,
        "samples_per_epoch": 64,
        "batch_size": 4,
        "region_size": 32,
        "crop_size": 24,
        "lr": 0.05,
        "warmup_epochs": 1,
        "seed": 0,
    },
    "heads": {
        "epochs": 30,
        "samples_per_epoch": 32,
        "batch_size": 4,
        "patch_size": 32,
        "lr": 3e-3,
        "seed": 0,
        "freeze": "none",
    },
    # epochs per head (8 steps of 4 patches each); the instance head needs the most: at 30
    # epochs it found a fifth of the particles, at 60 almost half (held-out tilt series)
    "head_epochs": {"denoise": 30, "lamella": 20, "semantic": 50, "instance": 80},
    "subtomo": {"box": 24, "epochs": 6, "samples_per_epoch": 64, "batch_size": 8, "seed": 0},
    "val_fraction": 0.25,
    # lamella head: thinner samples (24 nm in a 48 nm-deep volume) so that "outside" is
    # well represented; the default tomograms are almost all sample
    "lamella_sim": {"n": 6, "seed": 3024, "thickness_nm": 24.0},
    # the multi-task model: one backbone, all four heads trained jointly on varied data
    "multitask": {
        "n": 24,
        "shape": (96, 160, 160),
        "seed": 5000,
        "val_n": 2,
        "val_shape": (64, 128, 128),
        "val_seed": 5900,
        "voxel_range": (8.0, 14.0),
        "epochs": 40,
        "samples_per_epoch": 256,
        "batch_size": 4,
        "lr": 3e-3,
        "val_every": 10,
        "foreground_fraction": 0.6,
        "seed_train": 0,
        "backbone": "tiny-dense-ssl",
        # stage 2: the same model continued on low-SNR data (projection SNR 0.04–0.3)
        "stage2": {
            "n": 16,
            "seed": 5200,
            "val_n": 2,
            "val_seed": 5950,
            "snr_range": (0.04, 0.3),
            "epochs": 5,
            "lr": 1e-3,
        },
        # stage 3: rare thin classes — 2.3× the microtubules and 2.5× the actin per
        # tomogram, CE weighted by class frequency, 80 % class-balanced patches
        "stage3": {"n": 16, "seed": 5400, "val_n": 2, "val_seed": 5980, **_RARE_CLASSES},
        # stage 4 (optional, run only with --stages stage4; it lowered most validation
        # metrics, see multitask_recipe.OPTIONAL_STAGES): small particles — stage 3's data
        # and class weights on fresh seeds, the instance loss's foreground and distance
        # terms weighted 4× on particles under 150 voxels
        "stage4": {
            "n": 16,
            "seed": 5600,
            "val_n": 2,
            "val_seed": 6010,
            **_RARE_CLASSES,
            "small_weight": 4.0,
            "epochs": 24,
            "lr": 5e-4,
            "seed_train": 3,
        },
        # stage 5: stage 3 continued on fresh seeds for 30 more epochs, with twice the
        # default DNA in the transcription sample
        "stage5": {
            "n": 16,
            "seed": 5800,
            "val_n": 2,
            "val_seed": 6040,
            **_MORE_DNA,
            "epochs": 30,
            "seed_train": 4,
        },
        # stage 6: the instance head alone after stage 5 (see _STAGE6)
        "stage6": _STAGE6,
        # stage 7 (optional, run only with --stages stage7): stage 6 again on fresh seeds;
        # on validation tomograms 7201–7205 it lowered the small-particle F1 (0.574 vs
        # 0.614) and AP-70 (0.123 vs 0.131), other metrics equal
        "stage7": {
            "n": 16,
            "seed": 6200,
            "val_n": 2,
            "val_seed": 6240,
            **_MORE_DNA,
            **_INSTANCE_HEAD_ONLY,
            "epochs": 24,
            "lr": 5e-4,
            "seed_train": 7,
        },
        # stage 8 (optional, run only with --stages stage8): the semantic head alone after
        # stage 6 (backbone frozen, other heads untouched); it lowered the semantic Dice on
        # validation tomograms 7201–7205 (0.621 vs 0.635)
        "stage8": {
            "n": 16,
            "seed": 6300,
            "val_n": 2,
            "val_seed": 6340,
            **_MORE_DNA,
            "freeze": "backbone",
            "loss_weights": {"denoise": 0.0, "lamella": 0.0, "semantic": 1.0, "instance": 0.0},
            "epochs": 16,
            "seed_train": 8,
        },
        # stage 9: stage 5's data and training continued after stage 6 with the projection
        # SNR reaching down to 0.02 (8 e/Å² realises 0.036, where stages 1–6 fail), small
        # particles 8× as in stage 6, 16 epochs at lr 5e-4
        "stage9": {
            "n": 16,
            "seed": 6600,
            "val_n": 2,
            "val_seed": 6640,
            **_MORE_DNA,
            "snr_range": (0.02, 0.4),
            "small_weight": 8.0,
            "epochs": 16,
            "lr": 5e-4,
            "seed_train": 9,
        },
        # stage 10: stage 6 again after stage 9 (the same data and seed): the instance head
        # alone re-learns small particles on the low-SNR backbone
        "stage10": _STAGE6,
        # stage 11 (optional, run only with --stages stage11): stage 9's data and settings on
        # fresh seeds with 64³ training patches (the inference window) instead of 32³, one
        # patch per step, 5 epochs of 256 steps at lr 5e-4 (40 min on 2 threads); it lowered
        # every semantic score on validation tomograms (see multitask_recipe.OPTIONAL_STAGES)
        "stage11": {
            **_MORE_DNA,
            "n": 16,
            "seed": 6860,
            "val_n": 2,
            "val_seed": 6890,
            "snr_range": (0.02, 0.4),
            "small_weight": 8.0,
            "patch_size": 64,
            "batch_size": 1,
            "samples_per_epoch": 256,
            "epochs": 5,
            "lr": 5e-4,
            "seed_train": 11,
        },
        # the semantic refiner, trained last on the calibrated model's predictions
        # (training.refiner): stage 3's actin/microtubule-rich general scenes and the mix;
        # calibrated on the eight scenes of the per-voxel-size offsets, at 10 Å
        "refiner": refiner_recipe(
            _RARE_CLASSES["structures"], (_CALIBRATION_SET, _THICK_GENERAL_SET)
        ),
        # calibration (semantic prior correction, lamella threshold) also sees tomograms
        # with the simulator's default imaging (10 Å, projection SNR 0.1, default thickness
        # and structure counts), at a realistic size; validation seeds only. The instance
        # post-processing is tuned on these alone
        "calibration_val": _CALIBRATION_SET,
        # per-acquisition-voxel-size semantic offsets (on top of the pooled calibration):
        # the calibration set plus four thick general scenes, each simulated at 8, 10, 12
        # and 14 Å and rescaled to 10 Å. On validation tomograms (7201–7216 at 10 Å, nine
        # of those scenes at the other sizes) semantic Dice at 8 / 10 / 12 / 14 Å 0.620 /
        # 0.648 / 0.593 / 0.566 against the pooled calibration's 0.588 / 0.641 / 0.588 /
        # 0.537; the calibration set alone matched at 10 Å but reached 0.553 at 14 Å
        # (2026-12-07)
        "voxel_calibration": {
            "voxel_sizes": (8.0, 10.0, 12.0, 14.0),
            "sets": (_CALIBRATION_SET, _THICK_GENERAL_SET),
        },
    },
}


def _overridden(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` whose sub-dicts are updated with the dicts in ``changes``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in changes.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) else v
    return out


#: ``--quick``: :data:`RECIPE` on three small tomograms for one epoch of everything
QUICK: dict[str, Any] = _overridden(
    RECIPE,
    sim={"n": 3, "shape": (32, 48, 48), "mode": "fast"},
    dense_ssl={
        "epochs": 1,
        "samples_per_epoch": 4,
        "batch_size": 2,
        "region_size": 24,
        "crop_size": 16,
        "warmup_epochs": 0,
    },
    heads={
        "epochs": 1,
        "samples_per_epoch": 4,
        "batch_size": 2,
        "patch_size": 16,
        "val_every": 1,
        "freeze": "encoder",
    },
    head_epochs={"denoise": 1, "lamella": 1, "semantic": 1, "instance": 1},
    subtomo={"box": 16, "epochs": 1, "samples_per_epoch": 8, "batch_size": 4},
    val_fraction=0.34,
    lamella_sim={"n": 3, "thickness_nm": 16.0},
    multitask={
        "n": 3,
        "shape": (32, 48, 48),
        "val_n": 1,
        "val_shape": (32, 48, 48),
        "epochs": 1,
        "samples_per_epoch": 4,
        "batch_size": 2,
        "val_every": 1,
        "mode": "fast",
        "stage2": {"n": 2, "val_n": 1, "epochs": 1, "snr_range": (0.04, 0.3), "lr": 1e-3},
        "stage3": {"n": 2, "val_n": 1, "epochs": 1, "class_weights": "auto", "lr": 1e-3},
        "stage4": {"n": 2, "val_n": 1, "epochs": 1, "class_weights": "auto", "small_weight": 4.0},
        "stage5": {"n": 2, "val_n": 1, "epochs": 1, "class_weights": "auto", "lr": 1e-3},
        "stage6": {"n": 2, "val_n": 1, "epochs": 1, **_INSTANCE_HEAD_ONLY},
        "stage9": {"n": 2, "val_n": 1, "epochs": 1, "snr_range": (0.02, 0.4), "lr": 1e-3},
        "stage10": {"n": 2, "val_n": 1, "epochs": 1, **_INSTANCE_HEAD_ONLY},
        "calibration_val": {
            "seeds": (7101,),
            "samples": ("general",),
            "shape": (32, 48, 48),
            "mode": "fast",
        },
        "refiner": QUICK_REFINER,
        "voxel_calibration": {
            "voxel_sizes": (10.0, 14.0),
            "sets": (
                {"seeds": (7101,), "samples": ("general",), "shape": (32, 48, 48), "mode": "fast"},
            ),
        },
    },
)


TASK_FILES = {
    "dense_ssl": "tiny-dense-ssl",
    "denoise": "tiny-denoise",
    "lamella": "tiny-lamella",
    "semantic": "tiny-semantic",
    "instance": "tiny-instance",
    "subtomo_ssl": "tiny-subtomo",
    "multitask": "tiny-multitask",
}


def simulate_training_set(
    n: int,
    shape: tuple[int, int, int],
    voxel_size: float = 10.0,
    seed: int = 0,
    mode: str = "fast",
    progress: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """``n`` simulated ``general`` tomograms (z, y, x voxels at ``voxel_size`` Å), seeds
    ``seed, seed+1, ...``, with :data:`SIM_STRUCTURES`; each has ``.name`` ``sim_<seed>``.
    ``kwargs`` go to :func:`cryosiam_nb.sim.simulate` (e.g. ``thickness_nm``)."""
    from tqdm.auto import tqdm

    from cryosiam_nb import sim

    out = []
    for i in tqdm(range(n), desc="simulate", disable=not progress):
        s = sim.simulate(
            tuple(shape),
            voxel_size=voxel_size,
            sample="general",
            seed=seed + i,
            mode=mode,
            structures=dict(SIM_STRUCTURES),
            progress=False,
            **kwargs,
        )
        try:
            s.name = f"sim_{seed + i}"
        except AttributeError:  # frozen dataclass: the data module names it instead
            pass
        out.append(s)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _card(
    path: Path, task: str, model: Any, cfg: dict[str, Any], command: str, metrics: dict
) -> None:
    from cryosiam_nb.io import atomic_path

    md = model.metadata
    sc = {**cfg["sim"], **cfg["lamella_sim"]} if task == "lamella" else cfg["sim"]
    extra = f", thickness_nm={sc['thickness_nm']}" if "thickness_nm" in sc else ""
    lines = [
        f"# {path.stem}",
        "",
        f"Task: `{task}` · preset `tiny` · trained by cryosiam_nb's own recipe (no external weights).",
        "",
        "## How it was made",
        f"- Command: `{command}`",
        f"- Data: {sc['n']} simulated `general` tomograms, shape {tuple(sc['shape'])} "
        f"(z, y, x) at {sc['voxel_size']} Å/voxel, `cryosiam_nb.sim.simulate(mode="
        f'"{sc["mode"]}", seed={sc["seed"]}+i, structures={SIM_STRUCTURES}{extra})`',
        f"- Train / validation tomograms (per-tomogram split): "
        f"{md.get('data_summary', {}).get('train')} / {md.get('data_summary', {}).get('val')}",
        f"- Input volume: `{md.get('data_summary', {}).get('input')}`, normalised "
        "(0.1/99.9 percentile clip → [0, 1], protein bright)",
        f"- Training voxel size: {model.voxel_size} Å; patch size {tuple(model.patch_size)} voxels",
        f"- Training settings: `{json.dumps(md.get('training', {}), default=str)}`",
        "",
        "## Validation metrics (held-out simulated tomograms)",
    ]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("(none)")
    lines += [
        "",
        "## Limits",
        "Tiny CPU model trained for minutes on small synthetic tomograms: a demonstration and",
        "test fixture, not a replacement for the published CryoSiam v1.0 weights.",
        "",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def _clean_side_files(out: Path) -> None:
    for suffix in (".state.pt",):
        p = out.with_name(out.stem + suffix)
        if p.exists():
            p.unlink()


def _last_val(history: Any) -> dict[str, float]:
    cols = [c for c in history.columns if c.startswith("val_")]
    return {c[4:]: float(history[c].iloc[-1]) for c in cols if np.isfinite(history[c].iloc[-1])}


def main(argv: list[str] | None = None) -> int:
    """Train all shipped tiny models; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m cryosiam_nb.training.recipe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default=None, help="output folder (default: cryosiam_nb/weights)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1–2 min)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", nargs="*", help="subset of tasks to train")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--epochs", type=int, default=None, help="multitask epochs (default: the recipe's)"
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="multitask: choose the epochs that fit this many minutes (timed on this machine)",
    )
    p.add_argument("--resume", action="store_true", help="multitask: continue an interrupted run")
    p.add_argument(
        "--calibrate-only",
        action="store_true",
        help="multitask: only re-calibrate the existing tiny-multitask.pt in --out (semantic "
        "prior correction, instance post-processing) and rewrite its card",
    )
    p.add_argument(
        "--refine-only",
        action="store_true",
        help="multitask: only (re)train and calibrate the refiner of tiny-multitask.pt in --out "
        "(with --calibrate-only: only calibrate its trained refiner again)",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        default=None,
        help="multitask: only run these continuation stages (e.g. stage3) on the existing "
        "tiny-multitask.pt in --out, then re-tune and rewrite its card",
    )
    args = p.parse_args(argv)
    from cryosiam_nb import models
    from cryosiam_nb.training import finetune, pretrain_dense, pretrain_subtomo

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else RECIPE
    out = Path(args.out) if args.out else models.WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m cryosiam_nb.training.recipe" + (" --quick" if args.quick else "")
    progress = not args.no_progress
    todo = set(args.only or TASK_FILES)
    t_start = time.perf_counter()
    report: dict[str, dict[str, float]] = {}
    times: dict[str, float] = {}

    if "multitask" in todo:
        from .multitask_recipe import continue_shipped_multitask, train_shipped_multitask
        from .refiner import refine_shipped_multitask

        t0 = time.perf_counter()
        if args.refine_only:
            flags = " --only multitask --refine-only" + " --calibrate-only" * args.calibrate_only
            report["multitask"] = refine_shipped_multitask(
                cfg, out, command + flags, progress, args.resume, train=not args.calibrate_only
            )
        elif args.stages or args.calibrate_only:
            report["multitask"] = continue_shipped_multitask(
                cfg, out, command, args.stages or [], progress, args.resume
            )
        else:
            report["multitask"] = train_shipped_multitask(
                cfg, out, command, progress, args.epochs, args.budget_minutes, args.resume
            )
        times["multitask"] = time.perf_counter() - t0
        todo.discard("multitask")
    times["simulate"] = 0.0
    if todo:
        t0 = time.perf_counter()
        sims = simulate_training_set(**cfg["sim"], progress=progress)
        times["simulate"] = time.perf_counter() - t0
    vf = cfg["val_fraction"]

    dense_path = out / f"{TASK_FILES['dense_ssl']}.pt"
    if not todo:
        pass
    elif "dense_ssl" in todo or not dense_path.exists():
        t0 = time.perf_counter()
        ssl, hist = pretrain_dense(
            sims,
            preset="tiny",
            image="clean",
            val_fraction=vf,
            out=dense_path,
            progress=progress,
            **cfg["dense_ssl"],
        )
        times["dense_ssl"] = time.perf_counter() - t0
        report["dense_ssl"] = _last_val(hist)
        report["dense_ssl"]["train_loss"] = float(hist["loss"].iloc[-1])
        models.save(ssl, dense_path, metrics=report["dense_ssl"])
        _clean_side_files(dense_path)
        _card(dense_path.with_suffix(".md"), "dense_ssl", ssl, cfg, command, report["dense_ssl"])
    else:
        ssl = models.load(dense_path)

    lamella_sims = None
    for task in ("denoise", "lamella", "semantic", "instance"):
        if task not in todo:
            continue
        t0 = time.perf_counter()
        data = sims
        if task == "lamella":
            lam_cfg = {**cfg["sim"], **cfg["lamella_sim"]}
            lamella_sims = simulate_training_set(**lam_cfg, progress=progress)
            data = lamella_sims
        path = out / f"{TASK_FILES[task]}.pt"
        hc = dict(cfg["heads"])
        hc["epochs"] = cfg.get("head_epochs", {}).get(task, hc["epochs"])
        hc.setdefault("val_every", hc["epochs"])
        model, hist = finetune(
            task,
            data,
            backbone=ssl,
            preset="tiny",
            image="noisy",
            val_fraction=vf,
            out=path,
            progress=progress,
            **hc,
        )
        times[task] = time.perf_counter() - t0
        report[task] = dict(model.metadata.get("metrics", {}))
        _clean_side_files(path)
        _card(path.with_suffix(".md"), task, model, cfg, command, report[task])

    if "subtomo_ssl" in todo:
        t0 = time.perf_counter()
        path = out / f"{TASK_FILES['subtomo_ssl']}.pt"
        sc = dict(cfg["subtomo"])
        sub, hist = pretrain_subtomo(
            sims, preset="tiny", image="clean", val_fraction=vf, out=path, progress=progress, **sc
        )
        times["subtomo_ssl"] = time.perf_counter() - t0
        report["subtomo_ssl"] = _last_val(hist)
        report["subtomo_ssl"]["train_loss"] = float(hist["loss"].iloc[-1])
        report["subtomo_ssl"].update(_subtomo_knn(sub, sims, sc["box"], vf, cfg))
        models.save(sub, path, metrics=report["subtomo_ssl"])
        _clean_side_files(path)
        _card(path.with_suffix(".md"), "subtomo_ssl", sub, cfg, command, report["subtomo_ssl"])

    total = time.perf_counter() - t_start
    print("\nValidation metrics (held-out simulated tomograms)")
    for task, m in report.items():
        vals = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items())
        print(f"  {TASK_FILES[task]:16s} {times.get(task, 0):6.0f} s  {vals}")
    size = sum(f.stat().st_size for f in out.glob("tiny-*.pt"))
    print(
        f"total {total:.0f} s (simulation {times['simulate']:.0f} s); weights {size / 2**20:.2f} MiB in {out}"
    )
    return 0


def _subtomo_knn(model: Any, sims: list[Any], box: int, vf: float, cfg: dict) -> dict[str, float]:
    """1-NN (cosine) species accuracy of held-out particles against training particles."""
    from cryosiam_nb.training.data import as_tomograms, split_tomograms
    from cryosiam_nb.training.ssl import subtomograms_from_tomograms

    tomos = as_tomograms(sims, image="clean")
    train, val = split_tomograms([t.name for t in tomos], vf, cfg["subtomo"]["seed"])
    sub, meta = subtomograms_from_tomograms(tomos, box, min_voxels=150)
    model.eval()
    with torch.no_grad():
        emb = torch.cat(
            [model.embed(torch.from_numpy(sub[i : i + 64, None])) for i in range(0, len(sub), 64)]
        )
    emb = emb.numpy()
    tr = meta["tomogram"].isin(train).to_numpy()
    va = meta["tomogram"].isin(val).to_numpy()
    if not tr.any() or not va.any():
        return {}
    sim_ = emb[va] @ emb[tr].T
    pred = meta["species"].to_numpy()[tr][sim_.argmax(1)]
    acc = float(np.mean(pred == meta["species"].to_numpy()[va]))
    return {"knn1_species_accuracy": acc, "n_val_particles": float(va.sum())}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
