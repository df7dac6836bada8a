"""Gallery thumbnails: central xy / xz views of a subtomogram box as PNG data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["thumbnail_png", "central_views"]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """1–99 % percentile contrast stretch to uint8 (NaN → the low percentile)."""
    img = np.asarray(img, dtype=np.float32)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(finite, [1, 99])
    if hi <= lo:
        hi = lo + 1e-6
    out = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0, 1)
    return (out * 255).astype(np.uint8)


def thumbnail_png(img: np.ndarray, size: int = 72) -> str:
    """A 2-D image as a PNG data URI.

    Parameters
    ----------
    img
        (rows, cols) image, any real dtype.
    size
        Edge of the square thumbnail in pixels (nearest-neighbour resize).

    Returns
    -------
    str
        ``"data:image/png;base64,..."`` of an 8-bit greyscale image with 1–99 % contrast.
    """
    im = Image.fromarray(_to_uint8(img), mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def central_views(sub: np.ndarray, slab: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Central xy and xz views of a (B, B, B) box (axis order z, y, x).

    Parameters
    ----------
    sub
        The box.
    slab
        Half thickness in voxels: xy is the mean over z = c ± slab, xz the mean over
        y = c ± slab, with c = B // 2.

    Returns
    -------
    tuple of numpy.ndarray
        ``(xy, xz)``: (y, x) and (z, x) images.
    """
    b = sub.shape[0]
    c = b // 2
    lo, hi = max(0, c - slab), min(b, c + slab + 1)
    return sub[lo:hi].mean(0), sub[:, lo:hi, :].mean(1)
