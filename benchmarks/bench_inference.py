"""Benchmark: out-of-core chunked inference (cryosiam_nb.tl.predict) vs monolithic MONAI.

Measures, each in a fresh interpreter (peak RSS = the child's own VmHWM):

1. chunked: ``predict`` with the tiny model on a memory-mapped float32 MRC tomogram,
   streamed to zarr with ``write_predictions`` — wall time, Mvox/s, peak RSS;
2. monolithic: one ``monai.inferers.sliding_window_inference`` over the same volume held in
   memory as a numpy array — wall time, Mvox/s, peak RSS; the ratio chunked / monolithic;
3. memory at full size: the whole 1024×1024×256 (1 GiB) memory-mapped tomogram streamed
   to zarr through ``predict`` with a one-layer conforming model (so that it finishes on a
   laptop CPU) — peak RSS;
4. mask: a tomogram whose lamella covers half the volume, with and without ``roi=``.

The chunked runs use what a user gets by default: as many dask threads as cores, and
torch's default intra-op threads. The tiny model's throughput decides the main run: the
whole 1024×1024×256 tomogram when it fits ``--budget`` seconds (or with ``--full-size``,
which also runs the monolithic window over the whole tomogram when it fits in memory),
otherwise the largest block that does, with the extrapolated full-size time printed. The mask volume
(256×288×96 in full mode) is large enough that skipping the empty half can pay more than
the 1.6× target: with the tiny model's 32³ windows at stride 16 the ideal is 1.7× for the
z-slab and 1.9× for the y-edge lamella. ``--quick`` (CI) shrinks everything to finish in
under a minute.

    python benchmarks/bench_inference.py --quick
    python benchmarks/bench_inference.py            # full mode
    python benchmarks/bench_inference.py --full-size  # whole tomogram, both ways (~45 min)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_child  # noqa: E402

FULL = (256, 1024, 1024)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# --------------------------------------------------------------------------- child side
def _setup(threads: int | None) -> None:
    """``threads`` torch intra-op threads; None keeps torch's default (one per core)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def _model(kind: str):
    import torch

    torch.manual_seed(0)
    if kind.startswith("onelayer"):
        patch = int(kind[len("onelayer") :] or 48)
        from torch import nn

        class OneLayer(nn.Module):
            """A conforming denoise model with one 3³ convolution (memory benchmark)."""

            task, patch_size, class_names, voxel_size, config = (
                "denoise",
                (patch,) * 3,
                None,
                None,
                {},
            )

            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv3d(1, 1, 3, padding=1)

            def backbone(self, x):
                return self.conv(x)

            def forward(self, x):
                return {"denoised": self.conv(x)}

        return OneLayer().eval()
    from cryosiam_nb.models import build

    return build(kind, preset="tiny").eval()


def child_chunked(
    jobs: list[dict], workers: int, overlap: float = 0.5, threads: int | None = None
) -> list[dict]:
    """predict() on memory-mapped MRC blocks, streamed to zarr; returns timings per job.

    Each job: ``mrc``, ``region`` (z, y, x), ``model``, ``out`` and optional ``mask`` (.npy).
    ``workers`` dask threads each run one chunk; ``threads`` torch threads per op (None:
    torch's default, what a notebook user gets).
    """
    _setup(threads)
    import dask

    from cryosiam_nb.inference import predict, write_predictions
    from cryosiam_nb.io import read

    results = []
    for job in jobs:
        net = _model(job["model"])
        tomo = read(job["mrc"], voxel_size=10.0, check_values=False)
        z, y, x = job["region"]
        tomo = tomo[:z, :y, :x]
        m = None
        if job.get("mask"):
            m = np.load(job["mask"], mmap_mode="r")[:z, :y, :x]
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=workers):
            ds = predict(tomo, net, batch_size=2, roi=m, overlap=overlap)
            write_predictions(ds, job["out"], progress=False)
        results.append({"wall_s": time.perf_counter() - t0, "voxels": int(z * y * x)})
    return results


def child_monolithic(mrc: str, region: list[int], model: str, overlap: float = 0.5) -> dict:
    """Plain MONAI sliding_window_inference on the block loaded into memory (torch's threads)."""
    _setup(None)
    import mrcfile
    import torch
    from monai.inferers import sliding_window_inference

    net = _model(model)
    z, y, x = region
    with mrcfile.mmap(mrc, mode="r") as f:
        vol = np.array(f.data[:z, :y, :x], dtype=np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = sliding_window_inference(
            torch.from_numpy(vol)[None, None],
            net.patch_size,
            2,
            net,
            overlap=overlap,
            mode="gaussian",
        )
    res = out["denoised"][0, 0].numpy()
    wall = time.perf_counter() - t0
    assert res.shape == vol.shape
    return {"wall_s": wall, "voxels": int(z * y * x)}


def _run_child(func: str, timeout: float = 7200, **kw) -> tuple[dict, float]:
    return run_child("bench_inference", func, timeout, **kw)


# --------------------------------------------------------------------------- parent side
def make_tomogram(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """A float32 MRC of ``shape`` (z, y, x) in [0, 1], written slab by slab (memory-mapped)."""
    import mrcfile

    rng = np.random.default_rng(seed)
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as f:
        for z0 in range(0, shape[0], 16):
            z1 = min(z0 + 16, shape[0])
            f.data[z0:z1] = rng.random((z1 - z0, *shape[1:]), dtype=np.float32)
        f.voxel_size = 10.0


def lamella(shape: tuple[int, int, int], geometry: str) -> np.ndarray:
    """A sample mask covering half the volume: a z-slab or a lamella edge across y."""
    m = np.zeros(shape, np.uint8)
    z, y, _ = shape
    if geometry == "z-slab":
        m[z // 4 : z // 4 + z // 2] = 1
    else:
        m[:, : y // 2] = 1
    return m


def _row(name, model, shape, res, peak) -> dict:
    mvox = res["voxels"] / 1e6
    return {
        "run": name,
        "model": model,
        "shape (z,y,x)": "×".join(map(str, shape)),
        "Mvox": round(mvox, 2),
        "wall s": round(res["wall_s"], 1),
        "Mvox/s": round(mvox / res["wall_s"], 4),
        "peak RSS GiB": round(peak, 2),
    }


def _fits_in_memory(shape: tuple[int, ...]) -> bool:
    """Whether a monolithic run on ``shape`` fits: input, output, count map and padding
    (≈ 4 float32 copies of the volume) below the machine's available memory."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return True
    return 4 * 4 * math.prod(shape) < avail


def _monolithic_only(args: argparse.Namespace, tiny: str) -> None:
    """One monolithic MONAI sliding window over ``--block`` of a memory-mapped tomogram."""
    block = tuple(args.block)
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmpd:
        mrc = Path(tmpd) / "tomo.mrc"
        make_tomogram(mrc, block)
        res, peak = _run_child(
            "child_monolithic", mrc=str(mrc), region=block, model=args.model, overlap=args.overlap
        )
    row = _row("monolithic (in memory)", tiny, block, res, peak)
    emit(pd.DataFrame([row]), "inference_monolithic", "Monolithic sliding window (MONAI)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (< 1 min)")
    ap.add_argument("--model", default="denoise", help="tiny preset task (denoise, semantic)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for the main run")
    ap.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="dask threads (default: cores)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads in the chunked runs (default: torch's own, one per core, as the "
        "monolithic run uses)",
    )
    ap.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap (predict's default 0.5)"
    )
    ap.add_argument(
        "--full-size",
        action="store_true",
        help="run the tiny model on the whole 1024×1024×256 tomogram whatever --budget says",
    )
    ap.add_argument(
        "--block",
        type=int,
        nargs=3,
        default=(96, 288, 288),
        metavar=("Z", "Y", "X"),
        help="block (voxels) for the chunked/monolithic side-by-side ratio",
    )
    ap.add_argument(
        "--monolithic-only",
        action="store_true",
        help="only the monolithic run on --block (e.g. the whole 256 1024 1024 tomogram, to "
        "set beside a --full-size chunked run)",
    )
    args = ap.parse_args()
    tiny = f"tiny-{args.model}"
    if args.monolithic_only:
        _monolithic_only(args, tiny)
        return

    rows: list[dict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmpd:
        tmp = Path(tmpd)
        shape = (96, 96, 96) if args.quick else FULL
        mrc = tmp / "tomo.mrc"
        make_tomogram(mrc, shape)

        def job(region, model, name, mask=None):
            return {
                "mrc": str(mrc),
                "region": list(region),
                "model": model,
                "out": str(tmp / f"{name}.zarr"),
                "mask": mask,
            }

        def chunked(jobs):
            res, peak = _run_child(
                "child_chunked",
                jobs=jobs,
                workers=args.workers,
                overlap=args.overlap,
                threads=args.torch_threads,
            )
            return res, peak

        mem_model = "onelayer48" if args.quick else "onelayer96"
        mshape = (48, 96, 48) if args.quick else (256, 288, 96)
        geometries = ["y-edge"] if args.quick else ["z-slab", "y-edge"]
        masks = {}
        for geom in geometries:
            masks[geom] = str(tmp / f"mask-{geom}.npy")
            np.save(masks[geom], lamella(mshape, geom))
        mask_model = mem_model if args.quick else args.model
        mask_label = "one-conv" if args.quick else tiny

        if args.quick:  # two interpreters in all
            region = (48, 48, 48)
            jobs = [job(region, args.model, "main"), job(shape, mem_model, "full")]
            jobs += [job(mshape, mask_model, "nomask")]
            jobs += [job(mshape, mask_model, f"m-{g}", masks[g]) for g in geometries]
            res, peak = chunked(jobs)
            rows.append(_row("chunked → zarr", tiny, region, res[0], peak))
            rate = res[0]["voxels"] / res[0]["wall_s"]
            full_res, mask_res = res[1], res[2:]
            full_peak = peak
        else:
            # the side-by-side ratio: chunked and monolithic on the same block, one after the
            # other, before the (long) main run
            region = tuple(args.block)
            res, peak = chunked([job(region, args.model, "probe")])
            rows.append(_row("chunked → zarr", tiny, region, res[0], peak))
            rate = res[0]["voxels"] / res[0]["wall_s"]
        chunked_rate = rows[-1]["Mvox/s"]
        res, peak = _run_child(
            "child_monolithic", mrc=str(mrc), region=region, model=args.model, overlap=args.overlap
        )
        rows.append(_row("monolithic (in memory)", tiny, region, res, peak))
        notes.append(
            f"chunked / monolithic throughput = {chunked_rate / rows[-1]['Mvox/s']:.2f} "
            f"on {'×'.join(map(str, region))} (target ≥ 0.9)"
        )
        if not args.quick:
            if args.full_size or math.prod(FULL) / rate <= 1.5 * args.budget:
                main_region = FULL
            else:
                side = int(math.sqrt(rate * args.budget / 96) // 48 * 48)
                main_region = (96, max(288, min(1024, side)), max(288, min(1024, side)))
            if main_region != region:
                res, peak = chunked([job(main_region, args.model, "main")])
                rows.append(_row("chunked → zarr", tiny, main_region, res[0], peak))
                rate = res[0]["voxels"] / res[0]["wall_s"]
                if args.full_size and _fits_in_memory(main_region):
                    res, peak = _run_child(
                        "child_monolithic",
                        mrc=str(mrc),
                        region=main_region,
                        model=args.model,
                        overlap=args.overlap,
                    )
                    rows.append(_row("monolithic (in memory)", tiny, main_region, res, peak))
                    notes.append(
                        f"chunked / monolithic throughput = "
                        f"{rows[-2]['Mvox/s'] / rows[-1]['Mvox/s']:.2f} on the whole "
                        f"{'×'.join(map(str, main_region))} tomogram (target ≥ 0.9)"
                    )
        notes.append(
            f"{tiny} at {rate / 1e6:.4f} Mvox/s (overlap {args.overlap}): 1024×1024×256 "
            f"{'took' if rows[-1]['shape (z,y,x)'] == '256×1024×1024' else 'would take'} "
            f"{math.prod(FULL) / rate / 60:.0f} min on this machine"
        )

        if not args.quick:
            (full_res,), full_peak = chunked([job(shape, mem_model, "full")])
            mask_res = []
            for name, mk in [("nomask", None)] + [(f"m-{g}", masks[g]) for g in geometries]:
                (r,), p = chunked([job(mshape, mask_model, name, mk)])
                mask_res.append(r)
                rows.append(_row(f"mask: {name}", mask_label, mshape, r, p))
        else:
            for name, r in zip(["nomask"] + [f"m-{g}" for g in geometries], mask_res):
                rows.append(_row(f"mask: {name}", mask_label, mshape, r, full_peak))
        rows.append(_row("chunked → zarr, whole tomogram", "one-conv", shape, full_res, full_peak))
        notes.append(
            f"whole-tomogram streaming: peak RSS {full_peak:.2f} GiB for a "
            f"{math.prod(shape) * 4 / 2**30:.2f} GiB float32 memory-mapped input (target ≤ 2.5)"
        )
        for g, r in zip(geometries, mask_res[1:]):
            notes.append(
                f"mask ({g} lamella, half the volume): "
                f"{mask_res[0]['wall_s'] / r['wall_s']:.2f}× faster than no mask (target ≥ 1.6)"
            )
        if args.quick:
            notes.append("quick mode: all chunked runs share one interpreter (one peak RSS)")

    df = pd.DataFrame(rows)
    emit(df, "inference" + ("_quick" if args.quick else ""), "Chunked inference (tl.predict)")
    for n in notes:
        print("-", n)


if __name__ == "__main__":
    main()
