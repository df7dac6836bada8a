"""Instance post-processing benchmark (cryosiam_nb.tl.instances).

Part 1 — speed/memory scaling: ground-truth instance labels (from the simulator,
``cryosiam_nb.sim.simulate(..., mode="fast")``, when it exists; else crowded touching
synthetic ellipsoids) are turned into perfect network maps (``maps_from_labels``), written to
zarr and read back lazily, as ``tl.predict`` output would be; ``tl.instances`` (defaults,
``block_shape="auto"``: whole volume up to 256³, 192³ blocks with a 24-voxel halo above) is
timed in a fresh interpreter per size. Printed: seconds, seconds per Mvoxel, peak RSS during
the call, and AP-50 against the ground truth (the post-processing must not lose what a perfect
network gives it).

Part 2 — model quality: AP-50 … AP-80 of the shipped tiny instance model
(``cryosiam_nb.models.load("tiny-instance")`` + ``tl.predict``) on noisy and on denoised
(``"tiny-denoise"``) simulated tomograms, beside the thesis' Table 7. Prints
"not available" when the models or the simulator are missing.

Usage: ``python benchmarks/bench_instances.py [--quick]`` (quick: 64³ and 96³, ≤ 1 min).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_isolated  # noqa: E402

CHILD = r"""
import atexit, gc, json, shutil, sys, tempfile, time, numpy as np, xarray as xr
sys.path.insert(0, {bench_dir!r})
from cryosiam_nb import metrics, segmentation
from _common import PeakRSS
import elf.segmentation.multicut, skimage.segmentation  # warm imports: not part of the timing

n, seed, bias = {n}, {seed}, {bias}

def gt_labels(n):
    try:
        from cryosiam_nb.sim import simulate
    except ImportError:
        simulate = None
    if simulate is not None and n <= 256:
        vols = simulate((n, n, n), mode="fast", seed=seed).volumes
        return vols["instances"].values.astype(np.uint32), "simulator"
    if simulate is not None:
        half = gt_labels(n // 2)[0]
        tiles, off = [], 0
        for _ in range(8):
            t = np.where(half > 0, half + off, 0).astype(np.uint32)
            off = int(t.max())
            tiles.append(t)
        t = tiles
        row = lambda a, b: np.concatenate([a, b], axis=2)
        col = lambda a, b: np.concatenate([a, b], axis=1)
        lab = np.concatenate([col(row(t[0], t[1]), row(t[2], t[3])),
                              col(row(t[4], t[5]), row(t[6], t[7]))], axis=0)
        return lab, "simulator 2x2x2 tiles"
    base = min(n, 128)
    reps = n // base
    tiles, off = [], 0
    for i in range(reps ** 3):
        t = segmentation.synthetic_instances((base,) * 3, density=0.35, radius=(4, 7), seed=seed + i)
        tiles.append(np.where(t > 0, t + off, 0).astype(np.uint32))
        off = int(tiles[-1].max())
    lab = np.stack(tiles).reshape((reps,) * 3 + (base,) * 3).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(lab.reshape(n, n, n)), "synthetic ellipsoids"

lab, source = gt_labels(n)
tmp = tempfile.mkdtemp()
atexit.register(shutil.rmtree, tmp, True)  # the maps store can be GBs
maps = segmentation.maps_from_labels(xr.DataArray(lab, dims=("z", "y", "x"),
                                                  attrs={{"voxel_size": 10.0}}))
maps["gt"] = (("z", "y", "x"), lab)
maps.chunk({{"z": 128, "y": 128, "x": 128}}).to_zarr(tmp + "/maps.zarr", mode="w")
del maps, lab
gc.collect()
lazy = xr.open_zarr(tmp + "/maps.zarr")
with PeakRSS() as rss:
    t0 = time.perf_counter()
    inst = segmentation.instances(lazy[["foreground", "boundary", "distance"]],
                                  boundary_bias=bias, progress=False)
    seconds = time.perf_counter() - t0
ap = metrics.average_precision(inst.data, lazy["gt"].data, thresholds=[0.5, 0.7])
blocks = "whole" if n ** 3 <= 256 ** 3 else "192^3 blocks"
print(json.dumps(dict(size=f"{{n}}^3", source=source, mode=blocks, mvox=n ** 3 / 1e6,
                      n_instances=int(inst.values.max()), n_true=ap["n_gt"], seconds=seconds,
                      rss_gib=(rss.peak - rss.start_rss) / 2**30, ap50=ap["AP50"],
                      ap70=ap["AP70"])))
"""

MODEL_CHILD = r"""
import json, numpy as np, torch
torch.set_num_threads(2)
from cryosiam_nb import metrics, models, pp, segmentation, tl
from cryosiam_nb.sim import simulate
inst_model = models.load("tiny-instance")
den_model = models.load("tiny-denoise")
n_tomo, shape = {n_tomo}, {shape}
rows = {{"noisy": [], "denoised": []}}
for s in range(n_tomo):
    vols = simulate(shape, seed=1000 + s).volumes
    gt = vols["instances"].values
    noisy = vols["noisy"]
    den = pp.normalize(tl.predict(noisy, den_model)["denoised"].compute(), invert=False)
    for name, vol in (("noisy", noisy), ("denoised", den)):
        maps = tl.predict(vol, inst_model).compute()
        inst = segmentation.instances(maps, progress=False)
        ap = metrics.average_precision(inst.values, gt, thresholds=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8])
        rows[name].append([ap[f"AP{{t}}"] for t in (50, 55, 60, 65, 70, 75, 80)])
print(json.dumps({{k: np.mean(v, axis=0).tolist() for k, v in rows.items()}}))
"""

THESIS = {  # Table 7 (CryoETSim, 400 tomograms): AP-50 and AP-70
    "clean": (0.437, 0.241),
    "noisy": (0.229, 0.020),
    "denoised": (0.249, 0.024),
}


def scaling(sizes: list[int], bias: float) -> pd.DataFrame:
    rows = []
    for n in sizes:
        code = CHILD.format(n=n, seed=0, bias=bias, bench_dir=str(Path(__file__).parent))
        out, peak = run_isolated(code)
        r = json.loads(out.strip().splitlines()[-1])
        r["s_per_mvox"] = r["seconds"] / r["mvox"]
        r["peak_rss_gib_process"] = peak
        rows.append(r)
        print(f"  {r['size']}: {r['seconds']:.1f} s", flush=True)
    df = pd.DataFrame(rows)
    cols = [
        "size",
        "source",
        "mode",
        "mvox",
        "n_true",
        "n_instances",
        "seconds",
        "s_per_mvox",
        "rss_gib",
        "peak_rss_gib_process",
        "ap50",
        "ap70",
    ]
    return df[cols].round(3)


def model_quality(quick: bool) -> pd.DataFrame | None:
    try:
        from cryosiam_nb import models, tl  # noqa: F401
        from cryosiam_nb.sim import simulate  # noqa: F401

        models.load("tiny-instance")
        models.load("tiny-denoise")
    except Exception as e:  # any missing piece → not available
        print(f"model AP: not available ({type(e).__name__}: {e})")
        return None
    n_tomo, shape = (1, (64, 96, 96)) if quick else (4, (96, 160, 160))
    out, _ = run_isolated(MODEL_CHILD.format(n_tomo=n_tomo, shape=shape))
    res = json.loads(out.strip().splitlines()[-1])
    thr = [50, 55, 60, 65, 70, 75, 80]
    rows = []
    for name in ("noisy", "denoised"):
        row = {"input": name, "tomograms": n_tomo, "shape": str(shape)}
        row.update({f"AP{t}": round(v, 3) for t, v in zip(thr, res[name])})
        row["thesis AP50"], row["thesis AP70"] = THESIS[name]
        rows.append(row)
    rows.append({"input": "clean (thesis only)", "thesis AP50": 0.437, "thesis AP70": 0.241})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64³ and 96³ only (CI, ≤ 1 min)")
    ap.add_argument(
        "--boundary-bias", type=float, default=0.5, help="multicut β (library default 0.5)"
    )
    ap.add_argument("--skip-model", action="store_true", help="skip the trained-model AP part")
    args = ap.parse_args()
    sizes = [64, 96] if args.quick else [128, 256, 512]
    df = scaling(sizes, args.boundary_bias)
    emit(
        df,
        "instances_quick" if args.quick else "instances",
        "tl.instances post-processing: time and memory vs volume size (perfect maps)",
    )
    if not args.skip_model:
        q = model_quality(args.quick)
        if q is not None:
            emit(
                q,
                "instances_model_quick" if args.quick else "instances_model",
                "Tiny instance model: AP on simulated tomograms vs thesis Table 7",
            )


if __name__ == "__main__":
    main()
