"""Speed and memory in one run, every figure beside its baseline measured in the same run.

Four measurements, each in a fresh interpreter where memory matters (peak RSS = the child's
own ``VmHWM``, via ``_common.run_isolated``):

1. **inference** — chunked ``tl.predict`` streamed to zarr vs one monolithic MONAI
   ``sliding_window_inference`` on the same volume held in memory (``bench_inference``'s
   children, tiny denoise architecture): Mvox/s and peak RSS; baseline = monolithic;
2. **instance post-processing** — ``tl.instances`` on perfect maps of simulated ground
   truth at growing volume sizes (``bench_instances.scaling``): seconds and s/Mvox;
   baseline = the smallest volume (ratio of s/Mvox: 1.0 = linear scaling);
3. **simulator** — ``sim.simulate`` ``mode="tilt"`` vs ``mode="fast"`` (same scene, after the
   species warm-up of ``bench_sim``); baseline = fast;
4. **training step** — one AdamW step (forward, L1+SSIM denoise loss, backward, update) of
   the whole network for the ``tiny`` and ``paper`` presets on one 48³ patch (quick: 32³;
   the first step, which allocates, is excluded in full mode);
   baseline = tiny.

    python benchmarks/bench_speed.py --quick    # ≤ 2 min on 2 cores
    python benchmarks/bench_speed.py            # full sizes

On a shared machine wall times vary with the load; ratios within a run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import emit, run_isolated  # noqa: E402

TRAIN_CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(2)
from cryosiam_nb.models import build
from cryosiam_nb.training.finetune import task_loss
from cryosiam_nb.training.loop import make_optimizer, seed_all
seed_all(0)
model = build("denoise", preset={preset!r}).train()
opt = make_optimizer(model.parameters(), "adamw", lr=1e-3)
g = torch.Generator().manual_seed(0)
x = torch.rand(({batch}, 1) + ({n},) * 3, generator=g)
y = torch.rand(({batch}, 1) + ({n},) * 3, generator=g)
times = []
for _ in range({steps}):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss, _ = task_loss("denoise", model(x), y)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
n_par = sum(p.numel() for p in model.parameters())
print(json.dumps(dict(step_s=min(times[1:] or times), first_s=times[0], params=n_par)))
"""


def _fmt_shape(s) -> str:
    return "×".join(map(str, s))


def inference(quick: bool) -> list[dict]:
    """Chunked vs monolithic on the same volume (bench_inference's child functions)."""
    import bench_inference as bi

    region = (32, 64, 64) if quick else (96, 144, 144)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmpd:
        tmp = Path(tmpd)
        mrc = tmp / "tomo.mrc"
        bi.make_tomogram(mrc, region)
        job = {"mrc": str(mrc), "region": list(region), "model": "denoise"}
        job["out"], job["mask"] = str(tmp / "pred.zarr"), None
        (res_c,), peak_c = bi._run_child("child_chunked", jobs=[job], workers=2)
        res_m, peak_m = bi._run_child(
            "child_monolithic", mrc=str(mrc), region=list(region), model="denoise"
        )
    mvox = res_c["voxels"] / 1e6
    rate_c, rate_m = mvox / res_c["wall_s"], mvox / res_m["wall_s"]
    base = {"measurement": "inference, tiny denoise", "size": _fmt_shape(region)}
    rows.append(
        {
            **base,
            "variant": "monolithic MONAI (in memory) [baseline]",
            "value": round(rate_m, 4),
            "unit": "Mvox/s",
            "ratio": 1.0,
        }
    )
    rows.append(
        {
            **base,
            "variant": "chunked tl.predict → zarr",
            "value": round(rate_c, 4),
            "unit": "Mvox/s",
            "ratio": round(rate_c / rate_m, 3),
        }
    )
    rows.append(
        {
            **base,
            "variant": "monolithic MONAI (in memory) [baseline]",
            "value": round(peak_m, 3),
            "unit": "peak RSS GiB",
            "ratio": 1.0,
        }
    )
    rows.append(
        {
            **base,
            "variant": "chunked tl.predict → zarr",
            "value": round(peak_c, 3),
            "unit": "peak RSS GiB",
            "ratio": round(peak_c / peak_m, 3),
        }
    )
    return rows


def postprocessing(quick: bool) -> list[dict]:
    """tl.instances time vs volume size (bench_instances.scaling)."""
    import bench_instances as bn

    sizes = [32, 48] if quick else [64, 128, 256]
    df = bn.scaling(sizes, 0.5)
    rows = []
    base = float(df["s_per_mvox"].iloc[0])
    for i, r in df.iterrows():
        rows.append(
            {
                "measurement": "instance post-processing (tl.instances)",
                "size": r["size"],
                "variant": f"{r['mvox']:.2f} Mvox" + (" [baseline]" if i == 0 else ""),
                "value": round(float(r["seconds"]), 2),
                "unit": "s",
                "ratio": round(float(r["s_per_mvox"]) / base, 3),
            }
        )
    return rows


def simulator(quick: bool) -> list[dict]:
    """sim.simulate tilt vs fast on the same scene (species fields warmed up first)."""
    import bench_sim as bs

    from cryosiam_nb import sim

    shape = (32, 48, 48) if quick else (128, 256, 256)
    bs._warm_up(10.0)
    for mode in ("fast", "tilt"):  # first calls pay one-off set-up costs: not timed
        sim.simulate((16, 32, 32), voxel_size=10.0, seed=1, mode=mode, progress=False)
    secs = {}
    for mode in ("fast", "tilt"):
        t0 = time.perf_counter()
        sim.simulate(shape, voxel_size=10.0, seed=0, mode=mode, progress=False)
        secs[mode] = time.perf_counter() - t0
    return [
        {
            "measurement": "simulator (general sample)",
            "size": _fmt_shape(shape),
            "variant": "fast [baseline]" if mode == "fast" else "tilt series + WBP",
            "value": round(secs[mode], 2),
            "unit": "s",
            "ratio": round(secs[mode] / secs["fast"], 3),
        }
        for mode in ("fast", "tilt")
    ]


def training(quick: bool) -> list[dict]:
    """One optimiser step per preset (child process each: time and peak RSS)."""
    n, batch, steps = (32, 1, 1) if quick else (48, 1, 2)
    res = {}
    for preset in ("tiny", "paper"):
        code = TRAIN_CHILD.format(repo=str(REPO), preset=preset, n=n, batch=batch, steps=steps)
        out, peak = run_isolated(code)
        res[preset] = json.loads(out.strip().splitlines()[-1]) | {"peak": peak}
    rows = []
    for preset in ("tiny", "paper"):
        r = res[preset]
        base = {
            "measurement": f"training step (AdamW, denoise, batch {batch})",
            "size": _fmt_shape((n,) * 3),
        }
        label = f"{preset} ({r['params'] / 1e6:.2f} M params)"
        label += " [baseline]" if preset == "tiny" else ""
        rows.append(
            {
                **base,
                "variant": label,
                "value": round(r["step_s"], 3),
                "unit": "s/step",
                "ratio": round(r["step_s"] / res["tiny"]["step_s"], 2),
            }
        )
        rows.append(
            {
                **base,
                "variant": label,
                "value": round(r["peak"], 3),
                "unit": "peak RSS GiB",
                "ratio": round(r["peak"] / res["tiny"]["peak"], 2),
            }
        )
    return rows


PARTS = {
    "inference": inference,
    "postprocessing": postprocessing,
    "simulator": simulator,
    "training": training,
}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized (≤ 2 min on 2 cores)")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = []
    for name in args.only or PARTS:
        t0 = time.perf_counter()
        rows += PARTS[name](args.quick)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    emit(
        df,
        "speed_quick" if args.quick else "speed",
        "Speed and memory, each figure as a ratio to its baseline in the same run "
        "(absolute times depend on what else the machine runs: compare ratios)",
    )
    return df


if __name__ == "__main__":
    main()
