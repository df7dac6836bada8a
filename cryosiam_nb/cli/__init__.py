"""The ``cryosiam-nb`` command: one subcommand per notebook stage.

    cryosiam-nb simulate  OUT_DIR            synthetic tomograms with ground truth
    cryosiam-nb normalize IN.mrc OUT.mrc     invert / clip / scale to [0, 1]
    cryosiam-nb denoise   IN.mrc OUT.mrc     denoising model
    cryosiam-nb segment   IN.mrc OUT.mrc     semantic class labels (--maps: every head)
    cryosiam-nb instances IN.mrc OUT_DIR     instance model → instances + particle table
    cryosiam-nb embed     IN.mrc TABLE.csv OUT.zarr   SimSiam embeddings → Particles
    cryosiam-nb cluster   PARTICLES.zarr     k-means and UMAP
    cryosiam-nb explore   PARTICLES.zarr     serve the curation app
    cryosiam-nb models                       list the shipped models
    cryosiam-nb train     ...                pretraining / fine-tuning / shipped-model recipe
    cryosiam-nb demo                         the whole path on a simulated tomogram

Every subcommand has --help. Volumes are (z, y, x); voxel sizes in Å. The output suffix
decides the format (.mrc / .rec / .map → MRC, .zarr → zarr). Nothing is overwritten unless
--overwrite is given, an input is never an output, and only outputs of cryosiam_nb are
ever replaced. Exit status: 0 done, 2 bad input or refused, 1 system error (disk full,
permission denied...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._parser import build_parser, package_version

__all__ = ["main", "build_parser", "package_version"]


def _train(argv: list[str]) -> int:
    from cryosiam_nb.training import main_train

    code = main_train(argv)
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cryosiam-nb``; returns the exit code.

    Errors are one line on stderr, ``error: <path>: <reason>``, never a traceback: bad
    input and refusals (:class:`~cryosiam_nb.io.InputError`, an existing output without
    ``--overwrite``) exit with 2, any other ``OSError`` (permission denied, read-only
    folder, disk full, a directory where a file is expected) with 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv and argv[0] == "train":
        return _train(argv[1:])
    args = ap.parse_args(argv)
    if getattr(args, "progress", False) is None:
        args.progress = sys.stdout.isatty()
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand ``args.func(args)``; map errors to messages + exit codes."""
    from cryosiam_nb.io import InputError

    try:
        args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from cryosiam_nb.cli._safety import describe_oserror

        print(f"error: {describe_oserror(exc, getattr(args, 'outputs_', []))}", file=sys.stderr)
        return 2 if isinstance(exc, FileExistsError) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
