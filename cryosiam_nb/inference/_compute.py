"""``dask.compute`` with a progress bar, on a ``dask.distributed`` Client when one is active."""

from __future__ import annotations

from typing import Any

import dask

__all__ = ["compute"]


def _active_client() -> Any | None:
    from distributed import get_client  # a dependency; imported when first needed

    try:
        return get_client()
    except ValueError:
        return None


def compute(*objs: Any, progress: bool = True) -> tuple:
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
