"""Writing :func:`~cryosiam_nb.inference.predict` results to zarr: :func:`write_predictions`.

A Dataset straight from ``predict`` is written by its own chunk tasks (each writes every
variable of its chunk, in an order that bounds memory); any other Dataset by xarray's
``to_zarr``. ``predict`` registers what is needed to rebuild its graph here.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import dask.array as da
import xarray as xr

from cryosiam_nb.inference._compute import compute
from cryosiam_nb.inference._graph import build_graph
from cryosiam_nb.inference._refine import (
    REFINED,
    ScratchReader,
    drop_scratch,
    make_scratch,
    scratch_rows,
)
from cryosiam_nb.inference._windows import ZarrSink
from cryosiam_nb.io import InputError, atomic_path

__all__ = ["write_predictions"]


class _Ordered:
    """What :func:`write_predictions` needs to rebuild a :func:`predict` graph whose blend
    tasks write every variable of their chunk (the dask names identify the variables)."""

    def __init__(self, image, roi, plans, runner, n_out, layout, names, refine=None) -> None:  # noqa: ANN001
        self.image, self.roi, self.plans, self.runner = image, roi, plans, runner
        self.n_out, self.layout, self.names = n_out, layout, names
        #: the refiner's second pass (:class:`~cryosiam_nb.inference._refine.RefinePlan`)
        self.refine = refine


#: live predictions: an entry goes when the last of its Dataset's variables is collected
#: (it holds the input array, which may be an in-memory numpy volume)
_ORDERED: dict[int, _Ordered] = {}


def _remember(entry: _Ordered, anchors: list[Any]) -> None:
    key, alive = id(entry), [len(anchors)]
    _ORDERED[key] = entry

    def gone() -> None:
        alive[0] -= 1
        if alive[0] == 0:
            _ORDERED.pop(key, None)

    for a in anchors:
        weakref.finalize(a, gone)


def _ordered_of(ds: xr.Dataset) -> _Ordered | None:
    """The :func:`predict` record whose unchanged variables ``ds`` holds, or None (then
    ``ds`` is written by xarray's generic ``to_zarr``)."""
    names = {}
    for k, v in ds.data_vars.items():
        if not isinstance(v.data, da.Array):
            return None
        names[k] = v.data.name
    for entry in reversed(list(_ORDERED.values())):
        if names and all(entry.names.get(k) == n for k, n in names.items()):
            return entry
    return None


def write_predictions(
    ds: xr.Dataset | xr.DataArray,
    path: str | os.PathLike[str],
    *,
    progress: bool = True,
    overwrite: bool = True,
) -> os.PathLike[str]:
    """Stream a lazy prediction Dataset to a zarr store, chunk by chunk, atomically.

    Each output chunk is computed (here, on the active dask scheduler), written and
    released; no tomogram-sized array is held. A Dataset straight from :func:`predict`
    (or a selection of its variables) is written by its own chunk tasks: each writes every
    variable of its chunk, and a chunk's windows start only when the chunk ``threads + 1``
    places earlier is on disk, so memory stays bounded whatever the scheduler's timing.
    Any other Dataset goes through xarray's ``to_zarr``. The store is written to a temporary sibling
    and renamed onto ``path`` when complete. Under a ``dask.distributed`` Client the work
    runs on the cluster (``path`` must be on a shared file system).

    Parameters
    ----------
    ds
        A :func:`predict` Dataset (or one DataArray, stored under its name). Variable and
        Dataset attrs (``voxel_size`` in Å, ...) are stored with it.
    path
        Output ``.zarr`` directory.
    progress
        Show a progress bar.
    overwrite
        Replace an existing ``path`` (only once the new store is complete); with ``False``
        an existing ``path`` raises ``FileExistsError``.

    Returns
    -------
    os.PathLike
        ``path``; open it again with ``xarray.open_zarr(path, consolidated=False)``.
    """
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=ds.name or "data")
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"ds: expected an xarray Dataset, got {type(ds).__name__}")
    ordered = _ordered_of(ds)
    with atomic_path(path, overwrite=overwrite) as tmp:
        delayed = ds.to_zarr(tmp, mode="w", compute=False, consolidated=False)
        if ordered is None:
            compute(delayed, progress=progress)
        else:  # metadata and coordinates are written; each chunk task writes its variables
            _write_ordered(ordered, ds, str(tmp), progress)
    return path


def _write_ordered(ordered: _Ordered, ds: xr.Dataset, tmp: str, progress: bool) -> None:
    """Run ``ordered``'s pass(es) with chunk tasks that write into the store ``tmp``.

    With the refiner's second pass, the first pass writes everything else and the
    refiner's inputs (scratch arrays), the second pass reads those and writes the refined
    variables; the scratch arrays are then removed."""
    layout = [row for row in ordered.layout if row[0] in ds.data_vars]
    plan = ordered.refine
    refined = [] if plan is None else [row for row in layout if row[0] in REFINED]
    passes = [(ordered.runner, ordered.n_out, layout, None)]
    if refined:
        first = [r for r in layout if r[0] not in REFINED] + scratch_rows(plan)
        shape = tuple(int(p.cores[-1][1]) for p in ordered.plans)
        chunk = tuple(int(p.cores[0][1] - p.cores[0][0]) for p in ordered.plans)
        make_scratch(tmp, shape, chunk, plan.n)
        second = [
            (name, 0 if name == REFINED[0] else plan.n, n, dtype) for name, _, n, dtype in refined
        ]
        passes = [
            (ordered.runner, ordered.n_out, first, None),
            (plan.runner, plan.n_out, second, ScratchReader(tmp)),
        ]
    for runner, n_out, rows, extra in passes:  # the second reads what the first wrote
        writes = build_graph(
            ordered.image,
            ordered.roi,
            ordered.plans,
            runner,
            n_out,
            sink=ZarrSink(tmp, rows),
            extra=extra,
        )
        compute(*writes, progress=progress)
    if refined:
        drop_scratch(tmp)
