"""``dask.compute`` with a progress bar, on a ``dask.distributed`` Client when one is active."""

from __future__ import annotations

from typing import Any

import dask

__all__ = ["compute"]


def _active_client() -> Any | None:
    """The Client to compute on: none when a local scheduler was chosen explicitly
    (``dask.config.set(scheduler=...)``) or when already inside a task on a worker (the
    inner compute runs there; sending it back to the cluster can deadlock a worker)."""
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    from distributed import get_client, get_worker  # a dependency; imported when needed

    try:
        get_worker()
        return None
    except ValueError:
        pass
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
    if progress:  # one bar (a widget in Jupyter) instead of dask's text ProgressBar
        from tqdm.auto import tqdm
        from tqdm.dask import TqdmCallback

        with TqdmCallback(tqdm_class=tqdm, desc="compute"):
            return dask.compute(*objs)
    return dask.compute(*objs)
