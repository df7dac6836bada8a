"""Preprocessing (scanpy-style ``pp``): contrast inversion, percentile normalisation, rescaling.

Everything here is lazy and chunked: a tomogram larger than RAM is normalised with a
few streaming passes (fixed-bin histograms), never by loading it whole.
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from cryosiam_nb.io import DIMS, InputError, as_dataarray

__all__ = ["normalize", "percentiles", "rescale"]

_BINS = 65536
_FINE_BINS = 4096


def _source(data: xr.DataArray) -> str:
    return str(data.attrs.get("source", data.name or "volume"))


def _hist_block(block: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    b = block[np.isfinite(block)].astype(np.float64)
    h, _ = np.histogram(b, bins=bins, range=(lo, hi))
    # Values exactly at / beyond the range edges go to the outer bins by np.histogram's
    # rules only when inside; count the ones below / above separately.
    below = np.count_nonzero(b < lo)
    above = np.count_nonzero(b > hi)
    return np.concatenate([[below], h, [above]]).astype(np.int64)[None, None, None, :]


def _histogram(x: da.Array, lo: float, hi: float, bins: int) -> da.Array:
    parts = x.map_blocks(
        _hist_block,
        lo,
        hi,
        bins,
        dtype=np.int64,
        new_axis=3,
        chunks=tuple((1,) * n for n in x.numblocks) + ((bins + 2,),),
    )
    return parts.sum(axis=(0, 1, 2))


def percentiles(
    data: xr.DataArray | Any, q: tuple[float, ...] = (0.1, 99.9), bins: int = _BINS
) -> tuple[float, ...]:
    """Out-of-core percentiles (in %) of the finite voxels, by two fixed-bin histogram passes.

    Pass 1 finds min/max and counts non-finite voxels; pass 2 histograms into ``bins``
    bins; pass 3 re-histograms inside the bin that holds each requested rank, giving a
    resolution of (max − min) / bins² — far below 1e-3 of the clipped range in practice.
    Uses numpy's "linear" definition (rank = q/100 · (n − 1)).

    Parameters
    ----------
    data
        Volume (z, y, x): ``DataArray``, numpy or dask array. Dask computes here (three
        streaming passes, one chunk in memory at a time).
    q
        Percentiles in % (0–100).
    bins
        Histogram bins of the second pass.

    Returns
    -------
    tuple of float
        One value per ``q``, in the volume's intensity units.
    """
    arr = as_dataarray(data)
    x = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
    x = x.astype(np.float32)
    finite = da.isfinite(x)
    vmin, vmax, n = dask.compute(
        da.where(finite, x, np.inf).min(), da.where(finite, x, -np.inf).max(), finite.sum()
    )
    n = int(n)
    if n == 0:
        raise InputError(f"{_source(arr)}: the volume holds no finite values (all NaN or Inf)")
    vmin, vmax = float(vmin), float(vmax)
    if vmax == vmin:
        return tuple(vmin for _ in q)
    counts = _histogram(x, vmin, vmax, bins).compute()[1:-1]
    width = (vmax - vmin) / bins
    # For each requested rank we need the values at floor(rank) and floor(rank)+1.
    wanted: list[int] = []
    for qq in q:
        r = qq / 100.0 * (n - 1)
        wanted += [int(math.floor(r)), min(int(math.floor(r)) + 1, n - 1)]
    cum = np.cumsum(counts)
    bin_of = {k: int(np.searchsorted(cum, k, side="right")) for k in set(wanted)}
    # Refine: histogram again inside each bin of interest.
    refine = sorted(set(bin_of.values()))
    graphs = [
        _histogram(x, vmin + b * width, vmin + (b + 1) * width, _FINE_BINS)[1:-1] for b in refine
    ]
    fine = dict(zip(refine, dask.compute(*graphs)))
    value: dict[int, float] = {}
    for k, b in bin_of.items():
        before = int(cum[b - 1]) if b > 0 else 0
        sub = np.cumsum(fine[b])
        j = int(np.searchsorted(sub, k - before, side="right"))
        j = min(j, _FINE_BINS - 1)
        value[k] = vmin + b * width + (j + 0.5) * width / _FINE_BINS
    out = []
    for qq in q:
        r = qq / 100.0 * (n - 1)
        k0 = int(math.floor(r))
        k1 = min(k0 + 1, n - 1)
        out.append(value[k0] + (r - k0) * (value[k1] - value[k0]))
    return tuple(float(v) for v in out)


def normalize(
    data: xr.DataArray | Any,
    invert: bool = True,
    lower: float = 0.1,
    upper: float = 99.9,
    nonfinite: str = "raise",
) -> xr.DataArray:
    """Invert contrast (optional), clip at percentiles, scale to [0, 1]; lazy, out of core.

    Parameters
    ----------
    data
        Tomogram (z, y, x). Raw cryo-ET has dark protein on bright ice.
    invert
        Multiply by −1 first so protein is bright, as the models expect. Default ``True``
        for raw data; pass ``False`` for volumes that are already protein-bright (e.g.
        the simulator's ``noisy`` output or a denoised volume).
    lower, upper
        Clipping percentiles in % (SPEC: 0.1 and 99.9), computed out of core.
    nonfinite
        ``"raise"`` (default): NaN/Inf voxels are an :class:`InputError`;
        ``"fill"``: they become 0 after scaling.

    Returns a float32 DataArray on the same grid with ``attrs["normalization"]``
    recording the clip values (in input units) and the inversion.
    """
    arr = as_dataarray(data)
    if not 0 <= lower < upper <= 100:
        raise InputError(f"normalize: need 0 <= lower < upper <= 100, got {lower}, {upper}")
    if nonfinite not in {"raise", "fill"}:
        raise InputError(f"normalize: nonfinite must be 'raise' or 'fill', got {nonfinite!r}")
    x = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
    x = x.astype(np.float32)
    if invert:
        x = -x
    if nonfinite == "raise":
        bad = int(da.count_nonzero(~da.isfinite(x)).compute())
        if bad:
            raise InputError(
                f"{_source(arr)}: {bad} voxels are NaN or Inf; clean the volume or pass "
                "nonfinite='fill' to set them to 0"
            )
    lo, hi = percentiles(x, (lower, upper))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    y = da.clip((x - np.float32(lo)) * np.float32(scale), 0.0, 1.0)
    if nonfinite == "fill":
        y = da.where(da.isfinite(y), y, np.float32(0.0))
    out = xr.DataArray(
        y.astype(np.float32), dims=arr.dims, coords=arr.coords, name=arr.name, attrs=dict(arr.attrs)
    )
    out.attrs["normalization"] = {
        "invert": bool(invert),
        "lower_percentile": lower,
        "upper_percentile": upper,
        "clip_low": lo if not invert else -lo,
        "clip_high": hi if not invert else -hi,
    }
    return out


def rescale(
    data: xr.DataArray | Any,
    voxel_size: float,
    order: int = 1,
    chunks: tuple[int, int, int] | None = None,
) -> xr.DataArray:
    """Resample a tomogram to ``voxel_size`` Å per voxel, chunk by chunk.

    Down-sampling applies a Gaussian anti-alias filter (σ = (factor − 1) / 2 voxels of
    the input) before interpolation (spline ``order``, default linear). Each output
    chunk reads only the input slab it needs (plus a halo), so memory stays bounded.
    The physical extent is kept: output shape = round(input shape · old / new).

    Parameters
    ----------
    data
        Tomogram ``DataArray`` (z, y, x) carrying ``attrs["voxel_size"]`` (Å).
    voxel_size
        Target voxel size in Å.
    order
        Spline order of the interpolation (0 nearest, 1 linear, 3 cubic).
    chunks
        Output chunks in voxels (z, y, x); default up to 128³.

    Returns
    -------
    xarray.DataArray
        Lazy (dask) float32 volume on the new grid: ``attrs["voxel_size"]`` = ``voxel_size``,
        ``attrs["rescaled_from"]`` = the old one (Å), coordinates ``index * voxel_size``
        (Å). Nothing is computed until used.
    """
    arr = as_dataarray(data)
    old = float(arr.attrs.get("voxel_size", 0) or 0)
    if old <= 0:
        raise InputError(f"{_source(arr)}: rescale needs attrs['voxel_size'] (Å) on the input")
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise InputError(f"rescale: target voxel_size must be positive Å, got {voxel_size!r}")
    factor = float(voxel_size) / old  # >1: fewer, bigger voxels
    src = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
    src = src.astype(np.float32)
    out_shape = tuple(max(1, int(round(s / factor))) for s in src.shape)
    if chunks is None:
        chunks = tuple(min(128, s) for s in out_shape)
    sigma = max(0.0, (factor - 1.0) / 2.0)
    halo = int(math.ceil(4 * sigma)) + order + 2

    out_chunks = da.core.normalize_chunks(chunks, out_shape)
    starts = [np.cumsum((0,) + c) for c in out_chunks]
    blocks = np.empty(tuple(len(c) for c in out_chunks), dtype=object)
    for idx in np.ndindex(blocks.shape):
        o0 = [int(starts[a][i]) for a, i in enumerate(idx)]
        o1 = [int(starts[a][i + 1]) for a, i in enumerate(idx)]
        # Input coordinate of output voxel j: (j + 0.5) * factor - 0.5 (voxel centres align).
        i0 = [max(0, int(math.floor((a + 0.5) * factor - 0.5)) - halo) for a in o0]
        i1 = [
            min(s, int(math.ceil((b - 1 + 0.5) * factor - 0.5)) + halo + 1)
            for b, s in zip(o1, src.shape)
        ]
        slab = src[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]]
        blk = dask.delayed(_resample_block)(slab, o0, o1, i0, factor, sigma, order)
        blocks[idx] = da.from_delayed(
            blk, shape=tuple(b - a for a, b in zip(o0, o1)), dtype=np.float32
        )
    out = da.block(blocks.tolist())
    res = xr.DataArray(out, dims=DIMS, name=arr.name, attrs=dict(arr.attrs))
    res.attrs["rescaled_from"] = old
    # Same coordinate convention as io.read (index * voxel size, Å): one carrier, one rule.
    return as_dataarray(res, voxel_size=float(voxel_size))


def _resample_block(
    slab: np.ndarray,
    o0: list[int],
    o1: list[int],
    i0: list[int],
    factor: float,
    sigma: float,
    order: int,
) -> np.ndarray:
    slab = np.asarray(slab, dtype=np.float32)
    if sigma > 0:
        slab = ndimage.gaussian_filter(slab, sigma, mode="nearest")
    grids = [
        (np.arange(a, b, dtype=np.float64) + 0.5) * factor - 0.5 - off
        for a, b, off in zip(o0, o1, i0)
    ]
    coords = np.meshgrid(*grids, indexing="ij")
    return ndimage.map_coordinates(slab, coords, order=order, mode="nearest").astype(np.float32)
