"""Simulator speed: seconds per tomogram by imaging mode, sample type and shape.

Acceptance targets (2 CPU cores): one 128×256×256 tomogram with tilt-series imaging in
≤ 60 s, and the fast mode in ≤ 10 s.

    python benchmarks/bench_sim.py            # full: 128×256×256, tilt + fast, 3 samples
    python benchmarks/bench_sim.py --quick    # CI: 64×96×96 (≤ 1 min)

``seconds`` is wall time; ``cpu_s`` the process CPU time (all threads), which is what the
wall time would be on an otherwise idle machine for this mostly single-threaded code.
Prints a table and writes ``benchmarks/results/sim.csv`` and ``sim.md``. The first call of
a process builds the species' cached distance fields; that warm-up is timed separately.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from cryosiam_nb import sim  # noqa: E402
from cryosiam_nb.sim import shapes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"tilt": 60.0, "fast": 10.0}


def _warm_up(voxel_size: float) -> float:
    t = time.perf_counter()
    for sp in shapes.SPECIES.values():
        shapes._reference_fields(sp.name, float(voxel_size))
        _ = sp.volume_nm3
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CI, ≤ 1 min)")
    ap.add_argument("--voxel-size", type=float, default=10.0, help="Å per voxel")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    shape = (64, 96, 96) if args.quick else (128, 256, 256)
    warm = _warm_up(args.voxel_size)
    rows = []
    for mode in ("fast", "tilt"):
        for sample in sim.SAMPLES:
            t, c = time.perf_counter(), time.process_time()
            s = sim.simulate(
                shape,
                voxel_size=args.voxel_size,
                sample=sample,
                seed=args.seed,
                mode=mode,
                progress=False,
            )
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            cats = s.particles["size_category"].value_counts()
            rows.append(
                {
                    "mode": mode,
                    "sample": sample,
                    "shape": "×".join(map(str, shape)),
                    "seconds": round(dt, 2),
                    "cpu_s": round(cpu, 2),
                    "scene_s": s.params["seconds_scene"],
                    "imaging_s": round(dt - s.params["seconds_scene"], 2),
                    "particles": len(s.particles),
                    "categories": int((cats > 0).sum()),
                    "crowding": round(s.params["crowding_achieved"], 3),
                    "target_s": TARGETS[mode] if shape == (128, 256, 256) else None,
                }
            )
            print(
                f"{mode:5s} {sample:13s} {rows[-1]['shape']:>11s} {dt:7.2f} s wall "
                f"{cpu:7.2f} s CPU "
                f"({len(s.particles)} particles)",
                flush=True,
            )
    df = pd.DataFrame(rows)
    if shape == (128, 256, 256):
        df["meets_target"] = df["seconds"] <= df["target_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS / "sim.csv", index=False)
    header = (
        f"# bench_sim ({'quick' if args.quick else 'full'})\n\n"
        f"machine: {machine()}; "
        f"voxel size {args.voxel_size:g} Å; species warm-up {warm:.1f} s (once per process)\n\n"
    )
    (RESULTS / "sim.md").write_text(header + df.to_markdown(index=False) + "\n")
    print()
    print(f"species warm-up (once per process): {warm:.2f} s")
    print(df.to_string(index=False))
    return df


if __name__ == "__main__":
    main()
