"""The dask graph of one sliding-window pass of :func:`~cryosiam_nb.inference.predict`.

:func:`build_graph` wires the chunk tasks of :mod:`~cryosiam_nb.inference._windows` (window
sums per chunk, halo exchange with the neighbours, blend) in an order that keeps memory
bounded; with a :class:`~cryosiam_nb.inference._windows.ZarrSink` each blend task also
writes its chunk.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from cryosiam_nb.inference._windows import Runner, ZarrSink, blend_and_write, stage1, stage2, take


def _in_flight() -> int:
    """How many chunks may be under way at once: the active scheduler's threads + 1."""
    from cryosiam_nb.inference._compute import _active_client

    client = _active_client()
    if client is not None:
        n = sum(client.nthreads().values())
    else:
        n = dask.config.get("num_workers", None) or os.cpu_count() or 2
    return max(2, int(n) + 1)


def _crop(blocks: list, starts: tuple[int, ...], sl: tuple[slice, ...]) -> np.ndarray:
    """The region ``sl`` (z, y, x) of the ``(C, z, y, x)`` volume whose blocks (nested lists,
    z outermost, starting at voxel ``starts``) are given."""
    whole = np.block([blocks])  # innermost list along x, then y, z, channels
    return whole[(slice(None), *(slice(s.start - o, s.stop - o) for s, o in zip(sl, starts)))]


def _regions(image: da.Array) -> Any:
    """``sl → `` the argument a windows task reads for region ``sl`` (z, y, x slices).

    A (z, y, x) input is sliced as a dask array. A (channels, z, y, x) input (the
    refiner's second pass, computed from the first pass's graph) is read through its
    blocks as delayed objects of one unoptimised graph: a sliced dask array passed to a
    task is finalised (culled, fused) on its own, which here would rename the first
    pass's keys (its order dependencies then miss) and repeat its work for every region.
    """
    if image.ndim == 3:
        return lambda sl: image[sl]
    image = image.rechunk({0: -1})
    blocks = image.to_delayed(optimize_graph=False)[0]
    bounds = [np.cumsum((0, *c)) for c in image.chunks[1:]]

    def region(sl: tuple[slice, ...]) -> Any:
        size = [s.stop - s.start for s in sl]
        if min(size) <= 0:  # a chunk that owns no window
            return np.zeros((image.shape[0], *size), np.float32)
        idx = [
            range(int(np.searchsorted(b, s.start, "right")) - 1, int(np.searchsorted(b, s.stop)))
            for b, s in zip(bounds, sl)
        ]
        sub = [[[blocks[i, j, k] for k in idx[2]] for j in idx[1]] for i in idx[0]]
        starts = tuple(int(b[r[0]]) for b, r in zip(bounds, idx))
        return dask.delayed(_crop, pure=True)(sub, starts, sl)

    return region


def build_graph(
    image: da.Array,
    roi: da.Array | None,
    plans: list,
    runner: Runner,
    n_out: int,
    sink: ZarrSink | None = None,
    extra: Any = None,
) -> da.Array | list[Delayed]:
    """The two-stage dask graph: ``(n_out, z, y, x)`` float32, chunked by ``plans``.
    ``extra``: a picklable ``region → (C, *region)`` reader of further input channels, run
    inside each windows task (:func:`~cryosiam_nb.inference._windows.stage1`).

    Memory stays bounded by the order of the work, which the graph fixes: chunks are
    visited with the axis of most chunks outermost, a chunk's windows start only once the
    chunk :func:`_in_flight` places earlier is blended, and a chunk's blend waits for every
    halo slice of its windows (so the windows' sums are released at once and only the thin
    halos wait for the neighbours above). With a ``sink`` each blend task also writes its
    chunk (every variable) and the graph is the list of those tasks: a chunk's windows
    then wait until the chunk ``lag`` places earlier is on disk, which bounds memory.
    """
    runner_d = dask.delayed(runner, pure=True, name=f"cryosiam-model-{runner.key}")
    tag = runner.key[:8]
    task, heads = runner.task, runner.heads
    counts = tuple(len(p.cores) for p in plans)
    axes = sorted(range(3), key=lambda a: (-counts[a], a))  # outermost first
    order = []
    for idx in itertools.product(*(range(counts[a]) for a in axes)):
        c = [0, 0, 0]
        for a, v in zip(axes, idx):
            c[a] = v
        order.append(tuple(c))
    lag = _in_flight()
    region_of = _regions(image)
    incoming: dict[tuple, list] = {c: [] for c in order}  # chunk → [(take, place)]
    blocks: dict[tuple, Any] = {}
    for n, c in enumerate(order):
        name = "-".join(map(str, c))
        reg = tuple(p.regions[m] for p, m in zip(plans, c))
        sl = tuple(slice(a, e) for a, e in reg)
        msk = None if roi is None else roi[sl]
        # a bare key reference: passing the Delayed itself would drag (and re-cull) the
        # whole graph built so far into every call — quadratic in the number of chunks
        gate = Delayed(blocks[order[n - lag]].key, {}) if n >= lag else None
        first = dask.delayed(stage1, pure=True)(
            runner_d,
            region_of(sl),
            msk,
            gate,
            extra,
            sl,
            dask_key_name=f"cryosiam-windows-{tag}-{name}",
        )
        outgoing = []  # slices of this chunk's windows for itself and its upper neighbours
        for d in itertools.product((0, 1), repeat=3):
            dst = tuple(v + dv for v, dv in zip(c, d))
            if any(v >= cnt for v, cnt in zip(dst, counts)):
                continue
            core = tuple(p.cores[m] for p, m in zip(plans, dst))
            src_sl, place = [], []
            for (a, e), (c0, c1) in zip(reg, core):
                lo, hi = max(a, c0), min(e, c1)
                src_sl.append(slice(lo - a, hi - a) if hi > lo else None)
                place.append(slice(lo - c0, hi - c0))
            if any(v is None for v in src_sl):
                continue
            piece = dask.delayed(take, pure=True)(
                first,
                tuple(src_sl),
                any(d),
                dask_key_name=f"cryosiam-take-{tag}-{name}-{''.join(map(str, d))}",
            )
            incoming[dst].append((piece, tuple(place)))
            outgoing.append(piece)
        core = tuple(p.cores[m] for p, m in zip(plans, c))
        core_sl = tuple(slice(a, b) for a, b in core)
        core_shape = tuple(b - a for a, b in core)
        msk = None if roi is None else roi[core_sl]
        pieces = incoming.pop(c)
        blend_args = (
            [p for p, _ in pieces],
            [pl for _, pl in pieces],
            msk,
            core_shape,
            task,
            heads,
            n_out,
            outgoing,
        )
        if sink is not None:
            blocks[c] = dask.delayed(blend_and_write, pure=True)(
                sink, core_sl, *blend_args, dask_key_name=f"cryosiam-write-{tag}-{name}"
            )
            continue
        blocks[c] = dask.delayed(stage2, pure=True)(
            *blend_args, dask_key_name=f"cryosiam-blend-{tag}-{name}"
        )
    if sink is not None:
        return [blocks[c] for c in order]
    rows = [
        [
            [
                da.from_delayed(
                    blocks[i, j, k],
                    (n_out, *(b - a for a, b in (p.cores[m] for p, m in zip(plans, (i, j, k))))),
                    dtype=np.float32,
                )
                for k in range(counts[2])
            ]
            for j in range(counts[1])
        ]
        for i in range(counts[0])
    ]
    return da.block(rows)
