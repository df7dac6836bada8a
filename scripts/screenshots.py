"""Real screenshots of the tutorial notebooks for the README tour (``docs/img/nb_*.png``).

    .venv/bin/python scripts/screenshots.py                 # notebooks 01-05 into docs/img/
    .venv/bin/python scripts/screenshots.py --notebooks 02 04 --out docs/img

Each notebook is executed (an in-memory copy; outputs go to a scratch folder) in FAST mode
exactly as ``tests/test_notebooks.py`` runs it (``cryosiam_nb._nbrun.fast_client``), one at a
time, in a ``python3`` kernel of the running interpreter limited to ``--threads`` threads
(default 1). It is exported to HTML with nbconvert's ``lab`` template and opened in headless
Chromium (Debian ``chromium`` driven by ``playwright``, as in the browser tests:
``scripts/install_browser.sh`` installs it). The code cell that draws the notebook's key figure
(see ``SHOTS``), plus optionally the code cell(s) before it, is photographed with its output at
~1000 px width; their stderr streams (progress bars, warnings) are left out. The PNG is
palette-quantised and written atomically (temporary file, then rename) to
``<out>/nb_<nn>_<short>.png``. Runs offline: the page is not allowed to load anything but
itself. Needs the dev extras plus ``nbconvert``. A notebook that fails (a cell error, or no
figure among its outputs) is reported and skipped; the exit status is then 1 (2: a tool is
missing).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
CHROMIUM = os.environ.get("CRYOSIAM_NB_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAG = "cs-screenshot"  # marks the photographed cell in the exported HTML (class celltag_<TAG>)
WIDTH = 1000  # viewport width in CSS pixels (= PNG width before the margin crop)

# nn -> (short name for the file, text that identifies the figure's code cell, how many code
# cells before it to include as well, caption). The first code cell whose source contains the
# text and that has an image output is taken; if none matches (the notebook changed), the first
# cell with an image output is used.
SHOTS = {
    "01": (
        "simulation",
        "pl.slices(simulation)",
        0,
        "A simulated lamella: every ground-truth volume the simulator writes, one slice each.",
    ),
    "02": (
        "denoising",
        'ax.set_title(title); ax.axis("off")',
        1,
        "The shipped tiny denoiser on a held-out simulated tomogram: PSNR/SSIM against a "
        "Gaussian filter, and noisy / denoised / clean slices.",
    ),
    "03": (
        "segmentation",
        'variables=["noisy", "semantic", "predicted"]',
        1,
        "Semantic segmentation inside the predicted lamella: per-class Dice, and input / "
        "ground truth / prediction slices.",
    ),
    "04": (
        "particles",
        "tl.extract_subtomograms(",
        0,
        "Particles picked from instances, cut out as masked subtomograms.",
    ),
    "05": (
        "umap",
        "UMAP coloured by cluster",
        0,
        "Particle embeddings, clustered and sub-clustered, on a UMAP.",
    ),
}


class SetupError(RuntimeError):
    """Something the script needs is missing (browser, playwright, nbconvert)."""


def _check_tools():
    missing = []
    for mod in ("nbclient", "nbconvert", "PIL", "playwright.sync_api"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod.split(".")[0])
    if missing:
        raise SetupError(
            f"missing Python package(s): {', '.join(missing)}; install the dev extras "
            "(pip install -e '.[dev]' nbconvert) and Chromium (scripts/install_browser.sh)"
        )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise SetupError(
            f"Chromium not found at {CHROMIUM}: run scripts/install_browser.sh as root "
            "(apt-get install chromium) or set CRYOSIAM_NB_CHROMIUM=/path/to/chromium"
        )


def _notebook(nb_dir: Path, nn: str) -> Path:
    found = sorted(nb_dir.glob(f"{nn}_*.ipynb"))
    if len(found) != 1:
        raise SetupError(f"no (single) notebook {nn}_*.ipynb in {nb_dir}")
    return found[0]


def _kernel_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures become outputs
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _has_image(cell) -> bool:
    return cell.cell_type == "code" and any(
        "image/png" in o.get("data", {}) for o in cell.get("outputs", [])
    )


def _hidden_results(nb) -> str:
    """Code cells without output whose last line ends in ';' (hides a returned Figure)."""
    hits = []
    for i, c in enumerate(nb.cells):
        lines = [ln for ln in c.source.splitlines() if ln.strip()]
        if c.cell_type == "code" and not c.get("outputs") and lines and lines[-1].endswith(";"):
            hits.append(f"cell {i}: {lines[-1].strip()!r}")
        if len(hits) == 3:
            break
    return "; ".join(hits)


def mark_cells(nb, marker: str, context: int) -> None:
    """Tag the figure's code cell and the ``context`` code cells before it (``TAG``) and drop
    their stderr streams (progress bars, warnings); raise if no cell has an image output."""
    with_images = [c for c in nb.cells if _has_image(c)]
    if not with_images:
        hint = _hidden_results(nb)
        raise RuntimeError(
            "no figure among the outputs"
            + (f" (a trailing ';' suppresses a returned Figure: {hint})" if hint else "")
        )
    target = next((c for c in with_images if marker in c.source), with_images[0])
    code = [c for c in nb.cells if c.cell_type == "code"]
    i = code.index(target)
    for cell in code[max(0, i - context) : i + 1]:
        cell.metadata.setdefault("tags", []).append(TAG)
        cell.outputs = [
            o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")
        ]


def execute(path: Path, threads: int, timeout: int):
    """Run ``path`` in FAST mode in a scratch folder; return the executed notebook."""
    if str(ROOT) not in sys.path:  # this checkout, also without an editable install
        sys.path.insert(0, str(ROOT))
    from cryosiam_nb._nbrun import fast_client

    with tempfile.TemporaryDirectory(prefix="cs-shot-") as tmp:
        client = fast_client(path, Path(tmp) / "out", timeout=timeout)
        client.execute(env=_kernel_env(threads))
        return client.nb


def to_html(nb) -> str:
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return html


def _offline(route):
    # MathJax / require.js come from a CDN in the lab template; the page needs neither.
    if route.request.url.startswith(("file:", "data:")):
        route.continue_()
    else:
        route.abort()


_BOX_JS = f"""() => {{
  const r = [...document.querySelectorAll('.celltag_{TAG}')].map((e) => e.getBoundingClientRect());
  const x0 = Math.min(...r.map((b) => b.left)), y0 = Math.min(...r.map((b) => b.top));
  const x1 = Math.max(...r.map((b) => b.right)), y1 = Math.max(...r.map((b) => b.bottom));
  return [x0 + window.scrollX, y0 + window.scrollY, x1 - x0, y1 - y0];
}}"""
_IMAGES_READY_JS = f"""() => [...document.querySelectorAll('.celltag_{TAG} img')]
  .every((i) => i.complete && i.naturalWidth > 0)"""


def shoot(browser, html: str) -> bytes:
    """Photograph the tagged cells of the exported ``html`` (one clip around all); PNG bytes."""
    with tempfile.TemporaryDirectory(prefix="cs-shot-") as tmp:
        page_path = Path(tmp) / "notebook.html"
        page_path.write_text(html, encoding="utf-8")
        page = browser.new_page(viewport={"width": WIDTH, "height": 900}, device_scale_factor=1)
        try:
            page.route("**/*", _offline)
            page.goto(page_path.as_uri(), wait_until="load", timeout=60_000)
            page.locator(f".celltag_{TAG}").first.wait_for(state="visible", timeout=30_000)
            page.wait_for_function(_IMAGES_READY_JS, timeout=30_000)
            page.evaluate("document.fonts.ready")
            x, y, w, h = page.evaluate(_BOX_JS)
            pad = 6
            clip = {"x": max(0, x - pad), "y": max(0, y - pad), "width": w + 2 * pad}
            clip["height"] = h + 2 * pad
            return page.screenshot(clip=clip, full_page=True, animations="disabled")
        finally:
            page.close()


def compress(png: bytes) -> bytes:
    """Palette-quantise (256 colours: figures are grey-scale or few colours) and optimise."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    small = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--notebooks",
        nargs="+",
        default=sorted(SHOTS),
        metavar="NN",
        help=f"notebook numbers (default: {' '.join(sorted(SHOTS))})",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="output folder")
    ap.add_argument(
        "--nb-dir", type=Path, default=NB_DIR, help="notebook folder (default: notebooks/)"
    )
    ap.add_argument("--threads", type=int, default=1, help="threads for each kernel (default 1)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per notebook cell")
    args = ap.parse_args(argv)

    wanted = [n.zfill(2) for n in args.notebooks]
    unknown = [n for n in wanted if n not in SHOTS]
    if unknown:
        ap.error(f"no screenshot defined for notebook(s) {unknown}; known: {sorted(SHOTS)}")
    try:
        _check_tools()
        paths = {nn: _notebook(args.nb_dir, nn) for nn in wanted}
    except SetupError as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        return 2

    from nbclient.exceptions import CellExecutionError
    from playwright.sync_api import sync_playwright

    failed = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            for nn in wanted:
                short, marker, context, caption = SHOTS[nn]
                name, t0 = paths[nn].name, time.time()
                print(f"[{nn}] executing {name} (FAST) ...", flush=True)
                try:
                    nb = execute(paths[nn], args.threads, args.timeout)
                    mark_cells(nb, marker, context)
                except (CellExecutionError, RuntimeError) as exc:
                    print(f"[{nn}] FAILED: {name}: {exc}", file=sys.stderr, flush=True)
                    failed.append(nn)
                    continue
                png = compress(shoot(browser, to_html(nb)))
                target = args.out / f"nb_{nn}_{short}.png"
                write_atomic(target, png)
                print(
                    f"[{nn}] wrote {target} ({len(png) / 1024:.0f} KB, {time.time() - t0:.0f} s)"
                    f"\n     caption: {caption}",
                    flush=True,
                )
        finally:
            browser.close()
    if failed:
        print(f"screenshots: failed for notebook(s) {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
