"""The subcommands of ``cryosiam-nb``: one function per stage, ``f(args) -> None``.

Each command first names its inputs and outputs to :func:`._safety.check_outputs` (so a
refusal happens before any work and touches nothing), then does the work and writes every
volume through :func:`cryosiam_nb.io.write` (the output suffix decides the format: ``.mrc``
→ MRC, ``.zarr`` → zarr). Heavy modules are imported inside the functions so that
``cryosiam-nb --help`` answers at once. Volumes are (z, y, x); voxel sizes in Å.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "simulate",
    "normalize",
    "denoise",
    "segment",
    "instances",
    "embed",
    "cluster",
    "explore",
    "list_models",
    "demo",
    "read_tomogram",
]

#: The subcommand that uses each shipped model by default (shown by ``cryosiam-nb models``).
_DEFAULT_FOR = {
    "tiny-denoise": "denoise",
    "tiny-semantic": "segment",
    "tiny-instance": "instances",
    "tiny-subtomo": "embed",
}


# --------------------------------------------------------------------------- helpers
def _guard(args: argparse.Namespace, inputs: list[Any], outputs: list[tuple[Path, str]]) -> None:
    """Check the outputs before any work; remember them to name them in error messages."""
    from cryosiam_nb.cli._safety import check_outputs

    args.outputs_ = [p for p, _ in outputs]
    check_outputs(inputs, outputs, overwrite=bool(getattr(args, "overwrite", False)))


def read_tomogram(path: Path, voxel_size: float | None) -> Any:
    """:func:`cryosiam_nb.io.read`, refusing an unset header voxel size.

    Parameters
    ----------
    path
        Tomogram (.mrc / .zarr).
    voxel_size
        ``--voxel-size`` in Å, or ``None`` to take the header's.

    Returns
    -------
    xarray.DataArray
        Lazy (z, y, x) volume with ``attrs["voxel_size"]`` in Å.

    Raises
    ------
    InputError
        The header's voxel size is 0, 1 Å, negative or missing (io's
        :class:`~cryosiam_nb.io.VoxelSizeWarning`) and ``voxel_size`` is ``None``: it would
        otherwise be read as 1 Å and rescaled tenfold.
    """
    from cryosiam_nb import io

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tomo = io.read(path, voxel_size=voxel_size)
    for w in caught:
        if issubclass(w.category, io.VoxelSizeWarning):
            raise io.InputError(
                f"{path}: the file does not give a voxel size (the header says 0, 1 Å or a "
                "negative value, which means 'unset'); pass --voxel-size <Å per voxel>, "
                "e.g. --voxel-size 10"
            )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return tomo


def _load_input(args: argparse.Namespace, model: Any | None = None) -> Any:
    """Read, normalise and (to the model's voxel size) rescale ``args.input``."""
    from cryosiam_nb import pp

    tomo = read_tomogram(args.input, args.voxel_size)
    norm = pp.normalize(tomo, invert=not args.no_invert)
    target = getattr(model, "voxel_size", None) if model is not None else None
    if target and abs(float(target) - float(norm.attrs["voxel_size"])) > 0.05 * float(target):
        print(
            f"rescaling from {norm.attrs['voxel_size']:.2f} Å to the model's {target:.2f} Å/voxel"
        )
        norm = pp.rescale(norm, float(target))
    return norm


def _model(args: argparse.Namespace) -> Any:
    from cryosiam_nb import models

    return models.load(args.model, trusted=args.trusted, device=args.device)


def _model_input(args: argparse.Namespace) -> list[Path | None]:
    """The model checkpoint, when it is a file (a shipped name is not a user path)."""
    p = Path(args.model)
    return [p] if p.exists() else []


# --------------------------------------------------------------------------- commands
def simulate(args: argparse.Namespace) -> None:
    """``cryosiam-nb simulate OUT_DIR``: simulated tomograms + ground truth."""
    from cryosiam_nb import sim
    from cryosiam_nb.cli._safety import DATASET

    _guard(args, [], [(args.out, DATASET)])
    manifest = sim.write_dataset(
        args.out,
        n=args.n,
        shape=tuple(args.shape),
        voxel_size=args.voxel_size,
        sample=args.sample,
        seed=args.seed,
        mode=args.mode,
        format=args.format,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"wrote {args.n} simulated tomogram(s) to {Path(manifest).parent}")


def normalize(args: argparse.Namespace) -> None:
    """``cryosiam-nb normalize IN OUT``: invert / clip / scale to [0, 1]."""
    from cryosiam_nb import io
    from cryosiam_nb.cli._safety import VOLUME

    _guard(args, [args.input], [(args.output, VOLUME)])
    out = io.write(_load_input(args), args.output, overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {out}")


def denoise(args: argparse.Namespace) -> None:
    """``cryosiam-nb denoise IN OUT``: the denoised volume (.mrc or .zarr)."""
    from cryosiam_nb import io, tl
    from cryosiam_nb.cli._safety import VOLUME

    _guard(args, [args.input, *_model_input(args)], [(args.output, VOLUME)])
    model = _model(args)
    ds = tl.predict(_load_input(args, model), model, device=args.device, tta=args.tta)
    io.write(ds["denoised"], args.output, overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {args.output}")


def segment(args: argparse.Namespace) -> None:
    """``cryosiam-nb segment IN OUT [--maps MAPS.zarr]``: class labels (+ every head)."""
    import xarray as xr

    from cryosiam_nb import io, tl
    from cryosiam_nb.cli._safety import MAPS, VOLUME

    outputs = [(args.output, VOLUME)] + ([(args.maps, MAPS)] if args.maps else [])
    _guard(args, [args.input, *_model_input(args)], outputs)
    model = _model(args)
    ds = tl.outputs_of(
        tl.predict(_load_input(args, model), model, device=args.device, tta=args.tta), "semantic"
    )
    labels = ds["labels"]
    if args.maps:  # the model runs once: the labels are read back from the maps
        tl.write_predictions(ds, args.maps, progress=args.progress, overwrite=args.overwrite)
        labels = xr.open_zarr(args.maps, consolidated=False)["labels"]
        labels = labels.assign_attrs(voxel_size=float(ds.attrs["voxel_size"]))
        print(f"wrote {args.maps}")
    io.write(labels, args.output, overwrite=args.overwrite, progress=args.progress)
    names = [str(c) for c in ds["class"].values]
    print(f"wrote {args.output} (labels: {', '.join(f'{i}={n}' for i, n in enumerate(names))})")


def instances(args: argparse.Namespace) -> None:
    """``cryosiam-nb instances IN OUT_DIR``: instances.{zarr,mrc} + particles.csv."""
    import numpy as np

    from cryosiam_nb import export, io, tl
    from cryosiam_nb.cli._safety import TABLE, VOLUME

    if args.output.exists() and not args.output.is_dir():
        raise io.InputError(f"{args.output}: exists and is not a folder; choose an output folder")
    vol_out = args.output / f"instances.{args.format}"
    table_out = args.output / "particles.csv"
    _guard(args, [args.input, *_model_input(args)], [(vol_out, VOLUME), (table_out, TABLE)])
    model = _model(args)
    data = _load_input(args, model)
    maps = tl.predict(data, model, device=args.device, tta=args.tta).compute()
    labels = tl.instances(maps, min_size=args.min_size, progress=args.progress)
    table = tl.particles(labels, name=args.input.stem, progress=args.progress)
    n_max = int(labels.max()) if labels.size else 0
    if args.format == "mrc" and n_max >= 2**24:
        raise io.InputError(
            f"{vol_out}: {n_max} instances do not fit an MRC file exactly; use --format zarr"
        )
    dtype = np.uint16 if args.format == "mrc" and n_max <= np.iinfo(np.uint16).max else np.uint32
    args.output.mkdir(parents=True, exist_ok=True)
    io.write(labels.astype(dtype), vol_out, overwrite=args.overwrite, progress=args.progress)
    export.write(
        table, table_out, voxel_size=float(data.attrs["voxel_size"]), overwrite=args.overwrite
    )
    print(f"{len(table)} particles → {table_out}; labels → {vol_out}")


def embed(args: argparse.Namespace) -> None:
    """``cryosiam-nb embed IN TABLE OUT.zarr``: SimSiam embeddings → Particles store."""
    from cryosiam_nb import export, tl
    from cryosiam_nb.cli._safety import STORE
    from cryosiam_nb.particles import Particles

    _guard(args, [args.input, args.table, *_model_input(args)], [(args.output, STORE)])
    model = _model(args)
    data = _load_input(args, model)
    table, _ = export.read_csv(args.table)
    parts = Particles.from_table(table, voxel_size=float(data.attrs["voxel_size"]))
    box = args.box or int(model.patch_size[0])
    subs = tl.extract_subtomograms(data, table, box=box, progress=args.progress)
    tl.embed(
        parts,
        model,
        subtomograms=subs,
        device=args.device,
        rotations=args.rotations,
        progress=args.progress,
    )
    parts.save(args.output)
    print(f"embedded {len(parts)} particles → {args.output}")


def cluster(args: argparse.Namespace) -> None:
    """``cryosiam-nb cluster PARTICLES [--output OUT]``: k-means + UMAP."""
    from cryosiam_nb import tl
    from cryosiam_nb.cli._safety import STORE, same_or_nested
    from cryosiam_nb.particles import Particles

    in_place = args.output is None or same_or_nested(args.output, args.particles) == "is"
    target = args.particles if in_place else args.output
    # In place: the store's own update (previous clusters stay undoable in its history).
    _guard(args, [args.particles], [] if in_place else [(args.output, STORE)])
    args.outputs_ = [target]
    parts = Particles.load(args.particles, lazy=False)
    k = min(args.k, len(parts))
    tl.cluster(parts, k=k, seed=args.seed)
    tl.umap(parts, seed=args.seed, progress=args.progress)
    parts.save(target)
    print(f"{k} clusters and a UMAP stored in {target}")


def _tomogram_arg(item: str) -> tuple[str, Path]:
    from cryosiam_nb.io import InputError

    name, sep, path = item.partition("=")
    p = Path(path if sep else item)
    if sep and not name:
        raise InputError(f"--tomogram {item!r}: empty NAME; use NAME=PATH or PATH")
    if not p.exists():
        raise InputError(f"{p}: no such file or directory (--tomogram)")
    return (name if sep else p.stem), p


def explore(args: argparse.Namespace) -> None:
    """``cryosiam-nb explore PARTICLES``: serve the curation app."""
    from cryosiam_nb.io import InputError
    from cryosiam_nb.particles import Particles
    from cryosiam_nb.pl.curation import main as explore_main

    if not args.particles.exists():
        raise InputError(f"{args.particles}: no such file or directory")
    tomos = dict(_tomogram_arg(t) for t in args.tomogram)
    obs = Particles.load(args.particles).obs
    if args.color_by not in obs.columns and args.color_by != "cluster":
        raise InputError(
            f"{args.particles}: --color-by {args.color_by!r} is not an obs column; this store "
            f"has {sorted(map(str, obs.columns))}"
        )
    argv = [str(args.particles), "--port", str(args.port), "--address", args.address]
    argv += ["--color-by", args.color_by]
    if args.output_dir is not None:
        argv += ["--output-dir", str(args.output_dir)]
    if args.token:
        argv += ["--token", args.token]
    for name, p in tomos.items():
        argv += ["--tomogram", f"{name}={p}"]
    if args.show:
        argv.append("--show")
    explore_main(argv)


def list_models(args: argparse.Namespace) -> None:
    """``cryosiam-nb models``: the shipped models with task, voxel size and patch."""
    from cryosiam_nb import models

    names = models.list_models()
    if not names:
        print(f"no models shipped in {models.WEIGHTS_DIR}")
        return
    rows = [("name", "task", "voxel size", "patch (z×y×x)", "default for", "classes")]
    for name in names:
        ckpt = models.load_checkpoint_dict(models.WEIGHTS_DIR / f"{name}.pt")
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        vs = cfg.get("voxel_size")
        patch = cfg.get("patch_size") or []
        classes = cfg.get("class_names") or []
        rows.append(
            (
                name,
                str(ckpt.get("task", cfg.get("task", "?"))),
                f"{float(vs):g} Å" if vs else "-",
                "×".join(str(int(v)) for v in patch) or "-",
                _DEFAULT_FOR.get(name, "-"),
                ", ".join(map(str, classes)) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"\nmodel cards: {models.WEIGHTS_DIR}/<name>.md; use one with --model <name>")


def demo(args: argparse.Namespace) -> None:
    """``cryosiam-nb demo``: the whole path, report in ``--out``."""
    from cryosiam_nb.cli._safety import DEMO
    from cryosiam_nb.demo import run_demo

    _guard(args, [args.mrc], [(args.out, DEMO)])
    if args.mrc is not None:
        read_tomogram(args.mrc, args.voxel_size)  # refuse an unset voxel size up front
    run_demo(
        out=args.out,
        mrc=args.mrc,
        voxel_size=args.voxel_size,
        invert=not args.no_invert,
        fast=args.fast,
        seed=args.seed,
        progress=args.progress,
    )
