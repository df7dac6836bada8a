"""Helpers shared by the benchmark scripts: peak-RSS measurement and table output."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine the numbers were measured on."""
    import psutil

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}"
    )


class PeakRSS:
    """Sample this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_rss = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_isolated(code: str, timeout: float = 3600) -> tuple[str, float]:
    """Run Python ``code`` in a fresh interpreter; return (its stdout, its peak RSS in GiB).

    The child reports its own high-water mark (``VmHWM`` of /proc/self/status; Linux keeps
    ``ru_maxrss`` across exec, so it would include the parent's pre-fork size).
    """
    tail = (
        "\nimport re as _re, resource as _r\n"
        "try:\n"
        "    _k = int(_re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "except Exception:\n"
        "    _k = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss\n"
        "print('PEAK_RSS_KIB', _k)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code + tail],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-4000:]}")
    lines = out.stdout.strip().splitlines()
    peak_kib = float(lines[-1].split()[1])
    return "\n".join(lines[:-1]), peak_kib / 2**20


def run_child(module: str, func: str, timeout: float = 7200, **kw) -> tuple[dict, float]:
    """``benchmarks/<module>.py``'s ``func(**kw)`` in a fresh interpreter (see
    :func:`run_isolated`): its JSON-able result and the child's peak RSS in GiB."""
    import json

    here, repo = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    code = (
        f"import sys, json; sys.path[:0] = [{str(here)!r}, {str(repo)!r}]\n"
        f"import {module} as b\n"
        f"print('RESULT', json.dumps(b.{func}(**json.loads({json.dumps(json.dumps(kw))}))))\n"
    )
    stdout, peak = run_isolated(code, timeout=timeout)
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :]), peak


def emit(df: pd.DataFrame, name: str, title: str) -> None:
    """Print ``df`` as a Markdown table and write CSV + Markdown to benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = f"### {title}\n\nMeasured on: {machine()}\n\n{df.to_markdown(index=False)}\n"
    print(md, flush=True)
    df.to_csv(RESULTS / f"{name}.csv", index=False)
    (RESULTS / f"{name}.md").write_text(md)
    _record(f"{name}.csv", f"{name}.md")


def _record(*files: str) -> None:
    """Append written result file names to ``$CRYOSIAM_BENCH_MANIFEST`` when it is set
    (``run_all.py`` uses it to attribute tables to scripts on a shared results folder)."""
    manifest = os.environ.get("CRYOSIAM_BENCH_MANIFEST")
    if manifest:
        with open(manifest, "a") as fh:
            fh.write("".join(f"{f}\n" for f in files))
