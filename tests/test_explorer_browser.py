"""Drive the served explorer in a real headless Chromium (Debian ``chromium`` + playwright).

Run ``scripts/install_browser.sh`` (as root) first; without a Chromium binary these tests
are skipped with the reason. The screenshot goes to ``test-artifacts/explorer.png``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("CRYOSIAM_NB_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Screen position of UMAP coordinates: ask Bokeh's view of the figure named "cs-umap" for its
# scales and clip to the inside of the plot frame (a drag must start inside the frame).
_TO_SCREEN_JS = """([x0, y0, x1, y1]) => {
  const v = [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0];
  const r = v.canvas_view.el.getBoundingClientRect();
  const f = v.frame.bbox;
  const cx = (x) => Math.min(Math.max(r.left + v.frame.x_scale.compute(x), r.left + f.left + 3),
                             r.left + f.right - 3);
  const cy = (y) => Math.min(Math.max(r.top + v.frame.y_scale.compute(y), r.top + f.top + 3),
                             r.top + f.bottom - 3);
  return [cx(x0), cy(y0), cx(x1), cy(y1)];
}"""
_UMAP_READY_JS = """() => window.Bokeh && Bokeh.index &&
  [...Bokeh.index.query((v) => v.model.name === "cs-umap")].length > 0"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def chromium_browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: run scripts/install_browser.sh as root "
            "(apt-get install chromium) or set CRYOSIAM_NB_CHROMIUM"
        )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served():
    """Serve the explorer on a free localhost port (one Explorer per browser session)."""
    import sys

    import panel as pn

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under --import-mode=importlib
    from test_explorer import make_particles, make_tomograms

    particles = make_particles()
    tomograms = make_tomograms(particles)
    apps = []

    def app():
        from cryosiam_nb.pl.curation import Explorer

        ex = Explorer(particles, tomograms=tomograms, width=520, height=420)
        apps.append(ex)
        return ex.panel()

    port = _free_port()
    server = pn.serve(
        app,
        port=port,
        address="127.0.0.1",
        websocket_origin=[f"127.0.0.1:{port}"],
        threaded=True,
        show=False,
        title="cryosiam_nb explorer test",
    )
    try:
        yield f"http://127.0.0.1:{port}/", apps, particles
    finally:
        server.stop()


def test_box_select_gallery_merge_undo_export_in_chromium(chromium_browser, served, tmp_path):
    from playwright.sync_api import expect

    from cryosiam_nb.export import read_star
    from cryosiam_nb.pl.curation import points_in_box

    url, apps, particles = served
    page = chromium_browser.new_page(viewport={"width": 1400, "height": 1150})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, timeout=90_000)
    page.wait_for_function(_UMAP_READY_JS, timeout=90_000)
    ex = apps[-1]

    # 1. Box selection through the UI: drag over cluster "0" (around UMAP (0, 0)) with the
    #    box-select tool, which the app makes the active drag tool.
    active = page.evaluate(
        """() => [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0]
                 .model.toolbar.active_drag.type"""
    )
    assert active == "BoxSelectTool"
    sx0, sy0, sx1, sy1 = page.evaluate(_TO_SCREEN_JS, [-3.0, -3.0, 3.0, 3.0])
    page.mouse.move(sx0, sy0)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(sx0 + (sx1 - sx0) * i / 10, sy0 + (sy1 - sy0) * i / 10)
    page.mouse.up()
    _wait(lambda: len(ex.selection) > 0, 60, "the box selection to reach the server")
    bounds = ex._bounds.bounds
    expected = particles.obs.index[points_in_box(ex._uv, bounds)].tolist()
    cluster0 = particles.obs.index[particles.obs["cluster"] == "0"].tolist()
    assert expected == cluster0  # the groups are well separated: the drag caught all of "0"
    thumbs = page.locator(".cs-thumb")
    expect(thumbs).to_have_count(len(expected), timeout=60_000)
    shown = thumbs.evaluate_all("els => els.map((e) => e.dataset.particleId)")
    assert sorted(shown) == sorted(expected)
    assert sorted(page.locator(".cs-thumb-id").all_inner_texts()) == sorted(expected)
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", str(len(expected)))

    # 2. Clicking a thumbnail jumps the slice viewer to that particle.
    pid = shown[3]
    row = particles.obs.loc[pid]
    thumbs.nth(3).click()
    want = tuple(int(round(row[c])) for c in "zyx")
    _wait(
        lambda: (
            row["tomogram"] in ex._viewers
            and (
                ex._viewers[row["tomogram"]].z,
                ex._viewers[row["tomogram"]].y,
                ex._viewers[row["tomogram"]].x,
            )
            == want
        ),
        60,
        "the slice viewer to jump to the clicked particle",
    )
    expect(page.locator(".cs-thumb.cs-active")).to_have_attribute("data-particle-id", pid)

    # 3. Merge two clusters with the widgets, then undo.
    page.locator(".cs-clusters select").select_option(["1", "2"])
    page.locator(".cs-merge button").click()
    expect(page.locator(".cs-legend-item")).to_have_count(3, timeout=30_000)
    assert particles.clusters() == ["0", "1", "3"]
    page.locator(".cs-undo button").click()
    expect(page.locator(".cs-legend-item")).to_have_count(4, timeout=30_000)
    assert particles.clusters() == ["0", "1", "2", "3"]
    assert particles.obs.loc[particles.obs["cluster"] == "2"].shape[0] == 10

    # 4. Export the selection as a RELION 4 STAR file through the UI.
    out = tmp_path / "selection.star"
    path_input = page.locator(".cs-export-path input")
    path_input.fill(str(out))
    path_input.press("Enter")
    _wait(lambda: ex._widgets["path"].value == str(out), 30, "the export path to sync")
    page.locator(".cs-export button").click()
    _wait(out.exists, 30, f"{out} to be written")
    star = read_star(out)
    assert sorted(star["particle_id"]) == sorted(expected)
    np.testing.assert_allclose(
        star.set_index("particle_id").loc[expected, ["z", "y", "x"]].to_numpy(),
        particles.obs.loc[expected, ["z", "y", "x"]].to_numpy(),
        atol=1e-4,
    )
    expect(page.locator(".cs-status-text")).to_contain_text("exported 10 particle(s)")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
    assert not errors, f"JavaScript errors in the page: {errors}"
    page.close()
