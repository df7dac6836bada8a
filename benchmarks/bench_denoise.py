"""Denoising benchmark: PSNR/SSIM against the clean volume on held-out simulated tomograms.

Methods, all on the same volumes in one run:

- **noisy input** (no denoising);
- **Gaussian filter** with the σ (voxels) that gives the best PSNR on a *separate*
  tomogram (seed :data:`SIGMA_SEED`), then applied unchanged to the test tomograms;
- **cryosiam_nb tiny** (``models.load("tiny-denoise")`` + ``tl.predict``);
- **cryosiam_nb paper-size** (``models.load("paper-denoise")``) — "not available" unless
  such weights are installed (none are shipped);
- **Topaz-Denoise 3-D** (``topaz denoise3d`` with its pretrained ``unet-3d-10a`` model, shipped
  inside the ``topaz-em`` package) run from an isolated virtualenv,
  ``benchmarks/.topaz-venv`` (created on first use from the local PyPI mirror: torch 2.13.0
  CPU + ``topaz-em --no-deps`` + its light dependencies; topaz is *not* a cryosiam_nb
  dependency because it pins torchvision). Topaz gets the raw-contrast input (dark protein)
  it was trained on, written as MRC; its output is read back and inverted.

Test tomograms: ``sim.simulate(mode=RECIPE["sim"]["mode"], sample="general")`` (tilt series) with the training recipe's
structure mix (:data:`cryosiam_nb.training.recipe.SIM_STRUCTURES`) and 10 Å voxels, seeds
:data:`TEST_SEEDS` — disjoint from the recipe's training/validation seeds (2024…2031).

Inputs and reference are normalised like the recipe's training data (``pp.normalize``,
0.1/99.9 % clip → [0, 1]): every method gets the normalised noisy volume and is scored
against the normalised clean volume.

Metrics (``cryosiam_nb.metrics.psnr`` / ``ssim``, data range = that of the clean volume):
``PSNR``/``SSIM`` on each method's output as is (our denoiser is trained to output the clean
volume's intensities), and ``PSNR matched``/``SSIM matched`` after a least-squares affine map
``a·out + b`` of each output onto the clean volume, which removes intensity-scale differences
between methods (Topaz outputs its own units); the matched columns are the fair comparison.

    python benchmarks/bench_denoise.py --quick    # one 64×96×96 tomogram (Topaz skipped if > 1 min)
    python benchmarks/bench_denoise.py            # three 64×128×128 tomograms

Quick mode never creates the Topaz venv (it reuses one a full run made) and skips Topaz
if it takes more than a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import emit  # noqa: E402

TEST_SEEDS = (7001, 7002, 7003)
SIGMA_SEED = 7100
SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
TOPAZ_VENV = HERE / ".topaz-venv"
TOPAZ_MODEL = "unet-3d-10a"

#: Runs in the Topaz venv. ``topaz denoise3d -m unet-3d-10a`` cannot find its own packaged
#: weights in topaz-em 0.3.20 (``importlib.resources.files("topaz.denoising.models")`` is
#: given a module, not a package), so the shipped state dict is loaded from the package
#: folder into topaz's ``UDenoiseNet3D(base_width=7)`` (the architecture topaz pairs with it)
#: and handed to topaz's own ``Denoise3D`` / ``denoise_tomogram_stream`` (as a saved model
#: path: ``Denoise`` accepts only a path or a plain ``nn.Module``). ``patch_size=0``: each
#: (small) test volume is denoised whole, so no patch stitching enters the comparison.
TOPAZ_RUNNER = """
import pathlib, sys, torch, topaz
from topaz.denoise import Denoise3D, denoise_tomogram_stream
from topaz.denoising.models import UDenoiseNet3D
name, out, *vols = sys.argv[1:]
torch.set_num_threads(2)
root = pathlib.Path(topaz.__file__).parent / "pretrained" / "denoise"
net = UDenoiseNet3D(base_width=7)
sd = torch.load(root / (name + "-v0.2.4.sav"), map_location="cpu", weights_only=True)
net.load_state_dict(sd)
full = pathlib.Path(out) / "model.pt"
torch.save(net.eval(), full)
den = Denoise3D(str(full), use_cuda=False, dims=3)
denoise_tomogram_stream(volumes=vols, model=den, output_path=out, suffix="", gaus=0,
                        patch_size=0, padding=0, verbose=False, use_cuda=False)
"""
#: topaz-em's declared dependencies except torchvision (its 3-D denoising path never imports it)
TOPAZ_PKGS = [
    "tqdm",
    "h5py",
    "numpy",
    "pandas",
    "psutil",
    "scikit-learn",
    "scipy",
    "pillow",
    "future",
]


# --------------------------------------------------------------------------- data
def simulate(shape: tuple[int, int, int], seed: int):
    """One held-out ``general`` tomogram imaged like the training recipe's (10 Å)."""
    from cryosiam_nb import sim
    from cryosiam_nb.training.recipe import RECIPE, SIM_STRUCTURES

    return sim.simulate(
        shape,
        voxel_size=10.0,
        sample="general",
        seed=seed,
        mode=RECIPE["sim"]["mode"],
        structures=dict(SIM_STRUCTURES),
        progress=False,
    )


def unit(vol) -> np.ndarray:
    """``pp.normalize(invert=False)``: 0.1/99.9 % clip → [0, 1], as the recipe trains on."""
    from cryosiam_nb import pp

    return np.asarray(pp.normalize(vol, invert=False).values, dtype=np.float32)


def matched(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Least-squares affine map ``a·out + b`` of ``out`` onto ``ref`` (float64)."""
    x = out.astype(np.float64).ravel()
    A = np.stack([x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, ref.astype(np.float64).ravel(), rcond=None)
    return (a * out.astype(np.float64) + b).reshape(out.shape)


def scores(out: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM of ``out`` vs ``clean`` as is and after affine matching."""
    from cryosiam_nb import metrics

    dr = float(clean.max() - clean.min())
    m = matched(out, clean)
    return {
        "PSNR dB": metrics.psnr(out, clean, data_range=dr),
        "SSIM": metrics.ssim(out, clean, data_range=dr),
        "PSNR matched dB": metrics.psnr(m, clean, data_range=dr),
        "SSIM matched": metrics.ssim(m, clean, data_range=dr),
    }


def best_sigma(noisy: np.ndarray, clean: np.ndarray) -> tuple[float, dict[float, float]]:
    """σ (voxels) of the Gaussian filter with the best affine-matched PSNR on this tomogram."""
    from scipy.ndimage import gaussian_filter

    from cryosiam_nb import metrics

    dr = float(clean.max() - clean.min())
    res = {
        s: metrics.psnr(matched(gaussian_filter(noisy, s), clean), clean, data_range=dr)
        for s in SIGMAS
    }
    return max(res, key=res.get), res


# --------------------------------------------------------------------------- models
def load_model(name: str, weights: str | None = None):
    """``models.load(name)`` (or ``weights/<name>.pt``); ``(model, None)`` or ``(None, why)``."""
    try:
        from cryosiam_nb import models

        return models.load(name if weights is None else str(Path(weights) / f"{name}.pt")), None
    except Exception as e:  # noqa: BLE001 - any missing piece → "not available"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def run_model(model, noisy: np.ndarray) -> np.ndarray:
    from cryosiam_nb import tl

    ds = tl.predict(noisy, model)
    return np.asarray(ds["denoised"].compute().values, dtype=np.float32)


# --------------------------------------------------------------------------- topaz
def topaz_python() -> Path:
    return TOPAZ_VENV / "bin" / "python"


def ensure_topaz(create: bool = True, timeout: float = 900) -> str | None:
    """Create (``create``) or reuse the isolated Topaz venv; ``None`` when usable, else why."""
    py = topaz_python()
    check = [str(py), "-c", "import topaz.denoise, topaz.commands.denoise3d"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return None
    if not create:
        return f"no working venv at {TOPAZ_VENV.relative_to(REPO)}; a full run creates it"
    steps = [
        [sys.executable, "-m", "venv", str(TOPAZ_VENV)],
        [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", *TOPAZ_PKGS],
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "topaz-em"],
    ]
    t0 = time.perf_counter()
    for cmd in steps:
        left = timeout - (time.perf_counter() - t0)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            return f"venv set-up took > {timeout:.0f} s"
        if r.returncode != 0:
            return f"`{' '.join(cmd[-3:])}` failed: {(r.stderr or r.stdout).strip()[-300:]}"
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        return f"topaz does not import: {r.stderr.strip().splitlines()[-1][:200]}"
    return None


def run_topaz(
    volumes: list[np.ndarray], timeout: float, create: bool = True
) -> tuple[list[np.ndarray] | None, str]:
    """Topaz-Denoise 3-D on raw-contrast copies of ``volumes`` (protein bright, [0, 1]).

    Returns (denoised volumes, protein bright, or None; a note with seconds or the reason).
    """
    import mrcfile

    why = ensure_topaz(create)
    if why is not None:
        return None, why
    with tempfile.TemporaryDirectory(prefix="bench_topaz_") as tmpd:
        tmp = Path(tmpd)
        inputs = []
        for i, v in enumerate(volumes):
            p = tmp / f"tomo{i}.mrc"
            with mrcfile.new(p, overwrite=True) as f:
                f.set_data((1.0 - v).astype(np.float32))  # raw contrast: protein dark
                f.voxel_size = 10.0
            inputs.append(p)
        out_dir = tmp / "out"
        out_dir.mkdir()
        runner = tmp / "run_topaz.py"
        runner.write_text(TOPAZ_RUNNER)
        cmd = [str(topaz_python()), str(runner), TOPAZ_MODEL, str(out_dir), *map(str, inputs)]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"skipped: took > {timeout:.0f} s"
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            return None, f"topaz denoise3d failed: {(r.stderr or r.stdout).strip()[-300:]}"
        outs = []
        for p in inputs:
            q = out_dir / p.name
            if not q.exists():
                return None, f"topaz wrote no {q.name} (files: {sorted(os.listdir(out_dir))})"
            with mrcfile.open(q, permissive=True) as f:
                outs.append(1.0 - np.asarray(f.data, dtype=np.float32))  # undo the inversion
        return outs, f"{secs:.0f} s for {len(volumes)} tomogram(s)"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 64×96×96 tomogram (CI)")
    ap.add_argument("--no-topaz", action="store_true", help="skip Topaz-Denoise")
    ap.add_argument("--weights", help="folder with tiny-denoise.pt (default: shipped models)")
    ap.add_argument(
        "--topaz-timeout", type=float, help="seconds allowed for Topaz (quick: 60, full: 1800)"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from scipy.ndimage import gaussian_filter

    shape = (64, 96, 96) if args.quick else (64, 128, 128)
    seeds = TEST_SEEDS[:1] if args.quick else TEST_SEEDS
    topaz_timeout = args.topaz_timeout or (60.0 if args.quick else 1800.0)

    t0 = time.perf_counter()
    ref = simulate(shape, SIGMA_SEED).volumes
    sigma, sig_scores = best_sigma(unit(ref["noisy"]), unit(ref["clean"]))
    print(f"Gaussian σ chosen on seed {SIGMA_SEED}: {sigma} voxels ({sig_scores[sigma]:.2f} dB)")
    tomos = [simulate(shape, s).volumes for s in seeds]
    print(f"simulated {len(tomos) + 1} tomograms in {time.perf_counter() - t0:.0f} s", flush=True)
    noisy = [unit(t["noisy"]) for t in tomos]
    clean = [unit(t["clean"]) for t in tomos]

    outputs: dict[str, tuple[list[np.ndarray] | None, str]] = {}
    outputs["noisy input"] = (noisy, "")
    t = time.perf_counter()
    outputs[f"Gaussian filter (σ = {sigma} vox, chosen on a separate tomogram)"] = (
        [gaussian_filter(v, sigma) for v in noisy],
        f"{time.perf_counter() - t:.1f} s",
    )
    for label, name in (
        ("cryosiam_nb tiny (tiny-denoise)", "tiny-denoise"),
        ("cryosiam_nb paper-size (paper-denoise)", "paper-denoise"),
    ):
        model, why = load_model(name, args.weights)
        if model is None:
            outputs[label] = (None, f"not available ({why})")
            print(f"{label}: not available ({why})")
            continue
        t = time.perf_counter()
        outs = [run_model(model, v) for v in noisy]
        outputs[label] = (outs, f"{time.perf_counter() - t:.0f} s")
        print(f"{label}: {outputs[label][1]}", flush=True)
    label = f"Topaz-Denoise 3-D ({TOPAZ_MODEL}, pretrained)"
    if args.no_topaz:
        outputs[label] = (None, "not available (skipped: --no-topaz)")
    else:
        outs, note = run_topaz(noisy, topaz_timeout, create=not args.quick)
        outputs[label] = (outs, note if outs is not None else f"not available ({note})")
    if outputs[label][0] is None:
        print(f"Topaz: {outputs[label][1]}")

    rows = []
    for method, (outs, note) in outputs.items():
        row: dict = {"method": method}
        if outs is None:
            row.update({"PSNR dB": np.nan, "SSIM": np.nan})
            row.update({"PSNR matched dB": np.nan, "SSIM matched": np.nan})
        else:
            per = pd.DataFrame([scores(o, c) for o, c in zip(outs, clean)]).mean()
            row.update({k: round(float(v), 3) for k, v in per.items()})
        row["note"] = note
        rows.append(row)
    df = pd.DataFrame(rows)
    emit(
        df,
        "denoise_quick" if args.quick else "denoise",
        f"Denoising: mean PSNR/SSIM vs clean over {len(seeds)} held-out simulated tomogram(s) "
        f"{'×'.join(map(str, shape))} (z, y, x) at 10 Å, seeds {', '.join(map(str, seeds))}",
    )
    return df


if __name__ == "__main__":
    main()
