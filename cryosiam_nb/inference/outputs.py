"""Views of a multi-task prediction: one head task's outputs under single-task names."""

from __future__ import annotations

import xarray as xr

from cryosiam_nb.io import InputError

__all__ = ["outputs_of"]


def outputs_of(ds: xr.Dataset, task: str) -> xr.Dataset:
    """The outputs of one head ``task`` from a :func:`predict` Dataset, under the names a
    single-task model gives (``probabilities``/``labels``/``distance`` with dim ``class``;
    ``foreground``/``boundary``/``distance``; ``denoised``).

    A single-task Dataset is returned as is; a multi-task one gives a view of the
    ``<task>_*`` variables (nothing is computed).
    """
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"expected a predict() Dataset, got {type(ds).__name__}")
    if ds.attrs.get("task") != "multitask":
        return ds
    if task == "denoise":
        names = {"denoised": "denoised"} if "denoised" in ds else {}
    else:
        pre = f"{task}_"
        names = {v: v[len(pre) :] for v in ds.data_vars if str(v).startswith(pre)}
    if not names:
        raise InputError(
            f"the multi-task prediction has no {task!r} outputs (variables: {sorted(ds.data_vars)})"
        )
    sub = ds[list(names)].rename(names)
    cdim = f"{task}_class"
    if cdim in sub.dims:
        sub = sub.rename({cdim: "class"})
    extra = [c for c in sub.coords if str(c).endswith("_class")]
    sub = sub.drop_vars(extra)
    sub.attrs = {**ds.attrs, "task": task}
    return sub
