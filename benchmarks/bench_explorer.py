"""Server-side speed of the curation explorer at 10k / 100k / 1M particles.

Measures, per size (CPU, wall-clock seconds):

- ``setup``: building the Explorer (plot table with categorical colour columns);
- ``first_frame``: the datashader aggregation + shading that produces the first UMAP image
  (default 620 x 520 canvas, data extent), i.e. what the server computes before the page
  shows the scatter; numba JIT compile time is measured once, separately (``jit_warmup``);
- ``box`` / ``lasso``: a box / 64-vertex lasso selection → particle ids over all points;
- ``gallery``: the 16 thumbnails (xy + xz PNGs cut lazily from the tomogram) of page 1;
- ``sel_frame``: the datashaded overlay of the selected points;
- ``answer``: box + gallery + sel_frame (what a user waits for after a box drag).

Usage: ``python benchmarks/bench_explorer.py [--quick]`` (quick: 10k and 100k). Writes
``benchmarks/results/bench_explorer[_quick].{csv,md}``. Target: first frame and answer < 2 s at 1M.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402


def make_particles(n: int, n_clusters: int = 30, seed: int = 0, tomo_shape=(64, 512, 512)):
    """``n`` particles: a UMAP of ``n_clusters`` Gaussian blobs, centres in one tomogram."""
    from cryosiam_nb.particles import Particles

    rng = np.random.default_rng(seed)
    centres = rng.uniform(-15, 15, size=(n_clusters, 2))
    lab = rng.integers(0, n_clusters, n)
    uv = (centres[lab] + rng.normal(scale=0.9, size=(n, 2))).astype(np.float32)
    nz, ny, nx = tomo_shape
    obs = pd.DataFrame(
        {
            "tomogram": "tomo",
            "z": rng.uniform(8, nz - 8, n),
            "y": rng.uniform(8, ny - 8, n),
            "x": rng.uniform(8, nx - 8, n),
            "voxel_size": 10.0,
            "cluster": lab.astype(str),
            "excluded": False,
            "score": rng.uniform(size=n).astype(np.float32),
        },
        index=pd.Index(np.char.add("p", np.arange(n).astype(str))),
    )
    return Particles(obs, obsm={"umap": uv}), centres


def run(sizes: list[int], seed: int = 0) -> pd.DataFrame:
    from cryosiam_nb.pl.curation import Explorer

    rng = np.random.default_rng(seed)
    tomo = rng.normal(size=(64, 512, 512)).astype(np.float32)
    rows = []
    # Numba JIT compile of the datashader kernels, paid once per process.
    t = time.perf_counter()
    small, _ = make_particles(1000, seed=seed)
    warm = Explorer(small, tomograms={"tomo": tomo})
    warm._umap_frame()
    warm.max_scatter = 0
    warm.select_box(-100, -100, 100, 100)
    warm._selection_frame()
    jit = time.perf_counter() - t
    for n in sizes:
        parts, centres = make_particles(n, seed=seed)
        t = time.perf_counter()
        ex = Explorer(parts, tomograms={"tomo": tomo}, box=32, max_scatter=20_000)
        setup = time.perf_counter() - t

        t = time.perf_counter()
        ex._umap_frame()
        first = time.perf_counter() - t

        cx, cy = centres[0]
        t = time.perf_counter()
        ex.select_box(cx - 2, cy - 2, cx + 2, cy + 2)
        box = time.perf_counter() - t
        n_box = len(ex.selection)
        t = time.perf_counter()
        items = ex.gallery_items()
        gallery = time.perf_counter() - t
        t = time.perf_counter()
        ex._selection_frame()
        sel_frame = time.perf_counter() - t

        ang = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        poly = np.c_[cx + 2.5 * np.cos(ang), cy + 2.5 * np.sin(ang)]
        t = time.perf_counter()
        ex.select_lasso(poly)
        lasso = time.perf_counter() - t
        n_lasso = len(ex.selection)
        rows.append(
            {
                "n_particles": n,
                "jit_warmup_s": round(jit, 3),
                "setup_s": round(setup, 3),
                "first_frame_s": round(first, 3),
                "box_s": round(box, 4),
                "n_box": n_box,
                "lasso_s": round(lasso, 4),
                "n_lasso": n_lasso,
                "gallery_s": round(gallery, 3),
                "n_thumbs": len(items),
                "sel_frame_s": round(sel_frame, 3),
                "answer_s": round(box + gallery + sel_frame, 3),
            }
        )
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only (CI)")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the particle counts")
    args = ap.parse_args()
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    df = run(sizes)
    # each time as a ratio to the smallest particle count in the same run
    for col in ("first_frame_s", "answer_s"):
        df[col.removesuffix("_s") + " ratio"] = (df[col] / df[col].iloc[0]).round(2)
    emit(
        df,
        "bench_explorer" + ("_quick" if args.quick else ""),
        "Explorer server-side timings (s, CPU) vs particle count; ratios to the "
        f"{int(df['n_particles'].iloc[0]):,}-particle row",
    )
    big = df.iloc[-1]
    ok = big["first_frame_s"] < 2 and big["answer_s"] < 2
    print(
        f"\ntarget (< 2 s first frame and answer at {int(big['n_particles']):,}): "
        + ("met" if ok else "NOT met")
    )


if __name__ == "__main__":
    main()
