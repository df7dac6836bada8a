"""Browser-side speed of the curation explorer at 10k / 100k / 1M particles, slice viewer on.

The explorer is served (:func:`cryosiam_nb.pl.curation.server.serve`, token, one working
copy per session) with one 64 x 512 x 512 tomogram, so the slice viewer and its particle
markers (capped, ``max_markers``) are on; headless Chromium (playwright) drives it as a
curator would. Per size, wall-clock seconds as the browser sees them:

- ``first_frame``: ``page.goto`` → the first datashaded UMAP image is in the page;
- ``viewer``: ``page.goto`` → the slice viewer is in the page (it is part of the first
  document); the interactions start after it;
- ``select_gallery``: end of a box drag over one UMAP cluster (~1/30 of the particles) →
  the gallery shows its thumbnails and the selected count;
- ``zoom_frame``: a mouse-wheel zoom on the UMAP → a new datashader frame (new bounds);
- ``exclude_legend``: click "Exclude selection" → the legend shows the excluded count.

datashader's numba kernels are compiled once in the server process before the first size
(``jit_warmup``). Usage: ``python benchmarks/bench_explorer.py [--quick] [--sizes N ...]``
(quick: 10k and 100k). Writes ``benchmarks/results/bench_explorer[_quick].{csv,md}``.
Goal (issue 22): first frame < 5 s and every interaction < 2 s at 1M.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

CHROMIUM = os.environ.get("CRYOSIAM_NB_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
TOMO_SHAPE = (64, 512, 512)

_READY_JS = """() => window.Bokeh && Bokeh.index &&
  [...Bokeh.index.query((v) => v.model.name === "cs-umap")].length > 0"""
# Bounds (x, dw) of the UMAP's datashaded image; null until the first frame arrived.
_FRAME_JS = """() => {
  const v = [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0];
  if (!v) return null;
  for (const r of v.model.renderers) {
    if (r.glyph && r.glyph.type === "ImageRGBA") {
      const d = r.data_source.data;
      if (d.image && d.image.length && d.dw && d.dw.length) {
        const im = d.image[0];
        if ((im.length || (im.shape && im.shape[0])) > 4) return [d.x[0], d.dw[0], d.y[0], d.dh[0]];
      }
    }
  }
  return null;
}"""
# The slice viewer's xy figure has been drawn (its title is "<tomogram> xy").
_VIEWER_JS = """() => [...Bokeh.index.query((v) => v.model.type === "Figure" &&
  v.model.title && v.model.title.text === "tomo xy")].length > 0"""
_TO_SCREEN_JS = """([x0, y0, x1, y1]) => {
  const v = [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0];
  const r = v.canvas_view.el.getBoundingClientRect();
  return [r.left + v.frame.x_scale.compute(x0), r.top + v.frame.y_scale.compute(y0),
          r.left + v.frame.x_scale.compute(x1), r.top + v.frame.y_scale.compute(y1)];
}"""


def make_particles(n: int, n_clusters: int = 30, seed: int = 0):
    """``n`` particles: a UMAP of ``n_clusters`` Gaussian blobs, centres in one tomogram."""
    from cryosiam_nb.particles import Particles

    rng = np.random.default_rng(seed)
    centres = rng.uniform(-15, 15, size=(n_clusters, 2))
    lab = rng.integers(0, n_clusters, n)
    uv = (centres[lab] + rng.normal(scale=0.9, size=(n, 2))).astype(np.float32)
    nz, ny, nx = TOMO_SHAPE
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


def _until(cond, timeout: float, what: str) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if cond():
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def measure(browser, n: int, tomo: np.ndarray, out: Path, seed: int = 0) -> dict:
    from cryosiam_nb.pl.curation.server import live_sessions, serve

    parts, centres = make_particles(n, seed=seed)
    t = time.perf_counter()
    server, url = serve(
        parts, {"tomo": tomo}, port=0, output_dir=out, threaded=True, autosave=False, box=32
    )
    setup = time.perf_counter() - t
    before = {e._session_label for e in live_sessions()}
    page = browser.new_page(viewport={"width": 1500, "height": 1200})
    try:
        t0 = time.perf_counter()
        page.goto(url, timeout=300_000)
        page.wait_for_function(_READY_JS, timeout=300_000, polling=50)
        page.wait_for_function(f"() => ({_FRAME_JS})() !== null", timeout=300_000, polling=50)
        first = time.perf_counter() - t0
        page.wait_for_function(_VIEWER_JS, timeout=300_000, polling=50)
        viewer = time.perf_counter() - t0
        (ex,) = [e for e in live_sessions() if e._session_label not in before]

        cx, cy = centres[0]
        sx0, sy0, sx1, sy1 = page.evaluate(_TO_SCREEN_JS, [cx - 2, cy - 2, cx + 2, cy + 2])
        page.mouse.move(sx0, sy0)
        page.mouse.down()
        for i in range(1, 6):
            page.mouse.move(sx0 + (sx1 - sx0) * i / 5, sy0 + (sy1 - sy0) * i / 5)
        t0 = time.perf_counter()
        page.mouse.up()
        _until(lambda: len(ex.selection) > 0, 120, "the selection")
        n_sel = len(ex.selection)
        page.locator(f".cs-n-selected[data-n='{n_sel}']").wait_for(timeout=120_000)
        page.locator(".cs-thumb").nth(min(16, n_sel) - 1).wait_for(timeout=120_000)
        select = time.perf_counter() - t0

        before = page.evaluate(_FRAME_JS)
        page.mouse.move((sx0 + sx1) / 2, (sy0 + sy1) / 2)
        t0 = time.perf_counter()
        page.mouse.wheel(0, -400)
        page.wait_for_function(
            f"(b) => {{ const f = ({_FRAME_JS})(); return f && f[1] < 0.9 * b[1]; }}",
            arg=before,
            timeout=120_000,
            polling=50,
        )
        zoom = time.perf_counter() - t0

        t0 = time.perf_counter()
        page.locator(".cs-exclude button").click()
        page.locator(
            f".cs-legend-item[data-category='(excluded)'] .cs-legend-count[data-n='{n_sel}']"
        ).wait_for(timeout=120_000)
        exclude = time.perf_counter() - t0
    finally:
        page.close()
        server.stop()
    row = {
        "n_particles": n,
        "serve_setup_s": round(setup, 2),
        "first_frame_s": round(first, 2),
        "viewer_s": round(viewer, 2),
        "n_selected": n_sel,
        "select_gallery_s": round(select, 2),
        "zoom_frame_s": round(zoom, 2),
        "exclude_legend_s": round(exclude, 2),
    }
    print(pd.DataFrame([row]).to_string(index=False), flush=True)
    return row


def run(sizes: list[int], seed: int = 0) -> pd.DataFrame:
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(seed)
    tomo = rng.normal(size=TOMO_SHAPE).astype(np.float32)
    from cryosiam_nb.pl.curation.server import warm_up

    t = time.perf_counter()
    warm_up(make_particles(2000, seed=seed)[0], {"tomo": tomo})  # what serve() does once
    jit = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            for n in sizes:
                rows.append(
                    {**measure(browser, n, tomo, Path(tmp), seed), "jit_warmup_s": round(jit, 2)}
                )
        finally:
            browser.close()
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the particle counts")
    args = ap.parse_args()
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    df = run(sizes)
    emit(
        df,
        "bench_explorer" + ("_quick" if args.quick else ""),
        "Explorer in headless Chromium, slice viewer on: seconds as the browser sees them",
    )
    big = df.iloc[-1]
    inter = max(big["select_gallery_s"], big["zoom_frame_s"], big["exclude_legend_s"])
    ok = big["first_frame_s"] < 5 and inter < 2
    print(
        f"\ntarget (first frame < 5 s, interactions < 2 s at {int(big['n_particles']):,}): "
        + ("met" if ok else "NOT met")
    )


if __name__ == "__main__":
    main()
