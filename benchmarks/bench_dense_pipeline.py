"""The whole dense pipeline on a full tomogram: speed, memory, FLOP rate and exactness.

Measured side by side in one run (each timing in a fresh interpreter; peak RSS = the child's
own high-water mark):

1. **Machine peak**: fp32 (and bf16) matrix-multiply GFLOP/s of torch on this machine with
   torch's default threads (4096² matrices, best of several).
2. **Before / after on one block** (default 64×256×256 voxels, a memory-mapped float32 MRC
   streamed to zarr with ``write_predictions``): the four separate tiny models (denoise,
   lamella, semantic, instance) with the previous defaults (their 32³ training patch,
   overlap 0.5, float32); ``tiny-multitask`` with those defaults; ``tiny-multitask`` with
   today's defaults (``tl.predict``'s inference window, overlap and ``precision="auto"``).
3. **Whole tomogram**: ``tiny-multitask`` with today's defaults over 256×1024×1024 voxels
   (a 1 GiB memory-mapped MRC) streamed to zarr: wall time, Mvox/s, peak RSS, and the useful
   FLOP rate — forward FLOP per voxel (one evaluation, counted by
   ``torch.utils.flop_counter`` on a window) × voxels / wall time — as a share of the fp32
   matmul peak.
4. **Exactness**: in float32, chunked ``predict`` with today's default window and overlap
   equals one monolithic MONAI ``sliding_window_inference`` with the same settings (max |Δ|
   of the un-activated denoise and instance-distance maps and of the probabilities).

    python benchmarks/bench_dense_pipeline.py               # everything (~20 min on 2 cores)
    python benchmarks/bench_dense_pipeline.py --no-full-size  # without step 3
    python benchmarks/bench_dense_pipeline.py --quick        # CI-sized
    python benchmarks/bench_dense_pipeline.py --only-today   # without the previous defaults
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import emit, run_child  # noqa: E402

FULL = (256, 1024, 1024)
SEPARATE = ("denoise", "lamella", "semantic", "instance")
PREVIOUS = {"patch": "training", "overlap": 0.5, "precision": "float32", "batch_size": 4}


# --------------------------------------------------------------------------- child side
def child_matmul_peak(n: int = 4096) -> dict:
    """Best GFLOP/s of ``n``×``n`` matrix products, fp32 and bf16 (torch's default threads)."""
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.rand(n, n, dtype=dt)
        b = torch.rand(n, n, dtype=dt)
        torch.mm(a, b)
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    out["threads"] = torch.get_num_threads()
    return out


def child_pipeline(mrc: str, region: list[int], models_: list[str], settings: dict) -> dict:
    """``predict`` + ``write_predictions`` of each model in turn on a memory-mapped block."""
    from cryosiam_nb import models, tl
    from cryosiam_nb.inference import write_predictions
    from cryosiam_nb.io import read

    tomo = read(mrc, voxel_size=10.0, check_values=False)
    z, y, x = region
    tomo = tomo[:z, :y, :x]
    nets = [models.load(m) for m in models_]
    import resource

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    import threading

    peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    done = threading.Event()

    def sample() -> None:  # the largest anonymous / file-backed resident sizes seen (kB)
        while not done.wait(0.1):
            with open("/proc/self/status") as f:
                for line in f:
                    k = line.split(":")[0]
                    if k in peaks:
                        peaks[k] = max(peaks[k], int(line.split()[1]))

    sampler = threading.Thread(target=sample, daemon=True)
    if Path("/proc/self/status").exists():
        sampler.start()
    if settings.get("cpu_fusion") is False:  # read by the inference copy in this process
        os.environ["CRYOSIAM_NB_CPU_FUSION"] = "0"
    with tempfile.TemporaryDirectory(prefix="bench_dense_") as tmpd:
        t0, c0 = time.perf_counter(), cpu_s()
        for i, net in enumerate(nets):
            kw = {k: v for k, v in settings.items() if k not in ("patch", "cpu_fusion")}
            if settings.get("patch") == "training":
                kw["patch_size"] = net.patch_size
            ds = tl.predict(tomo, net, **kw)
            write_predictions(ds, Path(tmpd) / f"out{i}.zarr", progress=False)
        wall = time.perf_counter() - t0
        cores = (cpu_s() - c0) / wall
    done.set()
    return {
        "rss_anon_gib": peaks["RssAnon"] / 2**20,
        "rss_file_gib": peaks["RssFile"] / 2**20,
        "wall_s": wall,
        "voxels": int(z * y * x),
        "window": ds.attrs["patch_size"],
        "cores": cores,
    }


def child_exactness(shape: list[int]) -> dict:
    """Chunked (default window/overlap, float32) vs monolithic MONAI sliding windows: one
    over the heads (with the model's semantic offsets), then (the refiner's second pass) one over the stitched input, denoised
    map and float16 semantic probabilities."""
    import torch
    from monai.inferers import sliding_window_inference

    from cryosiam_nb import models, tl
    from cryosiam_nb.inference._fast import inference_copy
    from cryosiam_nb.inference._refine import RefinerPass, split_refiner
    from cryosiam_nb.inference.prediction import _calibrated_for

    net = models.load("tiny-multitask")
    vol = np.random.default_rng(1).random(tuple(shape), dtype=np.float32)
    ds = tl.predict(vol, net, precision="float32").compute()
    win, ov = tuple(ds.attrs["patch_size"]), ds.attrs["overlap"]
    # the model as predict runs it: its semantic offsets for the model's voxel size folded in
    heads, refiner = split_refiner(_calibrated_for(net, vol)[0])
    ref_net = inference_copy(heads, torch.device("cpu"), "multitask")
    with torch.inference_mode():
        ref = sliding_window_inference(
            torch.from_numpy(vol)[None, None], win, 1, ref_net, overlap=ov, mode="gaussian"
        )
        logits = ref["semantic/logits"]
        if refiner is not None:
            prob = torch.softmax(logits, 1).half().float()
            inp = torch.cat([torch.from_numpy(vol)[None, None], ref["denoise/denoised"], prob], 1)
            logits = sliding_window_inference(
                inp, win, 1, RefinerPass(refiner), overlap=ov, mode="gaussian"
            )["semantic/logits"]
    d_den = float(np.abs(ds["denoised"].values - ref["denoise/denoised"][0, 0].numpy()).max())
    d_dist = float(
        np.abs(ds["instance_distance"].values - ref["instance/distance"][0, 0].numpy()).max()
    )
    prob = torch.softmax(logits[0], 0).numpy()
    d_prob = float(np.abs(ds["semantic_probabilities"].values.astype(np.float32) - prob).max())
    return {
        "window": list(win),
        "overlap": ov,
        "denoised": d_den,
        "distance": d_dist,
        "prob": d_prob,
    }


def _child(func: str, timeout: float = 7200, **kw) -> tuple[dict, float]:
    return run_child("bench_dense_pipeline", func, timeout, **kw)


# --------------------------------------------------------------------------- parent side
def flop_per_voxel(window: int = 64) -> float:
    """Forward FLOP of tiny-multitask per output voxel of one ``window``³ evaluation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cryosiam_nb import models

    net = models.load("tiny-multitask").eval()
    x = torch.zeros(1, 1, window, window, window)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    return fc.get_total_flops() / window**3


def main(argv: list[str] | None = None) -> None:
    from bench_inference import make_tomogram

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized (< 1 min)")
    ap.add_argument("--no-full-size", action="store_true", help="skip the whole tomogram")
    ap.add_argument(
        "--only-today", action="store_true", help="skip the previous-defaults block runs"
    )
    ap.add_argument("--block", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    args = ap.parse_args(argv)
    block = (32, 64, 64) if args.quick else tuple(args.block)
    full = None if (args.quick or args.no_full_size) else FULL

    peak, _ = _child("child_matmul_peak", n=1024 if args.quick else 4096)
    fpv = flop_per_voxel(32 if args.quick else 64)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench_dense_") as tmpd:
        mrc = Path(tmpd) / "tomo.mrc"
        make_tomogram(mrc, full or block)
        runs = [
            (
                "four separate tiny models, previous defaults",
                [f"tiny-{t}" for t in SEPARATE],
                PREVIOUS,
            ),
            ("tiny-multitask, previous defaults", ["tiny-multitask"], PREVIOUS),
            (
                "tiny-multitask, today's defaults without oneDNN fusion",
                ["tiny-multitask"],
                {"cpu_fusion": False},
            ),
            ("tiny-multitask, today's defaults", ["tiny-multitask"], {}),
        ]
        if args.only_today:
            runs = runs[-2:]
        for name, ms, settings in runs:
            res, rss = _child(
                "child_pipeline", mrc=str(mrc), region=list(block), models_=ms, settings=settings
            )
            rows.append(_row(name, block, res, rss, fpv, peak))
            print(rows[-1], flush=True)
        base = rows[-1]["Mvox/s"]
        for r in rows[:-1]:
            notes.append(f"today's defaults are {base / r['Mvox/s']:.1f}× faster than: {r['run']}")
        if full:
            res, rss = _child(
                "child_pipeline",
                mrc=str(mrc),
                region=list(full),
                models_=["tiny-multitask"],
                settings={},
            )
            rows.append(
                _row("tiny-multitask, today's defaults, whole tomogram", full, res, rss, fpv, peak)
            )
            print(rows[-1], flush=True)
            notes.append(
                f"whole 256×1024×1024 tomogram (denoise + lamella + semantic + instance maps → "
                f"zarr): {res['wall_s'] / 60:.1f} min (target ≤ 15), peak RSS {rss:.2f} GiB "
                "(target ≤ 2.5)"
            )
        else:
            r = rows[-1]
            notes.append(
                f"whole 256×1024×1024 tomogram at this block's rate would take "
                f"{math.prod(FULL) / (r['Mvox/s'] * 1e6) / 60:.1f} min (not run)"
            )
    ex, _ = _child("child_exactness", shape=[24, 80, 80] if args.quick else [64, 160, 160])
    notes.append(
        f"float32 chunked vs monolithic, window {ex['window']}, overlap {ex['overlap']}: max |Δ| "
        f"denoised {ex['denoised']:.2e}, instance distance {ex['distance']:.2e}, semantic "
        f"probabilities {ex['prob']:.2e} (float16 storage) (target ≤ 1e-4; probabilities ≤ 1e-3)"
    )
    notes.append(
        f"machine peak: fp32 matmul {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
        f"({peak['threads']} torch threads); tiny-multitask forward {fpv / 1e3:.1f} kFLOP/voxel"
    )
    emit(
        pd.DataFrame(rows),
        "dense_pipeline" + ("_quick" if args.quick else ""),
        "Whole dense pipeline",
    )
    for n in notes:
        print("-", n)


def _row(name: str, shape, res: dict, rss: float, fpv: float, peak: dict) -> dict:
    mvox = res["voxels"] / 1e6
    useful = fpv * res["voxels"] / res["wall_s"] / 1e9
    return {
        "run": name,
        "shape (z,y,x)": "×".join(map(str, shape)),
        "window": "×".join(map(str, res["window"])),
        "wall s": round(res["wall_s"], 1),
        "Mvox/s": round(mvox / res["wall_s"], 4),
        "µs/voxel": round(1e6 * res["wall_s"] / res["voxels"], 3),
        "peak RSS GiB": round(rss, 2),
        "peak anon / file GiB": f"{res.get('rss_anon_gib', float('nan')):.2f} / "
        f"{res.get('rss_file_gib', float('nan')):.2f}",
        "cores busy": round(res.get("cores", float("nan")), 2),
        "useful GFLOP/s": round(useful, 1),
        "% of fp32 peak": round(100 * useful / peak["fp32"], 1),
    }


if __name__ == "__main__":
    main()
