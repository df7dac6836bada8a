"""Cryo-ET augmentations as MONAI-style dictionary transforms (SPEC §3).

All transforms act on channel-first arrays ``(C, Z, Y, X)`` (numpy or torch),
intensities normalised to [0, 1] with protein bright. Every random transform is
a MONAI :class:`~monai.transforms.Randomizable`; seed a whole pipeline with
``pipeline.set_random_state(seed)``.

Intensity views (self-supervised pretraining):

* :class:`RandGaussianNoiseRenormd` — additive Gaussian noise, σ ∈ [0.1, 0.5],
  then min-max renormalisation to [0, 1];
* :class:`RandLowPassd` — Gaussian blur, σ ∈ [0.5, 2] voxels;
* :class:`RandHighPassd` — difference of Gaussians G(σ1) − G(σ2),
  σ1 ∈ [0.1, 0.5], σ2 ∈ [1, 1.5] voxels, renormalised to [0, 1];
* :class:`RandVoxelMaskd` — an independent random 10–50 % of voxels set to 0;
* :func:`ssl_view_transform` — one of {low-pass, high-pass, noise, all
  combined, identity} per view, then voxel masking.

Geometry:

* :class:`RandOverlappingCropPaird` — two overlapping crops of one region, each
  with its box in region coordinates (for the overlap-only dense loss);
* :class:`RandUniformRotateTranslated` and :func:`subtomo_view_transform` —
  subtomogram views (rotation uniform on SO(3), translation ≤ 10 voxels, random
  crop removing ≤ 20 % of each side, resized back);
* :func:`finetune_geometric_transform` — flips, 90° rotations and a small
  affine, applied identically to image and labels (labels: nearest neighbour,
  cast back to integers).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Affine,
    Compose,
    GaussianSmooth,
    Identityd,
    MapTransform,
    OneOf,
    RandAffined,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleCropd,
    Resized,
)
from scipy.spatial.transform import Rotation

from cryosiam_nb.io import InputError

__all__ = [
    "RandGaussianNoiseRenormd",
    "RandLowPassd",
    "RandHighPassd",
    "RandVoxelMaskd",
    "RandOverlappingCropPaird",
    "RandUniformRotateTranslated",
    "ToPlainTensord",
    "ssl_view_transform",
    "subtomo_view_transform",
    "finetune_geometric_transform",
    "overlap_slices",
    "box_overlap",
]


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain float32 torch tensor (MetaTensor stripped)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


def _like(out: torch.Tensor, ref: Any) -> Any:
    """Return ``out`` as the same array type as ``ref`` (numpy in → numpy out)."""
    if isinstance(ref, np.ndarray):
        return out.numpy().astype(np.float32, copy=False)
    return out


def _renorm(x: torch.Tensor) -> torch.Tensor:
    """Min-max rescale to [0, 1] (a constant array becomes zeros)."""
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= 1e-12:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _check_range(name: str, rng: Sequence[float], lo: float = 0.0) -> tuple[float, float]:
    if len(rng) != 2 or not rng[0] <= rng[1] or rng[0] < lo:
        raise ValueError(f"{name} must be a (low, high) pair with {lo} <= low <= high, got {rng!r}")
    return float(rng[0]), float(rng[1])


class _RandIntensityd(RandomizableTransform, MapTransform):
    """Base: draw one parameter set per call, apply it to every key."""

    def __init__(self, keys: Any, prob: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.params: dict[str, float] = {}

    def _draw(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.params = self._draw()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = _like(self._apply(_as_tensor(d[key])), d[key])
        return d


class RandGaussianNoiseRenormd(_RandIntensityd):
    """Add Gaussian noise with σ ~ U(``sigma_range``) (data units, data in [0, 1]),
    then rescale to [0, 1]. The drawn σ is in ``self.params["sigma"]``."""

    def __init__(
        self,
        keys: Any,
        sigma_range: Sequence[float] = (0.1, 0.5),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma_range = _check_range("sigma_range", sigma_range)

    def _draw(self) -> dict[str, float]:
        return {
            "sigma": float(self.R.uniform(*self.sigma_range)),
            "seed": int(self.R.randint(0, 2**31 - 1)),
        }

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(self.params["seed"]))
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        return _renorm(x + self.params["sigma"] * noise.to(x.device))


class RandLowPassd(_RandIntensityd):
    """Isotropic Gaussian low-pass with σ ~ U(``sigma_range``) voxels (MONAI GaussianSmooth)."""

    def __init__(
        self,
        keys: Any,
        sigma_range: Sequence[float] = (0.5, 2.0),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma_range = _check_range("sigma_range", sigma_range)

    def _draw(self) -> dict[str, float]:
        return {"sigma": float(self.R.uniform(*self.sigma_range))}

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return _as_tensor(GaussianSmooth(sigma=self.params["sigma"])(x))


class RandHighPassd(_RandIntensityd):
    """Difference-of-Gaussians high-pass G(σ1) − G(σ2), σ in voxels, renormalised to [0, 1].

    Defaults follow the thesis (σ1 ∈ [0.1, 0.5], σ2 ∈ [1, 1.5]); the public release
    used σ2 ∈ [4, 5]."""

    def __init__(
        self,
        keys: Any,
        sigma1_range: Sequence[float] = (0.1, 0.5),
        sigma2_range: Sequence[float] = (1.0, 1.5),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma1_range = _check_range("sigma1_range", sigma1_range)
        self.sigma2_range = _check_range("sigma2_range", sigma2_range)
        if self.sigma1_range[1] > self.sigma2_range[0]:
            raise ValueError(
                f"sigma1_range {sigma1_range!r} must lie below sigma2_range {sigma2_range!r}"
            )

    def _draw(self) -> dict[str, float]:
        return {
            "sigma1": float(self.R.uniform(*self.sigma1_range)),
            "sigma2": float(self.R.uniform(*self.sigma2_range)),
        }

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        g1 = _as_tensor(GaussianSmooth(sigma=self.params["sigma1"])(x))
        g2 = _as_tensor(GaussianSmooth(sigma=self.params["sigma2"])(x))
        return _renorm(g1 - g2)


class RandVoxelMaskd(_RandIntensityd):
    """Set a random fraction f ~ U(``fraction_range``) of voxels to ``fill`` (default 0).

    Each call draws a new, independent mask (so the two SSL views are masked
    independently). The drawn fraction is in ``self.params["fraction"]``."""

    def __init__(
        self,
        keys: Any,
        fraction_range: Sequence[float] = (0.1, 0.5),
        fill: float = 0.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        self.fraction_range = _check_range("fraction_range", fraction_range)
        if self.fraction_range[1] > 1.0:
            raise ValueError(f"fraction_range must lie in [0, 1], got {fraction_range!r}")
        self.fill = float(fill)

    def _draw(self) -> dict[str, float]:
        return {
            "fraction": float(self.R.uniform(*self.fraction_range)),
            "seed": int(self.R.randint(0, 2**31 - 1)),
        }

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(self.params["seed"]))
        # one mask per voxel, shared over channels
        keep = torch.rand(x.shape[1:], generator=gen) >= self.params["fraction"]
        out = x.clone()
        out[:, ~keep.to(x.device)] = self.fill
        return out


def ssl_view_transform(
    keys: Any = "image",
    noise_sigma: Sequence[float] = (0.1, 0.5),
    lowpass_sigma: Sequence[float] = (0.5, 2.0),
    highpass_sigma1: Sequence[float] = (0.1, 0.5),
    highpass_sigma2: Sequence[float] = (1.0, 1.5),
    mask_fraction: Sequence[float] | None = (0.1, 0.5),
    weights: Sequence[float] | None = None,
) -> Compose:
    """One SSL view (SPEC §3): one of {low-pass, high-pass, noise, all combined,
    identity} (``weights`` in that order, default equal), then voxel masking
    (``mask_fraction=None`` disables it). Seed with ``.set_random_state(seed)``."""
    low = RandLowPassd(keys, lowpass_sigma)
    high = RandHighPassd(keys, highpass_sigma1, highpass_sigma2)
    noise = RandGaussianNoiseRenormd(keys, noise_sigma)
    combined = Compose(
        [
            RandLowPassd(keys, lowpass_sigma),
            RandHighPassd(keys, highpass_sigma1, highpass_sigma2),
            RandGaussianNoiseRenormd(keys, noise_sigma),
        ]
    )
    choice = OneOf([low, high, noise, combined, Identityd(keys)], weights=weights)
    steps: list[Any] = [choice]
    if mask_fraction is not None:
        steps.append(RandVoxelMaskd(keys, mask_fraction))
    return Compose(steps)


def box_overlap(box1: np.ndarray, box2: np.ndarray) -> np.ndarray | None:
    """Intersection of two boxes ``[[z0, z1], [y0, y1], [x0, x1]]`` (half-open, voxels);
    ``None`` when they do not overlap."""
    b1, b2 = np.asarray(box1), np.asarray(box2)
    lo = np.maximum(b1[:, 0], b2[:, 0])
    hi = np.minimum(b1[:, 1], b2[:, 1])
    if np.any(hi <= lo):
        return None
    return np.stack([lo, hi], axis=1)


def overlap_slices(
    box1: np.ndarray | Sequence[Sequence[int]],
    box2: np.ndarray | Sequence[Sequence[int]],
    *,
    factor: int = 1,
    shape1: Sequence[int] | None = None,
    shape2: Sequence[int] | None = None,
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (z, y, x) selecting the shared voxels inside view 1 and inside view 2.

    The one definition used by the crop-pair transform and by the DenseSimSiam loss
    (:func:`cryosiam_nb.models.losses.dense_simsiam_loss`).

    Parameters
    ----------
    box1, box2
        Where each view was cropped, in voxels of the shared region, as
        ``[[z0, z1], [y0, y1], [x0, x1]]`` (end exclusive) — the layout of the
        ``box_1``/``box_2`` entries of :class:`RandOverlappingCropPaird`.
    factor
        Resolution of the maps the slices index: map voxel ``j`` of a view at level
        ``factor`` covers region voxels ``start + factor·j … start + factor·(j+1) − 1``.
        The overlap is shrunk to the map voxels lying entirely inside it; both views get
        the same number of voxels (exact correspondence when the crop offsets are
        multiples of ``factor``).
    shape1, shape2
        Spatial shapes of the two maps; the slices are clipped to them.

    Returns
    -------
    tuple of tuple of slice
        ``(slices into view 1, slices into view 2)``, three slices each.

    Raises
    ------
    InputError
        (a ``ValueError``) when the boxes do not overlap at this level.
    """
    a, b = np.asarray(box1, dtype=np.int64), np.asarray(box2, dtype=np.int64)
    if a.shape != (3, 2) or b.shape != (3, 2):
        raise InputError(
            f"boxes: expected [[z0, z1], [y0, y1], [x0, x1]], got shapes {a.shape}, {b.shape}"
        )
    f = int(factor)
    lo, hi = np.maximum(a[:, 0], b[:, 0]), np.minimum(a[:, 1], b[:, 1])
    s1, s2 = [], []
    for ax in range(3):
        st1 = -(-(lo[ax] - a[ax, 0]) // f)  # ceil
        st2 = -(-(lo[ax] - b[ax, 0]) // f)
        n = min((hi[ax] - a[ax, 0]) // f - st1, (hi[ax] - b[ax, 0]) // f - st2)
        if shape1 is not None:
            n = min(n, shape1[ax] - st1)
        if shape2 is not None:
            n = min(n, shape2[ax] - st2)
        if n <= 0:
            raise InputError(f"boxes {a.tolist()} and {b.tolist()} do not overlap at level {f}")
        s1.append(slice(int(st1), int(st1 + n)))
        s2.append(slice(int(st2), int(st2 + n)))
    return tuple(s1), tuple(s2)


class RandOverlappingCropPaird(RandomizableTransform, MapTransform):
    """Two overlapping crops of size ``crop_size`` (voxels, z y x) from a region.

    For each key ``k`` writes ``k + "_1"`` and ``k + "_2"`` (the crops) and
    ``"box_1"``, ``"box_2"``: int arrays ``[[z0, z1], [y0, y1], [x0, x1]]`` in
    region coordinates. Along every axis the two crops share at least
    ``min_overlap`` × crop size voxels. The first crop's corner is uniform; the
    second is shifted by a uniform offset within the allowed range."""

    def __init__(
        self,
        keys: Any,
        crop_size: Sequence[int] | int,
        min_overlap: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        cs = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        if len(cs) != 3 or min(cs) < 1:
            raise ValueError(f"crop_size must be 3 positive ints (z, y, x), got {crop_size!r}")
        if not 0.0 < min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap!r}")
        self.crop_size = cs
        self.min_overlap = float(min_overlap)
        self.boxes: tuple[np.ndarray, np.ndarray] | None = None

    def randomize(self, data: Any = None) -> None:
        shape = tuple(int(s) for s in data)
        for s, c in zip(shape, self.crop_size):
            if s < c:
                raise ValueError(f"region shape {shape} is smaller than crop_size {self.crop_size}")
        b1, b2 = [], []
        for s, c in zip(shape, self.crop_size):
            a = int(self.R.randint(0, s - c + 1))
            max_shift = c - int(np.ceil(self.min_overlap * c))
            lo, hi = max(0, a - max_shift), min(s - c, a + max_shift)
            b = int(self.R.randint(lo, hi + 1))
            b1.append((a, a + c))
            b2.append((b, b + c))
        self.boxes = (np.array(b1, dtype=np.int64), np.array(b2, dtype=np.int64))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(np.asarray(d[keys[0]].shape[1:]))
        assert self.boxes is not None
        for key in keys:
            for i, box in enumerate(self.boxes, start=1):
                sl = tuple(slice(int(lo), int(hi)) for lo, hi in box)
                d[f"{key}_{i}"] = d[key][(slice(None), *sl)]
        d["box_1"], d["box_2"] = self.boxes[0].copy(), self.boxes[1].copy()
        return d


class RandUniformRotateTranslated(RandomizableTransform, MapTransform):
    """Rotation drawn uniformly on SO(3) (all angles 0–360°) plus a translation
    uniform in [−``max_translation``, ``max_translation``] voxels per axis, about
    the volume centre (MONAI :class:`~monai.transforms.Affine`). ``mode`` may be a
    sequence, one per key (``"nearest"`` for labels)."""

    def __init__(
        self,
        keys: Any,
        max_translation: float = 10.0,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str = "zeros",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if max_translation < 0:
            raise ValueError(f"max_translation must be >= 0 voxels, got {max_translation!r}")
        self.max_translation = float(max_translation)
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        self.padding_mode = padding_mode
        self.matrix: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        rot = Rotation.random(random_state=int(self.R.randint(0, 2**31 - 1))).as_matrix()
        shift = self.R.uniform(-self.max_translation, self.max_translation, size=3)
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = shift
        self.matrix = m

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key, mode in zip(self.key_iterator(d), self.mode):
            aff = Affine(
                affine=torch.as_tensor(self.matrix, dtype=torch.float32),
                mode=mode,
                padding_mode=self.padding_mode,
                image_only=True,
            )
            out = _as_tensor(aff(_as_tensor(d[key])))
            d[key] = _like(out, d[key])
        return d


class ToPlainTensord(MapTransform):
    """Convert keys to plain ``torch.Tensor`` (MONAI MetaTensor stripped), given dtype."""

    def __init__(self, keys: Any, dtype: torch.dtype = torch.float32, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if hasattr(x, "as_tensor"):
                x = x.as_tensor()
            t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
            if not self.dtype.is_floating_point and t.is_floating_point():
                t = torch.round(t)
            d[key] = t.to(self.dtype)
        return d


def subtomo_view_transform(
    box: int,
    keys: Any = "image",
    max_translation: float = 10.0,
    max_crop_removed: float = 0.2,
    intensity: bool = True,
    mask_fraction: Sequence[float] | None = None,
) -> Compose:
    """One SimSiam view of a subtomogram ``(1, box, box, box)`` (SPEC §3):
    uniform random rotation, translation ≤ ``max_translation`` voxels, a random
    crop removing ≤ ``max_crop_removed`` of each side (resized back to ``box``),
    then (``intensity=True``) one of the intensity views of :func:`ssl_view_transform`."""
    if not 0.0 <= max_crop_removed < 1.0:
        raise ValueError(f"max_crop_removed must be in [0, 1), got {max_crop_removed!r}")
    steps: list[Any] = [
        RandUniformRotateTranslated(keys, max_translation=max_translation),
        RandScaleCropd(keys, roi_scale=1.0 - max_crop_removed, max_roi_scale=1.0, random_size=True),
        Resized(keys, spatial_size=(box, box, box), mode="trilinear"),
    ]
    if intensity:
        steps.append(ssl_view_transform(keys, mask_fraction=mask_fraction))
    steps.append(ToPlainTensord(keys))
    return Compose(steps)


def finetune_geometric_transform(
    image_keys: Any = "image",
    label_keys: Any = "label",
    prob: float = 0.5,
    affine_prob: float = 0.3,
    rotate_deg: float = 15.0,
    scale: float = 0.1,
) -> Compose:
    """Geometric fine-tuning augmentation applied identically to images and labels:
    random flips along z, y, x, random 90° rotations in each plane, and (with
    ``affine_prob``) a small affine (rotation ±``rotate_deg``°, scale ±``scale``).
    Images are interpolated bilinearly, labels with nearest neighbour and cast
    back to int64; both use reflection padding so they stay aligned."""
    ik = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    lk = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    keys = ik + lk
    modes = ["bilinear"] * len(ik) + ["nearest"] * len(lk)
    rad = np.deg2rad(rotate_deg)
    steps: list[Any] = [RandFlipd(keys, prob=prob, spatial_axis=a) for a in range(3)]
    steps += [
        RandRotate90d(keys, prob=prob, max_k=3, spatial_axes=axes)
        for axes in ((0, 1), (0, 2), (1, 2))
    ]
    if affine_prob > 0:
        steps.append(
            RandAffined(
                keys,
                prob=affine_prob,
                rotate_range=(rad, rad, rad),
                scale_range=(scale, scale, scale),
                mode=modes,
                padding_mode="reflection",
            )
        )
    steps.append(ToPlainTensord(ik))
    if lk:
        steps.append(ToPlainTensord(lk, dtype=torch.int64))
    return Compose(steps)
