"""Segmentation quality of the shipped tiny models on clean / noisy / denoised tomograms.

Three tables, on held-out simulated tomograms (``sim.simulate(mode="fast", sample="general")``
with the training recipe's structure mix, 10 Å voxels, seeds :data:`TEST_SEEDS`, disjoint from
the recipe's 2024…2031):

1. **Semantic Dice per class** (``tiny-semantic`` + ``tl.predict`` → ``labels``;
   ``metrics.dice`` against the simulator's ``semantic``), laid out like the thesis' Table 6
   (rows classes, columns clean / noisy / denoised) with the thesis' numbers beside;
2. **Instance AP-50 … AP-80** (``tiny-instance`` + ``tl.predict`` → ``tl.instances`` →
   ``metrics.average_precision`` against the simulator's ``instances``), like Table 7;
3. **Particle-picking F1 per size category**: centroids of the predicted instances
   (``tl.particles``) vs the simulator's particle centres, matched one to one within
   :data:`RADIUS` voxels (``metrics.picking_scores``). Per true size category: recall =
   matched true particles / true particles of that category; precision counts a match as a
   true positive of its true particle's category and an unmatched prediction as a false
   positive of the category of its own volume (``constants.size_category``).

Every input is normalised as the recipe's training data (``pp.normalize(invert=False)``:
0.1/99.9 % clip → [0, 1]); "denoised" = ``tiny-denoise`` output on the normalised noisy
volume, normalised the same way.
Unlike the thesis (one model trained per input type) the same model — trained on *noisy*
volumes by the recipe — is applied to all three inputs. A missing model prints
"not available" and its table is skipped.

    python benchmarks/bench_quality.py --quick    # one 48×96×96 tomogram
    python benchmarks/bench_quality.py            # two 64×128×128 tomograms
    python benchmarks/bench_quality.py --weights DIR   # DIR/tiny-<task>.pt instead of shipped
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
from bench_denoise import simulate  # noqa: E402  (the same held-out tomograms)

TEST_SEEDS = (7001, 7002, 7003)
RADIUS = 5.0  # voxels (50 Å at 10 Å/voxel)
INPUTS = ("clean", "noisy", "denoised")
AP_T = (50, 55, 60, 65, 70, 75, 80)
SIZE_ORDER = ("very big", "big", "medium", "small", "tiny")

#: thesis Table 6 (Dice; separate models trained per input type; CryoETSim test set)
THESIS_DICE = {
    "background": (0.944, 0.894, 0.896),
    "membrane": (0.778, 0.639, 0.671),
    "microtubule": (0.874, 0.754, 0.793),
    "particle": (0.822, 0.619, 0.636),
    "actin": (0.788, 0.280, 0.342),
    "dna": (0.703, 0.332, 0.350),
    "all classes": (0.836, 0.635, 0.664),
}
#: mean of the thesis' five foreground classes (our derivation from Table 6)
THESIS_FG = tuple(
    round(float(np.mean([THESIS_DICE[c][i] for c in list(THESIS_DICE)[1:6]])), 3) for i in range(3)
)
#: thesis Table 7 (AP at IoU thresholds 0.50 … 0.80)
THESIS_AP = {
    "clean": (0.437, 0.417, 0.393, 0.346, 0.241, 0.099, 0.016),
    "noisy": (0.229, 0.180, 0.121, 0.063, 0.020, 0.003, 0.000),
    "denoised": (0.249, 0.196, 0.133, 0.071, 0.024, 0.003, 0.000),
}


def load(task: str, weights: str | None):
    """Shipped ``tiny-<task>`` (or ``weights/tiny-<task>.pt``); (model, None) or (None, why)."""
    try:
        from cryosiam_nb import models

        src = f"tiny-{task}" if weights is None else str(Path(weights) / f"tiny-{task}.pt")
        return models.load(src), None
    except Exception as e:  # noqa: BLE001 - any missing piece → "not available"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def semantic_dice(model, vol, gt: np.ndarray) -> dict[str, float]:
    """Dice per simulator class name (predicted labels mapped to simulator ids by name)."""
    from cryosiam_nb import metrics, tl
    from cryosiam_nb.sim import SEMANTIC_CLASSES

    pred = np.asarray(tl.predict(vol, model)["labels"].compute().values)
    names = tuple(model.class_names or SEMANTIC_CLASSES)
    lut = np.zeros(max(len(names), 1), dtype=np.int64)
    for i, n in enumerate(names):
        lut[i] = SEMANTIC_CLASSES.index(n) if n in SEMANTIC_CLASSES else 255
    pred = lut[pred]
    return metrics.dice(pred, gt, classes=dict(enumerate(SEMANTIC_CLASSES)))


def instance_scores(model, vol, gt: np.ndarray, truth: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """AP at :data:`AP_T` and the per-size-category picking counts on one input."""
    from cryosiam_nb import metrics, segmentation, tl

    maps = tl.predict(vol, model).compute()
    inst = segmentation.instances(maps, progress=False)
    ap = metrics.average_precision(inst.values, gt, thresholds=[t / 100 for t in AP_T])
    table = segmentation.particles(inst)
    pick = metrics.picking_scores(table[["z", "y", "x"]], truth[["z", "y", "x"]], RADIUS)
    pred_cat = np.asarray(table["size_category"].astype(str))
    true_cat = np.asarray(truth["size_category"].astype(str))
    m = pick["matches"]
    matched_pred = np.zeros(len(table), bool)
    matched_pred[m[:, 0]] = True
    rows = []
    for cat in SIZE_ORDER:
        n_true = int((true_cat == cat).sum())
        tp = int((true_cat[m[:, 1]] == cat).sum()) if len(m) else 0
        fp = int(((pred_cat == cat) & ~matched_pred).sum())
        rows.append({"size_category": cat, "n_true": n_true, "tp": tp, "fp": fp})
    rows.append({"size_category": "all", "n_true": len(truth), "tp": pick["tp"], "fp": pick["fp"]})
    return ap, pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 48×96×96 tomogram (CI)")
    ap.add_argument("--weights", help="folder with tiny-<task>.pt (default: shipped models)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from cryosiam_nb import pp, tl
    from cryosiam_nb.sim import SEMANTIC_CLASSES

    shape = (48, 96, 96) if args.quick else (64, 128, 128)
    seeds = TEST_SEEDS[:1] if args.quick else TEST_SEEDS[:2]
    where = (
        f"{len(seeds)} held-out simulated tomogram(s) {'×'.join(map(str, shape))} (z, y, x) at "
        f"10 Å, seeds {', '.join(map(str, seeds))}"
    )
    sem, why_sem = load("semantic", args.weights)
    ins, why_ins = load("instance", args.weights)
    den, why_den = load("denoise", args.weights)
    for name, why in (("semantic", why_sem), ("instance", why_ins), ("denoise", why_den)):
        if why:
            print(f"tiny-{name}: not available ({why})")
    sfx = "_quick" if args.quick else ""
    if sem is None:
        rows = [
            {"class": c, "ours": f"not available ({why_sem})"}
            | {f"thesis {n}": t for n, t in zip(INPUTS, th)}
            for c, th in THESIS_DICE.items()
        ]
        emit(pd.DataFrame(rows), f"quality_semantic{sfx}", "Semantic Dice: thesis Table 6 only")
    if ins is None:
        rows = [
            {"input": n, "ours": f"not available ({why_ins})"}
            | {f"thesis AP{t}": v for t, v in zip(AP_T, THESIS_AP[n])}
            for n in INPUTS
        ]
        emit(pd.DataFrame(rows), f"quality_instances{sfx}", "Instance AP: thesis Table 7 only")
    if sem is None and ins is None:
        return
    inputs = INPUTS if den is not None else INPUTS[:2]

    dice_rows: dict[str, list[dict]] = {k: [] for k in inputs}
    ap_rows: dict[str, list[dict]] = {k: [] for k in inputs}
    pick_rows: dict[str, list[pd.DataFrame]] = {k: [] for k in inputs}
    t0 = time.perf_counter()
    for seed in seeds:
        s = simulate(shape, seed)
        v = s.volumes
        vols = {k: pp.normalize(v[k], invert=False).compute() for k in ("clean", "noisy")}
        if den is not None:
            d = tl.predict(vols["noisy"], den)["denoised"].compute()
            vols["denoised"] = pp.normalize(d, invert=False).compute()
        for name in inputs:
            if sem is not None:
                dice_rows[name].append(semantic_dice(sem, vols[name], v["semantic"].values))
            if ins is not None:
                a, p = instance_scores(ins, vols[name], v["instances"].values, s.particles)
                ap_rows[name].append(a)
                pick_rows[name].append(p)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    if sem is not None:
        classes = list(SEMANTIC_CLASSES)
        rows = []
        for c in classes + ["mean (5 foreground classes)", "mean (6 incl. background)"]:
            row: dict = {"class": c}
            for name in inputs:
                per = pd.DataFrame(dice_rows[name])
                if c.startswith("mean (5"):
                    val = per[classes[1:]].mean(axis=1, skipna=True).mean()
                elif c.startswith("mean (6"):
                    val = per[classes].mean(axis=1, skipna=True).mean()
                else:
                    val = per[c].mean(skipna=True)
                row[name] = round(float(val), 3)
            th = THESIS_DICE.get(c) or (THESIS_DICE["all classes"] if "6" in c else THESIS_FG)
            for name, t in zip(INPUTS, th or (None,) * 3):
                row[f"thesis {name}"] = t
            rows.append(row)
        emit(
            pd.DataFrame(rows),
            f"quality_semantic{sfx}",
            f"Semantic Dice per class (tiny-semantic, trained on noisy) on {where}; thesis "
            "Table 6 beside (its 'all classes' row next to our 6-class mean)",
        )
    if ins is not None:
        rows = []
        for name in inputs:
            per = pd.DataFrame(ap_rows[name])
            row = {"input": name}
            row.update({f"AP{t}": round(float(per[f"AP{t}"].mean()), 3) for t in AP_T})
            row["n_pred"] = int(per["n_pred"].sum())
            row["n_true"] = int(per["n_gt"].sum())
            row["thesis AP50"], row["thesis AP70"] = THESIS_AP[name][0], THESIS_AP[name][4]
            rows.append(row)
        emit(
            pd.DataFrame(rows),
            f"quality_instances{sfx}",
            f"Instance AP (tiny-instance, trained on noisy) on {where}; thesis Table 7 beside",
        )
        rows = []
        for name in inputs:
            tot = pd.concat(pick_rows[name]).groupby("size_category", sort=False).sum()
            for cat, r in tot.iterrows():
                tp, fp, n_true = int(r["tp"]), int(r["fp"]), int(r["n_true"])
                prec = tp / (tp + fp) if tp + fp else np.nan
                rec = tp / n_true if n_true else np.nan
                f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
                if not n_true and not tp + fp:
                    f1 = np.nan
                rows.append(
                    {
                        "input": name,
                        "size_category": cat,
                        "n_true": n_true,
                        "tp": tp,
                        "fp": fp,
                        "precision": round(prec, 3),
                        "recall": round(rec, 3),
                        "F1": round(f1, 3),
                    }
                )
        emit(
            pd.DataFrame(rows),
            f"quality_picking{sfx}",
            f"Particle picking per true size category (tiny-instance centroids vs simulator "
            f"centres, radius {RADIUS:g} voxels) on {where}",
        )


if __name__ == "__main__":
    main()
