"""Out-of-core, dask-chunked sliding-window inference: :func:`predict` and its writer.

:func:`predict` runs a CryoSiam model over a tomogram of any size in bounded memory and
returns a **lazy** :class:`xarray.Dataset` on the tomogram's grid; :func:`write_predictions`
streams it to zarr. How chunk borders are made invisible (each window runs once, the
result equals one monolithic MONAI ``sliding_window_inference``) is described in
:mod:`cryosiam_nb.inference._windows`.

Running on a cluster
--------------------
The graph runs on any dask scheduler. With ``dask.distributed`` the same call is used::

    from dask.distributed import Client, LocalCluster
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    ds = cryosiam_nb.tl.predict(tomo, model)          # lazy
    write_predictions(ds, "tomo_pred.zarr")           # runs on the cluster, progress bar

and on a SLURM GPU cluster via dask-jobqueue (not a dependency of cryosiam_nb)::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=8, processes=1, memory="32GB", walltime="02:00:00",
                           job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=4)
    client = Client(cluster)
    write_predictions(cryosiam_nb.tl.predict(tomo, model), "/shared/tomo_pred.zarr")

Each worker picks its own device (``device=None`` → cuda → mps → cpu), moves the model
there once and caches it. The zarr path must be on a file system all workers share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch
import xarray as xr

from cryosiam_nb.constants import DENSE_TASKS, DIMS
from cryosiam_nb.device import pick_device
from cryosiam_nb.inference._fast import resolve_precision
from cryosiam_nb.inference._graph import build_graph
from cryosiam_nb.inference._refine import refine_plan, refiner_input, split_refiner
from cryosiam_nb.inference._windows import (
    FIXED_HEADS,
    Runner,
    default_chunk,
    n_activated,
    parts_of,
    plan_axis,
)
from cryosiam_nb.inference.grid import grid_coords, grid_voxel_size
from cryosiam_nb.inference.outputs import outputs_of
from cryosiam_nb.inference.writing import (  # noqa: F401 - _ORDERED, _ordered_of: tests
    _ORDERED,
    _Ordered,
    _ordered_of,
    _remember,
    write_predictions,
)
from cryosiam_nb.io import InputError, as_volume, voxel_size_of
from cryosiam_nb.models.logits import at_voxel_size

__all__ = [
    "predict",
    "write_predictions",
    "outputs_of",
    "inference_window",
    "DEFAULT_WINDOW",
    "DEFAULT_OVERLAP",
]

#: default inference window (voxels per axis) and overlap, chosen from the quality-vs-speed
#: tables of ``benchmarks/bench_windows.py`` on validation tomograms (README): 64³ at
#: overlap 0.125 (1.5 evaluations per voxel on a large volume, instead of 8 with the 32³
#: training patch at 0.5) scores like 32³ / 0.5 and at least like 48³ or 64³ at 0.25;
#: 96³ and 128³ are no better. The whole 256×1024×1024 pipeline peaks at 2.1 GiB with it.
DEFAULT_WINDOW = 64
DEFAULT_OVERLAP = 0.125


def inference_window(
    model: torch.nn.Module, shape: Sequence[int], window: int = DEFAULT_WINDOW
) -> tuple[int, int, int]:
    """The default sliding window (z, y, x voxels) for ``model`` on a volume ``shape``.

    ``window`` voxels per axis, but at least the model's training ``patch_size`` and, where
    the volume axis is at least that patch, at most the axis length (one window then
    spans it). An axis shorter than the training patch gets the training patch (MONAI
    pads it), as before.
    """
    src = getattr(model, "patch_size", None)
    if src is None:
        raise InputError("patch_size: the model has no patch_size; pass patch_size=(z, y, x)")
    train = (int(src),) * 3 if np.isscalar(src) else tuple(int(p) for p in src)
    out = []
    for size, p in zip(shape, train):
        w = max(int(window), p)
        out.append(p if size < p else min(w, int(size)))
    return tuple(out)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dask(arr: np.ndarray | da.Array, chunks: tuple[int, int, int]) -> da.Array:
    return arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr), chunks=chunks)


def _calibrated_for(model: torch.nn.Module, data: Any) -> tuple[Any, Any, float | None]:
    """``model`` with the semantic offsets of its ``by_voxel_size`` table for the voxel size
    ``data`` was acquired at (:func:`~cryosiam_nb.models.logits.at_voxel_size`), the
    offsets (``None`` without a table) and that voxel size (Å): ``attrs["rescaled_from"]``
    (set by ``pp.rescale``), else the data's own voxel size, else the model's."""
    attrs = getattr(data, "attrs", {}) or {}
    acquired = attrs.get("rescaled_from") or voxel_size_of(data)
    acquired = acquired or getattr(model, "voxel_size", None)
    if not acquired:
        return model, None, None
    shifted, off = at_voxel_size(model, float(acquired))
    return shifted, off, None if off is None else float(acquired)


def _model_heads(model: torch.nn.Module, task: str, patch: tuple[int, int, int]) -> tuple:
    """Channels of each head, from the model's attributes or, if needed, one dry run."""
    if task in ("denoise", "instance"):
        return tuple((name, 1) for name in FIXED_HEADS[task])
    names = getattr(model, "class_names", None)
    if task in ("semantic", "lamella") and names:
        return tuple((name, len(names)) for name in FIXED_HEADS[task])
    try:
        dev = next(iter(model.parameters())).device
    except StopIteration:
        dev = torch.device("cpu")
    # the dry run uses the model's (small) training patch when it has one
    src = getattr(model, "patch_size", None)
    probe = patch if src is None else ((int(src),) * 3 if np.isscalar(src) else tuple(src))
    probe = tuple(int(p) for p in probe)
    x = torch.zeros((1, 1, *probe), device=dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = {"embedding": model.backbone(x)} if task == "dense_ssl" else model(x)
    finally:
        model.train(was_training)
    if not isinstance(out, Mapping):
        raise InputError(f"model: forward must return a dict of head outputs, got {type(out)}")
    if task == "dense_ssl":
        wanted: tuple[str, ...] = ("embedding",)
    elif task == "multitask":  # each part's outputs in the order its activation expects
        parts = dict.fromkeys(k.split("/", 1)[0] for k in out if "/" in k)
        wanted = tuple(f"{p}/{k}" for p in parts if p in FIXED_HEADS for k in FIXED_HEADS[p])
    else:
        wanted = FIXED_HEADS[task]
    heads = []
    for name in wanted:
        if name not in out:
            raise InputError(
                f"model: task {task!r} needs output {name!r}, the model returned {sorted(out)}"
            )
        t = out[name]
        if t.ndim != 5 or tuple(t.shape[2:]) != probe:
            raise InputError(
                f"model: output {name!r} has shape {tuple(t.shape)}, expected (1, C, *{probe})"
            )
        heads.append((name, int(t.shape[1])))
    return tuple(heads)


def predict(
    data: xr.DataArray | np.ndarray | da.Array,
    model: torch.nn.Module,
    *,
    patch_size: Sequence[int] | int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    roi: xr.DataArray | np.ndarray | da.Array | None = None,
    device: str | torch.device | None = None,
    chunks: Sequence[int] | int | None = None,
    sigma_scale: float = 0.125,
    amp: bool | None = None,
    precision: str = "auto",
    tta: bool | int = False,
) -> xr.Dataset:
    """Chunked sliding-window inference of ``model`` on a tomogram → lazy ``xarray.Dataset``.

    Nothing is computed here (one tiny dry run of the model aside, when the number of
    output channels is not known from its attributes): the result is a dask graph.

    Parameters
    ----------
    data
        Tomogram, dims (z, y, x), values normalised to [0, 1] (protein bright); a dask-backed
        ``DataArray`` (e.g. from :func:`cryosiam_nb.io.read`) is never loaded whole. Its
        ``attrs["voxel_size"]`` (Å) is carried to the outputs (1 Å for a bare array).
    model
        A CryoSiam model (``task`` ∈ :data:`cryosiam_nb.constants.DENSE_TASKS`;
        ``patch_size``; ``class_names``); ``model(x)`` returns un-activated heads. A list
        of head models whose backbones hold identical weights runs as one multi-task
        model (:func:`cryosiam_nb.models.combine`): one backbone pass for all their heads.
    patch_size
        Sliding-window size (z, y, x) in voxels. Default (:func:`inference_window`): an
        inference window of :data:`DEFAULT_WINDOW` voxels per axis, independent of the
        training patch — never smaller than the model's ``patch_size`` nor (when the
        volume is at least that patch) larger than the volume. Larger windows with a small
        overlap evaluate each voxel fewer times; ``benchmarks/bench_windows.py`` measured
        the quality and speed of each choice.
    overlap
        Fraction of a window shared by neighbouring windows (MONAI ``overlap``), in [0, 1);
        default :data:`DEFAULT_OVERLAP`.
    batch_size
        Windows per forward pass; default on CPU as many as make about 64³ voxels (1 for
        the default window, 4 for 32³ windows: oneDNN runs a single 32³ window ~10× slower
        per voxel), 4 on a GPU.
    roi
        Optional region of interest: a 0/1 (z, y, x) volume on the same grid (e.g.
        :func:`~cryosiam_nb.inference.lamella_mask`). Windows and chunks without any voxel
        of it are not run; outputs are exact inside it and 0 outside it.
    device
        ``None`` → each worker picks cuda → mps → cpu; mixed precision on CUDA (``amp``).
    chunks
        Output chunk (z, y, x) in voxels: a multiple of the window stride and ≥ the patch;
        default two windows per axis, capped at 128 voxels but never below one window,
        rounded up to the stride, then made smaller (by strides, not below one window)
        while a chunk's window sums exceed ``CHUNK_BYTES`` (64 MiB) — the case of the
        multi-task model's 21 channels. Memory per running chunk ≈ (chunk + window)³ ×
        (output channels + 2) × 4 bytes.
    sigma_scale
        Gaussian blending sigma as a fraction of the patch (MONAI's default 0.125).
    amp
        Older switch for reduced precision: ``False`` forces float32, ``True`` the
        device's reduced precision; ``None`` leaves it to ``precision``.
    precision
        ``"auto"`` (default): float16 autocast on CUDA, bfloat16 autocast on a CPU with
        native bf16 instructions (AMX / AVX512-BF16; 3–8× faster there), float32
        elsewhere; or ``"float32"``, ``"bfloat16"``, ``"float16"``. Reduced precision
        changes outputs by about 1e-2 (logits; measured in ``bench_windows.py``, with the
        held-out quality); use ``"float32"`` for bit-stable results — chunked then equals a
        monolithic sliding window to 1e-4.
    tta
        Test-time augmentation: each window is also run flipped (``True``: all 8 flips of
        the z, y and x axes; an int ``n``: the first ``n`` of
        :data:`~cryosiam_nb.inference._windows.TTA_FLIPS`) and the un-activated outputs
        are averaged; ``n`` times slower.

    Returns
    -------
    xarray.Dataset
        Lazy, on the input grid (coords in Å, ``index * voxel_size`` unless the input has
        its own). ``attrs["voxel_size"]`` (Å) is set on the Dataset **and on every
        variable**, so ``io.write(ds["denoised"], ...)`` writes the right voxel size; the
        Dataset's attrs also hold ``task``, ``patch_size``, ``overlap``, ``blending``,
        ``sigma_scale``. Variables — denoise: ``denoised`` float32 (z, y, x); semantic /
        lamella: ``probabilities`` float16 (class, z, y, x; softmax), ``labels`` uint8
        (argmax), ``distance`` float16 (class, z, y, x; tanh); instance: ``foreground``,
        ``boundary`` (sigmoid) and ``distance`` float32; dense_ssl: ``embedding`` float16
        (feature, z, y, x); multitask (or a list of models sharing one backbone): every
        part's variables prefixed with its task — ``denoised``, ``lamella_probabilities``
        (lamella_class, z, y, x), ``lamella_labels``, ``lamella_distance``,
        ``semantic_probabilities`` (semantic_class, z, y, x), ``semantic_labels``,
        ``semantic_distance``, ``instance_foreground``, ``instance_boundary``,
        ``instance_distance``; :func:`outputs_of` gives one part under the single-task
        names. All heads come from one model pass per window; a multi-task model with a
        semantic refiner then runs it as a second sliding-window pass over the stitched
        input, denoised map and semantic probabilities (what it is trained on;
        :mod:`~cryosiam_nb.inference._refine`), which gives ``semantic_probabilities`` and
        ``semantic_labels`` (``attrs["semantic_refiner"] = "second pass"``). Dask computes
        when the result is computed: :func:`write_predictions` (streams to zarr),
        ``ds.compute()`` for small volumes. A model whose
        ``metadata["semantic_prior"]["by_voxel_size"]`` holds per-voxel-size semantic
        offsets (the shipped ``tiny-multitask``) gets those for the voxel size the data
        was acquired at — ``attrs["rescaled_from"]`` (``pp.rescale`` sets it), else its
        own voxel size, else the model's (:func:`~cryosiam_nb.models.logits.at_voxel_size`)
        — recorded in ``attrs["semantic_offsets"]`` and
        ``attrs["semantic_offsets_voxel_size"]`` (Å).
    """
    if isinstance(model, (list, tuple)):
        from cryosiam_nb.models import combine

        model = combine(model)
    task = getattr(model, "task", None)
    if task not in DENSE_TASKS:
        raise InputError(f"model: task must be one of {DENSE_TASKS}, got {task!r}")
    vol = as_volume(data, "data")
    vs = grid_voxel_size(data)
    shape = tuple(int(s) for s in vol.shape)
    if patch_size is None:
        patch = inference_window(model, shape)
    else:
        patch_src = patch_size
        patch = (
            (int(patch_src),) * 3 if np.isscalar(patch_src) else tuple(int(p) for p in patch_src)
        )
        if len(patch) != 3 or min(patch) < 1:
            raise InputError(
                f"patch_size: expected 3 positive voxel counts (z, y, x), got {patch_src}"
            )
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if not 0 <= float(overlap) < 1:
        raise InputError(f"overlap: must be in [0, 1), got {overlap}")
    dev_arg = None if device is None else str(device)
    if batch_size is None:  # CPU: ~64³ voxels per forward (oneDNN is slow on one 32³ window)
        cpu = pick_device(dev_arg).type == "cpu"
        batch_size = min(4, max(1, 64**3 // int(np.prod(patch)))) if cpu else 4
    if int(batch_size) < 1:
        raise InputError(f"batch_size: must be ≥ 1, got {batch_size}")
    try:
        resolve_precision(precision, amp, torch.device("cpu"))
    except ValueError as e:
        raise InputError(str(e)) from None
    overlap = float(overlap)
    n_tta = 8 if tta is True else int(tta)
    if not 0 <= n_tta <= 8:
        raise InputError(f"tta: True, False or a number of flips from 0 to 8, got {tta!r}")
    model, sem_offsets, acquired = _calibrated_for(model, data)
    model, refiner = split_refiner(model)  # the refiner runs as a second pass
    heads = _model_heads(model, task, patch)
    n_raw = sum(c for _, c in heads)
    if chunks is None:
        chunk = tuple(default_chunk(s, p, overlap, n_raw) for s, p in zip(shape, patch))
    elif np.isscalar(chunks):
        chunk = (int(chunks),) * 3
    else:
        chunk = tuple(int(c) for c in chunks)
        if len(chunk) != 3:
            raise InputError(f"chunks: expected 3 voxel counts (z, y, x), got {chunks}")
    plans = [plan_axis(s, p, overlap, c, ax) for s, p, c, ax in zip(shape, patch, chunk, DIMS)]

    image = _as_dask(vol, chunk)
    if image.dtype != np.float32:
        image = image.astype(np.float32)
    roi_d = None
    if roi is not None:
        m = as_volume(roi, "roi")
        if tuple(m.shape) != shape:
            raise InputError(f"roi: shape {tuple(m.shape)} differs from the data's {shape}")
        roi_d = (_as_dask(m, chunk) > 0).astype(np.uint8)

    runner = Runner(
        model,
        task,
        heads,
        patch,
        overlap,
        int(batch_size),
        float(sigma_scale),
        dev_arg,
        amp,
        precision,
        n_tta if n_tta > 1 else 0,
    )
    n_out = n_raw if task == "dense_ssl" else n_activated(task, heads)
    stacked = build_graph(image, roi_d, plans, runner, n_out)

    coords: dict[str, Any] = grid_coords(data, shape, vs)
    attrs = dict(getattr(data, "attrs", {}))
    attrs.update(
        {
            "voxel_size": vs,
            "task": task,
            "patch_size": list(patch),
            "overlap": overlap,
            "precision": _dtype_name(resolve_precision(precision, amp, pick_device(dev_arg))),
            "blending": "gaussian",
            "tta_flips": n_tta if n_tta > 1 else 1,
            "sigma_scale": float(sigma_scale),
        }
    )
    if sem_offsets is not None:  # the model's per-voxel-size semantic offsets, as applied
        attrs["semantic_offsets"] = [float(v) for v in sem_offsets]
        attrs["semantic_offsets_voxel_size"] = acquired
    va = {"voxel_size": vs}
    variables: dict[str, Any] = {}
    if task == "dense_ssl":
        coords["feature"] = np.arange(n_raw)
        variables["embedding"] = (("feature", *DIMS), stacked.astype(np.float16), dict(va))
        return xr.Dataset(variables, coords=coords, attrs=attrs)
    multi = task == "multitask"
    c = 0
    layout: list[tuple[str, int, int | None, str]] = []  # (variable, channel, n, dtype)
    for part, hs in parts_of(task, heads):
        pre = f"{part}_" if multi else ""
        if part == "denoise":
            variables["denoised"] = (DIMS, stacked[c], dict(va))
            layout.append(("denoised", c, None, "float32"))
            c += 1
        elif part in ("semantic", "lamella"):
            n = hs[0][1]
            cdim = f"{part}_class" if multi else "class"
            names = getattr(model, "part_classes", {}).get(part) if multi else None
            names = names or getattr(model, "class_names", None)
            names = list(names) if names is not None and len(names) == n else None
            # object strings: stored as zarr v3 variable-length strings
            coords[cdim] = np.array(names or [f"class_{i}" for i in range(n)], dtype=object)
            prob = stacked[c : c + n].astype(np.float16)
            variables[f"{pre}probabilities"] = ((cdim, *DIMS), prob, dict(va))
            variables[f"{pre}labels"] = (DIMS, stacked[c + n].astype(np.uint8), dict(va))
            dist = stacked[c + n + 1 : c + 2 * n + 1].astype(np.float16)
            variables[f"{pre}distance"] = ((cdim, *DIMS), dist, dict(va))
            layout += [
                (f"{pre}probabilities", c, n, "float16"),
                (f"{pre}labels", c + n, None, "uint8"),
                (f"{pre}distance", c + n + 1, n, "float16"),
            ]
            c += 2 * n + 1
        elif part == "instance":
            for i, key in enumerate(("foreground", "boundary", "distance")):
                variables[f"{pre}{key}"] = (DIMS, stacked[c + i], dict(va))
                layout.append((f"{pre}{key}", c + i, None, "float32"))
            c += 3
    plan = None
    if refiner is not None:  # the semantic refiner over the stitched first-pass outputs
        plan = refine_plan(refiner, runner, layout)
        inp = refiner_input(image, stacked[plan.den], stacked[plan.prob : plan.prob + plan.n])
        refined = build_graph(inp, roi_d, plans, plan.runner, plan.n_out)
        dims = variables["semantic_probabilities"][0]
        prob = refined[: plan.n].astype(np.float16)
        variables["semantic_probabilities"] = (dims, prob, dict(va))
        variables["semantic_labels"] = (DIMS, refined[plan.n].astype(np.uint8), dict(va))
        attrs["semantic_refiner"] = "second pass"
    names = {k: v[1].name for k, v in variables.items()}
    out = xr.Dataset(variables, coords=coords, attrs=attrs)
    entry = _Ordered(image, roi_d, plans, runner, n_out, layout, names, plan)
    _remember(entry, [out[k].data for k in out.data_vars])
    return out
