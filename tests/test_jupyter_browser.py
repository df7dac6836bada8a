"""Notebook 05 in a real JupyterLab, driven by headless Chromium (playwright).

JupyterLab is started on a free localhost port with a token, the notebook (switched to FAST
mode) is opened and run with "Run All Cells"; the explorer must render inline (its Bokeh
UMAP figure in the output area), the Python-side selection must fill the gallery, and a
box drag over the UMAP must reach the kernel and the gallery. The screenshot goes to
``docs/img/jupyterlab_explorer.png``.

Skipped only when JupyterLab (the ``[jupyter]`` extra), playwright or Chromium is missing
(``scripts/install_browser.sh`` installs Chromium).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from cryosiam_nb._nbrun import fast_client

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_embeddings_and_cluster_curation.ipynb"
SCREENSHOT = ROOT / "docs" / "img" / "jupyterlab_explorer.png"

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: every code cell has run (an execution count), the kernel is idle; errors are reported
_DONE_JS = """() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext.session) return null;
  const cells = nb.content.widgets.filter((c) => c.model.type === "code");
  const errors = cells.flatMap((c) => c.model.outputs.toJSON())
    .filter((o) => o.output_type === "error").map((o) => o.ename + ": " + o.evalue);
  const kernel = nb.sessionContext.session.kernel;
  const done = cells.every((c) => c.model.executionCount !== null) &&
    kernel && kernel.status === "idle";
  return {done, errors, n: cells.length};
}"""
_UMAP_JS = """() => window.Bokeh && Bokeh.index &&
  [...Bokeh.index.query((v) => v.model.name === "cs-umap")].length > 0"""
_VIEWS_JS = """() => !window.Bokeh ? "no Bokeh" : !Bokeh.index ? "no Bokeh.index" :
  [...Bokeh.index.query(() => true)].map((v) => v.model.type + ":" + v.model.name).slice(0, 40)"""
#: screen corners of the UMAP plot frame (3 px inside), after scrolling it into view
_FRAME_JS = """() => {
  const v = [...Bokeh.index.query((v) => v.model.name === "cs-umap")][0];
  v.canvas_view.el.scrollIntoView({block: "center"});
  const r = v.canvas_view.el.getBoundingClientRect();
  const f = v.frame.bbox;
  return [r.left + f.left + 3, r.top + f.top + 3, r.left + f.right - 3, r.top + f.bottom - 3];
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> Path:
    """Lab settings for a quiet, fully rendered notebook: no news/update toasts, no
    windowed (virtual) cell rendering, so every output exists in the page."""
    overrides = {
        "@jupyterlab/apputils-extension:notification": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
        "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.json").write_text(json.dumps(overrides))
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free port (token auth) serving a FAST copy of notebook 05."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (the [jupyter] extra)")
    work = tmp_path_factory.mktemp("lab")
    client = fast_client(NOTEBOOK, work / "out", timeout=600)
    nbformat.write(client.nb, work / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    app_dir = _settings(work / "app_settings")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MPLBACKEND": "Agg",
        "JUPYTER_CONFIG_DIR": str(work / "config"),
        "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(work / "user_settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces"),
    }
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
        f"--LabServerApp.app_settings_dir={app_dir}", "--ServerApp.port_retries=0",
    ]  # fmt: skip
    if os.geteuid() == 0:  # containers / CI run as root
        cmd.append("--allow-root")
    log = open(work / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (work / "jupyterlab.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "JupyterLab did not start in 120 s"
            time.sleep(0.5)
        yield url, token, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_lab_refuses_requests_without_the_token(lab):
    url, _, _ = lab
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/contents", timeout=10)
    assert err.value.code == 403


def test_notebook_05_runs_in_jupyterlab_and_the_explorer_renders_inline(chromium_browser, lab):
    from playwright.sync_api import expect

    url, token, work = lab
    page = chromium_browser.new_page(viewport={"width": 1500, "height": 1100})
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=120_000)
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget &&"
        " window.jupyterapp.shell.currentWidget.sessionContext &&"
        " window.jupyterapp.shell.currentWidget.sessionContext.isReady",
        timeout=120_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    t0 = time.monotonic()
    state = None
    while time.monotonic() - t0 < 900:
        state = page.evaluate(_DONE_JS)
        assert not (state and state["errors"]), f"a cell failed: {state['errors']}"
        if state and state["done"]:
            break
        time.sleep(1.0)
    assert state and state["done"], f"Run All did not finish in 900 s: {state}"

    # the explorer rendered inline: its Bokeh UMAP figure lives in the notebook's output
    try:
        page.wait_for_function(_UMAP_JS, timeout=60_000)
    except Exception:
        page.screenshot(path=str(work / "failed.png"), full_page=True)
        views = page.evaluate(_VIEWS_JS)
        raise AssertionError(f"no 'cs-umap' Bokeh figure in the page; views: {views}") from None
    assert page.locator(".jp-OutputArea-output .cs-n-selected").count() >= 1
    # the cell after it selected the first cluster from Python: the gallery shows it
    selected = page.locator(".cs-n-selected").first
    n_python = int(selected.get_attribute("data-n"))
    assert n_python > 0
    expect(page.locator(".cs-thumb").first).to_be_visible(timeout=60_000)

    # a box drag over the whole UMAP frame selects every particle: UI → kernel → gallery
    x0, y0, x1, y1 = page.evaluate(_FRAME_JS)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x0 + (x1 - x0) * i / 10, y0 + (y1 - y0) * i / 10)
    page.mouse.up()
    expect(selected).not_to_have_attribute("data-n", str(n_python), timeout=120_000)
    assert int(selected.get_attribute("data-n")) > n_python
    expect(page.locator(".cs-thumb").first).to_be_visible(timeout=60_000)
    assert page.locator(".cs-thumb").count() >= 1

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate(_FRAME_JS)  # the explorer in view
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
    assert not js_errors, f"JavaScript errors in JupyterLab: {js_errors}"
    page.close()
