"""Drive the served explorer in a real headless Chromium (Debian ``chromium`` + playwright).

Run ``scripts/install_browser.sh`` (as root) first; without a Chromium binary these tests
are skipped with the reason. The screenshot goes to ``test-artifacts/explorer.png``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

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
def served(tmp_path_factory):
    """Serve the explorer with :func:`serve` on a free localhost port (token, working copies)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under --import-mode=importlib
    from test_explorer import make_particles, make_tomograms

    from cryosiam_nb import analysis
    from cryosiam_nb.pl.curation.server import live_sessions, serve

    particles = make_particles()
    analysis.cluster(particles, k=4, seed=0, key_added="kmeans")  # a pipeline step
    tomograms = make_tomograms(particles)
    out = tmp_path_factory.mktemp("explorer_out")
    server, url = serve(
        particles,
        tomograms,
        port=0,
        output_dir=out,
        threaded=True,
        width=520,
        height=420,
        token="test-token-123",
    )
    try:
        yield url, live_sessions, particles, out
    finally:
        server.stop()


def _open(browser, url, sessions):
    """A new page on the app; returns (page, its Explorer, JS errors list)."""
    before = {e._session_label for e in sessions()}
    page = browser.new_page(viewport={"width": 1500, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, timeout=90_000)
    page.wait_for_function(_UMAP_READY_JS, timeout=90_000)
    new = lambda: [e for e in sessions() if e._session_label not in before]  # noqa: E731
    _wait(lambda: len(new()) == 1, 30, "the session's explorer")
    return page, new()[0], errors


def _drag(page, box, shift=False):
    sx0, sy0, sx1, sy1 = page.evaluate(_TO_SCREEN_JS, list(box))
    if shift:
        page.keyboard.down("Shift")
    page.mouse.move(sx0, sy0)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(sx0 + (sx1 - sx0) * i / 10, sy0 + (sy1 - sy0) * i / 10)
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def _export_as(page, ex, out: Path, name: str) -> Path:
    """Type an export file name, press Export, wait for the file; returns its path."""
    path_input = page.locator(".cs-export-path input")
    path_input.fill(name)
    path_input.press("Enter")
    _wait(lambda: ex._widgets["path"].value == name, 30, "the name to sync")
    page.locator(".cs-export button").click()
    target = out / name
    _wait(target.exists, 30, f"{target} to be written")
    return target


_ACTIVE_MARK_JS = """() => {
  for (const m of Bokeh.documents[0].all_models) {
    if (m.type === "GlyphRenderer" && m.glyph.type === "Scatter" && m.glyph.marker &&
        m.glyph.marker.value === "x") {
      const d = m.data_source.data;
      if (d.u && d.u.length === 1) return [d.u[0], d.v[0]];
    }
  }
  return null;
}"""


def test_box_select_gallery_merge_undo_export_in_chromium(chromium_browser, served):
    from playwright.sync_api import expect

    from cryosiam_nb.export import read_star
    from cryosiam_nb.pl.curation import points_in_box

    url, sessions, base, out = served
    page, ex, errors = _open(chromium_browser, url, sessions)
    particles = ex.particles  # this session's working copy

    # 1. Box selection through the UI: drag over cluster "0" (around UMAP (0, 0)) with the
    #    box-select tool, which the app makes the active drag tool.
    active = page.evaluate(
        """() => [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0]
                 .model.toolbar.active_drag.type"""
    )
    assert active == "BoxSelectTool"
    _drag(page, (-3.0, -3.0, 3.0, 3.0))
    _wait(lambda: len(ex.selection) > 0, 60, "the box selection to reach the server")
    expected = particles.obs.index[points_in_box(ex._uv, ex._bounds.bounds)].tolist()
    cluster0 = particles.obs.index[particles.obs["cluster"] == "0"].tolist()
    assert expected == cluster0  # the groups are well separated: the drag caught all of "0"
    thumbs = page.locator(".cs-thumb")
    expect(thumbs).to_have_count(len(expected), timeout=60_000)
    shown = thumbs.evaluate_all("els => els.map((e) => e.dataset.particleId)")
    assert sorted(shown) == sorted(expected)
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", str(len(expected)))

    # 2. Shift-drag adds cluster "2" to the selection.
    _drag(page, (-3.0, 7.0, 3.0, 13.0), shift=True)
    both = sorted(cluster0 + particles.obs.index[particles.obs["cluster"] == "2"].tolist())
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", "20", timeout=60_000)
    assert ex.selected_ids == both
    _drag(page, (-3.0, -3.0, 3.0, 3.0))  # a plain drag replaces it again
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", "10", timeout=60_000)

    # 3. Clicking a thumbnail jumps the slice viewer there and marks the particle on the UMAP.
    pid = thumbs.nth(3).get_attribute("data-particle-id")
    row = particles.obs.loc[pid]
    thumbs.nth(3).click()
    want = tuple(int(round(row[c])) for c in "zyx")
    viewer = lambda: ex._viewers.get(row["tomogram"])  # noqa: E731
    _wait(
        lambda: viewer() is not None and (viewer().z, viewer().y, viewer().x) == want,
        60,
        "the slice viewer to jump to the clicked particle",
    )
    expect(page.locator(".cs-thumb.cs-active")).to_have_attribute("data-particle-id", pid)
    page.wait_for_function(f"() => ({_ACTIVE_MARK_JS})() !== null", timeout=30_000)
    mark = page.evaluate(_ACTIVE_MARK_JS)
    np.testing.assert_allclose(mark, ex._uv[particles.obs.index.get_loc(pid)], rtol=1e-6)
    expect(page.locator(".cs-status-text")).to_contain_text(f"particle {pid}")

    # 4. Merge two clusters with the widgets: legend and header follow; undo.
    page.locator(".cs-clusters select").select_option(["1", "2"])
    page.locator(".cs-merge button").click()
    expect(page.locator(".cs-legend-item")).to_have_count(3, timeout=30_000)
    expect(page.locator(".cs-n-clusters")).to_have_text("3 clusters")
    assert particles.clusters() == ["0", "1", "3"] and base.clusters() == ["0", "1", "2", "3"]
    page.locator(".cs-undo button").click()
    expect(page.locator(".cs-legend-item")).to_have_count(4, timeout=30_000)
    expect(page.locator(".cs-n-clusters")).to_have_text("4 clusters")
    # The pipeline's kmeans step is not undoable from the UI.
    page.locator(".cs-undo button").click()
    expect(page.locator(".cs-status-text")).to_contain_text("nothing to undo in this session")
    assert "kmeans" in particles.obs.columns and "cluster" in particles.obs.columns

    # 5. Export the selection as STAR through the UI: a file *name* in the output folder.
    path_input = page.locator(".cs-export-path input")
    path_input.fill("../escape.star")
    path_input.press("Enter")
    page.locator(".cs-export button").click()
    expect(page.locator(".cs-status-text")).to_contain_text("only inside the output folder")
    assert not (out.parent / "escape.star").exists()
    star = read_star(_export_as(page, ex, out, "ui_selection.star"))
    assert sorted(star["particle_id"]) == sorted(expected)
    expect(page.locator(".cs-status-text")).to_contain_text("exported 10 particle(s)")
    page.locator(".cs-export button").click()  # again: refused, no silent overwrite
    expect(page.locator(".cs-status-text")).to_contain_text("exists")

    # 6. Exclude: legend, header, gallery and status agree; export reports the skipped ones.
    page.locator(".cs-exclude button").click()
    expect(
        page.locator(".cs-legend-item[data-category='(excluded)'] .cs-legend-count")
    ).to_have_attribute("data-n", "10", timeout=30_000)
    expect(page.locator(".cs-n-excluded")).to_have_text("10 excluded")
    expect(page.locator(".cs-thumb.cs-excluded")).to_have_count(10)
    expect(page.locator(".cs-status-text")).to_contain_text("excluded 10 particle(s)")
    page.keyboard.press("u")  # keyboard shortcut: undo
    expect(page.locator(".cs-n-excluded")).to_have_text("0 excluded", timeout=30_000)

    # 7. Average preview of the selection.
    page.locator(".cs-average button").click()
    expect(page.locator(".cs-avg-count")).to_have_text("10 particle(s)", timeout=30_000)
    assert page.locator(".cs-average img").count() == 3

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
    assert not errors, f"JavaScript errors in the page: {errors}"
    page.close()


def test_two_tabs_have_their_own_state_and_reload_offers_autosave(chromium_browser, served):
    from playwright.sync_api import expect

    url, sessions, base, out = served
    a, ex_a, err_a = _open(chromium_browser, url, sessions)
    b, ex_b, err_b = _open(chromium_browser, url, sessions)
    assert ex_a is not ex_b and ex_a.particles is not ex_b.particles
    a.locator(".cs-clusters select").select_option(["1", "2"])
    a.locator(".cs-merge button").click()
    expect(a.locator(".cs-legend-item")).to_have_count(3, timeout=30_000)
    b.locator(".cs-undo button").click()  # B's undo must not touch A's merge
    expect(b.locator(".cs-status-text")).to_contain_text("nothing to undo", timeout=30_000)
    expect(b.locator(".cs-legend-item")).to_have_count(4)
    assert ex_a.clusters() == ["0", "1", "3"] and ex_b.clusters() == ["0", "1", "2", "3"]
    # Colours are those of the clusters, the same in both tabs for the untouched ones.
    assert ex_a._color_keys["cluster"]["3"] == ex_b._color_keys["cluster"]["3"]
    # A reload of A (a new session) offers A's autosaved edit; Restore brings it back.
    a.close()
    c, ex_c, err_c = _open(chromium_browser, url, sessions)
    expect(c.locator(".cs-restore-msg")).to_contain_text("1 edit(s)", timeout=30_000)
    c.locator(".cs-restore button").click()
    expect(c.locator(".cs-legend-item")).to_have_count(3, timeout=30_000)
    assert ex_c.clusters() == ["0", "1", "3"]
    # Explicit save: a name in the output folder.
    c.locator(".cs-save-path input").fill("curated.zarr")
    c.locator(".cs-save-path input").press("Enter")
    _wait(lambda: ex_c._widgets["save_path"].value == "curated.zarr", 30, "the name to sync")
    c.locator(".cs-save button").click()
    _wait(lambda: (out / "curated.zarr").exists(), 30, "the store to be saved")
    from cryosiam_nb.particles import Particles

    assert Particles.load(out / "curated.zarr").clusters() == ["0", "1", "3"]
    assert not (err_a or err_b or err_c)
    b.close()
    c.close()


def test_requests_without_the_token_are_refused(chromium_browser, served):
    url, sessions, _, _ = served
    before = {e._session_label for e in sessions()}
    page = chromium_browser.new_page()
    resp = page.goto(url.split("?")[0], timeout=60_000)
    assert resp.status == 403 and "token required" in page.content()
    resp = page.goto(url.split("?")[0] + "?token=guess", timeout=60_000)
    assert resp.status == 403
    time.sleep(1.0)
    assert {e._session_label for e in sessions()} <= before  # no session was created
    page.close()


def test_recluster_histograms_and_per_tomogram_export_in_chromium(chromium_browser, served):
    from playwright.sync_api import expect

    from cryosiam_nb.export import read_csv

    url, sessions, base, out = served
    page, ex, errors = _open(chromium_browser, url, sessions)
    obs = ex.particles.obs
    # The slice viewer is part of the page.
    expect(page.locator(".cs-slice-viewer")).to_have_count(1, timeout=60_000)

    # 1. Re-embed clusters "0" and "1" on their own UMAP, k-means into 2 groups.
    _drag(page, (-3.0, -3.0, 13.0, 3.0))
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", "20", timeout=60_000)
    chosen = sorted(ex.selected_ids)
    before = obs.copy()
    k_input = page.locator(".cs-recluster-k input")
    k_input.fill("2")
    k_input.press("Enter")
    _wait(lambda: ex._widgets["recluster_k"].value == 2, 30, "k to sync")
    page.locator(".cs-recluster button").click()
    expect(page.locator(".cs-status-text")).to_contain_text(
        "re-embedded 20 particle(s)", timeout=240_000
    )
    expect(page.locator(".cs-legend-item[data-category='split.1']")).to_have_count(1)
    obs = ex.particles.obs
    groups = {n: sorted(obs.index[obs["cluster"] == n]) for n in ("split.1", "split.2")}
    assert sorted(groups["split.1"] + groups["split.2"]) == chosen
    assert {tuple(sorted(set(before.loc[g, "cluster"]))) for g in groups.values()} == {
        ("0",),
        ("1",),
    }
    rest = ~obs.index.isin(chosen)
    assert obs.loc[rest].equals(before.loc[rest])  # nothing outside the selection moved
    # The plot shows the subset in its own coordinates: drag around group split.1 there.
    uv = ex._uv[obs.index.get_indexer(groups["split.1"])]
    pad = 0.05 * (np.nanmax(ex._uv) - np.nanmin(ex._uv))
    _drag(page, (*(uv.min(0) - pad), *(uv.max(0) + pad)))
    _wait(lambda: sorted(ex.selected_ids) == groups["split.1"], 60, "a subset-view selection")
    # Undo (button): the labels and the full UMAP come back.
    page.locator(".cs-undo button").click()
    expect(page.locator(".cs-status-text")).to_contain_text("undid recluster", timeout=60_000)
    expect(page.locator(".cs-legend-item[data-category='0']")).to_have_count(1)
    assert not ex.subset_view and ex.particles.obs.equals(before)

    # 2. Histograms of the selection (HoloViews figures named cs-hist-<column>).
    _drag(page, (-3.0, -3.0, 3.0, 3.0))
    expect(page.locator(".cs-n-selected")).to_have_attribute("data-n", "10", timeout=60_000)
    page.locator(".cs-hist-selection button").click()
    page.wait_for_function(
        """() => [...Bokeh.index.query((v) => v.model.name === "cs-hist-score")].length > 0""",
        timeout=60_000,
    )

    # 3. Export only the tomogram shown in the viewer.
    page.locator(".cs-tomogram select").select_option("tomoB")
    _wait(lambda: ex._widgets["tomogram"].value == "tomoB", 30, "the tomogram picker")
    page.locator(".cs-export-tomo input").check()
    _wait(lambda: ex._widgets["export_tomo"].value, 30, "the checkbox to sync")
    page.locator(".cs-format select").select_option("CSV (Å)")
    table = read_csv(_export_as(page, ex, out, "tomoB_only.csv"))[0]
    want = [i for i in ex.selected_ids if obs.at[i, "tomogram"] == "tomoB"]
    assert sorted(table["particle_id"]) == sorted(want) and 0 < len(want) < 10
    expect(page.locator(".cs-status-text")).to_contain_text(f"(tomoB: {len(want)})")
    assert not errors, f"JavaScript errors in the page: {errors}"
    page.close()
