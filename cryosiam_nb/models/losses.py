"""Losses of the CryoSiam method (SPEC §2) and the targets they need.

Self-supervision
    :func:`negative_cosine` (stop-gradient on ``z``), :func:`simsiam_loss` (symmetric),
    :func:`dense_simsiam_loss` (``L = L_global + L_dense + L_level``; dense and level terms
    only over the overlap of the two views).
Fine-tuning
    :class:`SemanticLoss` (CE + generalised Dice + MSE on ``tanh(distance)``),
    :class:`InstanceLoss` (BCE foreground + BCE boundary + MSE distance),
    :class:`DenoiseLoss` (MSE, or L1 + SSIM), :func:`contrastive_loss` with
    :func:`contrastive_pairs` (hard negatives of the same size category).
Targets
    :func:`distance_targets` (per-class signed distances), :func:`instance_targets`.

Tensors are ``(N, C, Z, Y, X)``; label volumes ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)``.
Distances are in voxels, clipped to ±``clip`` and divided by ``clip`` (range ±1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss, SSIMLoss
from scipy import ndimage
from torch import nn

from ._compat import InputError

__all__ = [
    "negative_cosine",
    "simsiam_loss",
    "dense_simsiam_loss",
    "overlap_slices",
    "SemanticLoss",
    "InstanceLoss",
    "DenoiseLoss",
    "contrastive_loss",
    "contrastive_pairs",
    "distance_targets",
    "instance_targets",
]


# ============================================================================ SimSiam
def negative_cosine(p: torch.Tensor, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean of ``−cos(p, stopgrad(z))`` along ``dim`` (−1 when they point the same way)."""
    return -(F.normalize(p, dim=dim) * F.normalize(z.detach(), dim=dim)).sum(dim).mean()


def simsiam_loss(
    out1: Mapping[str, torch.Tensor], out2: Mapping[str, torch.Tensor], key: str = ""
) -> torch.Tensor:
    """Symmetric SimSiam loss ``½ D(p1, z2) + ½ D(p2, z1)`` of two views' outputs.

    ``out*`` hold ``{key}p`` and ``{key}z`` (``model.ssl_forward`` of a subtomo_ssl model
    gives ``p``/``z``; ``key="global_"`` reads a dense model's global pair).
    """
    p1, z1, p2, z2 = out1[f"{key}p"], out1[f"{key}z"], out2[f"{key}p"], out2[f"{key}z"]
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def _boxes(box: Any, n: int, name: str) -> np.ndarray:
    """Boxes → int array (n, 2, 3): [[z0, y0, x0], [z1, y1, x1]] (end exclusive)."""
    b = box.detach().cpu().numpy() if isinstance(box, torch.Tensor) else np.asarray(box)
    b = b.astype(np.int64)
    if b.shape[-2:] == (3, 2):  # [[z0, z1], [y0, y1], [x0, x1]]
        b = np.swapaxes(b, -1, -2)
    elif b.shape[-1] == 6:  # (z0, y0, x0, z1, y1, x1)
        b = b.reshape(*b.shape[:-1], 2, 3)
    else:
        raise InputError(
            f"{name}: shape {b.shape}; expected (6,) / (N, 6) as (z0, y0, x0, z1, y1, x1) "
            "or (3, 2) / (N, 3, 2) as [[z0, z1], [y0, y1], [x0, x1]]"
        )
    if b.ndim == 2:
        b = np.broadcast_to(b, (n, 2, 3))
    if b.shape[0] != n:
        raise InputError(f"{name}: {b.shape[0]} boxes for a batch of {n}")
    if np.any(b[:, 1] <= b[:, 0]):
        raise InputError(f"{name}: every box needs end > start on each axis, got {b.tolist()}")
    return b


def overlap_slices(
    box1: Sequence[int] | np.ndarray,
    box2: Sequence[int] | np.ndarray,
    factor: int = 1,
    shape1: Sequence[int] | None = None,
    shape2: Sequence[int] | None = None,
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of the two views' maps at ``1/factor`` resolution covering their overlap.

    Boxes are ``[[z0, y0, x0], [z1, y1, x1]]`` (end exclusive) in voxels of the shared
    region the views were cropped from. Map voxel ``j`` of a view at level ``f`` covers
    region voxels ``start + f·j … start + f·(j+1) − 1``; the overlap box is shrunk to the map
    voxels lying entirely inside it (the box halves at L2, quarters at L4 …). Both views
    get the same number of voxels; the correspondence is exact when the crop offsets are
    multiples of ``factor``. ``None`` when the views do not overlap at this level.
    """
    a, b = np.asarray(box1), np.asarray(box2)
    lo, hi = np.maximum(a[0], b[0]), np.minimum(a[1], b[1])
    s1, s2 = [], []
    for ax in range(3):
        st1 = -(-(lo[ax] - a[0][ax]) // factor)  # ceil
        st2 = -(-(lo[ax] - b[0][ax]) // factor)
        n = min((hi[ax] - a[0][ax]) // factor - st1, (hi[ax] - b[0][ax]) // factor - st2)
        if shape1 is not None:
            n = min(n, shape1[ax] - st1)
        if shape2 is not None:
            n = min(n, shape2[ax] - st2)
        if n <= 0:
            return None
        s1.append(slice(int(st1), int(st1 + n)))
        s2.append(slice(int(st2), int(st2 + n)))
    return tuple(s1), tuple(s2)


def _dense_term(
    p1: torch.Tensor,
    z1: torch.Tensor,
    p2: torch.Tensor,
    z2: torch.Tensor,
    b1: np.ndarray | None,
    b2: np.ndarray | None,
    factor: int,
) -> torch.Tensor:
    if b1 is None:
        if p1.shape != p2.shape:
            raise InputError(
                f"views of shapes {tuple(p1.shape)} and {tuple(p2.shape)} need box1/box2"
            )
        return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
    terms = []
    for i in range(p1.shape[0]):
        sl = overlap_slices(b1[i], b2[i], factor, p1.shape[2:], p2.shape[2:])
        if sl is None:
            raise InputError(
                f"sample {i}: views {b1[i].tolist()} and {b2[i].tolist()} do not overlap at "
                f"level {factor}"
            )
        s1, s2 = (slice(None), *sl[0]), (slice(None), *sl[1])
        d = negative_cosine(p1[i][s1], z2[i][s2], dim=0) + negative_cosine(
            p2[i][s2], z1[i][s1], dim=0
        )
        terms.append(0.5 * d)
    return torch.stack(terms).mean()


def dense_simsiam_loss(
    out1: Mapping[str, torch.Tensor],
    out2: Mapping[str, torch.Tensor],
    box1: Any = None,
    box2: Any = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """DenseSimSiam loss ``L = L_global + L_dense + Σ_f L_level f`` (SPEC §2, eq. 1–7).

    ``out1``/``out2``: ``model.ssl_forward(view1, view2)``. ``box1``/``box2``: where each
    view was cropped in the shared region, voxels, end exclusive — ``(z0, y0, x0, z1, y1,
    x1)`` or ``[[z0, z1], [y0, y1], [x0, x1]]``, one per batch or one per sample. The dense
    and level terms use only the overlapping voxels (see :func:`overlap_slices`); without
    boxes the two views must be aligned and equally sized. ``weights`` scales terms by name.
    Returns ``{"loss", "global", "dense", "level2", ...}``; each term is −1 at best.
    """
    n = out1["dense_p"].shape[0]
    if (box1 is None) != (box2 is None):
        raise InputError("dense_simsiam_loss: give both box1 and box2, or neither")
    b1 = None if box1 is None else _boxes(box1, n, "box1")
    b2 = None if box2 is None else _boxes(box2, n, "box2")
    terms = {"global": simsiam_loss(out1, out2, key="global_")}
    terms["dense"] = _dense_term(
        out1["dense_p"], out1["dense_z"], out2["dense_p"], out2["dense_z"], b1, b2, 1
    )
    for key in sorted(k for k in out1 if k.startswith("level") and k.endswith("_z")):
        name = key[: -len("_z")]
        f = int(name[len("level") :])
        terms[name] = _dense_term(
            out1[f"{name}_p"], out1[key], out2[f"{name}_p"], out2[key], b1, b2, f
        )
    w = dict(weights or {})
    unknown = set(w) - set(terms)
    if unknown:
        raise InputError(f"weights: unknown term(s) {sorted(unknown)}; terms: {sorted(terms)}")
    total = sum(w.get(k, 1.0) * v for k, v in terms.items())
    return {"loss": total, **terms}


# ============================================================================ targets
def _signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """Signed Euclidean distance in voxels (+ inside, − outside), clipped, divided by clip."""
    if mask.all():
        return np.ones(mask.shape, np.float32)
    if not mask.any():
        return -np.ones(mask.shape, np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (np.clip(inside - outside, -clip, clip) / clip).astype(np.float32)


def _labels_np(labels: Any, name: str) -> tuple[np.ndarray, bool, torch.device | None]:
    is_t = isinstance(labels, torch.Tensor)
    dev = labels.device if is_t else None
    arr = labels.detach().cpu().numpy() if is_t else np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise InputError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64), is_t, dev


def distance_targets(labels: Any, n_classes: int, clip: float = 5.0) -> Any:
    """Per-class signed distance maps for semantic training (SPEC §2).

    ``labels`` int, ``(Z, Y, X)``, ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)``; returns float32
    ``(C, Z, Y, X)`` or ``(N, C, Z, Y, X)``: for class c, the Euclidean distance (voxels) to
    the class border, positive inside c, negative outside, clipped to ±``clip`` and divided by
    ``clip`` (±1; the network predicts it through tanh). A class absent from a volume is −1.
    numpy in → numpy out; torch in → torch out (same device).
    """
    lab, is_t, dev = _labels_np(labels, "labels")
    if lab.ndim == 5:
        if lab.shape[1] != 1:
            raise InputError(f"labels: shape {lab.shape}; expected one channel")
        lab = lab[:, 0]
    single = lab.ndim == 3
    if single:
        lab = lab[None]
    if lab.ndim != 4:
        raise InputError(f"labels: shape {lab.shape}; expected (Z, Y, X) or (N, [1,] Z, Y, X)")
    if lab.min(initial=0) < 0 or lab.max(initial=0) >= n_classes:
        raise InputError(
            f"labels: values must lie in [0, {n_classes - 1}] for n_classes={n_classes}"
        )
    out = np.empty((lab.shape[0], n_classes, *lab.shape[1:]), np.float32)
    for i in range(lab.shape[0]):
        for c in range(n_classes):
            out[i, c] = _signed_distance(lab[i] == c, clip)
    if single:
        out = out[0]
    return torch.from_numpy(out).to(dev) if is_t else out


def _instance_targets_3d(
    lab: np.ndarray, clip: float, grow: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from skimage.segmentation import find_boundaries

    fg = lab > 0
    st = ndimage.generate_binary_structure(3, 1)
    # Boundaries *between different instances* (both sides), as segmentation.maps_from_labels:
    # the instance/background border is already the foreground's edge, and marking it too
    # makes the multicut cut thin necks of multi-lobed particles.
    big = np.iinfo(np.int64).max
    lab64 = lab.astype(np.int64)
    higher = ndimage.grey_dilation(lab64, footprint=st, mode="nearest") > lab64
    lower = ndimage.grey_erosion(np.where(fg, lab64, big), footprint=st, mode="nearest") < lab64
    bd = fg & (higher | lower)
    if grow > 0 and bd.any():
        bd = ndimage.binary_dilation(bd, structure=st, iterations=grow)
    # inside: distance to the nearest voxel outside the own instance (touching ones separate)
    inner = find_boundaries(lab, connectivity=1, mode="inner") & fg
    dist = np.zeros(lab.shape, np.float32)
    if fg.any():
        d_in = ndimage.distance_transform_edt(fg & ~inner) + 1.0
        dist[fg] = np.minimum(d_in[fg], clip)
        if not fg.all():
            d_out = ndimage.distance_transform_edt(~fg)
            dist[~fg] = -np.minimum(d_out[~fg], clip)
    else:
        dist[:] = -clip
    return fg.astype(np.float32), bd.astype(np.float32), dist / clip


def instance_targets(instances: Any, clip: float = 5.0, grow: int = 1) -> dict[str, Any]:
    """Training targets of the instance heads from instance labels (0 = background).

    ``instances`` int ``(Z, Y, X)``, ``(N, Z, Y, X)`` or ``(N, 1, Z, Y, X)``. Returns float32
    maps with a channel axis (``(1, Z, Y, X)`` / ``(N, 1, Z, Y, X)``):
    ``foreground`` 1 inside any instance; ``boundary`` the boundaries between different
    instances (both sides) grown by ``grow`` voxels — the same definition as
    :func:`cryosiam_nb.segmentation.maps_from_labels`; ``distance``
    the signed distance in voxels — inside an instance to the nearest voxel outside *that*
    instance (so touching instances separate), outside to the nearest instance, negative —
    clipped to ±``clip`` and divided by ``clip`` (±1, 1 ≙ ``clip`` voxels; the unit that
    ``cryosiam_nb.segmentation`` multiplies back by 5). numpy/torch in → same type out.
    """
    lab, is_t, dev = _labels_np(instances, "instances")
    if lab.ndim == 5:
        lab = lab[:, 0]
    single = lab.ndim == 3
    if single:
        lab = lab[None]
    if lab.ndim != 4:
        raise InputError(f"instances: shape {lab.shape}; expected (Z, Y, X) or (N, [1,] Z, Y, X)")
    maps = [_instance_targets_3d(v, clip, grow) for v in lab]
    out = {}
    for i, key in enumerate(("foreground", "boundary", "distance")):
        a = np.stack([m[i] for m in maps])[:, None]
        if single:
            a = a[0]
        out[key] = torch.from_numpy(a).to(dev) if is_t else a
    return out


# ============================================================================ fine-tuning
def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give a target ``(N, Z, Y, X)`` a channel axis to match ``like`` ``(N, C, Z, Y, X)``."""
    return t[:, None] if t.dim() == like.dim() - 1 else t


class SemanticLoss(nn.Module):
    """Semantic / lamella loss: CE + generalised Dice + MSE(tanh(distance), targets).

    Generalised Dice is MONAI's ``GeneralizedDiceLoss`` (softmax, weights 1/(Σ y_c)²).
    ``forward(outputs, labels, distance=None)``: ``outputs`` from the model (``logits``,
    ``distance``), ``labels`` int ``(N, [1,] Z, Y, X)``; distance targets are made with
    :func:`distance_targets` when not given. Returns ``{"loss", "ce", "dice", "distance"}``.
    """

    def __init__(
        self,
        n_classes: int,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        distance_weight: float = 1.0,
        clip: float = 5.0,
    ) -> None:
        super().__init__()
        self.n_classes = int(n_classes)
        self.w = (ce_weight, dice_weight, distance_weight)
        self.clip = clip
        self.dice = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type="square")

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        distance: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        logits = outputs["logits"].float()
        if logits.shape[1] != self.n_classes:
            raise InputError(
                f"logits have {logits.shape[1]} classes, loss expects {self.n_classes}"
            )
        lab = _channel(labels.long(), logits)
        terms = {
            "ce": F.cross_entropy(logits, lab[:, 0]),
            "dice": self.dice(logits, lab),
        }
        if "distance" in outputs and self.w[2]:
            if distance is None:
                distance = distance_targets(lab, self.n_classes, self.clip)
            terms["distance"] = F.mse_loss(torch.tanh(outputs["distance"].float()), distance)
        w = dict(zip(("ce", "dice", "distance"), self.w))
        return {"loss": sum(w[k] * v for k, v in terms.items()), **terms}


class InstanceLoss(nn.Module):
    """Instance loss ``L = L_foreground + L_boundary + L_distance`` (SPEC §2).

    BCE-with-logits on ``foreground`` and ``boundary``, MSE of the raw ``distance`` output
    against the scaled signed distance (±1 ≙ ±5 voxels). ``forward(outputs, targets)`` with
    ``targets`` from :func:`instance_targets` (torch), or ``forward(outputs,
    instances=labels)`` to make them. Returns ``{"loss", "foreground", "boundary",
    "distance"}``.
    """

    def __init__(
        self,
        foreground_weight: float = 1.0,
        boundary_weight: float = 1.0,
        distance_weight: float = 1.0,
        clip: float = 5.0,
    ) -> None:
        super().__init__()
        self.w = {
            "foreground": foreground_weight,
            "boundary": boundary_weight,
            "distance": distance_weight,
        }
        self.clip = clip

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor] | None = None,
        instances: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if targets is None:
            if instances is None:
                raise InputError("InstanceLoss: give targets or instances")
            targets = instance_targets(instances, self.clip)
        terms = {}
        for key in ("foreground", "boundary"):
            pred = outputs[key].float()
            terms[key] = F.binary_cross_entropy_with_logits(
                pred, _channel(targets[key], pred).float()
            )
        pred = outputs["distance"].float()
        terms["distance"] = F.mse_loss(pred, _channel(targets["distance"], pred).float())
        return {"loss": sum(self.w[k] * v for k, v in terms.items()), **terms}


class DenoiseLoss(nn.Module):
    """Denoising loss: ``"mse"`` (thesis) or ``"l1_ssim"`` = L1 + (1 − SSIM) (release).

    SSIM is MONAI's ``SSIMLoss`` (3-D, data range 1 for [0, 1] data, Gaussian window of
    ``win_size`` voxels, shrunk for small patches). ``forward(prediction, target)`` where
    prediction is ``model(x)["denoised"]`` (or that dict). Returns ``{"loss", ...terms}``.
    """

    def __init__(self, kind: str = "l1_ssim", win_size: int = 7, data_range: float = 1.0) -> None:
        super().__init__()
        if kind not in ("mse", "l1_ssim"):
            raise InputError(f"kind={kind!r}: expected 'mse' or 'l1_ssim'")
        self.kind = kind
        self.win_size = int(win_size)
        self.data_range = float(data_range)

    def forward(self, prediction: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = prediction["denoised"] if isinstance(prediction, Mapping) else prediction
        pred, target = pred.float(), _channel(target, pred).float()
        if self.kind == "mse":
            mse = F.mse_loss(pred, target)
            return {"loss": mse, "mse": mse}
        win = min(self.win_size, *pred.shape[2:])
        win = max(3, win if win % 2 else win - 1)
        ssim = SSIMLoss(spatial_dims=3, data_range=self.data_range, win_size=win)(pred, target)
        l1 = F.l1_loss(pred, target)
        return {"loss": l1 + ssim, "l1": l1, "ssim": ssim}


# ============================================================================ contrastive
def contrastive_loss(
    e1: torch.Tensor, e2: torch.Tensor, y: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Contrastive loss (SPEC §2, eq. 17–18): mean of ``y·d² + (1−y)·max(0, margin − d)²``.

    ``d`` is the Euclidean distance between the L2-normalised embeddings ``e1``, ``e2``
    ``(N, D)`` (0 … 2); ``y`` is 1 for pairs of the same class, 0 otherwise.
    """
    d = (F.normalize(e1, dim=1) - F.normalize(e2, dim=1)).norm(dim=1)
    y = y.to(d.dtype)
    return (y * d**2 + (1 - y) * torch.clamp(margin - d, min=0) ** 2).mean()


def contrastive_pairs(
    classes: Sequence[Any],
    size_categories: Sequence[Any] | None = None,
    n_pairs: int | None = None,
    positive_fraction: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``(i, j, y)`` for contrastive refinement, reproducible with ``seed``.

    Positives (``y = 1``): two different particles of the same class. Negatives
    (``y = 0``): hard negatives — a particle of a *different class in the same size
    category*; when the anchor's size category holds no other class, any other class.
    ``classes``/``size_categories``: one value per particle. ``n_pairs`` defaults to the
    number of particles. Returns int64 ``i``, ``j`` and float32 ``y`` arrays.
    """
    cls = np.asarray(classes)
    n = len(cls)
    if n < 2:
        raise InputError(f"classes: need at least 2 particles, got {n}")
    cats = np.zeros(n, np.int64) if size_categories is None else np.asarray(size_categories)
    if len(cats) != n:
        raise InputError(f"size_categories has {len(cats)} values for {n} particles")
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction={positive_fraction}: must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    n_pairs = n if n_pairs is None else int(n_pairs)
    by_class = {c: np.flatnonzero(cls == c) for c in np.unique(cls)}
    pos_anchor = np.flatnonzero([len(by_class[c]) > 1 for c in cls])
    if len(by_class) < 2:
        raise InputError("classes: need at least two classes for negative pairs")
    n_pos = int(round(n_pairs * positive_fraction)) if len(pos_anchor) else 0
    ii, jj, yy = [], [], []
    for _ in range(n_pos):
        a = int(rng.choice(pos_anchor))
        same = by_class[cls[a]]
        b = int(rng.choice(same[same != a]))
        ii.append(a), jj.append(b), yy.append(1.0)
    for _ in range(n_pairs - n_pos):
        a = int(rng.integers(n))
        hard = np.flatnonzero((cats == cats[a]) & (cls != cls[a]))
        pool = hard if len(hard) else np.flatnonzero(cls != cls[a])
        ii.append(a), jj.append(int(rng.choice(pool))), yy.append(0.0)
    order = rng.permutation(len(ii))
    return (
        np.asarray(ii, np.int64)[order],
        np.asarray(jj, np.int64)[order],
        np.asarray(yy, np.float32)[order],
    )
