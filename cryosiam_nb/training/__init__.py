"""Training: DenseSimSiam / SimSiam self-supervision, contrastive refinement, head fine-tuning.

>>> from cryosiam_nb import training
>>> ssl, hist = training.pretrain_dense(sims, preset="tiny", epochs=10, out="dense.pt")
>>> seg, hist = training.finetune("semantic", sims, backbone=ssl, freeze="encoder")

Everything takes a ``seed``; the device is picked cuda → mps → cpu (AMP on CUDA);
``out=`` writes a checkpoint (``cryosiam_nb.models.save``) plus ``<out>.history.csv``
and ``<out>.state.pt`` (for ``resume=True``). The shipped tiny models are trained by
``python -m cryosiam_nb.training.recipe --out cryosiam_nb/weights``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .data import Tomogram, as_tomograms, split_tomograms
from .finetune import evaluate, finetune
from .loop import fit
from .ssl import pretrain_dense, pretrain_subtomo, refine_contrastive

__all__ = [
    "Tomogram",
    "as_tomograms",
    "split_tomograms",
    "fit",
    "pretrain_dense",
    "pretrain_subtomo",
    "refine_contrastive",
    "finetune",
    "evaluate",
    "main_train",
]


def _data_arg(args: argparse.Namespace) -> object:
    if args.data:
        return args.data
    if not args.image:
        raise SystemExit("give --data FOLDER (simulator dataset) or --image FILE [--target FILE]")
    if args.target and len(args.target) != len(args.image):
        raise SystemExit(
            f"--target given {len(args.target)} times but --image {len(args.image)} times"
        )
    items = []
    for i, img in enumerate(args.image):
        d: dict[str, object] = {"image": img, "name": f"tomo{i:03d}"}
        if args.target:
            d[args.target_kind] = args.target[i]
        if args.voxel_size:
            d["voxel_size"] = args.voxel_size
        items.append(d)
    return items


def main_train(argv: Sequence[str] | None = None) -> int:
    """``cryosiam-nb train`` — command-line training.

    Sub-commands: ``dense-ssl``, ``subtomo-ssl``, ``finetune TASK``, ``recipe``.
    Data: ``--data FOLDER`` (written by ``cryosiam_nb.sim.write_dataset``) or
    ``--image tomo.mrc [--target labels.mrc --target-kind semantic]`` (repeatable; images
    must be protein-bright; use ``cryosiam-nb`` normalisation first for raw data)."""
    p = argparse.ArgumentParser(prog="cryosiam-nb train", description=main_train.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", help="simulator dataset folder")
        sp.add_argument("--image", action="append", help="input volume (MRC/zarr), repeatable")
        sp.add_argument("--target", action="append", help="label/target volume per --image")
        sp.add_argument(
            "--target-kind",
            default="semantic",
            choices=["semantic", "lamella", "instances", "clean"],
            help="what --target volumes are",
        )
        sp.add_argument("--voxel-size", type=float, help="voxel size in Å (overrides headers)")
        sp.add_argument("--out", required=True, help="checkpoint path (.pt)")
        sp.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
        sp.add_argument("--epochs", type=int, default=20)
        sp.add_argument("--batch-size", type=int, default=4)
        sp.add_argument("--samples-per-epoch", type=int, default=64)
        sp.add_argument("--lr", type=float)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--val-fraction", type=float, default=0.1)
        sp.add_argument("--resume", action="store_true")
        sp.add_argument("--device", help="cuda, mps or cpu (default: best available)")
        sp.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("dense-ssl", help="DenseSimSiam self-supervised pretraining")
    common(sp)
    sp.add_argument("--input", default="clean", help="simulator volume used as input")
    sp = sub.add_parser("subtomo-ssl", help="SimSiam pretraining on particle subtomograms")
    common(sp)
    sp.add_argument("--input", default="clean")
    sp = sub.add_parser("finetune", help="fine-tune a task head")
    sp.add_argument("task", choices=["denoise", "semantic", "lamella", "instance"])
    common(sp)
    sp.add_argument("--input", default="noisy")
    sp.add_argument("--backbone", help="pretrained dense model (path or shipped name)")
    sp.add_argument("--freeze", default="encoder", choices=["encoder", "backbone", "none"])
    sp = sub.add_parser("recipe", help="train all shipped tiny models")
    sp.add_argument("--out", default=None)
    sp.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)

    if args.cmd == "recipe":
        from .recipe import main as recipe_main

        return recipe_main(
            ([] if args.out is None else ["--out", args.out]) + (["--quick"] if args.quick else [])
        )
    data = _data_arg(args)
    kw = dict(
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        val_fraction=args.val_fraction,
        out=args.out,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        image=args.input,
    )
    if args.lr is not None:
        kw["lr"] = args.lr
    if args.cmd == "dense-ssl":
        _, hist = pretrain_dense(data, **kw)
    elif args.cmd == "subtomo-ssl":
        _, hist = pretrain_subtomo(data, **kw)
    else:
        _, hist = finetune(args.task, data, backbone=args.backbone, freeze=args.freeze, **kw)
    print(hist.tail(1).to_string(index=False))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_train())
