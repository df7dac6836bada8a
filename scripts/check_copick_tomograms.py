"""Round trip of tomograms between cryosiam_nb and the real copick library.

copick pins ``zarr < 3``, so it cannot live in the project environment; give the Python of
a separate environment that has it::

    python -m venv /tmp/copickenv && /tmp/copickenv/bin/pip install copick
    python scripts/check_copick_tomograms.py --copick-python /tmp/copickenv/bin/python

1. ``io.write`` puts an intensity tomogram and a label volume into a copick project
   (``ExperimentRuns/<run>/VoxelSpacing10.000/<type>.zarr``, OME-Zarr 0.4 on zarr v2);
2. copick (other environment) lists them, reads levels 0 and 1 and compares the voxels, then
   writes a tomogram of its own with ``CopickTomogram.from_numpy``;
3. ``io.list_tomograms`` lists the project and ``io.read`` reads copick's tomogram at every
   level with the voxel size of each level's scale.

Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cryosiam_nb import io

COPICK_SIDE = r"""
import json, sys
import numpy as np, copick, zarr
root = copick.from_file(sys.argv[1])
ref = np.load(sys.argv[2])
out = {"copick": copick.__version__, "zarr": zarr.__version__, "ours": []}
for run in root.runs:
    for vs in run.voxel_spacings:
        for t in vs.tomograms:
            want = ref if t.tomo_type == "wbp" else (ref > 0).astype("u1")
            lvl0, lvl1 = t.numpy(), t.numpy(zarr_group="1")
            ok1 = np.array_equal(lvl1, want[::2, ::2, ::2]) if want.dtype == "u1" else True
            out["ours"].append([run.name, vs.voxel_size, t.tomo_type, list(lvl0.shape),
                                str(lvl0.dtype), bool(np.array_equal(lvl0, want)), ok1,
                                list(lvl1.shape)])
mine = np.random.default_rng(1).normal(size=(80, 90, 100)).astype("f4")
np.save(sys.argv[3], mine)
root.new_run("TS_copick").new_voxel_spacing(7.84).new_tomogram("denoised").from_numpy(mine)
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copick-python", required=True, help="python of an env with copick")
    ap.add_argument("--keep", type=Path, help="build the project here instead of a temp dir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        vs_dir = base / "ExperimentRuns" / "TS_1" / "VoxelSpacing10.000"
        vol = np.random.default_rng(0).normal(size=(70, 96, 96)).astype(np.float32)
        io.write(io.as_dataarray(vol, 10.0, name="wbp"), vs_dir / "wbp.zarr", overwrite=True)
        labels = io.as_dataarray((vol > 0).astype(np.uint8), 10.0)
        io.write(labels, vs_dir / "labels.zarr", overwrite=True)
        np.save(base / "ref.npy", vol)
        cfg = base / "copick_config.json"
        cfg.write_text(
            json.dumps(
                {
                    "config_type": "filesystem",
                    "name": "cryosiam-nb-check",
                    "pickable_objects": [
                        {"name": "ribosome", "is_particle": True, "label": 1, "radius": 120}
                    ],
                    "overlay_root": f"local://{base.resolve()}",
                    "overlay_fs_args": {"auto_mkdir": True},
                }
            )
        )
        res = subprocess.run(
            [
                args.copick_python,
                "-c",
                COPICK_SIDE,
                str(cfg),
                str(base / "ref.npy"),
                str(base / "theirs.npy"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return 1
        report = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"copick {report['copick']} (zarr {report['zarr']}) reads io.write output:")
        ok = True
        for run, vs, kind, shape, dtype, same0, same1, shape1 in report["ours"]:
            print(f"  {run} {vs} Å {kind}: level 0 {shape} {dtype} equal={same0}, level 1 {shape1}")
            ok &= same0 and same1
        print("cryosiam_nb reads copick's own tomogram:")
        table = io.list_tomograms(cfg)
        print(table.drop(columns="path").to_string(index=False))
        path = table[table.run == "TS_copick"].path.iloc[0]
        theirs = np.load(base / "theirs.npy")
        level = 0
        while True:
            try:
                t = io.read(path, level=level)
            except io.InputError:
                break
            print(f"  level {level}: shape {t.shape}, voxel size {t.attrs['voxel_size']:g} Å")
            if level == 0:
                ok &= bool(np.array_equal(t.values, theirs))
            ok &= abs(t.attrs["voxel_size"] - 7.84 * 2**level) < 1e-6
            level += 1
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
