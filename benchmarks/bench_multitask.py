"""Held-out quality of the multi-task model against the separate tiny models and the thesis.

Held-out tomograms: tilt-series simulations (``mode="tilt"``) at 10 Å of the ``general``
and ``transcription`` samples, 96×192×192 voxels plus a thicker 128×192×192 one, seeds
:data:`TEST_SEEDS` — disjoint from every seed the recipe uses (2024…, 3024…, 5000…5023,
5900…) — with the simulator's default imaging (not the recipe's drawn ranges).

Tables:

1. **Quality** per model set (``tiny-multitask``: one ``tl.predict`` pass for all heads;
   ``separate``: ``tiny-denoise``/``-lamella``/``-semantic``/``-instance``): semantic Dice
   over all present classes (background included, as the thesis' "all classes") and per
   class, instance AP-50/AP-70, picking recall/F1 of particles under 150 voxels and of all
   (centroids within :data:`RADIUS` voxels), denoise PSNR/SSIM against the clean volume,
   lamella Dice of ``tl.lamella_mask`` against the true slab, and the dense pipeline's
   time per voxel (predictions only).
2. **Robustness** of ``tiny-multitask`` on variants of the first held-out tomogram:
   another voxel size (14 Å simulated, ``pp.rescale`` to 10 Å), thicker sample, lower dose
   (8 e⁻/Å²), higher dose (40 e⁻/Å²), cleaner data (projection SNR 0.8), and raw-contrast
   input through ``pp.normalize(invert=True)``. The held-out default is a projection SNR of
   0.1; the table gives the projection SNR each variant realised.

    python benchmarks/bench_multitask.py            # 3 held-out tomograms + robustness
    python benchmarks/bench_multitask.py --quick    # one 64×128×128 tomogram
    python benchmarks/bench_multitask.py --extra 6 --no-separate --no-robustness
                                                    # 9 held-out tomograms, mean and std
    python benchmarks/bench_multitask.py --validation --weights DIR --with-shipped
                                                    # choose between candidates on the 16
                                                    # validation tomograms, never test ones
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import emit  # noqa: E402

TEST_SEEDS = (9101, 9102, 9103)
RADIUS = 4.0  # voxels (40 Å at 10 Å/voxel)
THESIS = {"semantic_all": 0.635, "ap50": 0.229}
SMALL = 150  # voxels: "particles under 150 voxels"


#: the held-out scenes, in order: (name, shape in voxels, sample); ``--extra N`` repeats
#: the cycle on the next seeds (9104, …)
_KINDS = (
    ("general 96×192×192", (96, 192, 192), "general"),
    ("transcription 96×192×192", (96, 192, 192), "transcription"),
    ("general thick 128×192×192", (128, 192, 192), "general"),
)


#: validation scenes (seed, shape in voxels, sample) for choosing between candidate models
#: and settings: never trained or calibrated on, disjoint from :data:`TEST_SEEDS`
VALIDATION: tuple[tuple[int, tuple[int, int, int], str], ...] = (
    (7201, (96, 192, 192), "general"),
    (7202, (96, 192, 192), "transcription"),
    (7203, (96, 192, 192), "general"),
    (7204, (96, 192, 192), "chromatin"),
    (7205, (96, 192, 192), "general"),
    *((seed, (128, 192, 192), "general") for seed in range(7206, 7217)),
)


def _simulated(specs: list[tuple[str, tuple, str, int]]) -> list[tuple[str, object]]:
    """(name, Simulation) per (name, shape, sample, seed): tilt series, default imaging, 10 Å."""
    from cryosiam_nb import sim

    out = []
    for name, shape, sample, seed in specs:
        s = sim.simulate(
            shape,
            voxel_size=10.0,
            sample=sample,
            seed=seed,
            mode="tilt",
            progress=False,
            keep_tilt_series=False,
        )
        out.append((name, s))
    return out


def validation(quick: bool) -> list[tuple[str, object]]:
    """(name, Simulation) of the validation set :data:`VALIDATION` (its first scene at
    64×128×128 with ``quick``)."""
    if quick:
        return _simulated([("validation general 64×128×128", (64, 128, 128), "general", 7201)])
    return _simulated([(f"{smp} {seed}", shape, smp, seed) for seed, shape, smp in VALIDATION])


def held_out(quick: bool, extra: int = 0) -> list[tuple[str, object]]:
    """(name, Simulation) of the held-out set: the three of :data:`TEST_SEEDS`, then
    ``extra`` more on the following seeds (the same cycle of samples and shapes), to show
    how much a metric varies from one tomogram to the next."""
    if quick:
        specs = [("general 64×128×128", (64, 128, 128), "general", TEST_SEEDS[0])]
    else:
        specs = []
        for i in range(len(TEST_SEEDS) + max(int(extra), 0)):
            name, shape, sample = _KINDS[i % len(_KINDS)]
            seed = TEST_SEEDS[0] + i
            specs.append(
                (name if i < len(TEST_SEEDS) else f"{name} (seed {seed})", shape, sample, seed)
            )
    return _simulated(specs)


def _centres(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    if not len(ids):
        return np.zeros((0, 3)), np.zeros(0)
    return np.array(ndimage.center_of_mass(lab > 0, lab, ids)), counts


def dense(data, model_set: dict, **predict_kwargs) -> tuple[dict, float]:
    """Denoised, lamella mask, semantic labels, instance labels; and the prediction seconds.

    ``predict_kwargs`` (window, overlap, precision) go to the multi-task ``tl.predict``."""
    from cryosiam_nb import tl

    t0 = time.perf_counter()
    if "multitask" in model_set:
        ds = tl.predict(data, model_set["multitask"], **predict_kwargs).compute()
        t_pred = time.perf_counter() - t0
        den, lam_in, sem, inst = ds["denoised"], ds, ds["semantic_labels"], ds
    else:
        den = tl.predict(data, model_set["denoise"])["denoised"].compute()
        lam_in = tl.predict(data, model_set["lamella"]).compute()
        sem = tl.predict(data, model_set["semantic"])["labels"].compute()
        inst = tl.predict(data, model_set["instance"]).compute()
        t_pred = time.perf_counter() - t0
    # the multi-task model's card carries settings tuned on validation tomograms
    mt = model_set.get("multitask")
    lam_kw = dict(mt.metadata.get("lamella_defaults", {})) if mt is not None else {}
    lamella = tl.lamella_mask(lam_in, progress=False, **lam_kw).compute()
    tuned = dict(mt.metadata.get("instance_defaults", {})) if mt is not None else {}
    labels = tl.instances(inst, progress=False, **tuned)
    sem_kw = dict(mt.metadata.get("semantic_defaults", {})) if mt is not None else {}
    if sem_kw:  # the multi-task model's tuned minimum component sizes
        sem = tl.postprocess_semantic(sem, progress=False, **sem_kw)
    return {
        "denoised": den.values,
        "lamella": lamella.values,
        "semantic": sem.values,
        "instances": np.asarray(labels.values),
    }, t_pred


def score(out: dict, truth) -> dict[str, float]:
    from cryosiam_nb import metrics, pp
    from cryosiam_nb.constants import SEMANTIC_CLASSES

    v = truth.volumes
    gt_sem = v["semantic"].values.astype(np.int64)
    present = [int(c) for c in np.unique(gt_sem)]
    d = metrics.dice(
        out["semantic"].astype(np.int64), gt_sem, classes={c: SEMANTIC_CLASSES[c] for c in present}
    )
    r: dict[str, float] = {
        "semantic_all": float(np.mean([d[SEMANTIC_CLASSES[c]] for c in present]))
    }
    r.update({f"dice_{k}": float(x) for k, x in d.items() if k != "mean"})
    gt = v["instances"].values
    ap = metrics.average_precision(out["instances"], gt, thresholds=[0.5, 0.7])
    r["ap50"], r["ap70"] = float(ap["AP50"]), float(ap["AP70"])
    pc, _ = _centres(out["instances"])
    tc, tsize = _centres(gt)
    for tag, keep in (("small", tsize < SMALL), ("all", np.ones(len(tc), bool))):
        if keep.sum() == 0:  # nothing to pick (no particle under 150 voxels in the
            # transcription or chromatin samples): undefined, left out of the mean
            r[f"recall_{tag}"] = r[f"f1_{tag}"] = float("nan")
            continue
        if len(pc) == 0:
            r[f"recall_{tag}"] = r[f"f1_{tag}"] = 0.0
            continue
        p = metrics.picking_scores(pc, tc[keep], radius=RADIUS)
        r[f"recall_{tag}"], r[f"f1_{tag}"] = float(p["recall"]), float(p["f1"])
        if tag == "small":  # precision against small particles only: a prediction matched
            # to a big particle is not a false positive of the small ones
            pall = metrics.picking_scores(pc, tc, radius=RADIUS)
            m = pall["matches"]
            tp = int(keep[m[:, 1]].sum()) if len(m) else 0
            fp = int(len(pc) - len(m))
            prec = tp / max(tp + fp, 1)
            rec = tp / max(int(keep.sum()), 1)
            r["f1_small"] = 2 * prec * rec / max(prec + rec, 1e-9)
            r["recall_small"] = rec
    # the clean volume normalised like every input (0.1/99.9 % clip → [0, 1])
    clean = np.asarray(pp.normalize(np.asarray(v["clean"].values, np.float32), invert=False))
    r["psnr"] = metrics.psnr(out["denoised"], clean, data_range=1.0)
    r["ssim"] = metrics.ssim(out["denoised"], clean, data_range=1.0)
    r["lamella_dice"] = float(
        metrics.dice(out["lamella"].astype(np.int64), v["lamella"].values.astype(np.int64), [1])[
            "mean"
        ]
    )
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 64×128×128 tomogram")
    ap.add_argument("--weights", help="folder with tiny-<task>.pt (default: shipped models)")
    ap.add_argument("--no-robustness", action="store_true")
    ap.add_argument(
        "--with-shipped",
        action="store_true",
        help="with --weights: also the shipped tiny-multitask, to compare a new training run",
    )
    ap.add_argument("--no-separate", action="store_true", help="skip the four separate models")
    ap.add_argument(
        "--validation",
        action="store_true",
        help="score the validation tomograms 7201–7216 instead of the held-out ones (to "
        "choose between candidates; no robustness table)",
    )
    ap.add_argument(
        "--extra",
        type=int,
        default=0,
        help="this many more held-out tomograms (seeds 9104, …, the same cycle of samples): "
        "the table then also gives each metric's standard deviation over tomograms",
    )
    ap.add_argument(
        "--tta",
        type=int,
        default=0,
        help="also the multi-task model with test-time augmentation over this many flips "
        "(tl.predict(tta=N); informational: the defaults are not chosen on held-out data)",
    )
    args = ap.parse_args(argv)
    from cryosiam_nb import models, pp, sim

    def load(task):
        src = (
            f"tiny-{task}" if args.weights is None else str(Path(args.weights) / f"tiny-{task}.pt")
        )
        return models.load(src)

    # name → (models, tl.predict keyword arguments of the multi-task model)
    multitask_name = "tiny-multitask (one backbone)"  # one backbone pass (+ the refiner's pass)
    sets: dict[str, tuple[dict, dict]] = {multitask_name: ({"multitask": load("multitask")}, {})}
    if args.tta:
        sets[f"tiny-multitask, TTA {args.tta} flips"] = (
            {"multitask": sets[multitask_name][0]["multitask"]},
            {"tta": args.tta},
        )
    if args.with_shipped and args.weights is not None:
        sets["shipped tiny-multitask"] = ({"multitask": models.load("tiny-multitask")}, {})
    if not args.no_separate:
        sets["separate tiny models"] = (
            {t: models.load(f"tiny-{t}") for t in ("denoise", "lamella", "semantic", "instance")},
            {},
        )
    tomos = validation(args.quick) if args.validation else held_out(args.quick, args.extra)
    rows = []
    for tname, s in tomos:
        data = pp.normalize(s.volumes["noisy"].assign_attrs(voxel_size=10.0), invert=False)
        data = data.persist()
        for sname, (ms, kw) in sets.items():
            out, secs = dense(data, ms, **kw)
            r = score(out, s)
            r["µs/voxel"] = 1e6 * secs / data.size
            rows.append({"tomogram": tname, "models": sname, **r})
            print(tname, sname, {k: round(v, 3) for k, v in r.items()}, flush=True)
    df = pd.DataFrame(rows)
    mean = df.groupby("models", sort=False).mean(numeric_only=True).reset_index()
    mean.insert(0, "tomogram", "mean")
    parts = [df, mean]
    if len(tomos) > len(TEST_SEEDS):  # how much a metric moves between tomograms
        sd = df.groupby("models", sort=False).std(numeric_only=True).reset_index()
        sd.insert(0, "tomogram", "std")
        parts.append(sd)
    table = pd.concat(parts, ignore_index=True)
    cols = [
        "tomogram",
        "models",
        "semantic_all",
        "dice_membrane",
        "dice_microtubule",
        "dice_particle",
        "dice_actin",
        "dice_dna",
        "ap50",
        "ap70",
        "recall_small",
        "f1_small",
        "recall_all",
        "f1_all",
        "psnr",
        "ssim",
        "lamella_dice",
        "µs/voxel",
    ]
    table = table[[c for c in cols if c in table.columns]].round(3)
    if args.validation:
        emit(
            table,
            "multitask_validation",
            "Validation quality (tilt series, 10 Å, seeds "
            f"{VALIDATION[0][0]}–{VALIDATION[-1][0]}; for choosing, never test ones)",
        )
        return
    emit(
        table,
        "multitask_quality",
        f"Held-out quality (tilt series, 10 Å, seeds {TEST_SEEDS[0]}–"
        f"{TEST_SEEDS[0] + len(tomos) - 1}); thesis noisy: semantic "
        f"all classes {THESIS['semantic_all']}, AP-50 {THESIS['ap50']}",
    )
    if args.no_robustness:
        return
    base_shape = (64, 128, 128) if args.quick else (96, 192, 192)
    seed = TEST_SEEDS[0]
    mt = sets[multitask_name][0]

    def variant(shape, **kw):
        return sim.simulate(
            shape,
            sample="general",
            seed=seed,
            mode="tilt",
            progress=False,
            keep_tilt_series=False,
            **{"voxel_size": 10.0, **kw},
        )

    # the held-out default is a projection SNR of 0.1; the dose variants name the dose, the
    # table gives the projection SNR each variant realised
    variants = [
        (
            "14 Å, rescaled to 10 Å",
            variant(tuple(int(round(x * 10 / 14)) for x in base_shape), voxel_size=14.0),
            "rescale",
        ),
        (
            "thicker sample (90 % of the volume)",
            variant((base_shape[0] + 32, *base_shape[1:]), thickness_nm=0.9 * (base_shape[0] + 32)),
            "noisy",
        ),
        ("lower dose (8 e/Å²)", variant(base_shape, dose=8.0), "noisy"),
        ("higher dose (40 e/Å²)", variant(base_shape, dose=40.0), "noisy"),
        ("cleaner data (projection SNR 0.8)", variant(base_shape, snr=0.8), "noisy"),
    ]
    variants.append(("raw contrast + normalize(invert=True)", tomos[0][1], "raw"))
    rrows = []
    for vname, s, how in variants:
        if how == "raw":
            data = pp.normalize(s.raw_noisy.assign_attrs(voxel_size=10.0), invert=True)
            truth = s
        elif how == "rescale":
            data = pp.normalize(s.volumes["noisy"].assign_attrs(voxel_size=14.0), invert=False)
            data = pp.rescale(data, 10.0)
            truth = _truth_on(s, data.shape)
        else:
            data = pp.normalize(s.volumes["noisy"].assign_attrs(voxel_size=10.0), invert=False)
            truth = s
        out, _ = dense(data.persist(), mt)
        r = score(out, truth)
        rrows.append(
            {
                "variant": vname,
                "projection_snr": float(s.params.get("snr_realised") or s.params["snr"]),
                **{
                    k: r[k]
                    for k in (
                        "semantic_all",
                        "dice_membrane",
                        "dice_actin",
                        "ap50",
                        "f1_small",
                        "f1_all",
                        "psnr",
                        "lamella_dice",
                    )
                },
            }
        )
        print(vname, rrows[-1], flush=True)
    emit(
        pd.DataFrame(rrows).round(3),
        "multitask_robustness",
        "tiny-multitask robustness (variants of the first held-out tomogram)",
    )


def flop_per_voxel(model, patch: int = 32) -> float:
    """Forward FLOP per output voxel of ``model`` on one ``patch``³ window."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, patch, patch, patch)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() / patch**3


def _truth_on(s, shape):
    """The simulation's truth volumes resampled (nearest / linear) onto ``shape``."""
    from scipy import ndimage

    class _T:
        pass

    t = _T()
    vols = {}
    for k in ("semantic", "instances", "lamella", "clean"):
        a = s.volumes[k].values
        zoom = [n / o for n, o in zip(shape, a.shape)]
        vols[k] = _Var(
            ndimage.zoom(
                a,
                zoom,
                order=1 if k == "clean" else 0,
                grid_mode=True,
                mode="nearest",
                prefilter=False,
            )
        )
    t.volumes = vols
    return t


class _Var:
    def __init__(self, a):
        self.values = a


if __name__ == "__main__":
    main()
