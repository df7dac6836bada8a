"""Window planning, the per-worker model runner and the two chunk tasks of :func:`predict`.

How chunk borders are made invisible
------------------------------------
A monolithic MONAI ``sliding_window_inference`` over the whole volume places windows on a
global grid (stride ``int(patch * (1 - overlap))``, the last window shifted back to end at
the volume edge) and blends them with Gaussian weights ``g``:
``out(v) = Σ_w g_w(v) f_w(v) / Σ_w g_w(v)``. Every window depends only on the voxels it
covers. Here the volume is cut into chunks whose size is a multiple of the stride, so each
global window *starts* in exactly one chunk, which **owns** it. For every chunk one dask task
(:func:`stage1`) runs MONAI's ``sliding_window_inference`` over the region covered by the
windows it owns (its core plus a halo of ``patch - stride`` voxels on the high side);
MONAI's own grid over that region is exactly the owned windows (checked when the graph is
built). The task returns the weighted sum ``Σ g f`` and the weight sum ``Σ g`` (MONAI's
output multiplied back by its count map). A second task per chunk (:func:`stage2`) adds
the halo contributions of its (up to 7) lower neighbours and divides. The result equals
one monolithic ``sliding_window_inference`` (same patch, overlap, Gaussian blending) to
float rounding, and no window is ever run twice.
"""

from __future__ import annotations

import copy
import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from cryosiam_nb.device import autocast, pick_device
from cryosiam_nb.io import InputError

FIXED_HEADS = {
    "denoise": ("denoised",),
    "semantic": ("logits", "distance"),
    "lamella": ("logits", "distance"),
    "instance": ("foreground", "boundary", "distance"),
}

Heads = tuple[tuple[str, int], ...]


def parts_of(task: str, heads: Heads) -> list[tuple[str, Heads]]:
    """``[(head task, its heads with plain names)]``: one part for a single-task model,
    one per ``"<task>/<output>"`` prefix (in order) for a multi-task model."""
    if task != "multitask":
        return [(task, heads)]
    out: dict[str, list[tuple[str, int]]] = {}
    for name, ch in heads:
        part, key = name.split("/", 1)
        out.setdefault(part, []).append((key, ch))
    return [(p, tuple(h)) for p, h in out.items()]


def n_activated(task: str, heads: Heads) -> int:
    """Channels after activation: semantic / lamella add an argmax channel."""
    n = 0
    for part, hs in parts_of(task, heads):
        n += 2 * hs[0][1] + 1 if part in ("semantic", "lamella") else sum(c for _, c in hs)
    return n


# ============================================================================ window planning
def scan_interval(size: int, patch: int, overlap: float) -> int:
    """MONAI's stride rule (``monai.inferers.utils._getscan_interval``) for one axis."""
    if patch == size:
        return patch
    return max(int(patch * (1 - overlap)), 1)


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis exactly as MONAI's ``dense_patch_slices`` places them."""
    from monai.data.utils import dense_patch_slices

    return [int(s[0].start) for s in dense_patch_slices((size,), (patch,), (stride,))]


@dataclass(frozen=True)
class AxisPlan:
    cores: tuple[tuple[int, int], ...]  # [a, b) voxels of each output chunk
    regions: tuple[tuple[int, int], ...]  # [a, e) covered by the windows the chunk owns


def plan_axis(size: int, patch: int, overlap: float, chunk: int, axis: str) -> AxisPlan:
    if size <= patch:  # MONAI pads such an axis to one window: keep it in one chunk
        return AxisPlan(((0, size),), ((0, size),))
    stride = scan_interval(size, patch, overlap)
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
            local = _window_starts(e - a, patch, scan_interval(e - a, patch, overlap))
            if local != [s - a for s in owned]:  # pragma: no cover - guarded by the rules above
                raise RuntimeError(f"window grid mismatch on axis {axis} at {a}: {local} {owned}")
        cores.append((a, b))
        regions.append((a, e))
    return AxisPlan(tuple(cores), tuple(regions))


def default_chunk(size: int, patch: int, overlap: float) -> int:
    """Two patches, capped at 128 voxels but never below one patch, rounded up to the stride."""
    if size <= patch:
        return size
    stride = scan_interval(size, patch, overlap)
    target = max(patch, min(2 * patch, 128))
    return int(math.ceil(target / stride) * stride)


# ============================================================================ model runner
_MODEL_CACHE: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2
_COUNT_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


class Runner:
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
        strides = tuple(scan_interval(s, p, self.overlap) for s, p in zip(padded, self.patch))
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

    def run(self, image: np.ndarray, roi: np.ndarray | None) -> np.ndarray:
        """Weighted sums over the owned windows of one region: ``(C + 1, *region)`` float32.

        Channels ``:C`` hold ``Σ g·f`` (un-activated head outputs), the last ``Σ g``.
        With an roi, windows containing no roi voxel are not run (they add zero).
        """
        from monai.inferers import sliding_window_inference

        dev = pick_device(self.device)
        model = self.module(dev)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if roi is not None:
            m = torch.from_numpy(np.ascontiguousarray(roi, dtype=np.float32))[None, None]
            x = torch.cat([x, m], dim=1)
        x = x.to(dev)
        n_ch = self.n_channels

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            if roi is None:
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
def stage1(runner: Runner, image: np.ndarray, roi: np.ndarray | None) -> np.ndarray | None:
    if image.size == 0:
        return None
    if roi is not None and not roi.any():
        return None  # no sample under any owned window: the model is not run
    return runner.run(image, roi)


def take(acc: np.ndarray | None, sl: tuple[slice, ...]) -> np.ndarray | None:
    if acc is None:
        return None
    return np.array(acc[(slice(None), *sl)], copy=True)


def _activate(task: str, raw: np.ndarray, heads: Heads) -> np.ndarray:
    if task == "multitask":
        outs, c0 = [], 0
        for part, hs in parts_of(task, heads):
            c1 = c0 + sum(c for _, c in hs)
            outs.append(_activate(part, raw[c0:c1], hs))
            c0 = c1
        return np.concatenate(outs, axis=0)
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


def stage2(
    parts: list[np.ndarray | None],
    places: list[tuple[slice, ...]],
    roi: np.ndarray | None,
    shape: tuple[int, ...],
    task: str,
    heads: tuple[tuple[str, int], ...],
    n_out: int,
) -> np.ndarray:
    """Sum the window contributions landing in one chunk, normalise, activate, zero outside the roi."""
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
    if roi is not None or not ok.all():
        keep = ok if roi is None else (ok & (roi > 0))
        out = out * keep[None]
    return np.ascontiguousarray(out, dtype=np.float32)
