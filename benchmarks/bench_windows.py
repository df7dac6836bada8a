"""Quality vs speed of the inference window, overlap and precision (tiny-multitask).

The default sliding window of ``tl.predict`` (:data:`cryosiam_nb.inference.DEFAULT_WINDOW`,
:data:`~cryosiam_nb.inference.DEFAULT_OVERLAP`, ``precision="auto"``) is chosen from the
first table, measured on **validation** tomograms (seeds :data:`VAL_SEEDS`, never used by
the recipe nor by the held-out benchmarks). The second table compares the chosen default
with the previous one (the 32³ training patch, overlap 0.5, float32) on the **held-out**
tomograms of ``bench_multitask.py`` (seeds 9101–9103): quality must be no worse.

Columns: window (z, y, x voxels per axis, clipped to the volume), overlap, precision,
evaluations per voxel ((window / stride)³), the dense-prediction time per voxel (one
``tl.predict`` pass, all heads; torch and dask threads as a user gets them), semantic Dice
over all present classes, membrane and particle Dice, instance AP-50, picking F1 (all
particles and those under 150 voxels), denoise PSNR / SSIM against the clean volume, and
lamella Dice.

    python benchmarks/bench_windows.py           # 2 validation + 3 held-out tomograms
    python benchmarks/bench_windows.py --quick   # one small tomogram, two settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _common import emit  # noqa: E402
from bench_multitask import dense, held_out, score  # noqa: E402

VAL_SEEDS = (7101, 7102)
#: (window, overlap, precision); the first row is the previous default
SETTINGS = [
    (32, 0.5, "float32"),
    (32, 0.5, "auto"),
    (64, 0.5, "auto"),
    (64, 0.25, "auto"),
    (96, 0.25, "float32"),
    (96, 0.25, "auto"),
    (96, 0.125, "auto"),
    (128, 0.25, "auto"),
]
COLS = [
    "semantic_all",
    "dice_membrane",
    "dice_particle",
    "ap50",
    "f1_all",
    "f1_small",
    "psnr",
    "ssim",
    "lamella_dice",
]


def _validation(quick: bool) -> list[tuple[str, object]]:
    from cryosiam_nb import sim

    specs = [("general", VAL_SEEDS[0]), ("transcription", VAL_SEEDS[1])]
    shape = (48, 96, 96) if quick else (96, 192, 192)
    if quick:
        specs = specs[:1]
    return [
        (
            f"{sample} {'×'.join(map(str, shape))}",
            sim.simulate(
                shape,
                voxel_size=10.0,
                sample=sample,
                seed=seed,
                mode="fast" if quick else "tilt",
                progress=False,
                keep_tilt_series=False,
            ),
        )
        for sample, seed in specs
    ]


def _rows(tomos, model, settings) -> pd.DataFrame:
    from cryosiam_nb import pp
    from cryosiam_nb.inference import inference_window
    from cryosiam_nb.inference._windows import _window_starts, scan_interval

    rows = []
    for tname, s in tomos:
        data = pp.normalize(s.volumes["noisy"].assign_attrs(voxel_size=10.0), invert=False)
        data = data.persist()
        for window, overlap, precision in settings:
            win = inference_window(model, data.shape, window)
            kw = {"patch_size": win, "overlap": overlap, "precision": precision}
            if window == 32:  # the previous default batch (one 32³ window is slow on CPU)
                kw["batch_size"] = 4
            out, secs = dense(data, {"multitask": model}, **kw)
            r = score(out, s)
            evals = float(
                np.prod(
                    [
                        len(_window_starts(n, w, scan_interval(n, w, overlap))) * w / max(n, w)
                        for n, w in zip(data.shape, win)
                    ]
                )
            )
            rows.append(
                {
                    "tomogram": tname,
                    "window": window,
                    "overlap": overlap,
                    "precision": precision,
                    "evals/voxel": evals,
                    "µs/voxel": 1e6 * secs / data.size,
                    **{k: r.get(k, np.nan) for k in COLS},
                }
            )
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    keys = ["window", "overlap", "precision"]
    mean = df.groupby(keys, sort=False).mean(numeric_only=True).reset_index()
    mean.insert(0, "tomogram", "mean")
    return pd.concat([df, mean], ignore_index=True).round(3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small tomogram, two settings")
    ap.add_argument("--no-held-out", action="store_true", help="validation table only")
    ap.add_argument("--held-out-only", action="store_true", help="held-out table only")
    ap.add_argument(
        "--windows",
        type=int,
        nargs="+",
        help="only these windows (precision auto) beside the previous default",
    )
    ap.add_argument(
        "--overlaps",
        type=float,
        nargs="+",
        default=[0.25],
        help="with --windows: the overlaps to try for each window (default 0.25)",
    )
    ap.add_argument("--weights", help="folder with tiny-multitask.pt (default: the shipped one)")
    args = ap.parse_args(argv)
    from cryosiam_nb import models
    from cryosiam_nb.inference import DEFAULT_OVERLAP, DEFAULT_WINDOW

    src = Path(args.weights) / "tiny-multitask.pt" if args.weights else "tiny-multitask"
    model = models.load(src)
    default = (DEFAULT_WINDOW, DEFAULT_OVERLAP, "auto")
    settings = [SETTINGS[0], default] if args.quick else SETTINGS
    if args.windows:
        settings = [SETTINGS[0]] + [(w, o, "auto") for w in args.windows for o in args.overlaps]
    if not args.held_out_only:
        emit(
            _rows(_validation(args.quick), model, settings),
            "windows_validation"
            + ("_" + "_".join(f"{w}-{o}" for w, o, _ in settings[1:]) if args.windows else ""),
            f"Inference window / overlap / precision on validation tomograms (seeds {VAL_SEEDS})",
        )
    if args.no_held_out or args.quick:
        return
    emit(
        _rows(held_out(False), model, [SETTINGS[0], default]),
        "windows_held_out",
        f"Previous default {SETTINGS[0]} vs the chosen default {default} on held-out "
        "tomograms (seeds 9101–9103)",
    )


if __name__ == "__main__":
    main()
