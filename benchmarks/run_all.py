"""Run every benchmark script (``benchmarks/bench_*.py``) and collect their tables.

One command each::

    python benchmarks/run_all.py --quick     # CI-sized (every script with --quick), ≤ 5 min
    python benchmarks/run_all.py --full      # full mode (tens of minutes on 2 CPU cores)

Every script runs in its own interpreter (its own process group, killed on timeout) with a
per-script time limit; its stdout/stderr go to ``benchmarks/results/logs/<script>.log``. The
Markdown tables a script writes into ``benchmarks/results/`` during its run are collected into
``benchmarks/results/SUMMARY.md`` (full mode) or ``SUMMARY_quick.md`` (quick mode), which
starts with the machine line and a status table; ``SUMMARY[_quick].json`` lists, per script,
its status, seconds and the CSV/Markdown files it produced (the CI test reads it): the files
``_common.emit`` reports through ``$CRYOSIAM_BENCH_MANIFEST``, or, for a script that writes
its own files, those changed in ``results/`` while it ran. A summary
table (script, status, wall seconds, CPU seconds) is printed at the end; the exit status is 1 if any script
failed or timed out.

Scripts listed in :data:`CI_EXCLUDE` are skipped with ``--ci`` (used by the test suite) because
their quick mode does not fit the CI budget on 2 shared cores; ``--quick`` alone runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine  # noqa: E402

#: script → reason: left out of the CI quick run (``--ci``) because it is too slow there.
CI_EXCLUDE: dict[str, str] = {
    "bench_multitask.py": (
        "quick mode simulates a tilt-series tomogram and runs both model sets plus five "
        "robustness variants (several minutes on 2 cores); tests/test_multitask.py covers "
        "the code; run it with `run_all.py --quick --only multitask`"
    ),
    "bench_particles.py": (
        "quick mode 200 s wall / 104 s CPU on the shared 2-core machine (2026-11-24), about a "
        "quarter of the whole quick run; run it with `run_all.py --quick --only particles`"
    ),
    "bench_models.py": (
        "quick mode 134 s wall / 131 s CPU (2026-11-24, machine nearly idle), twice the 1-min "
        "quick target; its preset timing overlaps bench_speed's training-step rows"
    ),
    "bench_dense_pipeline.py": (
        "quick mode starts five interpreters that each load models (~3 min on the loaded "
        "2-core machine, 2026-12-05); tests/test_inference.py covers window defaults, "
        "precision and exactness; run it with `run_all.py --quick --only dense_pipeline`"
    ),
    "bench_windows.py": (
        "quick mode runs the whole multi-task pipeline, instances included, twice on a "
        "simulated tomogram (~1–2 min); run it with `run_all.py --quick --only windows`"
    ),
}

#: default per-script time limits (seconds) by mode
TIMEOUTS = {"quick": 240.0, "full": 3600.0}


def scripts(only: list[str] | None = None, exclude: list[str] | None = None) -> list[Path]:
    """The ``bench_*.py`` scripts in this folder (sorted), filtered by stem or file name."""

    def key(p: Path) -> set[str]:
        return {p.name, p.stem, p.stem.removeprefix("bench_")}

    found = sorted(HERE.glob("bench_*.py"))
    if only:
        found = [p for p in found if key(p) & set(only)]
    if exclude:
        found = [p for p in found if not key(p) & set(exclude)]
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    """Terminate the script's process group (the script and any children it started)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        pass


def run_script(path: Path, quick: bool, timeout: float, log_dir: Path) -> dict:
    """Run one script; returns ``script, status (ok/failed/timeout), seconds, cpu_s, files, log``.

    ``cpu_s``: CPU time (user + system) of the script and the children it waited for — on a
    shared, loaded machine a better guide than wall time to what an idle machine would take.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{path.stem}.log"
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    manifest = log_dir / f"{path.stem}.files"
    manifest.unlink(missing_ok=True)
    env["CRYOSIAM_BENCH_MANIFEST"] = str(manifest)
    before = {p: p.stat().st_mtime_ns for p in RESULTS.glob("*") if p.is_file()}
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = f"timeout (> {timeout:.0f} s)"
        except BaseException:
            _kill_group(proc)
            raise
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if manifest.exists():  # tables written through _common.emit
        files = sorted(set(manifest.read_text().split()))
    else:  # scripts that write their own files: whatever changed during the run
        files = sorted(
            p.name
            for p in RESULTS.glob("*")
            if p.is_file()
            and p.suffix in (".csv", ".md")
            and not p.name.startswith("SUMMARY")
            and before.get(p) != p.stat().st_mtime_ns
        )
    return {
        "script": path.name,
        "status": status,
        "seconds": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "files": files,
        "log": str(log.relative_to(REPO) if log.is_relative_to(REPO) else log),
    }


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _table(records: list[dict]) -> pd.DataFrame:
    cols = ("script", "status", "seconds", "cpu_s")
    return pd.DataFrame([{k: r.get(k) for k in cols} for r in records])


def write_summary(records: list[dict], mode: str, total: float) -> Path:
    """SUMMARY[_quick].md (status table + every collected table) and SUMMARY[_quick].json."""
    stem = "SUMMARY" if mode == "full" else "SUMMARY_quick"
    table = _table(records)
    parts = [
        f"# Benchmarks ({mode} mode)",
        "",
        f"Measured on: {machine()} (`python benchmarks/run_all.py --{mode}`, "
        f"total {total:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        table.to_markdown(index=False),
        "",
    ]
    for r in records:
        parts += [f"## {r['script']}", ""]
        mds = [f for f in r["files"] if f.endswith(".md")]
        for f in mds:
            parts += [(RESULTS / f).read_text().strip(), ""]
        if not mds:
            parts += ["(no table written)", ""]
        if r["status"] != "ok":
            parts += ["Log tail:", "", "```", _tail(REPO / r["log"]), "```", ""]
    md = RESULTS / f"{stem}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, md)
    js = RESULTS / f"{stem}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"mode": mode, "total_s": round(total, 1), "scripts": records}))
    os.replace(tmp, js)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="every script with --quick (CI)")
    mode.add_argument("--full", action="store_true", help="every script in full mode")
    ap.add_argument("--ci", action="store_true", help="skip the scripts listed in CI_EXCLUDE")
    ap.add_argument("--only", nargs="+", help="run only these scripts (e.g. denoise bench_io)")
    ap.add_argument("--exclude", nargs="+", default=[], help="skip these scripts")
    ap.add_argument("--timeout", type=float, help="per-script limit in seconds")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    timeout = args.timeout or TIMEOUTS[name]
    exclude = list(args.exclude) + (list(CI_EXCLUDE) if args.ci else [])
    todo = scripts(args.only, exclude)
    if not todo:
        print("no benchmark scripts selected", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.ci and CI_EXCLUDE:
        for s, why in CI_EXCLUDE.items():
            print(f"skipped in CI: {s} ({why})")
    records = []
    t0 = time.perf_counter()
    for path in todo:
        print(f"[{name}] {path.name} ...", flush=True)
        rec = run_script(path, args.quick, timeout, RESULTS / "logs")
        records.append(rec)
        print(f"[{name}] {path.name}: {rec['status']} in {rec['seconds']:.1f} s", flush=True)
        if rec["status"] != "ok":
            print(_tail(REPO / rec["log"]), flush=True)
    total = time.perf_counter() - t0
    md = write_summary(records, name, total)
    table = _table(records)
    print()
    print(f"Measured on: {machine()}; total {total:.0f} s")
    print(table.to_markdown(index=False))
    print(f"\nall tables: {md.relative_to(REPO)}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
