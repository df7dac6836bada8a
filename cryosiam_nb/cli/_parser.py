"""The argument parser of ``cryosiam-nb``: every argument has help text and its default.

Only the standard library is imported here, so ``cryosiam-nb --help`` and ``--version``
answer at once; the commands (:mod:`._commands`) import the heavy modules when they run.
"""

from __future__ import annotations

import argparse
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from . import _commands as cmd

__all__ = ["build_parser", "package_version"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: …)`` after every option, except where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def package_version() -> str:
    """Installed version of cryosiam_nb (importlib.metadata; the source's when not installed)."""
    try:
        return metadata.version("cryosiam-nb")
    except metadata.PackageNotFoundError:
        from cryosiam_nb import __version__

        return __version__


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _writes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (only outputs of cryosiam_nb of the same kind; never "
        "an input). Default: refuse when an output exists",
    )


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: only when stdout is a terminal)",
    )


def _volume_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="tomogram (.mrc / .rec / .map or .zarr), (z, y, x)")
    p.add_argument(
        "--voxel-size",
        type=_positive_float,
        default=None,
        metavar="Å",
        help="Å per voxel; overrides the header (default: the header's; an unset header "
        "voxel size — 0, 1 Å or negative — is refused without this option)",
    )
    p.add_argument(
        "--no-invert",
        action="store_true",
        help="the tomogram is already protein-bright (default: invert raw dark-protein data)",
    )
    p.add_argument(
        "--device", default=None, help="cuda, mps or cpu (default: cuda → mps → cpu, the best)"
    )


def _tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        type=int,
        default=0,
        choices=range(0, 9),
        metavar="FLIPS",
        help="test-time augmentation: average each window over this many flips (2–8; 8 is "
        "best and about 6x the time; default 0 = off)",
    )


def _model(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--model",
        default=default,
        help="checkpoint file or shipped model name (`cryosiam-nb models` lists them)",
    )
    p.add_argument(
        "--trusted",
        action="store_true",
        help="allow arbitrary pickled objects in the checkpoint (only for files you trust)",
    )


def _add(sub: Any, name: str, help_: str, description: str | None = None) -> Any:
    return sub.add_parser(
        name,
        help=help_,
        description=description or help_.replace("%%", "%"),
        formatter_class=_Formatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cryosiam-nb`` (one subparser per stage)."""
    from cryosiam_nb.cli import __doc__ as doc

    ap = argparse.ArgumentParser(
        prog="cryosiam-nb",
        description=(doc or "").replace("``", "").strip(),
        formatter_class=_Formatter,
    )
    ap.add_argument("--version", action="version", version=f"cryosiam-nb {package_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "simulate", "write simulated tomograms with ground truth")
    p.add_argument("out", type=Path, help="output folder (manifest.json + one folder per tomogram)")
    p.add_argument("--n", type=_positive_int, default=1, help="number of tomograms")
    p.add_argument(
        "--shape",
        type=_positive_int,
        nargs=3,
        default=(96, 192, 192),
        metavar=("Z", "Y", "X"),
        help="tomogram shape in voxels",
    )
    p.add_argument("--voxel-size", type=_positive_float, default=10.0, help="Å per voxel")
    p.add_argument(
        "--sample",
        default="general",
        choices=["general", "transcription", "chromatin"],
        help="sample type (which structures are placed)",
    )
    p.add_argument(
        "--mode",
        default="tilt",
        choices=["tilt", "fast"],
        help="tilt: tilt series + back-projection (missing wedge); fast: filtered noise",
    )
    p.add_argument("--format", default="mrc", choices=["mrc", "zarr"], help="format of the volumes")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed → same files)")
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.simulate)

    p = _add(sub, "normalize", "invert, clip at 0.1/99.9 %% and scale to [0, 1]")
    _volume_input(p)
    p.add_argument("output", type=Path, help="output volume: .mrc (MRC) or .zarr (zarr)")
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.normalize)

    p = _add(sub, "denoise", "run a denoising model chunk by chunk → the denoised volume")
    _volume_input(p)
    p.add_argument("output", type=Path, help="output volume: .mrc (MRC) or .zarr (zarr)")
    _model(p, "tiny-denoise")
    _tta(p)
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.denoise)

    p = _add(
        sub,
        "segment",
        "run a semantic model chunk by chunk → class labels (uint8, 0 = background)",
    )
    _volume_input(p)
    p.add_argument("output", type=Path, help="output label volume: .mrc (MRC) or .zarr (zarr)")
    _model(p, "tiny-semantic")
    p.add_argument(
        "--maps",
        type=Path,
        default=None,
        metavar="MAPS.zarr",
        help="also write every head (probabilities, labels, distance; xarray Dataset) to "
        "this zarr store (default: labels only)",
    )
    _tta(p)
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.segment)

    p = _add(sub, "instances", "instance segmentation → instances volume + particles.csv")
    _volume_input(p)
    p.add_argument(
        "output", type=Path, help="output folder (gets instances.<format> and particles.csv)"
    )
    _model(p, "tiny-instance")
    p.add_argument("--min-size", type=_positive_int, default=20, help="smallest particle (voxels)")
    p.add_argument(
        "--format",
        default="zarr",
        choices=["zarr", "mrc"],
        help="format of the instance label volume (instances.zarr or instances.mrc)",
    )
    _tta(p)
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.instances)

    p = _add(sub, "embed", "SimSiam embeddings of particles → Particles store")
    _volume_input(p)
    p.add_argument("table", type=Path, help="particles.csv written by `instances`")
    p.add_argument("output", type=Path, help="output Particles store (.zarr)")
    _model(p, "tiny-subtomo")
    p.add_argument(
        "--box",
        type=_positive_int,
        default=None,
        help="subtomogram box in voxels (default: the model's patch size)",
    )
    p.add_argument(
        "--rotations",
        type=int,
        default=12,
        choices=(1, 4, 12, 24),
        help="average the embedding over this many exact box rotations (1 = fastest)",
    )
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.embed)

    p = _add(sub, "cluster", "k-means clusters and a 2-D UMAP of embedded particles")
    p.add_argument("particles", type=Path, help="Particles store (.zarr) written by `embed`")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="OUT.zarr",
        help="write the clustered Particles here (default: update PARTICLES in place; "
        "the previous clusters stay undoable in its history)",
    )
    p.add_argument("--k", type=_positive_int, default=40, help="number of k-means clusters")
    p.add_argument("--seed", type=int, default=0, help="random seed of k-means and UMAP")
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.cluster)

    p = _add(sub, "explore", "serve the cluster-curation app in a browser (panel serve)")
    p.add_argument("particles", type=Path, help="Particles store (.zarr) with a UMAP")
    p.add_argument(
        "--tomogram",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="tomogram for the slice viewer and thumbnails, repeatable; NAME is the "
        "particles' `tomogram` value (default: the file name without suffix)",
    )
    p.add_argument("--port", type=int, default=5006, help="port to serve on")
    p.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to bind (127.0.0.1 = this machine only; 0.0.0.0 = every interface)",
    )
    p.add_argument(
        "--color-by", default="cluster", help="obs column to colour the UMAP by at start"
    )
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="the only folder the app writes exports and autosaves to (default: next to the store)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="session token the URL must carry (default: a random one, printed with the URL)",
    )
    p.set_defaults(func=cmd.explore)

    p = _add(sub, "models", "list the shipped models (task, voxel size, patch, classes)")
    p.set_defaults(func=cmd.list_models)

    p = sub.add_parser(
        "train",
        help="pretraining / fine-tuning; `cryosiam-nb train --help` lists the recipes",
        add_help=False,
    )
    p.set_defaults(func=None)

    p = _add(sub, "demo", "simulate → denoise → segment → particles → clusters → report")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    p.add_argument(
        "--mrc", type=Path, default=None, help="run on your own tomogram (default: simulate one)"
    )
    p.add_argument(
        "--voxel-size",
        type=_positive_float,
        default=None,
        metavar="Å",
        help="Å/voxel of --mrc (default: its header; an unset header voxel size is refused)",
    )
    p.add_argument(
        "--no-invert",
        action="store_true",
        help="--mrc is already protein-bright (default: invert raw dark-protein data)",
    )
    p.add_argument("--fast", action="store_true", help="a smaller tomogram (used by tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    _writes(p)
    _progress(p)
    p.set_defaults(func=cmd.demo)
    return ap
