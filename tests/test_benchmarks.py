"""Benchmark suite: the runner's behaviour and, in CI, that every quick table is produced.

The quick run (``python benchmarks/run_all.py --quick --ci``) asserts only that each script
succeeds and writes tables with finite numbers — speed bounds live in the scripts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    mod = _module("run_all")
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return mod


def _script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_discovers_every_bench_script_and_filters():
    mod = _module("run_all")
    names = [p.name for p in mod.scripts()]
    assert names == sorted(p.name for p in BENCH.glob("bench_*.py"))
    for own in ("bench_denoise.py", "bench_quality.py", "bench_speed.py"):
        assert own in names
    assert [p.name for p in mod.scripts(only=["denoise"])] == ["bench_denoise.py"]
    assert "bench_speed.py" not in [p.name for p in mod.scripts(exclude=["bench_speed"])]


def test_run_script_ok_failed_and_timeout(run_all, tmp_path):
    res = run_all.RESULTS
    ok = _script(
        tmp_path,
        "bench_ok.py",
        "import sys\nassert sys.argv[1:] == ['--quick']\n"
        f"open({str(res / 'ok_quick.csv')!r}, 'w').write('a,b\\n1,2.5\\n')\n",
    )
    rec = run_all.run_script(ok, quick=True, timeout=60, log_dir=tmp_path / "logs")
    assert rec["status"] == "ok" and rec["files"] == ["ok_quick.csv"]

    bad = _script(tmp_path, "bench_bad.py", "raise SystemExit(3)\n")
    rec = run_all.run_script(bad, quick=False, timeout=60, log_dir=tmp_path / "logs")
    assert rec["status"].startswith("failed") and "3" in rec["status"]

    # a script whose child keeps running: the whole process group is killed on timeout
    slow = _script(
        tmp_path,
        "bench_slow.py",
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n",
    )
    rec = run_all.run_script(slow, quick=True, timeout=2, log_dir=tmp_path / "logs")
    assert rec["status"].startswith("timeout") and rec["seconds"] < 30


def test_tables_attributed_by_manifest_not_by_concurrent_writes(run_all, tmp_path):
    """On a shared results folder, only the tables the script reports through emit count."""
    res = run_all.RESULTS
    body = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import _common\n"
        f"open({str(res / 'mine.csv')!r}, 'w').write('a\\n1\\n')\n"
        f"open({str(res / 'other_engineer.csv')!r}, 'w').write('a\\n1\\n')\n"
        "_common._record('mine.csv')\n"
    )
    rec = run_all.run_script(_script(tmp_path, "bench_m.py", body), True, 60, tmp_path / "logs")
    assert rec["status"] == "ok" and rec["files"] == ["mine.csv"]


def test_summary_collects_tables_and_status(run_all, tmp_path):
    (run_all.RESULTS / "x_quick.md").write_text("### X\n\n| a |\n|---|\n| 1 |\n")
    records = [
        {"script": "bench_x.py", "status": "ok", "seconds": 1.0, "files": ["x_quick.md"]},
        {
            "script": "bench_y.py",
            "status": "failed (exit 1)",
            "seconds": 2.0,
            "files": [],
            "log": "benchmarks/results/logs/none.log",
        },
    ]
    md = run_all.write_summary(records, "quick", 3.0)
    text = md.read_text()
    assert md.name == "SUMMARY_quick.md"
    assert "Measured on:" in text and "### X" in text and "failed (exit 1)" in text
    data = json.loads((run_all.RESULTS / "SUMMARY_quick.json").read_text())
    assert [r["script"] for r in data["scripts"]] == ["bench_x.py", "bench_y.py"]


def test_main_requires_a_mode():
    out = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--quick" in out.stderr


def test_denoise_affine_matching_and_sigma_choice():
    bd = _module("bench_denoise")
    rng = np.random.default_rng(0)
    clean = rng.random((16, 16, 16)).astype(np.float32)
    m = bd.matched(-3.0 * clean + 7.0, clean)  # inverted, rescaled copy maps back exactly
    np.testing.assert_allclose(m, clean, atol=1e-5)
    # smooth signal + strong white noise: some smoothing beats the smallest σ
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(rng.random((32, 32, 32)), 3).astype(np.float32)
    noisy = smooth + rng.normal(0, smooth.std() * 3, smooth.shape).astype(np.float32)
    sigma, scores = bd.best_sigma(noisy, smooth)
    assert sigma > min(bd.SIGMAS) and scores[sigma] == max(scores.values())


def _numeric_ok(df: pd.DataFrame) -> bool:
    num = df.select_dtypes("number")
    vals = num.to_numpy(dtype=float).ravel()
    return bool(len(df)) and np.isfinite(vals).any() and not np.isinf(vals).any()


@pytest.mark.slow
def test_quick_run_produces_finite_tables():
    """CI: every script's quick mode succeeds and writes tables with finite numbers."""
    mod = _module("run_all")
    out = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--ci"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((mod.RESULTS / "SUMMARY_quick.json").read_text())
    ran = {r["script"] for r in summary["scripts"]}
    assert {"bench_denoise.py", "bench_quality.py", "bench_speed.py"} - set(mod.CI_EXCLUDE) <= ran
    for rec in summary["scripts"]:
        assert rec["status"] == "ok", rec
        csvs = [f for f in rec["files"] if f.endswith(".csv")]
        assert csvs, f"{rec['script']} wrote no CSV table"
        for f in csvs:
            df = pd.read_csv(mod.RESULTS / f)
            assert _numeric_ok(df), f"{f}: empty or without finite numbers"
    denoise = pd.read_csv(mod.RESULTS / "denoise_quick.csv").set_index("method")
    for method in ("noisy input",) + tuple(m for m in denoise.index if m.startswith("Gaussian")):
        assert math.isfinite(denoise.loc[method, "PSNR matched dB"])


def test_multitask_bench_leaves_small_picking_undefined_without_small_particles():
    """A tomogram without particles under 150 voxels (transcription, chromatin) has no
    small-particle F1: NaN (left out of the mean), not 0; a miss where they exist is 0."""
    from types import SimpleNamespace

    import xarray as xr

    bm = _module("bench_multitask")
    inst = np.zeros((24, 24, 24), np.uint32)
    inst[2:10, 2:10, 2:10] = 1  # 512 voxels: big
    sem = (inst > 0).astype(np.int64) * 3
    vols = {
        "semantic": sem,
        "instances": inst,
        "clean": np.random.default_rng(0).random(inst.shape).astype(np.float32),
        "lamella": np.ones(inst.shape, np.uint8),
    }
    truth = SimpleNamespace(volumes={k: xr.DataArray(v) for k, v in vols.items()})
    out = {
        "semantic": sem,
        "instances": inst,
        "denoised": vols["clean"],
        "lamella": vols["lamella"],
    }
    r = bm.score(out, truth)
    assert np.isnan(r["f1_small"]) and np.isnan(r["recall_small"])
    assert r["f1_all"] == 1.0 and r["ap50"] == 1.0
    small = inst.copy()
    small[15:19, 15:19, 15:19] = 2  # 64 voxels: small, and predicted as nothing
    truth.volumes["instances"] = xr.DataArray(small)
    r = bm.score(out, truth)
    assert r["recall_small"] == 0.0 and r["f1_small"] == 0.0


def test_bench_multitask_extra_held_out_tomograms_take_the_next_seeds(monkeypatch):
    """``--extra N`` adds N held-out scenes on the seeds after the standard three, in the
    same cycle of samples and shapes, so the standard three stay the first rows."""
    from cryosiam_nb import sim

    bm = _module("bench_multitask")
    calls = []
    monkeypatch.setattr(
        sim, "simulate", lambda shape, **kw: calls.append((shape, kw["sample"], kw["seed"]))
    )
    names = [n for n, _ in bm.held_out(False, extra=4)]
    assert [c[2] for c in calls] == list(range(9101, 9108))
    assert [c[1] for c in calls] == ["general", "transcription", "general"] * 2 + ["general"]
    assert [c[0][0] for c in calls] == [96, 96, 128, 96, 96, 128, 96]
    assert names[:3] == [k[0] for k in bm._KINDS] and "seed 9104" in names[3]
    # and none of them is a seed the multi-task recipe simulates with
    from cryosiam_nb.training.recipe import RECIPE

    used = _recipe_seeds(RECIPE["multitask"])
    assert len(used) > 100 and not used & set(range(9101, 9108))


def _recipe_seeds(node) -> set[int]:
    """Every simulation seed under ``node`` (a recipe dict): ``seed``/``n``, ``val_seed``/
    ``val_n`` ranges and ``seeds`` lists, at any depth (calibration sets included)."""
    out: set[int] = set()
    if isinstance(node, dict):
        if isinstance(node.get("seed"), int):
            out |= set(range(node["seed"], node["seed"] + node.get("n", 1)))
        if isinstance(node.get("val_seed"), int):
            out |= set(range(node["val_seed"], node["val_seed"] + node.get("val_n", 1)))
        out |= {int(s) for s in node.get("seeds", ())}
        for v in node.values():
            out |= _recipe_seeds(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            out |= _recipe_seeds(v)
    return out


def test_bench_multitask_validation_scenes_are_neither_trained_calibrated_nor_test(monkeypatch):
    """``--validation`` scores the 16 scenes 7201–7216 that choices are made on: none is a
    held-out seed, and the multi-task recipe neither trains nor calibrates on any."""
    from cryosiam_nb import sim
    from cryosiam_nb.training.recipe import RECIPE

    bm = _module("bench_multitask")
    calls = []
    monkeypatch.setattr(
        sim, "simulate", lambda shape, **kw: calls.append((shape, kw["sample"], kw["seed"]))
    )
    names = [n for n, _ in bm.validation(False)]
    seeds = [c[2] for c in calls]
    assert seeds == list(range(7201, 7217)) and len(set(names)) == 16
    assert {c[1] for c in calls} == {"general", "transcription", "chromatin"}
    used = _recipe_seeds(RECIPE["multitask"])
    assert {7101, 7108, 8040} <= used  # calibration scenes and the refiner's sets are seen
    assert not used & set(seeds) and not set(seeds) & set(range(9101, 9110))
