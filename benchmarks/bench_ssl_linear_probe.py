"""Does DenseSimSiam self-supervision learn? A linear probe on frozen voxel embeddings.

Pretrain the ``tiny`` preset by DenseSimSiam SSL on simulated tomograms (CPU), freeze it,
and fit a 1×1×1 linear head (multinomial logistic regression on each voxel's feature
vector, class-balanced, features standardised) for the semantic classes on held-out
*probe-training* tomograms; score per-class Dice on *test* tomograms that neither SSL nor
the probe saw. SSL and probe use the same volume: ``--input noisy`` (default, what real
data looks like) or ``--input clean`` (the thesis' pretraining input; there the raw
intensity of a noise-free voxel is already a strong feature for background/particle, and
the tiny SSL model beat the random encoder but not raw intensities in our run). Three
feature sets:

(a) ``ssl``    — the frozen SSL network's voxel representation: its FPN pyramid
    (p2…p5, coarser levels trilinearly upsampled to the voxel grid and concatenated;
    4 × 16 = 64 channels for ``tiny``) — like SimSiam's linear evaluation, the probe reads
    the representation *before* the projector,
(b) ``random`` — the same network randomly initialised and frozen (its BatchNorm
    statistics re-estimated on the data, which only helps this baseline), same layer,
(c) ``raw``    — the raw voxel intensity (a 1×1×1 linear head on one feature).

Two control rows probe the projector output ``model.backbone(x)`` (the dense embedding the
SSL loss acts on and the task heads read; 16-d for ``tiny``) of (a) and (b); the verdict
line compares (a), (b), (c) as defined above.

Usage::

    python benchmarks/bench_ssl_linear_probe.py           # full (≤ 15 min on 2 cores)
    python benchmarks/bench_ssl_linear_probe.py --quick   # CI smoke (≤ 1 min)

Prints a table and writes ``benchmarks/results/ssl_linear_probe.csv`` (+ ``.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryosiam_nb import metrics, models  # noqa: E402
from cryosiam_nb.training import pretrain_dense  # noqa: E402
from cryosiam_nb.training.data import as_tomograms  # noqa: E402
from cryosiam_nb.training.recipe import RECIPE, simulate_training_set  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ("background", "membrane", "microtubule", "particle", "actin", "dna")


def _calibrate_bn(model: torch.nn.Module, tomos, crop: int, n: int = 16, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics of a random network on data crops."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(n):
            t = tomos[rng.integers(len(tomos))]
            c = [int(rng.integers(0, s - crop + 1)) for s in t.image.shape]
            x = t.image[c[0] : c[0] + crop, c[1] : c[1] + crop, c[2] : c[2] + crop]
            model.backbone(
                torch.from_numpy(np.ascontiguousarray(x))[None, None].repeat(2, 1, 1, 1, 1)
            )
    model.eval()


def _features(kind: str, model, vol: np.ndarray) -> np.ndarray:
    """(n_voxels, D) features of a volume: raw intensity, the FPN pyramid (``ssl``,
    ``random``) or the projector output (``… projector``), by MONAI sliding windows (the
    model's patch, overlap 0.5, Gaussian blending)."""
    from monai.inferers import sliding_window_inference

    if kind == "raw":
        return vol.reshape(-1, 1).astype(np.float32)
    net = model.backbone

    def layer(x: torch.Tensor) -> torch.Tensor:
        _, pyramid = net.features(x)
        if kind.endswith("projector"):
            return net.projector(pyramid[0])
        size = pyramid[0].shape[2:]
        up = [F.interpolate(p, size=size, mode="trilinear", align_corners=False) for p in pyramid]
        return torch.cat(up, dim=1)

    model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
        out = sliding_window_inference(
            x, tuple(model.patch_size), 4, layer, overlap=0.5, mode="gaussian"
        )
    return out[0].reshape(out.shape[1], -1).T.numpy()


def _sample_voxels(labels: np.ndarray, per_class: int, rng) -> np.ndarray:
    idx = []
    flat = labels.ravel()
    for c in np.unique(flat):
        where = np.flatnonzero(flat == c)
        idx.append(rng.choice(where, min(per_class, len(where)), replace=False))
    return np.concatenate(idx)


def probe(kind: str, model, train_t, test_t, per_class: int, seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for t in train_t:
        lab = t.labels["semantic"].astype(np.int64)
        f = _features(kind, model, t.image)
        idx = _sample_voxels(lab, per_class, rng)
        xs.append(f[idx])
        ys.append(lab.ravel()[idx])
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=300, random_state=seed),
    )
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    preds, gts = [], []
    for t in test_t:
        f = _features(kind, model, t.image)
        preds.append(clf.predict(f).reshape(t.image.shape))
        gts.append(t.labels["semantic"].astype(np.int64))
    classes = dict(enumerate(CLASSES))
    d = metrics.dice(np.stack(preds), np.stack(gts), classes=classes)
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (≤ 1 min)")
    p.add_argument("--epochs", type=int, default=None, help="SSL epochs (default: the recipe's)")
    p.add_argument("--input", default="noisy", choices=["clean", "noisy"], help="volume used")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.quick:
        sim_cfg = dict(n=4, shape=(32, 48, 48), voxel_size=10.0, seed=500, mode="fast")
        ssl_cfg = dict(
            RECIPE["dense_ssl"], epochs=1, samples_per_epoch=8, region_size=24, crop_size=16
        )
        n_probe, n_test, per_class = 1, 1, 500
    else:
        sim_cfg = dict(RECIPE["sim"], n=10, seed=500)
        ssl_cfg = dict(RECIPE["dense_ssl"])
        n_probe, n_test, per_class = 3, 2, 4000
    if args.epochs:
        ssl_cfg["epochs"] = args.epochs
    ssl_cfg["seed"] = args.seed
    sims = simulate_training_set(**sim_cfg, progress=False)
    tomos = as_tomograms(sims, image=args.input)
    test_t = tomos[-n_test:]
    probe_t = tomos[-(n_test + n_probe) : -n_test]
    ssl_t = tomos[: -(n_test + n_probe)]
    t0 = time.perf_counter()
    ssl, hist = pretrain_dense(ssl_t, preset="tiny", val_fraction=0.0, progress=False, **ssl_cfg)
    t_ssl = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    rand = models.build("dense_ssl", "tiny")
    _calibrate_bn(rand, ssl_t, int(ssl_cfg["crop_size"]), seed=args.seed)
    rows = []
    runs = [("ssl", ssl), ("random", rand), ("raw", None)]
    runs += [("ssl projector", ssl), ("random projector", rand)]
    for kind, model in runs:
        d = probe(kind, model, probe_t, test_t, per_class, args.seed)
        rows.append({"features": kind, **{k: d[k] for k in (*CLASSES, "mean")}})
    df = pd.DataFrame(rows).set_index("features")
    df = df.dropna(axis=1, how="all")
    total = time.perf_counter() - t_start
    print(
        f"DenseSimSiam linear probe ({'quick' if args.quick else 'full'}): SSL on "
        f"{len(ssl_t)} {args.input} tomograms {sim_cfg['shape']} @ {sim_cfg['voxel_size']} Å, "
        f"{ssl_cfg['epochs']} epochs × {ssl_cfg['samples_per_epoch']} crop pairs "
        f"({ssl_cfg['crop_size']}³), {t_ssl:.0f} s; probe fit on {n_probe}, tested on {n_test} "
        f"tomograms; SSL loss {hist['loss'].iloc[0]:.3f} → {hist['loss'].iloc[-1]:.3f}"
    )
    print("Dice per class on the test tomograms (1×1×1 linear head on frozen features):")
    print(df.to_string(float_format=lambda v: f"{v:.3f}"))
    win = df.loc["ssl", "mean"] > max(df.loc["random", "mean"], df.loc["raw", "mean"])
    print(f"(a) SSL beats (b) random and (c) raw on the mean: {'YES' if win else 'NO'}")
    print(f"total {total:.0f} s, torch threads {torch.get_num_threads()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "ssl_linear_probe" + ("" if args.input == "noisy" else f"_{args.input}")
    name += "_quick" if args.quick else ""
    df.to_csv(RESULTS / f"{name}.csv")
    (RESULTS / f"{name}.md").write_text(
        df.to_markdown(floatfmt=".3f") if _has_tabulate() else df.to_string()
    )
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
