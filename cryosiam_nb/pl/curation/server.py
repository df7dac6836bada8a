"""Command line: serve the explorer with ``panel serve`` semantics (one app per session)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import panel as pn

from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.curation.app import Explorer

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the explorer: ``python -m cryosiam_nb.pl.curation particles.zarr [--tomogram N=P]``.

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``): the Particles store, repeatable
        ``--tomogram NAME=PATH``, ``--port``, ``--address``, ``--show``, ``--color-by``.
        Each browser session gets its own :class:`Explorer` over the same Particles object;
        the default export path is ``selection.star`` next to the store.
    """

    ap = argparse.ArgumentParser(
        prog="python -m cryosiam_nb.pl.curation",
        description="Serve the cryosiam_nb particle-curation app.",
    )
    ap.add_argument("particles", help="Particles store (.zarr) written by Particles.save")
    ap.add_argument(
        "--tomogram",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="tomogram for the slice viewer / thumbnails (repeatable)",
    )
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--show", action="store_true", help="open a browser tab")
    ap.add_argument("--color-by", default="cluster")
    args = ap.parse_args(argv)

    parts = Particles.load(args.particles)
    tomos = {}
    for item in args.tomogram:
        if "=" not in item:
            raise SystemExit(f"--tomogram {item!r}: expected NAME=PATH")
        name, p = item.split("=", 1)
        tomos[name] = p
    export_path = Path(args.particles).resolve().with_name("selection.star")

    def app() -> pn.viewable.Viewable:
        return Explorer(
            parts, tomograms=tomos or None, color_by=args.color_by, export_path=export_path
        ).panel()

    pn.extension()
    print(f"cryosiam_nb explorer: http://{args.address}:{args.port}/", file=sys.stderr)
    pn.serve(
        app,
        port=args.port,
        address=args.address,
        show=args.show,
        title="cryosiam_nb explorer",
        websocket_origin=[f"{args.address}:{args.port}", f"localhost:{args.port}"],
    )
