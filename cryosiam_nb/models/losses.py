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
Targets are made by :mod:`cryosiam_nb.models.targets` (:func:`~.targets.distance_targets`,
:func:`~.targets.instance_targets`); the overlap of two views by
:func:`cryosiam_nb.transforms.overlap_slices`.

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
from torch import nn

from cryosiam_nb.io import InputError
from cryosiam_nb.transforms import overlap_slices

from .targets import distance_targets, instance_targets, small_instance_weights

__all__ = [
    "negative_cosine",
    "simsiam_loss",
    "dense_simsiam_loss",
    "SemanticLoss",
    "InstanceLoss",
    "DenoiseLoss",
    "contrastive_loss",
    "contrastive_pairs",
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
    """Boxes → int array (n, 3, 2): [[z0, z1], [y0, y1], [x0, x1]] (end exclusive)."""
    b = box.detach().cpu().numpy() if isinstance(box, torch.Tensor) else np.asarray(box)
    b = b.astype(np.int64)
    if b.shape[-2:] == (3, 2):  # [[z0, z1], [y0, y1], [x0, x1]]
        pass
    elif b.shape[-1] == 6:  # (z0, y0, x0, z1, y1, x1)
        b = np.swapaxes(b.reshape(*b.shape[:-1], 2, 3), -1, -2)
    else:
        raise InputError(
            f"{name}: shape {b.shape}; expected (6,) / (N, 6) as (z0, y0, x0, z1, y1, x1) "
            "or (3, 2) / (N, 3, 2) as [[z0, z1], [y0, y1], [x0, x1]]"
        )
    if b.ndim == 2:
        b = np.broadcast_to(b, (n, 3, 2))
    if b.shape[0] != n:
        raise InputError(f"{name}: {b.shape[0]} boxes for a batch of {n}")
    if np.any(b[..., 1] <= b[..., 0]):
        raise InputError(f"{name}: every box needs end > start on each axis, got {b.tolist()}")
    return b


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
        try:
            sl = overlap_slices(
                b1[i], b2[i], factor=factor, shape1=p1.shape[2:], shape2=p2.shape[2:]
            )
        except InputError as e:
            raise InputError(f"sample {i}: {e}") from None
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

    Parameters
    ----------
    out1, out2
        ``model.ssl_forward(view1, view2)`` of a dense_ssl model.
    box1, box2
        Where each view was cropped in the shared region, in voxels, end exclusive:
        ``(z0, y0, x0, z1, y1, x1)`` or ``[[z0, z1], [y0, y1], [x0, x1]]``, one for the
        batch or one per sample. The dense and level terms use only the overlapping voxels
        (:func:`cryosiam_nb.transforms.overlap_slices`). Without boxes the two views must
        be aligned and equally sized.
    weights
        Scale of each term by name (default 1).

    Returns
    -------
    dict of str to torch.Tensor
        ``{"loss", "global", "dense", "level2", ...}`` (scalars); each term is −1 at best.
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


# ============================================================================ fine-tuning
def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give a target ``(N, Z, Y, X)`` a channel axis to match ``like`` ``(N, C, Z, Y, X)``."""
    return t[:, None] if t.dim() == like.dim() - 1 else t


class SemanticLoss(nn.Module):
    """Semantic / lamella loss: CE + generalised Dice + MSE(tanh(distance), targets).

    Generalised Dice is MONAI's ``GeneralizedDiceLoss`` (softmax, weights 1/(Σ y_c)²).
    ``class_weights`` (one per class) weight the CE term (rare classes up; see
    :func:`cryosiam_nb.training.multitask.class_weights_of`); default unweighted.
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
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.n_classes = int(n_classes)
        if class_weights is not None and len(class_weights) != self.n_classes:
            raise InputError(
                f"class_weights: {len(class_weights)} values for {self.n_classes} classes"
            )
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
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
            "ce": F.cross_entropy(
                logits,
                lab[:, 0],
                weight=None
                if self.class_weights is None
                else torch.tensor(self.class_weights, device=logits.device),
            ),
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
    instances=labels)`` to make them. ``small_weight`` ≠ 1 (needs ``instances``) weights
    the foreground and distance terms per voxel by
    :func:`~cryosiam_nb.models.targets.small_instance_weights` (instances under
    ``small_size`` voxels and a 1-voxel shell around them). Returns ``{"loss", "foreground", "boundary",
    "distance"}``.
    """

    def __init__(
        self,
        foreground_weight: float = 1.0,
        boundary_weight: float = 1.0,
        distance_weight: float = 1.0,
        clip: float = 5.0,
        small_weight: float = 1.0,
        small_size: int = 150,
    ) -> None:
        super().__init__()
        self.w = {
            "foreground": foreground_weight,
            "boundary": boundary_weight,
            "distance": distance_weight,
        }
        self.clip = clip
        self.small_weight = float(small_weight)
        self.small_size = int(small_size)

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
        vw = None  # per-voxel weights of the foreground and distance terms
        if self.small_weight != 1.0:
            if instances is None:
                raise InputError("InstanceLoss: small_weight needs the instance labels")
            vw = _channel(
                small_instance_weights(instances, self.small_size, self.small_weight),
                outputs["distance"],
            ).float()
        terms = {}
        for key in ("foreground", "boundary"):
            pred = outputs[key].float()
            terms[key] = F.binary_cross_entropy_with_logits(
                pred,
                _channel(targets[key], pred).float(),
                weight=vw if key == "foreground" else None,
            )
        pred = outputs["distance"].float()
        sq = (pred - _channel(targets["distance"], pred).float()) ** 2
        terms["distance"] = (sq if vw is None else sq * vw).mean()
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
