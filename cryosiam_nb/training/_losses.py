"""Adapters from the trainers to :mod:`cryosiam_nb.models.losses` (SPEC §2).

Each returns ``(loss, parts)``: the scalar to back-propagate and a dict of floats for
the training history.
"""

from __future__ import annotations

import torch

from cryosiam_nb.models import losses as L

__all__ = [
    "dense_simsiam_loss",
    "simsiam_loss",
    "contrastive_loss",
    "instance_targets",
    "semantic_loss",
    "instance_loss",
    "denoise_loss",
]


def _split(res: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return res["loss"], {k: float(v.detach()) for k, v in res.items() if k != "loss"}


def dense_simsiam_loss(out1, out2, box1, box2) -> tuple[torch.Tensor, dict[str, float]]:
    """L_global + L_dense + Σ L_level, dense/level terms over the crops' overlap only
    (boxes ``(N, 3, 2)`` = ``[[z0, z1], [y0, y1], [x0, x1]]`` per sample, region voxels)."""
    return _split(L.dense_simsiam_loss(out1, out2, box1, box2))


def simsiam_loss(out1, out2) -> torch.Tensor:
    """Symmetric negative cosine with stop-gradient of subtomogram views."""
    return L.simsiam_loss(out1, out2)


def contrastive_loss(e1, e2, y, margin: float = 1.0) -> torch.Tensor:
    """``y·d² + (1−y)·max(0, margin − d)²`` on L2-normalised embeddings."""
    return L.contrastive_loss(e1, e2, y, margin=margin)


def instance_targets(instances):
    """Foreground / boundary / scaled signed-distance targets of instance labels."""
    return L.instance_targets(instances)


def semantic_loss(out, labels, n_classes: int) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + generalised Dice + MSE(tanh(distance), distance targets)."""
    return _split(L.SemanticLoss(n_classes)(out, labels))


def instance_loss(out, labels) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE(foreground) + BCE(boundary) + MSE(distance) from instance labels."""
    return _split(L.InstanceLoss()(out, instances=labels))


def denoise_loss(pred, target, kind: str = "l1_ssim") -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + (1 − SSIM) (``"l1_ssim"``) or MSE (``"mse"``)."""
    return _split(L.DenoiseLoss(kind)(pred, target))
