"""The ``cryosiam-nb`` command: one subcommand per notebook stage.

    cryosiam-nb simulate  OUT_DIR            synthetic tomograms with ground truth
    cryosiam-nb normalize IN.mrc OUT.zarr    invert / clip / scale to [0, 1]
    cryosiam-nb denoise   IN.mrc OUT.zarr    denoising model
    cryosiam-nb segment   IN.mrc OUT.zarr    semantic classes (+ lamella mask)
    cryosiam-nb instances IN.mrc OUT_DIR     instance model → instances + particle table
    cryosiam-nb embed     IN.mrc TABLE.csv OUT.zarr   SimSiam embeddings → Particles
    cryosiam-nb cluster   PARTICLES.zarr     k-means (+ spectral) and UMAP
    cryosiam-nb explore   PARTICLES.zarr     serve the curation app
    cryosiam-nb train     ...                pretraining / fine-tuning / shipped-model recipe
    cryosiam-nb demo                         the whole path on a simulated tomogram

Every subcommand has ``--help``. Volumes are (z, y, x); voxel sizes in Å.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _add_volume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="tomogram (.mrc or .zarr)")
    p.add_argument(
        "--voxel-size", type=float, default=None, help="Å per voxel (overrides the header)"
    )
    p.add_argument(
        "--no-invert",
        action="store_true",
        help="the tomogram is already protein-bright (default: invert raw dark-protein data)",
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")


def _load_input(args: argparse.Namespace, model: Any | None = None) -> Any:
    from cryosiam_nb import io, pp

    tomo = io.read(args.input, voxel_size=args.voxel_size)
    norm = pp.normalize(tomo, invert=not args.no_invert)
    target = getattr(model, "voxel_size", None) if model is not None else None
    if target and abs(float(target) - float(norm.attrs["voxel_size"])) > 0.05 * float(target):
        print(
            f"rescaling from {norm.attrs['voxel_size']:.2f} Å to the model's {target:.2f} Å/voxel"
        )
        norm = pp.rescale(norm, float(target))
    return norm


def _cmd_simulate(args: argparse.Namespace) -> None:
    from cryosiam_nb import sim

    folder = sim.write_dataset(
        args.out,
        n=args.n,
        shape=tuple(args.shape),
        voxel_size=args.voxel_size,
        sample=args.sample,
        seed=args.seed,
        mode=args.mode,
    )
    print(f"wrote {args.n} simulated tomogram(s) to {folder}")


def _cmd_normalize(args: argparse.Namespace) -> None:
    from cryosiam_nb import io

    out = io.write(_load_input(args), args.output, overwrite=True, progress=True)
    print(f"wrote {out}")


def _predict_to(args: argparse.Namespace, default_model: str) -> Any:
    from cryosiam_nb import models, tl

    model = models.load(args.model or default_model, trusted=args.trusted)
    data = _load_input(args, model)
    ds = tl.predict(data, model, device=args.device)
    tl.write_predictions(ds, args.output)
    print(f"wrote {args.output}")
    return ds


def _cmd_denoise(args: argparse.Namespace) -> None:
    _predict_to(args, "tiny-denoise")


def _cmd_segment(args: argparse.Namespace) -> None:
    _predict_to(args, "tiny-semantic")


def _cmd_instances(args: argparse.Namespace) -> None:
    from cryosiam_nb import export, io, models, tl

    model = models.load(args.model or "tiny-instance", trusted=args.trusted)
    data = _load_input(args, model)
    maps = tl.predict(data, model, device=args.device).compute()
    labels = tl.instances(maps, min_size=args.min_size)
    table = tl.particles(labels, name=args.input.stem)
    args.output.mkdir(parents=True, exist_ok=True)
    io.write(labels.astype("uint32"), args.output / "instances.zarr", overwrite=True)
    export.write(table, args.output / "particles.csv", voxel_size=float(data.attrs["voxel_size"]))
    print(f"{len(table)} particles → {args.output / 'particles.csv'}")


def _cmd_embed(args: argparse.Namespace) -> None:
    from cryosiam_nb import export, models, tl
    from cryosiam_nb.particles import Particles

    model = models.load(args.model or "tiny-subtomo", trusted=args.trusted)
    data = _load_input(args, model)
    table, _ = export.read_csv(args.table)
    parts = Particles.from_table(table, voxel_size=float(data.attrs["voxel_size"]))
    subs = tl.extract_subtomograms(data, table, box=args.box)
    tl.embed(parts, model, subtomograms=subs, device=args.device, rotations=args.rotations)
    parts.save(args.output)
    print(f"embedded {len(parts)} particles → {args.output}")


def _cmd_cluster(args: argparse.Namespace) -> None:
    from cryosiam_nb import tl
    from cryosiam_nb.particles import Particles

    parts = Particles.load(args.particles, lazy=False)
    k = min(args.k, len(parts))
    tl.cluster(parts, k=k, seed=args.seed)
    tl.umap(parts, seed=args.seed)
    parts.save(args.particles)
    print(f"{k} clusters and a UMAP stored in {args.particles}")


def _cmd_explore(args: argparse.Namespace) -> None:
    from cryosiam_nb.pl.curation import main as explore_main

    explore_main([str(args.particles), "--port", str(args.port)])


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> None:
    from cryosiam_nb.training import main_train

    main_train(rest)


def _cmd_demo(args: argparse.Namespace) -> None:
    from cryosiam_nb.demo import run_demo

    run_demo(
        out=args.out,
        mrc=args.mrc,
        voxel_size=args.voxel_size,
        invert=not args.no_invert,
        fast=args.fast,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cryosiam-nb`` (one subparser per stage)."""
    ap = argparse.ArgumentParser(prog="cryosiam-nb", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated tomograms with ground truth")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 192, 192), metavar=("Z", "Y", "X"))
    p.add_argument("--voxel-size", type=float, default=10.0, help="Å per voxel")
    p.add_argument("--sample", default="general", choices=["general", "transcription", "chromatin"])
    p.add_argument("--mode", default="tilt", choices=["tilt", "fast"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("normalize", help="invert, clip at 0.1/99.9 %% and scale to [0, 1]")
    _add_volume_args(p)
    p.add_argument("output", type=Path)
    p.set_defaults(func=_cmd_normalize)

    for name, func, default in (
        ("denoise", _cmd_denoise, "tiny-denoise"),
        ("segment", _cmd_segment, "tiny-semantic"),
    ):
        p = sub.add_parser(name, help=f"run a {name} model chunk by chunk, stream to zarr")
        _add_volume_args(p)
        p.add_argument("output", type=Path, help="output .zarr")
        p.add_argument("--model", default=None, help=f"checkpoint path or name (default {default})")
        p.add_argument("--trusted", action="store_true", help="allow pickled objects in checkpoint")
        p.set_defaults(func=func)

    p = sub.add_parser("instances", help="instance segmentation → instances.zarr + particles.csv")
    _add_volume_args(p)
    p.add_argument("output", type=Path, help="output folder")
    p.add_argument("--model", default=None)
    p.add_argument("--trusted", action="store_true")
    p.add_argument("--min-size", type=int, default=20, help="smallest particle in voxels")
    p.set_defaults(func=_cmd_instances)

    p = sub.add_parser("embed", help="SimSiam embeddings of particles → Particles store")
    _add_volume_args(p)
    p.add_argument("table", type=Path, help="particles.csv from `instances`")
    p.add_argument("output", type=Path, help="output Particles store (.zarr)")
    p.add_argument("--model", default=None)
    p.add_argument("--trusted", action="store_true")
    p.add_argument("--box", type=int, default=None, help="subtomogram box (voxels)")
    p.add_argument(
        "--rotations",
        type=int,
        default=12,
        choices=(1, 4, 12, 24),
        help="average the embedding over this many exact box rotations (1 = fastest)",
    )
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("cluster", help="k-means clusters and a 2-D UMAP of embedded particles")
    p.add_argument("particles", type=Path)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_cluster)

    p = sub.add_parser("explore", help="serve the cluster-curation app (panel serve)")
    p.add_argument("particles", type=Path)
    p.add_argument("--port", type=int, default=5006)
    p.set_defaults(func=_cmd_explore)

    p = sub.add_parser(
        "train",
        help="pretraining / fine-tuning; `cryosiam-nb train --help` lists the recipes",
        add_help=False,
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="simulate → denoise → segment → particles → clusters → report")
    p.add_argument("--out", type=Path, default=Path("demo_output"))
    p.add_argument("--mrc", type=Path, default=None, help="run on your own tomogram instead")
    p.add_argument("--voxel-size", type=float, default=None, help="Å/voxel of --mrc")
    p.add_argument("--no-invert", action="store_true", help="--mrc is already protein-bright")
    p.add_argument("--fast", action="store_true", help="smaller tomogram (used by tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cryosiam-nb``; returns the exit code."""
    from cryosiam_nb.io import InputError

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv and argv[0] == "train":
        args = argparse.Namespace(func=_cmd_train)
        _cmd_train(args, argv[1:])
        return 0
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
