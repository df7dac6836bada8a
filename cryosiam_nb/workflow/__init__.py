"""A whole dataset from a notebook: the dense pipeline over every tomogram, resumable.

:func:`run_dataset` runs, for every tomogram of a folder / list of paths, the path of the
demo — normalise → dense predictions → lamella mask → semantic labels → instances →
particle table → subtomograms → SimSiam embedding — as one dask task per tomogram (the
threaded scheduler, or a ``dask.distributed`` ``Client`` over its workers), then
concatenates the per-tomogram particles into one :class:`~cryosiam_nb.particles.Particles`,
clusters it (k-means + spectral split of the largest cluster) and lays it out with UMAP,
ready for the explorer.

By default one multi-task network (``tiny-multitask``) gives every dense output from one
``tl.predict`` pass per tomogram, with its tuned instance post-processing; per-task models
(``models=``) still work.

Each tomogram's outputs go to ``out_dir/<tomogram>/`` (a temporary sibling renamed in place
once complete, :func:`cryosiam_nb.io.atomic_path`) and end with the completion marker
``_complete.json`` (settings, model identities, particle count, timings). A rerun skips every
tomogram that has its marker, so a run killed midway only computes what was missing.

Per-tomogram folder (arrays (z, y, x) on the grid of the normalised tomogram; voxel size in
Å in the zarr attributes): ``denoised.zarr``, ``lamella.zarr``, ``semantic.zarr`` (0
outside the lamella),
``instances.zarr``, ``particles.csv`` (centres in voxels and Å), ``particles.zarr`` (the
:class:`Particles` with ``obsm["embedding"]`` and ``obsm["subtomograms"]``; absent when no
particle was found) and ``_complete.json``. The combined, clustered set is saved as
``out_dir/particles.zarr``.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryosiam_nb.io import InputError, atomic_path, write_json
from cryosiam_nb.workflow.inputs import list_inputs
from cryosiam_nb.workflow.settings import (
    DEFAULT_MODELS,
    DENSE_STEPS,
    _model,
    _resolve_models,
    _settings,
)

__all__ = [
    "DEFAULT_MODELS",
    "DENSE_STEPS",
    "MARKER",
    "list_inputs",
    "process_tomogram",
    "run_dataset",
    "combine",
    "finished",
    "tomograms",
]

#: File name of the completion marker inside each tomogram's folder.
MARKER = "_complete.json"


# ----------------------------------------------------------------------------- one tomogram
def finished(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The completion marker of a tomogram folder (a dict), or ``None`` when unfinished."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{marker}: unreadable completion marker ({exc})") from exc


def _check_resumable(folder: Path, done: dict[str, Any], settings: dict[str, Any]) -> None:
    old = done.get("settings", {})
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise InputError(
            f"{folder}: finished with other settings ({', '.join(diff)} differ); pass "
            "overwrite=True to recompute it or choose another out_dir"
        )


def _pipeline(
    path: Path, name: str, tmp: Path, models: dict[str, Any], s: dict[str, Any]
) -> dict[str, Any]:
    """The dense pipeline on one tomogram; writes into ``tmp``; returns marker fields."""
    from cryosiam_nb import io, pp, tl
    from cryosiam_nb.particles import Particles

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(label: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[label] = round(now - t0, 3)
        t0 = now

    tomo = io.read(path, voxel_size=s["voxel_size"])
    data = pp.normalize(tomo, invert=s["invert"])
    denoiser = _model(models["denoise"])
    if denoiser.voxel_size and abs(denoiser.voxel_size - data.attrs["voxel_size"]) > 0.5:
        data = pp.rescale(data, float(denoiser.voxel_size))
    data = data.persist()
    vs = float(data.attrs["voxel_size"])
    step("read + normalise")

    passes: dict[int, Any] = {}

    def outputs(key: str, roi: Any = None) -> Any:
        # A model named by several steps runs once (tiny-multitask: one pass for all).
        # Denoise and lamella come first, on the whole volume; a model serving only
        # semantic / instance runs inside the lamella.
        model = _model(models[key])
        if id(model) not in passes:
            passes[id(model)] = tl.predict(data, model, roi=roi, tta=s.get("tta", 0)).compute()
        return tl.outputs_of(passes[id(model)], key)

    den = outputs("denoise")["denoised"]
    io.write(den, tmp / "denoised.zarr")
    step("denoise")  # with one multi-task model: its whole pass

    lamella = tl.lamella_mask(outputs("lamella"), progress=False, **s["lamella_params"])
    lamella = lamella.compute()
    if int(lamella.sum()) == 0:  # nothing passes the threshold: keep the whole volume
        lamella = lamella.copy(data=np.ones(lamella.shape, dtype=lamella.dtype))
    io.write(lamella, tmp / "lamella.zarr")
    step("lamella")

    sem = outputs("semantic", roi=lamella)["labels"].where(lamella > 0, 0).astype(np.uint8)
    if s.get("semantic_defaults"):  # the model's tuned minimum component sizes
        sem = tl.postprocess_semantic(sem, progress=False, **s["semantic_defaults"])
    io.write(sem, tmp / "semantic.zarr")
    step("semantic")

    labels, picker = _instances(den, lamella, lambda: outputs("instance", roi=lamella), s)
    io.write(labels.astype(np.uint32), tmp / "instances.zarr")
    table = tl.particles(labels, tomogram=data, semantic=sem, name=name, progress=False)
    table.to_csv(tmp / "particles.csv", index=False)
    step("instances")

    if len(table):
        sub_model = _model(models["subtomo"])
        box = int(sub_model.patch_size[0])
        subs = tl.extract_subtomograms(
            data, table, instances=labels, box=box, masking="strict", progress=False
        )
        parts = Particles.from_table(table, tomogram=name, voxel_size=vs)
        parts.obsm["subtomograms"] = subs
        tl.embed(parts, sub_model, subtomograms=subs, rotations=s["rotations"], progress=False)
        parts.uns["box"] = box
        parts.save(tmp / "particles.zarr")
    step("subtomograms + embed")
    return {
        "n_particles": int(len(table)),
        "picker": picker,
        "voxel_size": vs,
        "shape": [int(n) for n in data.shape],
        "timings": timings,
    }


def _instances(den: Any, lamella: Any, model_maps: Callable[[], Any], s: dict[str, Any]):
    """Instance labels by the instance model (``model_maps()``: its maps; its tuned
    ``instance_defaults`` under ``instance_params``), or by density when it finds too few."""
    from cryosiam_nb import tl

    params = dict(s["instance_params"])
    min_model = int(params.pop("min_model_particles", 5))
    labels, picker = None, "density"
    if s["picker"] in ("auto", "model"):
        tuned = {**s["instance_defaults"], **params}
        labels = tl.instances(model_maps(), roi=lamella, progress=False, **tuned)
        picker = "model"
        n = int(labels.values.max())
        if s["picker"] == "auto" and n < min_model:
            labels = None  # too few: the tiny model is weak on data unlike its training set
    if labels is None:
        picker = "density"
        dmaps = tl.maps_from_density(den, roi=lamella)
        labels = tl.instances(dmaps, roi=lamella, progress=False, **params)
    return labels, picker


def process_tomogram(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    models: Mapping[str, Any] | None = None,
    voxel_size: float | None = None,
    invert: bool = True,
    lamella_params: Mapping[str, Any] | None = None,
    instance_params: Mapping[str, Any] | None = None,
    picker: str = "auto",
    rotations: int = 12,
    tta: bool | int = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the dense pipeline on one tomogram into ``out_dir/<name>/`` (skip it when done).

    Parameters
    ----------
    path
        The tomogram (MRC or zarr, axes (z, y, x)).
    out_dir
        Dataset folder; the outputs go to ``out_dir/<name>/`` (see the module docstring),
        written into a temporary sibling that is renamed in place once complete.
    name
        Tomogram name (default: the file stem); it prefixes the particle ids.
    models
        ``{step: model}`` for steps ``denoise, lamella, semantic, instance, subtomo``
        (a shipped name, a checkpoint path or a loaded model), and ``dense``: one
        (multi-task) model for the four dense steps. Missing steps use
        :data:`DEFAULT_MODELS`: ``tiny-multitask`` for every dense step, so one
        ``tl.predict`` pass per tomogram gives them all. A model named by several steps
        runs once; per-task models (e.g. the former defaults ``tiny-denoise``,
        ``tiny-lamella``, ``tiny-semantic``, ``tiny-instance``) run one pass each, the
        semantic and instance ones inside the lamella mask.
    voxel_size
        Voxel size in Å (overrides the header). Data are resampled to the denoise model's
        training voxel size when that differs by more than 0.5 Å.
    invert
        Raw cryo-ET has dark protein; ``True`` makes it bright for the models.
    lamella_params
        Keyword arguments of ``tl.lamella_mask``: ``threshold`` of the smoothed sample
        probability (default 0.9) and ``sigma`` (z, y, x) in voxels (default (10, 5, 5)),
        e.g. the result of ``tune_lamella(...).apply()``.
    instance_params
        Keyword arguments of ``tl.instances`` (``threshold_foreground``,
        ``min_center_distance``, ``max_center_distance``, ``boundary_bias``, ``min_size``
        in voxels, ...), e.g. the result of ``tune_instances(...).apply()``; plus
        ``min_model_particles`` (default 5) for ``picker="auto"``. On the instance
        model's maps they override its tuned ``metadata["instance_defaults"]`` (recorded
        in the marker's settings as ``instance_defaults``); density picking uses them
        alone.
    picker
        ``"model"``: instances from the instance model; ``"density"``: from the denoised
        tomogram (``tl.maps_from_density``); ``"auto"``: the model, or density when the
        model finds fewer than ``min_model_particles``.
    rotations
        Box rotations averaged by ``tl.embed`` (1, 4, 12 or 24).
    tta
        Test-time augmentation of the dense models (``tl.predict(tta=...)``): ``True`` or
        a number of flips up to 8 averaged per window. Off by default: on nine held-out
        tomograms (``tiny-multitask``) 4 flips took 3.3× the time and raised semantic
        Dice from 0.633 to 0.651, actin from 0.12 to 0.20, AP-50 from 0.239 to 0.251;
        8 flips took 6.6× for 0.655, 0.21 and 0.258.
    overwrite
        Recompute even when the folder is finished.

    Returns
    -------
    dict
        The completion marker (``name``, ``input``, ``settings``, ``n_particles``,
        ``picker``, ``voxel_size`` Å, ``shape`` (z, y, x) voxels, ``timings`` s) plus
        ``status`` (``"computed"`` or ``"skipped"``) and ``folder``.
    """
    path = Path(path)
    name = name or path.stem
    models_ = _resolve_models(models)
    settings = _settings(
        models_, voxel_size, invert, lamella_params, instance_params, picker, rotations, tta
    )
    return _run_one(path, name, Path(out_dir), models_, settings, overwrite)


def _run_one(
    path: Path,
    name: str,
    out_dir: Path,
    models: dict[str, Any],
    settings: dict[str, Any],
    overwrite: bool,
) -> dict[str, Any]:
    folder = out_dir / name
    done = finished(folder)
    if done is not None and not overwrite:
        _check_resumable(folder, done, settings)
        return {**done, "status": "skipped", "folder": str(folder)}
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    import dask

    t_start = time.perf_counter()
    with atomic_path(folder) as tmp, dask.config.set(scheduler="synchronous"):
        tmp.mkdir(parents=True)
        # A fresh context hides the dask.distributed worker running this task, so the
        # inner computes run here, synchronously, instead of going back to the cluster
        # through the worker's client (which deadlocks one-thread workers).
        info = contextvars.Context().run(_pipeline, path, name, tmp, models, settings)
        marker = {
            "name": name,
            "input": str(path.resolve()),
            "input_bytes": _size(path),
            "settings": settings,
            **info,
            "seconds": round(time.perf_counter() - t_start, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(marker, tmp / MARKER)  # last: a folder with a marker is complete
    return {**marker, "status": "computed", "folder": str(folder)}


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _guarded(*args: Any) -> dict[str, Any]:
    """:func:`_run_one` that reports an exception instead of raising it (one bad tomogram
    does not stop the others; ``KeyboardInterrupt`` and kills still stop everything)."""
    try:
        return _run_one(*args)
    except Exception as exc:  # reported per tomogram by run_dataset
        return {
            "name": args[1],
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }


# ----------------------------------------------------------------------------- the dataset
def run_dataset(
    inputs: str | os.PathLike[str] | Sequence[Any] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    models: Mapping[str, Any] | None = None,
    voxel_size: float | None = None,
    invert: bool = True,
    lamella_params: Mapping[str, Any] | None = None,
    instance_params: Mapping[str, Any] | None = None,
    picker: str = "auto",
    rotations: int = 12,
    tta: bool | int = False,
    k: int | None = None,
    seed: int = 0,
    client: Any = None,
    n_workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """The dense pipeline on every tomogram of ``inputs``, then one clustered particle set.

    One dask task per unfinished tomogram (:func:`process_tomogram`), run by ``client``
    (a ``dask.distributed.Client``, e.g. on a ``LocalCluster``: each worker process loads
    the models once) or by the local threaded scheduler with ``n_workers`` threads. Inside
    a task dask runs synchronously: the parallelism is over tomograms. Finished tomograms
    (those with a completion marker) are skipped, so rerunning after a crash or a kill
    computes only what is missing. A failing tomogram does not stop the others; the run
    raises at the end, naming it.

    Parameters
    ----------
    inputs
        A folder of tomograms (``*.mrc``, ``*.rec``, ``*.map``, ``*.zarr``), a list of
        paths or ``{name: path}`` (see :func:`list_inputs`).
    out_dir
        Dataset folder: ``out_dir/<tomogram>/`` per tomogram and the combined
        ``out_dir/particles.zarr``.
    models, voxel_size, invert, lamella_params, instance_params, picker, rotations, tta
        As in :func:`process_tomogram` (the same for every tomogram; a finished tomogram
        made with other settings is an error unless ``overwrite``).
    k
        Number of k-means clusters of the combined set (default ``min(8, max(2, N // 10))``).
    seed
        Seeds k-means, the spectral split and UMAP.
    client
        A ``dask.distributed.Client``; ``None`` uses the local threaded scheduler.
    n_workers
        Threads of the local scheduler (ignored with ``client``).
    overwrite
        Recompute every tomogram.
    progress
        Progress bar over tomograms (a widget in Jupyter).

    Returns
    -------
    Particles
        All particles (ids ``"<tomogram>:<instance>"``), with ``obsm["embedding"]``,
        ``obsm["subtomograms"]`` (lazy), ``obsm["umap"]`` and ``obs["cluster"]``;
        ``uns["workflow"]`` lists the tomograms ``computed`` and ``skipped`` by this run.
        Also saved as ``out_dir/particles.zarr``.
    """
    import dask

    items = list_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models_ = _resolve_models(models)
    settings = _settings(
        models_, voxel_size, invert, lamella_params, instance_params, picker, rotations, tta
    )
    todo, results = [], []
    for name, path in items.items():
        done = None if overwrite else finished(out / name)
        if done is None:
            todo.append((path, name))
        else:  # before anything runs: a mismatch is an error, not a silent mix
            _check_resumable(out / name, done, settings)
            results.append({**done, "status": "skipped", "folder": str(out / name)})
    tasks = [
        dask.delayed(_guarded, pure=False, name=f"tomogram-{name}")(
            path, name, out, models_, settings, overwrite
        )
        for path, name in todo
    ]
    if tasks:
        results += _compute(tasks, client, n_workers, progress)
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        lines = "\n".join(f"  {r['name']}: {r['error']}" for r in failed)
        raise RuntimeError(
            f"{len(failed)} of {len(items)} tomograms failed (the others are finished in "
            f"{out}; rerun to retry only these):\n{lines}\n\n{failed[0]['traceback']}"
        )
    parts = combine(out, names=list(items), k=k, seed=seed, save=False)
    parts.uns["workflow"] = {
        "computed": sorted(r["name"] for r in results if r["status"] == "computed"),
        "skipped": sorted(r["name"] for r in results if r["status"] == "skipped"),
        "settings": settings,
    }
    parts.save(out / "particles.zarr")
    return parts


def _compute(tasks: list[Any], client: Any, n_workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="tomograms", unit="tomogram", disable=not progress)
    try:
        if client is not None:
            from distributed import as_completed

            futures = client.compute(tasks)
            results = []
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(1)
            return results
        import dask
        from dask.callbacks import Callback

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(result, dict) and "status" in result:
                bar.update(1)

        with Callback(posttask=posttask):
            return list(dask.compute(*tasks, scheduler="threads", num_workers=int(n_workers)))
    finally:
        bar.close()


def combine(
    out_dir: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    k: int | None = None,
    seed: int = 0,
    save: bool = True,
) -> Any:
    """The finished tomograms of ``out_dir`` as one clustered :class:`Particles`.

    Concatenates each ``out_dir/<name>/particles.zarr`` (subtomograms stay lazy), then
    k-means on ``obsm["embedding"]``, a 2-way spectral split of the largest cluster when it
    has ≥ 12 particles, and a 2-D UMAP — all seeded, so the same inputs give the same result.

    Parameters
    ----------
    out_dir
        A folder written by :func:`run_dataset` / :func:`process_tomogram`.
    names
        Tomograms to combine (default: every finished one, sorted). Each must be finished.
    k
        k-means clusters (default ``min(8, max(2, N // 10))``, at most N).
    seed
        Seeds the clustering and UMAP.
    save
        Also write ``out_dir/particles.zarr``.

    Returns
    -------
    Particles
    """
    from cryosiam_nb import tl
    from cryosiam_nb.particles import Particles, concat

    out = Path(out_dir)
    if names is None:
        names = sorted(p.name for p in out.iterdir() if finished(p) is not None)
    items = []
    for name in names:
        done = finished(out / name)
        if done is None:
            raise InputError(f"{out / name}: not finished (no {MARKER}); run it first")
        if done.get("n_particles", 0) > 0:
            items.append(Particles.load(out / name / "particles.zarr"))
    if not items:
        raise InputError(f"{out}: no particles were found in any of {len(names)} tomogram(s)")
    parts = concat(items) if len(items) > 1 else items[0]
    n = len(parts)
    kk = int(min(k if k is not None else min(8, max(2, n // 10)), n))
    tl.cluster(parts, k=kk, seed=seed)
    biggest = parts.obs["cluster"].value_counts().index[0]
    if (parts.obs["cluster"] == biggest).sum() >= 12:
        tl.subcluster(parts, clusters=[biggest], k=2, seed=seed)
    if n >= 4:
        tl.umap(parts, n_neighbors=min(10, n - 1), seed=seed, progress=False)
    if save:
        parts.save(out / "particles.zarr")
    return parts


def tomograms(out_dir: str | os.PathLike[str], volume: str = "denoised") -> dict[str, Path]:
    """``{name: out_dir/<name>/<volume>.zarr}`` of the finished tomograms, e.g. for
    ``pl.explorer(particles, tomograms=workflow.tomograms(out_dir))``.

    Parameters
    ----------
    out_dir
        A dataset folder of :func:`run_dataset`.
    volume
        ``"denoised"``, ``"lamella"``, ``"semantic"`` or ``"instances"``.
    """
    out = Path(out_dir)
    found = {
        p.name: p / f"{volume}.zarr"
        for p in sorted(out.iterdir())
        if finished(p) is not None and (p / f"{volume}.zarr").exists()
    }
    if not found:
        raise InputError(f"{out}: no finished tomogram has {volume}.zarr")
    return found
