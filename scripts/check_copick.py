"""Open cryosiam_nb's copick export with the real copick library and compare every point.

copick (1.31) pins ``zarr < 3`` and cannot be installed beside cryosiam_nb's pins
(zarr 3), so this check cannot run in CI; it runs in two environments:

1. With cryosiam_nb's environment, export (or describe an existing export)::

       python scripts/check_copick.py export OUT/copick [--particles particles.zarr]
       python scripts/check_copick.py expect OUT/copick        # an existing export

   ``export`` writes picks for ``--particles`` (a Particles store, e.g. the demo's
   ``particles.zarr``; one copick object per cluster, as the demo and the explorer do) or for
   a synthetic table with awkward cluster names ("0", "0.1", "a b"), and then does ``expect``:
   it reads the picks back with ``cryosiam_nb.export.read_copick`` and writes
   ``OUT/copick-expected.json`` (runs, objects, point counts, locations in Å).

2. With a separate environment holding copick
   (``python3 -m venv /tmp/copickvenv && /tmp/copickvenv/bin/pip install copick``)::

       /tmp/copickvenv/bin/python scripts/check_copick.py check OUT/copick

   opens ``OUT/copick/copick_config.json`` with ``copick.from_file``, lists runs, pickable
   objects and picks (user, session, object, points), and compares them with the expected
   file: same picks, same point counts, locations equal to 1e-6 Å. Exit status 1 on any
   difference.

This script imports cryosiam_nb only in steps ``export``/``expect`` and copick only in
``check``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _expected_path(root: Path) -> Path:
    return root.parent / f"{root.name}-expected.json"


def expect(root: Path) -> Path:
    """Describe the picks under ``root`` as cryosiam_nb reads them (Å locations)."""
    from cryosiam_nb import export

    picks = []
    for f in sorted((root / "ExperimentRuns").glob("*/Picks/*.json")):
        doc = json.loads(f.read_text())
        table = export.read_copick(f)
        picks.append(
            {
                "run": doc["run_name"],
                "user": doc["user_id"],
                "session": doc["session_id"],
                "object": doc["pickable_object_name"],
                "xyz_A": table[["x_A", "y_A", "z_A"]].to_numpy().tolist(),
            }
        )
    out = _expected_path(root)
    out.write_text(json.dumps({"picks": picks}, indent=1))
    print(f"{len(picks)} picks file(s), {sum(len(p['xyz_A']) for p in picks)} point(s) → {out}")
    return out


def export_picks(root: Path, particles: Path | None) -> Path:
    """Export picks into ``root`` with cryosiam_nb (one object per cluster), then :func:`expect`."""
    import numpy as np
    import pandas as pd

    from cryosiam_nb import export
    from cryosiam_nb.particles import Particles

    if particles is not None:
        data: object = Particles.load(particles, lazy=False)
        kw: dict[str, object] = {}
    else:
        rng = np.random.default_rng(0)
        n = 60
        data = pd.DataFrame(
            {
                "z": rng.uniform(0, 64, n),
                "y": rng.uniform(0, 128, n),
                "x": rng.uniform(0, 128, n),
                "tomogram": np.where(np.arange(n) % 3 == 0, "TS_01", "TS_02"),
                "cluster": rng.choice(["0", "0.1", "1", "a b"], n),
                "score": rng.uniform(0, 1, n),
                "n_voxels": rng.integers(100, 900, n),
            }
        )
        kw = {"voxel_size": 10.0}
    export.write(data, root, format="copick", object_name="cluster", **kw)
    return expect(root)


def check(root: Path) -> int:
    """Open ``root`` with copick and compare with the expected file; 0 when all agree."""
    import copick
    import numpy as np

    want = json.loads(_expected_path(root).read_text())["picks"]
    proj = copick.from_file(str(root / "copick_config.json"))
    print(f"copick {copick.__version__}: {root / 'copick_config.json'}")
    objects = {o.name: o for o in proj.pickable_objects}
    for o in objects.values():
        print(
            f"  object {o.name:<16} label {o.label:<3} radius {o.radius} Å  color {o.color}"
            f"  is_particle {o.is_particle}"
        )
    got = {}
    errors = []
    for run in proj.runs:
        for p in run.picks:
            try:
                xyz, _ = p.numpy()
            except Exception as exc:  # copick misreads the file name or the file
                errors.append(f"copick cannot load picks listed in run {run.name!r}: {exc}")
                continue
            got[(run.name, p.user_id, p.session_id, p.pickable_object_name)] = xyz
            print(
                f"  run {run.name:<8} picks user={p.user_id} session={p.session_id} "
                f"object={p.pickable_object_name:<16} points={len(p.points)}"
            )
    for w in want:
        key = (w["run"], w["user"], w["session"], w["object"])
        if key not in got:
            errors.append(f"copick does not list picks {key}")
            continue
        xyz = got.pop(key)
        if w["object"] not in objects:
            errors.append(f"object {w['object']!r} is not in the config's pickable_objects")
        if xyz.shape != (len(w["xyz_A"]), 3):
            errors.append(f"{key}: copick has {len(xyz)} point(s), expected {len(w['xyz_A'])}")
        elif len(xyz) and not np.allclose(xyz, np.array(w["xyz_A"]), atol=1e-6):
            errors.append(f"{key}: locations differ by {np.abs(xyz - w['xyz_A']).max()} Å")
    errors += [f"copick lists unexpected picks {k}" for k in got]
    n = sum(len(w["xyz_A"]) for w in want)
    print(f"  expected {len(want)} picks file(s) with {n} point(s)")
    for e in errors:
        print("  MISMATCH:", e)
    print("OK: copick reads every pick" if not errors else f"FAILED: {len(errors)} mismatch(es)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["export", "expect", "check"])
    ap.add_argument("root", type=Path, help="copick root folder")
    ap.add_argument("--particles", type=Path, help="export: a Particles store (.zarr)")
    args = ap.parse_args(argv)
    if args.step == "export":
        export_picks(args.root, args.particles)
        return 0
    if args.step == "expect":
        expect(args.root)
        return 0
    return check(args.root)


if __name__ == "__main__":
    sys.exit(main())
