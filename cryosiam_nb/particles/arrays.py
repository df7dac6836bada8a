"""Per-particle arrays: :class:`AlignedArrays`, numpy or lazy (zarr / dask) values whose
first axis is aligned with the particles."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np

from cryosiam_nb.io import InputError

__all__ = ["AlignedArrays", "is_lazy", "to_dask", "row_chunks"]


def is_lazy(arr: Any) -> bool:
    """Whether ``arr`` is lazy.

    Parameters
    ----------
    arr : array-like
        A numpy, zarr or dask array.

    Returns
    -------
    bool
        True for a zarr / dask array (not read into memory), False for numpy.
    """
    return not isinstance(arr, np.ndarray)


def to_dask(arr: Any) -> Any:
    """A dask view of an array (reads nothing).

    Parameters
    ----------
    arr : array-like
        A numpy, zarr or dask array; numpy is chunked along rows (:func:`row_chunks`), zarr
        keeps its chunks.

    Returns
    -------
    dask.array.Array
    """
    import dask.array as da  # noqa: PLC0415

    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, np.ndarray):
        return da.from_array(arr, chunks=row_chunks(arr))
    return da.from_zarr(arr)


def row_chunks(arr: Any, target_bytes: int = 16 * 2**20) -> tuple[int, ...]:
    """Chunk shape along the particle axis only.

    Parameters
    ----------
    arr : array-like
        An array shaped (N, ...).
    target_bytes : int
        About this many bytes per chunk.

    Returns
    -------
    tuple of int
        ``(rows, *arr.shape[1:])`` with 1 ≤ rows ≤ N.
    """
    shape = tuple(int(s) for s in arr.shape)
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    rows = max(1, min(max(shape[0], 1), target_bytes // max(row, 1)))
    return (rows,) + shape[1:]


class AlignedArrays(MutableMapping):
    """Dict of arrays whose first axis is aligned with the particles (rows of ``obs``).

    Values may be numpy arrays or lazy (zarr / dask) arrays. Item access returns a numpy array
    (a lazy array is read once and cached); :meth:`lazy` returns a dask view without reading.

    Parameters
    ----------
    n_obs : int
        Number of particles N; every value must have N rows.
    data : dict of str to array-like, optional
        Initial arrays, each shaped (N, ...).
    """

    def __init__(self, n_obs: int, data: dict[str, Any] | None = None):
        self._n = int(n_obs)
        self._data: dict[str, Any] = {}
        for key, value in (data or {}).items():
            self[key] = value

    def _check(self, key: str, value: Any) -> Any:
        if not isinstance(key, str) or not key:
            raise InputError(f"obsm key must be a non-empty str, got {key!r}")
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            value = np.asarray(value)
        if len(value.shape) == 0 or int(value.shape[0]) != self._n:
            raise InputError(
                f"obsm[{key!r}] must have {self._n} rows (one per particle), "
                f"got shape {tuple(value.shape)}"
            )
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = self._check(key, value)

    def _stored(self, key: str) -> Any:
        """The stored value of ``obsm[key]``; a KeyError naming the keys there are."""
        if key not in self._data:
            raise KeyError(f"obsm has no {key!r} (available: {sorted(self._data)})")
        return self._data[key]

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._stored(key)
        if is_lazy(value):
            import dask.array as da  # noqa: PLC0415

            value = value.compute() if isinstance(value, da.Array) else value[...]
            value = np.asarray(value)
            self._data[key] = value
        return value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        parts = []
        for k, v in self._data.items():
            kind = "lazy" if is_lazy(v) else "numpy"
            parts.append(f"{k}: {tuple(v.shape)} {np.dtype(v.dtype)} ({kind})")
        return "AlignedArrays(" + ", ".join(parts) + ")"

    def raw(self, key: str) -> Any:
        """The stored value of ``obsm[key]`` (numpy, zarr or dask) without reading it.

        Parameters
        ----------
        key : str
            An obsm key.

        Returns
        -------
        numpy.ndarray, zarr.Array or dask.array.Array
        """
        return self._stored(key)

    def lazy(self, key: str) -> Any:
        """A dask view of ``obsm[key]``.

        Parameters
        ----------
        key : str
            An obsm key.

        Returns
        -------
        dask.array.Array
            Shaped (N, ...); reads nothing until computed.
        """
        return to_dask(self._stored(key))

    def is_lazy(self, key: str) -> bool:
        """Whether ``obsm[key]`` is still on disk / lazy.

        Parameters
        ----------
        key : str
            An obsm key.

        Returns
        -------
        bool
            True while ``obsm[key]`` has not been read into memory.
        """
        return is_lazy(self._stored(key))

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``obsm[key]`` without reading it.

        Parameters
        ----------
        key : str
            An obsm key.

        Returns
        -------
        tuple of int
            (N, ...).
        """
        return tuple(int(s) for s in self._stored(key).shape)

    def take(self, positions: np.ndarray) -> AlignedArrays:
        """The rows at the given positions.

        Parameters
        ----------
        positions : numpy.ndarray of int, shape (M,)
            Row positions, in the order wanted.

        Returns
        -------
        AlignedArrays
            M rows per array; lazy arrays stay lazy (dask indexing).
        """
        out = AlignedArrays(len(positions))
        for key, value in self._data.items():
            if is_lazy(value):
                out._data[key] = to_dask(value)[positions]
            else:
                out._data[key] = value[positions]
        return out
