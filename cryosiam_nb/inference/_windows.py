"""Window planning, the per-worker model runner and the two chunk tasks of :func:`predict`.

How chunk borders are made invisible
------------------------------------
A monolithic MONAI ``sliding_window_inference`` over the whole volume places windows on a
global grid (stride ``int(patch * (1 - overlap))``, the last window shifted back to end at
the volume edge) and blends them with Gaussian weights ``g``:
``out(v) = Σ_w g_w(v) f_w(v) / Σ_w g_w(v)``. Every window depends only on the voxels it
covers. Here the volume is cut into chunks whose size is a multiple of the stride, so each
global window *starts* in exactly one chunk, which **owns** it. For every chunk one dask task
(:func:`stage1`) runs the windows it owns over the region they cover (its core plus a halo
of ``patch - stride`` voxels on the high side): MONAI's own window grid over that region
(``dense_patch_slices``) is exactly the owned windows (checked when the graph is built).
The task accumulates the weighted sum ``Σ g f`` with MONAI's Gaussian importance map ``g``
and returns it with the weight sum ``Σ g``. A second task per chunk (:func:`stage2`) adds
the halo contributions of its (up to 7) lower neighbours and divides. The result equals
one monolithic ``sliding_window_inference`` (same patch, overlap, Gaussian blending) to
float rounding, and no window is ever run twice.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryosiam_nb.device import pick_device
from cryosiam_nb.inference._fast import inference_copy, resolve_precision
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
    if task == "refine":  # the refiner's second pass: probabilities and the argmax
        return heads[0][1] + 1
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


#: bytes of one chunk's stage-1 result (window sums over its region, float32) that the
#: default chunk stays under; dask runs one chunk per core, each with a few such buffers
CHUNK_BYTES = 64 * 2**20


def default_chunk(size: int, patch: int, overlap: float, n_channels: int = 1) -> int:
    """Two patches, capped at 128 voxels but never below one patch, rounded up to the stride;
    then fewer strides while a chunk's region (chunk + halo)³ × (``n_channels`` + 1) float32
    exceeds :data:`CHUNK_BYTES` (many-channel models such as the multi-task one)."""
    if size <= patch:
        return size
    stride = scan_interval(size, patch, overlap)
    target = max(patch, min(2 * patch, 128))
    chunk = int(math.ceil(target / stride) * stride)
    floor = int(math.ceil(patch / stride) * stride)
    halo = patch - stride
    while chunk - stride >= floor and (chunk + halo) ** 3 * (n_channels + 1) * 4 > CHUNK_BYTES:
        chunk -= stride
    return chunk


# ============================================================================ model runner
#: test-time augmentation: flips of the (N, C, z, y, x) window, identity first (axes 2–4)
TTA_FLIPS: tuple[tuple[int, ...], ...] = (
    (),
    (4,),
    (3,),
    (2,),
    (3, 4),
    (2, 4),
    (2, 3),
    (2, 3, 4),
)


def _probe(patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """A small input (z, y, x voxels) for checking a model's inference copy."""
    return tuple(min(int(p), 16) for p in patch)


_MODEL_CACHE: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2
_COUNT_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


class Runner:
    """Everything a chunk task needs to run the model; pickles with the model's weights.

    Each worker process makes its inference copy of the model once (BatchNorm folded,
    channels-last on CPU: :func:`~cryosiam_nb.inference._fast.inference_copy`) on its device
    and caches it (keyed by a per-``predict`` id), so a graph with hundreds of chunks pays
    that once. ``precision`` (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``)
    is resolved per device (:func:`~cryosiam_nb.inference._fast.resolve_precision`).
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
        precision: str = "auto",
        tta: int = 0,
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
        self.precision = precision
        self.tta = int(tta)
        self.key = uuid.uuid4().hex
        self.n_channels = sum(c for _, c in heads)

    def __dask_tokenize__(self) -> str:
        return self.key

    def like(self, model: torch.nn.Module, task: str, heads: tuple[tuple[str, int], ...]) -> Runner:
        """A runner of another ``model`` with this one's windows, batch, device, precision
        and flips (its own cache key)."""
        return Runner(
            model,
            task,
            heads,
            self.patch,
            self.overlap,
            self.batch_size,
            self.sigma_scale,
            self.device,
            self.amp,
            self.precision,
            self.tta,
        )

    def module(self, dev: torch.device) -> torch.nn.Module:
        k = (self.key, str(dev))
        with _CACHE_LOCK:
            m = _MODEL_CACHE.get(k)
            if m is None:  # a copy: the caller's own model is never moved or switched
                m = inference_copy(self.model, dev, self.task, _probe(self.patch))
                _MODEL_CACHE[k] = m
                while len(_MODEL_CACHE) > _CACHE_SIZE:
                    _MODEL_CACHE.popitem(last=False)
            else:
                _MODEL_CACHE.move_to_end(k)
            return m

    def forward(self, model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """Un-activated head outputs ``(N, C, *window)`` float32; with ``tta`` the mean over
        the flips of :data:`TTA_FLIPS` (each output flipped back)."""
        if not self.tta:
            return self._forward(model, x, dev)
        acc = None
        for dims in TTA_FLIPS[: self.tta]:
            y = self._forward(model, torch.flip(x, dims) if dims else x, dev)
            y = torch.flip(y, dims) if dims else y
            acc = y if acc is None else acc.add_(y)
        return acc.div_(self.tta)

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
        dtype = resolve_precision(self.precision, self.amp, dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if dev.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last_3d)
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
        return torch.cat([out[name] for name, _ in self.heads], dim=1).float()

    def windows(self, shape: tuple[int, ...]) -> tuple[tuple, tuple, list]:
        """MONAI's windows over a region ``shape``: the padded shape (MONAI pads an axis
        shorter than the window symmetrically), the region's slices in it, and the window
        slices (``dense_patch_slices`` with MONAI's stride rule)."""
        from monai.data.utils import dense_patch_slices

        padded = tuple(max(s, p) for s, p in zip(shape, self.patch))
        crop = tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(shape, padded))
        strides = tuple(scan_interval(s, p, self.overlap) for s, p in zip(padded, self.patch))
        return padded, crop, dense_patch_slices(padded, self.patch, strides)

    def count_map(self, shape: tuple[int, ...]) -> np.ndarray:
        """Σ of MONAI's Gaussian importance maps over MONAI's windows of a region ``shape``."""
        key = (shape, self.patch, self.overlap, self.sigma_scale)
        with _CACHE_LOCK:
            hit = _COUNT_CACHE.get(key)
        if hit is not None:
            return hit
        padded, crop, windows = self.windows(shape)
        imp = self.importance(torch.device("cpu"))
        cnt = torch.zeros(padded, dtype=torch.float32)
        for sl in windows:
            cnt[sl] += imp
        out = cnt[crop].numpy().copy()
        with _CACHE_LOCK:
            _COUNT_CACHE[key] = out
            while len(_COUNT_CACHE) > 16:
                _COUNT_CACHE.popitem(last=False)
        return out

    def importance(self, dev: torch.device) -> torch.Tensor:
        """MONAI's Gaussian importance map of one window (float32, on ``dev``), cached."""
        from monai.data.utils import compute_importance_map

        key = ("importance", self.patch, self.sigma_scale, str(dev))
        with _CACHE_LOCK:
            hit = _COUNT_CACHE.get(key)
        if hit is None:
            hit = compute_importance_map(
                self.patch, mode="gaussian", sigma_scale=self.sigma_scale, device=dev
            ).to(torch.float32)
            with _CACHE_LOCK:
                _COUNT_CACHE[key] = hit
        return hit

    def run(self, image: np.ndarray, roi: np.ndarray | None) -> np.ndarray:
        """Weighted sums over the owned windows of one region: ``(C + 1, *region)`` float32.

        ``image``: the region ``(z, y, x)``, or ``(channels, z, y, x)`` for a model that
        reads several input channels (the refiner's second pass).

        Channels ``:C`` hold ``Σ g·f`` (un-activated head outputs), the last ``Σ g``. The
        windows are MONAI's (``dense_patch_slices`` with MONAI's stride rule, the region
        padded like ``sliding_window_inference`` pads a volume smaller than the window) and
        ``g`` is MONAI's Gaussian ``compute_importance_map``; the sums are accumulated
        directly (``sliding_window_inference`` would divide by ``Σ g``, which the blend
        needs undone). With an roi, windows containing no roi voxel are not run (they add
        zero).
        """
        dev = pick_device(self.device)
        model = self.module(dev)
        img = np.asarray(image, dtype=np.float32)
        img = img[None] if img.ndim == 3 else img
        shape = tuple(int(s) for s in img.shape[1:])
        padded, crop, windows = self.windows(shape)
        x = torch.zeros((1, img.shape[0], *padded), dtype=torch.float32)
        x[(0, slice(None), *crop)] = torch.from_numpy(np.ascontiguousarray(img))
        if roi is not None:
            m = np.zeros(padded, dtype=bool)
            m[crop] = np.asarray(roi) > 0
        x = x.to(dev)
        n_ch = self.n_channels
        out = np.empty((n_ch + 1, *shape), dtype=np.float32)
        cpu_direct = dev.type == "cpu" and padded == shape
        if cpu_direct:  # accumulate straight into the result
            acc = torch.from_numpy(out[:n_ch])
            acc.zero_()
        else:
            acc = torch.zeros((n_ch, *padded), dtype=torch.float32, device=dev)
        if roi is not None:
            windows = [sl for sl in windows if m[sl].any()]
        imp = self.importance(dev)
        with torch.inference_mode():
            for i in range(0, len(windows), self.batch_size):
                group = windows[i : i + self.batch_size]
                batch = torch.cat([x[(slice(None), slice(None), *sl)] for sl in group])
                y = self.forward(model, batch, dev)
                # g·f into a (N, C, z, y, x)-contiguous buffer: adding a channels-last
                # window into the channel-first sums is ~5× slower per voxel
                y = torch.mul(y, imp, out=torch.empty(y.shape, device=dev))
                for j, sl in enumerate(group):
                    acc[(slice(None), *sl)] += y[j]
        if not cpu_direct:
            out[:n_ch] = acc[(slice(None), *crop)].cpu().numpy()
        out[n_ch] = self.count_map(shape)
        return out


# ============================================================================ chunk tasks
def stage1(
    runner: Runner,
    image: np.ndarray,
    roi: np.ndarray | None,
    after: object = None,
    extra: Any = None,
    region: tuple[slice, ...] | None = None,
) -> np.ndarray | None:
    """Window sums over one chunk's region (``after``: an earlier chunk's result, only an
    ordering dependency of the graph). ``extra(region)``, when given, reads more input
    channels ``(C, *region)`` for the region here, in the task itself (so no separate task
    holds them while the chunk waits for its turn); they follow ``image`` as channels."""
    if image.size == 0:
        return None
    if roi is not None and not roi.any():
        return None  # no sample under any owned window: the model is not run
    if extra is not None:
        image = np.concatenate([np.asarray(image, np.float32)[None], extra(region)])
    return runner.run(image, roi)


def take(acc: np.ndarray | None, sl: tuple[slice, ...], copy: bool = True) -> np.ndarray | None:
    """The slice ``sl`` of a chunk's window sums: a copy (a thin halo must not keep the whole
    region alive while it waits for a neighbour) or, for the chunk's own core, a view (its
    blend follows at once)."""
    if acc is None:
        return None
    return np.array(acc[(slice(None), *sl)], copy=copy)


def _argmax0(x: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the first (class) axis, ties to the lowest class like ``torch.argmax``;
    a running maximum over contiguous class slabs (a strided argmax is ~10× slower)."""
    best = x[0].clone()
    lab = torch.zeros(x.shape[1:], dtype=torch.int64)
    for c in range(1, x.shape[0]):
        more = x[c] > best
        lab[more] = c
        torch.maximum(best, x[c], out=best)
    return lab


def _activate(task: str, raw: np.ndarray, heads: Heads, out: np.ndarray) -> None:
    """Activated maps of ``raw`` (window averages) written into ``out`` (``n_activated``
    channels): softmax, argmax label and tanh distance for semantic / lamella, softmax and
    argmax for the refiner's second pass (``"refine"``), sigmoid
    foreground and boundary for instance, the rest as they are."""
    if task == "multitask":
        c0 = o0 = 0
        for part, hs in parts_of(task, heads):
            c1 = c0 + sum(c for _, c in hs)
            o1 = o0 + n_activated(part, hs)
            _activate(part, raw[c0:c1], hs, out[o0:o1])
            c0, o0 = c1, o1
        return
    t, o = torch.from_numpy(raw), torch.from_numpy(out)
    if task in ("semantic", "lamella", "refine"):
        n = heads[0][1]
        o[:n] = torch.softmax(t[:n], dim=0)
        o[n] = _argmax0(t[:n])
        if task != "refine":  # the refiner's second pass has no distance maps
            torch.tanh(t[n:], out=o[n + 1 :])
    elif task == "instance":
        torch.sigmoid(t[:2], out=o[:2])
        o[2:] = t[2:]
    else:
        o[:] = t


def stage2(
    parts: list[np.ndarray | None],
    places: list[tuple[slice, ...]],
    roi: np.ndarray | None,
    shape: tuple[int, ...],
    task: str,
    heads: tuple[tuple[str, int], ...],
    n_out: int,
    after: object = None,
) -> np.ndarray:
    """Sum the window contributions landing in one chunk, normalise, activate, zero outside
    the roi (``after``: this chunk's slices for its neighbours, an ordering dependency).

    A piece that covers the whole chunk (normally the chunk's own windows, a view of its
    window sums) is summed into in place instead of a new buffer: every piece goes to this
    chunk only, and ``after`` guarantees the neighbours' slices were already copied out."""
    total = None
    full = tuple(slice(0, n) for n in shape)
    for part, place in zip(parts, places):
        covers = tuple(slice(s.start or 0, s.stop) for s in place) == full
        if part is not None and covers and part.dtype == np.float32 and part.flags.writeable:
            total = part
            break
    for part, place in zip(parts, places):
        if part is None or part is total:
            continue
        if total is None:
            total = np.zeros((part.shape[0], *shape), dtype=np.float32)
        total[(slice(None), *place)] += part
    if total is None:
        return np.zeros((n_out, *shape), dtype=np.float32)
    cnt = total[-1]
    acc = total[:-1]
    ok = cnt > 0
    inv = np.zeros_like(cnt)
    np.divide(1.0, cnt, out=inv, where=ok)  # where cnt is 0, acc is 0 too
    acc *= inv[None]
    out = np.empty((n_out, *shape), dtype=np.float32)
    _activate(task, acc, heads, out)
    if roi is not None or not ok.all():
        keep = ok if roi is None else (ok & (roi > 0))
        out *= keep[None]
    return out


class ZarrSink:
    """Writes every variable of one blended chunk into an initialised zarr store.

    ``layout``: ``(variable, first channel, channels or None for a (z, y, x) variable,
    dtype)`` per variable, in the channel order of the blended chunk. The store is opened
    by path in the worker (so the sink pickles for ``dask.distributed``) and cached per
    process.
    """

    def __init__(self, path: str, layout: list[tuple[str, int, int | None, str]]) -> None:
        self.path = str(path)
        self.layout = list(layout)

    def _group(self) -> object:
        import zarr

        with _CACHE_LOCK:
            g = _SINK_CACHE.get(self.path)
            if g is None:
                g = zarr.open_group(self.path, mode="r+")
                _SINK_CACHE[self.path] = g
                while len(_SINK_CACHE) > 4:
                    _SINK_CACHE.popitem(last=False)
        return g

    def __call__(self, block: np.ndarray, core: tuple[slice, ...]) -> None:
        g = self._group()
        for name, c0, n, dtype in self.layout:
            if n is None:
                g[name][core] = block[c0].astype(dtype)
            else:
                g[name][(slice(None), *core)] = block[c0 : c0 + n].astype(dtype)


_SINK_CACHE: OrderedDict[str, object] = OrderedDict()


def blend_and_write(sink: ZarrSink, core: tuple[slice, ...], *args: object) -> None:
    """:func:`stage2` of one chunk, written by ``sink`` at ``core``; returns nothing, so
    the chunk's memory is released as soon as it is on disk."""
    sink(stage2(*args), core)
