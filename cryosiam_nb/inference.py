"""Out-of-core, dask-chunked sliding-window inference and dense post-processing.

:func:`predict` runs a CryoSiam model over a tomogram of any size in bounded memory and
returns a **lazy** :class:`xarray.Dataset` on the tomogram's grid; :func:`write_predictions`
streams it to zarr. :func:`postprocess_semantic` and :func:`lamella_mask` post-process
chunked predictions without ever holding a tomogram-sized array.

How chunk borders are made invisible
------------------------------------
A monolithic MONAI ``sliding_window_inference`` over the whole volume places windows on a
global grid (stride ``int(patch * (1 - overlap))``, the last window shifted back to end at
the volume edge) and blends them with Gaussian weights ``g``:
``out(v) = Σ_w g_w(v) f_w(v) / Σ_w g_w(v)``. Every window depends only on the voxels it
covers. Here the volume is cut into chunks whose size is a multiple of the stride, so each
global window *starts* in exactly one chunk, which **owns** it. For every chunk one dask task
runs MONAI's ``sliding_window_inference`` over the region covered by the windows it owns
(its core plus a halo of ``patch - stride`` voxels on the high side); MONAI's own grid over
that region is exactly the owned windows (checked when the graph is built). The task
returns the weighted sum ``Σ g f`` and the weight sum ``Σ g`` (MONAI's output multiplied
back by its count map). A second task per chunk adds the halo contributions of its (up to
7) lower neighbours and divides. The result equals one monolithic
``sliding_window_inference`` (same patch, overlap, Gaussian blending) to float rounding,
and — unlike recomputing a halo — **no window is ever run twice**, so chunking costs no
extra model evaluations.

Running on a cluster
--------------------
The graph runs on any dask scheduler. With ``dask.distributed`` the same call is used::

    from dask.distributed import Client, LocalCluster
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    ds = cryosiam_nb.tl.predict(model, tomo)          # lazy
    write_predictions(ds, "tomo_pred.zarr")           # runs on the cluster, progress bar

and on a SLURM GPU cluster via dask-jobqueue (not a dependency of cryosiam_nb)::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=8, processes=1, memory="32GB", walltime="02:00:00",
                           job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=4)
    client = Client(cluster)
    write_predictions(cryosiam_nb.tl.predict(model, tomo), "/shared/tomo_pred.zarr")

Each worker picks its own device (``device=None`` → cuda → mps → cpu), moves the model
there once and caches it. The zarr path must be on a file system all workers share.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from scipy import ndimage

from cryosiam_nb.device import autocast, pick_device
from cryosiam_nb.io import InputError, atomic_path

__all__ = [
    "predict",
    "write_predictions",
    "to_zarr",
    "postprocess_semantic",
    "lamella_mask",
    "TASKS",
]

DIMS = ("z", "y", "x")
TASKS = ("denoise", "semantic", "lamella", "instance", "dense_ssl")
_FIXED_HEADS = {
    "denoise": ("denoised",),
    "semantic": ("logits", "distance"),
    "lamella": ("logits", "distance"),
    "instance": ("foreground", "boundary", "distance"),
}


# ============================================================================ window planning
def _scan_interval(size: int, patch: int, overlap: float) -> int:
    """MONAI's stride rule (``monai.inferers.utils._get_scan_interval``) for one axis."""
    if patch == size:
        return patch
    return max(int(patch * (1 - overlap)), 1)


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis exactly as MONAI's ``dense_patch_slices`` places them."""
    from monai.data.utils import dense_patch_slices

    return [int(s[0].start) for s in dense_patch_slices((size,), (patch,), (stride,))]


@dataclass(frozen=True)
class _AxisPlan:
    cores: tuple[tuple[int, int], ...]  # [a, b) voxels of each output chunk
    regions: tuple[tuple[int, int], ...]  # [a, e) covered by the windows the chunk owns


def _plan_axis(size: int, patch: int, overlap: float, chunk: int, axis: str) -> _AxisPlan:
    if size <= patch:  # MONAI pads such an axis to one window: keep it in one chunk
        return _AxisPlan(((0, size),), ((0, size),))
    stride = _scan_interval(size, patch, overlap)
    if chunk < size and (chunk % stride or chunk < patch):
        raise InputError(
            f"chunks: the {axis}-chunk of {chunk} voxels must be a multiple of the window "
            f"stride ({stride} voxels = patch {patch} × (1 - overlap {overlap})) and at least "
            f"the patch size ({patch})"
        )
    starts = _window_starts(size, patch, stride)
    cores, regions = [], []
    for a in range(0, size, chunk):
        b = min(a + chunk, size)
        owned = [s for s in starts if a <= s < b]
        e = max(owned) + patch if owned else a
        if owned:  # MONAI's own grid over [a, e) must be exactly the owned windows
            local = _window_starts(e - a, patch, _scan_interval(e - a, patch, overlap))
            if local != [s - a for s in owned]:  # pragma: no cover - guarded by the rules above
                raise RuntimeError(f"window grid mismatch on axis {axis} at {a}: {local} {owned}")
        cores.append((a, b))
        regions.append((a, e))
    return _AxisPlan(tuple(cores), tuple(regions))


def _default_chunk(size: int, patch: int, overlap: float) -> int:
    """Two patches, capped at 128 voxels but never below one patch, rounded up to the stride."""
    if size <= patch:
        return size
    stride = _scan_interval(size, patch, overlap)
    target = max(patch, min(2 * patch, 128))
    return int(math.ceil(target / stride) * stride)


# ============================================================================ model runner
_MODEL_CACHE: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2
_COUNT_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


class _Runner:
    """Everything a chunk task needs to run the model; pickles with the model's weights.

    Each worker process moves the model to its device once and caches it (keyed by a
    per-``predict`` id), so a graph with hundreds of chunks pays the transfer once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: str,
        heads: tuple[tuple[str, int], ...],
        patch: tuple[int, int, int],
        overlap: float,
        batch_size: int,
        sigma_scale: float,
        device: str | None,
        amp: bool | None,
    ) -> None:
        self.model = model
        self.task = task
        self.heads = heads
        self.patch = patch
        self.overlap = overlap
        self.batch_size = batch_size
        self.sigma_scale = sigma_scale
        self.device = device
        self.amp = amp
        self.key = uuid.uuid4().hex
        self.n_channels = sum(c for _, c in heads)

    def __dask_tokenize__(self) -> str:
        return self.key

    def module(self, dev: torch.device) -> torch.nn.Module:
        k = (self.key, str(dev))
        with _CACHE_LOCK:
            m = _MODEL_CACHE.get(k)
            if m is None:
                params = list(self.model.parameters()) + list(self.model.buffers())
                on_dev = all(p.device == dev for p in params)
                if on_dev and not self.model.training:
                    m = self.model  # used as is: no copy of the weights
                else:  # never move or switch the caller's own model
                    m = copy.deepcopy(self.model).to(dev).eval()
                _MODEL_CACHE[k] = m
                while len(_MODEL_CACHE) > _CACHE_SIZE:
                    _MODEL_CACHE.popitem(last=False)
            else:
                _MODEL_CACHE.move_to_end(k)
            return m

    def forward(self, model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
        with autocast(dev, self.amp):
            if self.task == "dense_ssl":
                out = {"embedding": model.backbone(x)}
            else:
                out = model(x)
        missing = [name for name, _ in self.heads if name not in out]
        if missing:
            raise InputError(
                f"model: task {self.task!r} needs outputs {missing}, the model returned "
                f"{sorted(out)}"
            )
        return torch.cat([out[name].float() for name, _ in self.heads], dim=1)

    def count_map(self, shape: tuple[int, ...]) -> np.ndarray:
        """Σ of MONAI's Gaussian importance maps over MONAI's windows of a region ``shape``."""
        from monai.data.utils import compute_importance_map, dense_patch_slices

        key = (shape, self.patch, self.overlap, self.sigma_scale)
        with _CACHE_LOCK:
            hit = _COUNT_CACHE.get(key)
        if hit is not None:
            return hit
        padded = tuple(max(s, p) for s, p in zip(shape, self.patch))
        strides = tuple(_scan_interval(s, p, self.overlap) for s, p in zip(padded, self.patch))
        imp = compute_importance_map(self.patch, mode="gaussian", sigma_scale=self.sigma_scale)
        cnt = torch.zeros(padded, dtype=torch.float32)
        for sl in dense_patch_slices(padded, self.patch, strides):
            cnt[sl] += imp
        lo = [(p - s) // 2 for s, p in zip(shape, padded)]
        out = cnt[tuple(slice(o, o + s) for o, s in zip(lo, shape))].numpy().copy()
        with _CACHE_LOCK:
            _COUNT_CACHE[key] = out
            while len(_COUNT_CACHE) > 16:
                _COUNT_CACHE.popitem(last=False)
        return out

    def run(self, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Weighted sums over the owned windows of one region: ``(C + 1, *region)`` float32.

        Channels ``:C`` hold ``Σ g·f`` (un-activated head outputs), the last ``Σ g``.
        With a mask, windows containing no masked voxel are not run (they add zero).
        """
        from monai.inferers import sliding_window_inference

        dev = pick_device(self.device)
        model = self.module(dev)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if mask is not None:
            m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
            x = torch.cat([x, m], dim=1)
        x = x.to(dev)
        n_ch = self.n_channels

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            if mask is None:
                return self.forward(model, batch, dev)
            keep = batch[:, 1].flatten(1).amax(dim=1) > 0
            out = torch.zeros((batch.shape[0], n_ch, *batch.shape[2:]), device=batch.device)
            if bool(keep.any()):
                out[keep] = self.forward(model, batch[keep][:, :1], dev)
            return out

        with torch.inference_mode():
            y = sliding_window_inference(
                x,
                roi_size=self.patch,
                sw_batch_size=self.batch_size,
                predictor=predictor,
                overlap=self.overlap,
                mode="gaussian",
                sigma_scale=self.sigma_scale,
            )
        y = y[0].float().cpu().numpy()
        cnt = self.count_map(tuple(image.shape))
        out = np.empty((n_ch + 1, *cnt.shape), dtype=np.float32)
        np.multiply(y, cnt[None], out=out[:n_ch])
        out[n_ch] = cnt
        return out


# ============================================================================ chunk tasks
def _stage1(runner: _Runner, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    if image.size == 0:
        return None
    if mask is not None and not mask.any():
        return None  # no sample under any owned window: the model is not run
    return runner.run(image, mask)


def _take(acc: np.ndarray | None, sl: tuple[slice, ...]) -> np.ndarray | None:
    if acc is None:
        return None
    return np.array(acc[(slice(None), *sl)], copy=True)


def _activate(task: str, raw: np.ndarray, heads: tuple[tuple[str, int], ...]) -> np.ndarray:
    t = torch.from_numpy(raw)
    if task in ("semantic", "lamella"):
        n = heads[0][1]
        logits, dist = t[:n], t[n:]
        prob = torch.softmax(logits, dim=0)
        labels = torch.argmax(logits, dim=0, keepdim=True).float()
        return torch.cat([prob, labels, torch.tanh(dist)], dim=0).numpy()
    if task == "instance":
        return torch.cat([torch.sigmoid(t[:2]), t[2:3]], dim=0).numpy()
    return raw


def _stage2(
    parts: list[np.ndarray | None],
    places: list[tuple[slice, ...]],
    mask: np.ndarray | None,
    shape: tuple[int, ...],
    task: str,
    heads: tuple[tuple[str, int], ...],
    n_out: int,
) -> np.ndarray:
    """Sum the window contributions landing in one chunk, normalise, activate, mask."""
    total = None
    for part, place in zip(parts, places):
        if part is None:
            continue
        if total is None:
            total = np.zeros((part.shape[0], *shape), dtype=np.float32)
        total[(slice(None), *place)] += part
    if total is None:
        return np.zeros((n_out, *shape), dtype=np.float32)
    cnt = total[-1]
    acc = total[:-1]
    ok = cnt > 0
    acc = np.divide(acc, cnt[None], out=np.zeros_like(acc), where=ok[None])
    out = _activate(task, acc, heads)
    if mask is not None or not ok.all():
        keep = ok if mask is None else (ok & (mask > 0))
        out = out * keep[None]
    return np.ascontiguousarray(out, dtype=np.float32)


# ============================================================================ public API
def _as_tomogram(data: Any, name: str = "data") -> xr.DataArray:
    if isinstance(data, xr.DataArray):
        if data.ndim != 3:
            raise InputError(f"{name}: expected a 3-D (z, y, x) volume, got dims {data.dims}")
        if tuple(data.dims) != DIMS:
            raise InputError(f"{name}: expected dims ('z', 'y', 'x'), got {data.dims}")
        arr = data
    else:
        arr_np = data if isinstance(data, da.Array) else np.asarray(data)
        if arr_np.ndim != 3:
            raise InputError(f"{name}: expected a 3-D (z, y, x) volume, got shape {arr_np.shape}")
        arr = xr.DataArray(arr_np, dims=DIMS, attrs={})
    if 0 in arr.shape:
        raise InputError(f"{name}: the volume is empty (shape {arr.shape})")
    return arr


def _as_dask(arr: xr.DataArray, chunks: tuple[int, int, int]) -> da.Array:
    d = arr.data
    if not isinstance(d, da.Array):
        d = da.from_array(np.asarray(d), chunks=chunks)
    return d


def _model_heads(model: torch.nn.Module, task: str, patch: tuple[int, int, int]) -> tuple:
    """Channels of each head, from the model's attributes or, if needed, one dry run."""
    if task in ("denoise", "instance"):
        return tuple((name, 1) for name in _FIXED_HEADS[task])
    names = getattr(model, "class_names", None)
    if task in ("semantic", "lamella") and names:
        return tuple((name, len(names)) for name in _FIXED_HEADS[task])
    try:
        dev = next(iter(model.parameters())).device
    except StopIteration:
        dev = torch.device("cpu")
    x = torch.zeros((1, 1, *patch), device=dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = {"embedding": model.backbone(x)} if task == "dense_ssl" else model(x)
    finally:
        model.train(was_training)
    if not isinstance(out, Mapping):
        raise InputError(f"model: forward must return a dict of head outputs, got {type(out)}")
    wanted = ("embedding",) if task == "dense_ssl" else _FIXED_HEADS[task]
    heads = []
    for name in wanted:
        if name not in out:
            raise InputError(
                f"model: task {task!r} needs output {name!r}, the model returned {sorted(out)}"
            )
        t = out[name]
        if t.ndim != 5 or tuple(t.shape[2:]) != patch:
            raise InputError(
                f"model: output {name!r} has shape {tuple(t.shape)}, expected (1, C, *{patch})"
            )
        heads.append((name, int(t.shape[1])))
    return tuple(heads)


def predict(
    model: torch.nn.Module,
    data: xr.DataArray | np.ndarray | da.Array,
    patch_size: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    batch_size: int = 4,
    mask: xr.DataArray | np.ndarray | da.Array | None = None,
    device: str | torch.device | None = None,
    chunks: Sequence[int] | int | None = None,
    sigma_scale: float = 0.125,
    amp: bool | None = None,
) -> xr.Dataset:
    """Chunked sliding-window inference of ``model`` on a tomogram → lazy ``xarray.Dataset``.

    Parameters
    ----------
    model
        A CryoSiam model (``task`` ∈ denoise, semantic, lamella, instance, dense_ssl;
        ``patch_size``; ``class_names``); ``model(x)`` returns un-activated heads.
    data
        Tomogram, dims (z, y, x), values normalised to [0, 1] (protein bright); a dask-backed
        ``DataArray`` (e.g. from :func:`cryosiam_nb.io.read`) is never loaded whole.
    patch_size
        Sliding-window patch (z, y, x) in voxels; default the model's ``patch_size``.
    overlap
        Fraction of a patch shared by neighbouring windows (MONAI ``overlap``), in [0, 1).
    batch_size
        Windows per forward pass.
    mask
        Optional 0/1 volume on the same grid (e.g. :func:`lamella_mask`). Windows and
        chunks without any masked voxel are not run; outputs are exact inside the mask and
        0 outside it.
    device
        ``None`` → each worker picks cuda → mps → cpu; mixed precision on CUDA (``amp``).
    chunks
        Output chunk (z, y, x) in voxels: a multiple of the window stride and ≥ the patch;
        default two patches per axis, capped at 128 voxels but never below one patch (64
        for the tiny models' 32³ patch), rounded up to the stride. Memory per running chunk ≈ (chunk + patch)³ ×
        (output channels + 2) × 4 bytes.
    sigma_scale
        Gaussian blending sigma as a fraction of the patch (MONAI's default 0.125).

    Returns
    -------
    xarray.Dataset
        Lazy, on the input grid (coords and attrs copied). denoise: ``denoised`` float32;
        semantic / lamella: ``probabilities`` float16 (``class``, z, y, x; softmax),
        ``labels`` uint8 (argmax), ``distance`` float16 (tanh); instance: ``foreground``,
        ``boundary`` (sigmoid) and ``distance`` float32; dense_ssl: ``embedding`` float16
        (``feature``, z, y, x). All heads come from one model pass per window. Compute with
        :func:`write_predictions` (streams to zarr) or ``ds.compute()`` for small volumes.
    """
    task = getattr(model, "task", None)
    if task not in TASKS:
        raise InputError(f"model: task must be one of {TASKS}, got {task!r}")
    tomo = _as_tomogram(data, "data")
    patch_src = getattr(model, "patch_size", None) if patch_size is None else patch_size
    if patch_src is None:
        raise InputError("patch_size: the model has no patch_size; pass patch_size=(z, y, x)")
    patch = (int(patch_src),) * 3 if np.isscalar(patch_src) else tuple(int(p) for p in patch_src)
    if len(patch) != 3 or min(patch) < 1:
        raise InputError(f"patch_size: expected 3 positive voxel counts (z, y, x), got {patch_src}")
    if not 0 <= float(overlap) < 1:
        raise InputError(f"overlap: must be in [0, 1), got {overlap}")
    if int(batch_size) < 1:
        raise InputError(f"batch_size: must be ≥ 1, got {batch_size}")
    overlap = float(overlap)
    shape = tuple(int(s) for s in tomo.shape)
    if chunks is None:
        chunk = tuple(_default_chunk(s, p, overlap) for s, p in zip(shape, patch))
    elif np.isscalar(chunks):
        chunk = (int(chunks),) * 3
    else:
        chunk = tuple(int(c) for c in chunks)
        if len(chunk) != 3:
            raise InputError(f"chunks: expected 3 voxel counts (z, y, x), got {chunks}")
    plans = [_plan_axis(s, p, overlap, c, ax) for s, p, c, ax in zip(shape, patch, chunk, DIMS)]
    heads = _model_heads(model, task, patch)

    image = _as_dask(tomo, chunk)
    if image.dtype != np.float32:
        image = image.astype(np.float32)
    mask_d = None
    if mask is not None:
        m = _as_tomogram(mask, "mask")
        if tuple(m.shape) != shape:
            raise InputError(f"mask: shape {tuple(m.shape)} differs from the data's {shape}")
        mask_d = (_as_dask(m, chunk) > 0).astype(np.uint8)

    dev_arg = None if device is None else str(device)
    runner = _Runner(
        model, task, heads, patch, overlap, int(batch_size), float(sigma_scale), dev_arg, amp
    )
    runner_d = dask.delayed(runner, pure=True, name=f"cryosiam-model-{runner.key}")
    n_raw = runner.n_channels
    if task in ("semantic", "lamella"):
        n_out = 2 * heads[0][1] + 1
    else:
        n_out = n_raw
    tag = runner.key[:8]

    nz, ny, nx = (len(p.cores) for p in plans)
    # stage 1: one task per chunk over the region of the windows it owns
    stage1 = {}
    for i in range(nz):
        for j in range(ny):
            for k in range(nx):
                reg = tuple(p.regions[n] for p, n in zip(plans, (i, j, k)))
                sl = tuple(slice(a, e) for a, e in reg)
                img = image[sl]
                msk = None if mask_d is None else mask_d[sl]
                stage1[i, j, k] = dask.delayed(_stage1, pure=True)(
                    runner_d, img, msk, dask_key_name=f"cryosiam-windows-{tag}-{i}-{j}-{k}"
                )
    # stage 2: each chunk sums the contributions of itself and its lower neighbours
    rows = []
    for i in range(nz):
        plane = []
        for j in range(ny):
            line = []
            for k in range(nx):
                core = tuple(p.cores[n] for p, n in zip(plans, (i, j, k)))
                parts, places = [], []
                for di in (0, 1):
                    for dj in (0, 1):
                        for dk in (0, 1):
                            src = (i - di, j - dj, k - dk)
                            if min(src) < 0:
                                continue
                            reg = [p.regions[n] for p, n in zip(plans, src)]
                            sl, place = [], []
                            for (a, e), (c0, c1) in zip(reg, core):
                                lo, hi = max(a, c0), min(e, c1)
                                sl.append(slice(lo - a, hi - a) if hi > lo else None)
                                place.append(slice(lo - c0, hi - c0))
                            if any(s is None for s in sl):
                                continue
                            places.append(tuple(place))
                            parts.append(
                                dask.delayed(_take, pure=True)(
                                    stage1[src],
                                    tuple(sl),
                                    dask_key_name=f"cryosiam-take-{tag}-{i}-{j}-{k}-{di}{dj}{dk}",
                                )
                            )
                core_sl = tuple(slice(a, b) for a, b in core)
                core_shape = tuple(b - a for a, b in core)
                msk = None if mask_d is None else mask_d[core_sl]
                block = dask.delayed(_stage2, pure=True)(
                    parts,
                    places,
                    msk,
                    core_shape,
                    task,
                    heads,
                    n_out,
                    dask_key_name=f"cryosiam-blend-{tag}-{i}-{j}-{k}",
                )
                line.append(da.from_delayed(block, (n_out, *core_shape), dtype=np.float32))
            plane.append(line)
        rows.append(plane)
    stacked = da.block(rows)

    coords = {d: tomo.coords[d] for d in DIMS if d in tomo.coords}
    attrs = dict(tomo.attrs)
    attrs.update(
        {
            "task": task,
            "patch_size": list(patch),
            "overlap": overlap,
            "blending": "gaussian",
            "sigma_scale": float(sigma_scale),
        }
    )
    variables: dict[str, Any] = {}
    if task == "denoise":
        variables["denoised"] = (DIMS, stacked[0])
    elif task in ("semantic", "lamella"):
        n = heads[0][1]
        names = getattr(model, "class_names", None)
        names = list(names) if names is not None and len(names) == n else None
        # object strings: stored as zarr v3 variable-length strings
        coords["class"] = np.array(names or [f"class_{c}" for c in range(n)], dtype=object)
        variables["probabilities"] = (("class", *DIMS), stacked[:n].astype(np.float16))
        variables["labels"] = (DIMS, stacked[n].astype(np.uint8))
        variables["distance"] = (("class", *DIMS), stacked[n + 1 :].astype(np.float16))
    elif task == "instance":
        variables["foreground"] = (DIMS, stacked[0])
        variables["boundary"] = (DIMS, stacked[1])
        variables["distance"] = (DIMS, stacked[2])
    else:
        coords["feature"] = np.arange(n_raw)
        variables["embedding"] = (("feature", *DIMS), stacked.astype(np.float16))
    return xr.Dataset(variables, coords=coords, attrs=attrs)


# ============================================================================ computing
def _active_client() -> Any | None:
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def _compute(*objs: Any, progress: bool = True) -> tuple:
    """``dask.compute`` with a progress bar (distributed ``progress`` under a Client)."""
    client = _active_client()
    if client is not None:
        futures = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futures)
        return tuple(client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return dask.compute(*objs)
    return dask.compute(*objs)


def write_predictions(
    ds: xr.Dataset | xr.DataArray,
    path: str | os.PathLike[str],
    progress: bool = True,
    overwrite: bool = True,
) -> os.PathLike[str]:
    """Stream a lazy prediction Dataset to a zarr store, chunk by chunk, atomically.

    Each output chunk is computed, written and released; no tomogram-sized array is held.
    The store is written to a temporary sibling and renamed onto ``path`` when complete.
    Open it again with ``xarray.open_zarr(path)``. Under a ``dask.distributed`` Client the
    work runs on the cluster (``path`` must be on a shared file system).
    """
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=ds.name or "data")
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"ds: expected an xarray Dataset, got {type(ds).__name__}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        delayed = ds.to_zarr(tmp, mode="w", compute=False, consolidated=False)
        _compute(delayed, progress=progress)
    return path


to_zarr = write_predictions


# ============================================================================ connected components
def _label_block(
    block: np.ndarray, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face-connected components of each class in one block.

    Returns local labels (0 = none, 1..n consecutive over all classes), the class of each
    label and its voxel count.
    """
    lab = np.zeros(block.shape, dtype=np.int32)
    cls, sizes = [], []
    offset = 0
    for c in classes:
        lc, n = ndimage.label(block == c)
        if n:
            sel = lc > 0
            lab[sel] = lc[sel] + offset
            cls.extend([c] * n)
            sizes.extend(np.bincount(lc[sel], minlength=n + 1)[1:].tolist())
            offset += n
    return lab, np.asarray(cls, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


def _label_summary(block: np.ndarray, classes: tuple[int, ...]) -> dict[str, Any]:
    lab, cls, sizes = _label_block(block, classes)
    faces = {}
    for ax in range(3):
        faces[ax, 0] = np.take(lab, 0, axis=ax).copy()
        faces[ax, 1] = np.take(lab, -1, axis=ax).copy()
    return {"cls": cls, "sizes": sizes, "faces": faces}


def _component_tables(
    arr: da.Array, classes: tuple[int, ...], progress: bool
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """Exact global connected components of a chunked label volume.

    Pass over the data once: label each block (scipy.ndimage, face connectivity), keep its
    six faces; then merge labels that touch across block faces with a sparse graph
    (scipy.sparse.csgraph.connected_components). Returns, per block, the global component
    id of each local label, and per component its class and size.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    blocks = arr.to_delayed()
    grid = blocks.shape
    index = list(np.ndindex(grid))
    summ = _compute(
        *[dask.delayed(_label_summary, pure=True)(blocks[b], classes) for b in index],
        progress=progress,
    )
    by_block = dict(zip(index, summ))
    offsets, total = {}, 0
    for b in index:
        offsets[b] = total
        total += len(by_block[b]["sizes"])
    rows, cols = [], []
    for b in index:
        for ax in range(3):
            nb = list(b)
            nb[ax] += 1
            nb = tuple(nb)
            if nb[ax] >= grid[ax]:
                continue
            hi = by_block[b]["faces"][ax, 1]
            lo = by_block[nb]["faces"][ax, 0]
            both = (hi > 0) & (lo > 0)
            if not both.any():
                continue
            u = hi[both].astype(np.int64) - 1 + offsets[b]
            v = lo[both].astype(np.int64) - 1 + offsets[nb]
            rows.append(u)
            cols.append(v)
    cls_all = (
        np.concatenate([by_block[b]["cls"] for b in index]) if total else np.zeros(0, np.int64)
    )
    size_all = (
        np.concatenate([by_block[b]["sizes"] for b in index]) if total else np.zeros(0, np.int64)
    )
    if rows:
        u, v = np.concatenate(rows), np.concatenate(cols)
        same = cls_all[u] == cls_all[v]  # voxels of different classes never merge
        u, v = u[same], v[same]
    else:
        u = v = np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(total, total))
    n_comp, comp = connected_components(graph, directed=False)
    comp_size = np.bincount(comp, weights=size_all, minlength=n_comp).astype(np.int64)
    comp_cls = np.zeros(n_comp, dtype=np.int64)
    comp_cls[comp] = cls_all
    per_block = {b: comp[offsets[b] : offsets[b] + len(by_block[b]["sizes"])] for b in index}
    return per_block, comp_size, comp_cls, {"grid": grid, "index": index}


def _relabel_block(
    block: np.ndarray, classes: tuple[int, ...], lut: np.ndarray, fill: int, dtype: Any
) -> np.ndarray:
    """Re-label one block and keep voxels whose component ``lut`` keeps; others → fill."""
    lab, _, _ = _label_block(block, classes)
    keep = np.concatenate([[True], lut])[lab]
    in_classes = lab > 0
    out = np.where(in_classes & ~keep, fill, block)
    return out.astype(dtype, copy=False)


def _apply_component_filter(
    arr: da.Array,
    classes: tuple[int, ...],
    per_block: dict,
    keep_comp: np.ndarray,
    fill: int,
    dtype: Any,
) -> da.Array:
    blocks = arr.to_delayed()
    grid = blocks.shape
    out = np.empty(grid, dtype=object)
    for b in np.ndindex(grid):
        lut = keep_comp[per_block[b]]
        shape = tuple(arr.chunks[ax][b[ax]] for ax in range(3))
        d = dask.delayed(_relabel_block, pure=True)(blocks[b], classes, lut, fill, dtype)
        out[b] = da.from_delayed(d, shape, dtype=dtype)
    return da.block(out.tolist())


def postprocess_semantic(
    ds_or_labels: xr.Dataset | xr.DataArray,
    min_size: int | Mapping[int | str, int] = 100,
    progress: bool = True,
) -> xr.DataArray:
    """Remove connected components smaller than ``min_size`` voxels, per class, chunked.

    Components are face-connected (6-neighbourhood) and computed **exactly** across chunk
    borders: one pass labels every block with ``scipy.ndimage.label`` and records block
    faces; labels touching across faces are merged with a sparse connected-components
    solve; a lazy second pass rewrites each block. Removed voxels become background (0).

    Parameters
    ----------
    ds_or_labels
        A :func:`predict` Dataset (its ``labels`` and ``class`` coordinate are used) or a
        uint8 label DataArray (z, y, x).
    min_size
        Minimum component size in voxels: one int for every non-background class, or a
        dict ``{class index or name: voxels}`` (classes not named are left alone).

    Returns
    -------
    xarray.DataArray
        Lazy uint8 labels on the same grid.
    """
    names: list[str] | None = None
    if isinstance(ds_or_labels, xr.Dataset):
        if "labels" not in ds_or_labels:
            raise InputError("ds_or_labels: the Dataset has no 'labels' variable")
        labels = ds_or_labels["labels"]
        if "class" in ds_or_labels.coords:
            names = [str(c) for c in ds_or_labels.coords["class"].values]
    elif isinstance(ds_or_labels, xr.DataArray):
        labels = ds_or_labels
    else:
        raise InputError(
            f"ds_or_labels: expected a Dataset or DataArray, got {type(ds_or_labels).__name__}"
        )
    labels = _as_tomogram(labels, "ds_or_labels")
    arr = labels.data if isinstance(labels.data, da.Array) else da.from_array(labels.values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"ds_or_labels: labels must be integers, got {arr.dtype}")
    if isinstance(min_size, Mapping):
        sizes: dict[int, int] = {}
        for key, v in min_size.items():
            if isinstance(key, str):
                if names is None or key not in names:
                    raise InputError(
                        f"min_size: unknown class name {key!r} (known: {names or 'none'})"
                    )
                key = names.index(key)
            sizes[int(key)] = int(v)
    else:
        if int(min_size) < 0:
            raise InputError(f"min_size: must be ≥ 0 voxels, got {min_size}")
        n_cls = len(names) if names else int(arr.max().compute()) + 1
        sizes = {c: int(min_size) for c in range(1, n_cls)}
    classes = tuple(sorted(c for c, v in sizes.items() if v > 1))
    if not classes:
        return labels.copy()
    per_block, comp_size, comp_cls, _ = _component_tables(arr, classes, progress)
    thresh = np.array([sizes[int(c)] for c in comp_cls], dtype=np.int64)
    keep = comp_size >= thresh
    out = _apply_component_filter(arr, classes, per_block, keep, 0, labels.dtype)
    return xr.DataArray(
        out, dims=DIMS, coords=labels.coords, attrs=dict(labels.attrs), name="labels"
    )


def _hull_block(block: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    out = np.zeros(block.shape, dtype=np.uint8)
    for z in range(block.shape[0]):
        if block[z].any():
            out[z] = convex_hull_image(block[z] > 0)
    return out


def lamella_mask(
    probabilities: xr.Dataset | xr.DataArray,
    sigma: Sequence[float] = (10.0, 5.0, 5.0),
    threshold: float = 0.9,
    cls: int | str = -1,
    progress: bool = True,
) -> xr.DataArray:
    """Sample (lamella) mask from lamella-model probabilities, SPEC §2, out of core.

    Gaussian smoothing with ``sigma`` (z, y, x) in voxels (``dask.map_overlap``, halo
    4σ, reflecting edges — identical to ``scipy.ndimage.gaussian_filter``), threshold
    ``> threshold``, keep the largest connected component (exact across chunks, see
    :func:`postprocess_semantic`), then fill each z slice with its 2-D convex hull.

    Parameters
    ----------
    probabilities
        A lamella :func:`predict` Dataset, its ``probabilities`` (class, z, y, x), or a
        (z, y, x) probability of the sample.
    cls
        Class index or name of the sample in the ``class`` dim (default: the last one).

    Returns
    -------
    xarray.DataArray
        Lazy uint8 mask (1 = sample), named ``lamella``, on the same grid.
    """
    p = probabilities
    if isinstance(p, xr.Dataset):
        if "probabilities" not in p:
            raise InputError("probabilities: the Dataset has no 'probabilities' variable")
        p = p["probabilities"]
    if not isinstance(p, xr.DataArray):
        raise InputError(f"probabilities: expected a DataArray, got {type(p).__name__}")
    if "class" in p.dims:
        if isinstance(cls, str):
            names = [str(c) for c in p.coords["class"].values] if "class" in p.coords else []
            if cls not in names:
                raise InputError(f"cls: unknown class {cls!r} (known: {names})")
            p = p.isel({"class": names.index(cls)})
        else:
            p = p.isel({"class": int(cls)})
        p = p.drop_vars("class", errors="ignore")
    p = _as_tomogram(p, "probabilities")
    sig = tuple(float(s) for s in sigma)
    if len(sig) != 3 or min(sig) < 0:
        raise InputError(f"sigma: expected 3 non-negative values (z, y, x) in voxels, got {sigma}")
    arr = p.data if isinstance(p.data, da.Array) else da.from_array(p.values, chunks=64)
    arr = arr.astype(np.float32)
    depth = {ax: min(int(4.0 * s + 0.5), arr.shape[ax] - 1) for ax, s in enumerate(sig)}
    smooth = arr.map_overlap(
        ndimage.gaussian_filter,
        depth=depth,
        boundary="reflect",
        sigma=sig,
        mode="reflect",
        truncate=4.0,
        dtype=np.float32,
    )
    binary = (smooth > threshold).astype(np.uint8)
    per_block, comp_size, _, _ = _component_tables(binary, (1,), progress)
    keep = np.zeros(len(comp_size), dtype=bool)
    if len(comp_size):
        keep[int(np.argmax(comp_size))] = True
    largest = _apply_component_filter(binary, (1,), per_block, keep, 0, np.uint8)
    zc = max(1, min(arr.chunks[0]))
    slabs = largest.rechunk({0: zc, 1: -1, 2: -1})
    hull = slabs.map_blocks(_hull_block, dtype=np.uint8).rechunk(arr.chunks)
    return xr.DataArray(hull, dims=DIMS, coords=p.coords, attrs=dict(p.attrs), name="lamella")
