"""Benchmark: normalising a large memory-mapped float32 MRC out of core.

Target (issue 2): a 2 GiB tomogram is normalised (percentiles + clip + scale, streamed
to zarr) with the process's peak RSS under 1 GiB. ``--quick`` uses 256 MiB.

    python benchmarks/bench_io.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_isolated  # noqa: E402

CHILD = """
import time, numpy as np
from cryosiam_nb import io, pp
t0 = time.perf_counter()
vol = io.read({path!r})
norm = pp.normalize(vol, invert=True)
io.write(norm, {out!r})
print('SECONDS', time.perf_counter() - t0)
"""


def make_mrc(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Write a float32 MRC slab by slab (never holding it whole)."""
    rng = np.random.default_rng(seed)
    m = mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True)
    m.voxel_size = 6.8
    for z in range(shape[0]):
        m.data[z] = rng.normal(size=shape[1:]).astype(np.float32)
    m.flush()
    m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shape = (64, 1024, 1024) if args.quick else (512, 1024, 1024)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "big.mrc"
        make_mrc(src, shape)
        size_gib = src.stat().st_size / 2**30
        stdout, peak = run_isolated(CHILD.format(path=str(src), out=str(Path(d) / "norm.zarr")))
        secs = float(stdout.split("SECONDS")[-1])
        rows.append(
            {
                "task": "read + normalize + write zarr",
                "shape (z,y,x)": "×".join(map(str, shape)),
                "file GiB": round(size_gib, 2),
                "wall s": round(secs, 1),
                "MB/s": round(size_gib * 1024 / secs, 1),
                "peak RSS GiB": round(peak, 2),
                "target": "peak RSS < 1 GiB",
                "met": peak < 1.0,
            }
        )
    emit(pd.DataFrame(rows), "io_normalize", "Out-of-core normalisation")


if __name__ == "__main__":
    main()
