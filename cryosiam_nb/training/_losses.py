"""Training losses used by the trainers (SPEC §2).

Self-contained implementations (MONAI Dice/SSIM losses, scipy / scikit-image distance
transforms) so the trainers do not depend on the exact signatures of
``cryosiam_nb.models.losses``, which was written in parallel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "neg_cosine",
    "dense_simsiam_loss",
    "simsiam_loss",
    "contrastive_loss",
    "distance_targets",
    "instance_targets",
    "semantic_loss",
    "instance_loss",
    "denoise_loss",
]


def neg_cosine(p: torch.Tensor, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Negative cosine similarity with stop-gradient on ``z``, averaged: −1 for identical."""
    return -F.cosine_similarity(p, z.detach(), dim=dim).mean()


def _sym(p1, z1, p2, z2) -> torch.Tensor:
    return 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))


def _overlap_pairs(box1: torch.Tensor, box2: torch.Tensor, factor: int = 1):
    """Per sample: (slices in view 1, slices in view 2) of the overlap at 1/factor scale."""
    b1 = box1.detach().cpu().numpy().astype(np.int64)
    b2 = box2.detach().cpu().numpy().astype(np.int64)
    out = []
    for a, b in zip(b1, b2):
        lo = np.maximum(a[:, 0], b[:, 0])
        hi = np.minimum(a[:, 1], b[:, 1])
        if np.any(hi <= lo):
            out.append(None)
            continue
        s1, s2 = [], []
        for ax in range(3):
            l1 = (lo[ax] - a[ax, 0]) // factor
            l2 = (lo[ax] - b[ax, 0]) // factor
            n = max(1, (hi[ax] - lo[ax]) // factor)
            s1.append(slice(int(l1), int(l1 + n)))
            s2.append(slice(int(l2), int(l2 + n)))
        out.append((tuple(s1), tuple(s2)))
    return out


def _dense_overlap(p1, z1, p2, z2, pairs) -> torch.Tensor:
    terms = []
    for i, pr in enumerate(pairs):
        if pr is None:
            continue
        s1, s2 = pr
        a = (slice(None), *s1)
        b = (slice(None), *s2)
        n = min(p1[i][a].shape[1:].numel(), p2[i][b].shape[1:].numel())
        if n == 0:
            continue
        pa, za = p1[i][a], z1[i][a]
        pb, zb = p2[i][b], z2[i][b]
        shape = tuple(min(x, y) for x, y in zip(pa.shape[1:], pb.shape[1:]))
        crop = (slice(None), *(slice(0, s) for s in shape))
        terms.append(_sym(pa[crop], za[crop], pb[crop], zb[crop]))
    if not terms:
        return p1.sum() * 0.0
    return torch.stack(terms).mean()


def dense_simsiam_loss(
    out1: dict[str, torch.Tensor],
    out2: dict[str, torch.Tensor],
    box1: torch.Tensor,
    box2: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_global + L_dense + Σ L_level: symmetric negative cosine with stop-gradient; the
    dense and level terms only over the overlap of the two crops (boxes ``(N, 3, 2)`` in
    region voxels; the overlap box is divided by f at level f)."""
    parts: dict[str, torch.Tensor] = {}
    parts["global"] = _sym(out1["global_p"], out1["global_z"], out2["global_p"], out2["global_z"])
    parts["dense"] = _dense_overlap(
        out1["dense_p"],
        out1["dense_z"],
        out2["dense_p"],
        out2["dense_z"],
        _overlap_pairs(box1, box2),
    )
    for key in out1:
        if key.startswith("level") and key.endswith("_z"):
            lv = key[len("level") : -2]
            f = int(lv)
            parts[f"level{lv}"] = _dense_overlap(
                out1[f"level{lv}_p"],
                out1[key],
                out2[f"level{lv}_p"],
                out2[key],
                _overlap_pairs(box1, box2, f),
            )
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def simsiam_loss(out1: dict[str, torch.Tensor], out2: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric negative cosine of SimSiam projections ``z`` and predictions ``p``."""
    return _sym(out1["p"], out1["z"], out2["p"], out2["z"])


def contrastive_loss(
    e1: torch.Tensor, e2: torch.Tensor, y: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """``y·d² + (1−y)·max(0, margin − d)²`` with d the Euclidean distance of L2-normalised
    embeddings (y = 1 for positive pairs)."""
    d = (F.normalize(e1, dim=1) - F.normalize(e2, dim=1)).norm(dim=1)
    y = y.float()
    return (y * d**2 + (1 - y) * torch.clamp(margin - d, min=0) ** 2).mean()


def _signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """Signed Euclidean distance (voxels): positive inside ``mask``, negative outside."""
    if mask.all():
        return np.full(mask.shape, clip, np.float32)
    if not mask.any():
        return np.full(mask.shape, -clip, np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return np.clip(inside - outside, -clip, clip).astype(np.float32)


def distance_targets(labels: torch.Tensor, n_classes: int, clip: float = 5.0) -> torch.Tensor:
    """Per-class signed distance maps clipped to ±``clip`` voxels, scaled to ±1:
    ``(N, 1, Z, Y, X)`` int labels → ``(N, C, Z, Y, X)`` float."""
    lab = labels.detach().cpu().numpy()[:, 0]
    out = np.zeros((lab.shape[0], n_classes, *lab.shape[1:]), np.float32)
    for i in range(lab.shape[0]):
        for c in range(n_classes):
            out[i, c] = _signed_distance(lab[i] == c, clip) / clip
    return torch.from_numpy(out).to(labels.device)


def instance_targets(labels: torch.Tensor, clip: float = 5.0) -> dict[str, torch.Tensor]:
    """Instance targets from labels ``(N, 1, Z, Y, X)``: ``foreground`` (0/1), ``boundary``
    (thick instance boundaries grown by 1 voxel, 0/1) and ``distance`` (signed distance
    to the background in voxels, clipped to ±``clip``), each ``(N, 1, Z, Y, X)`` float."""
    from skimage.segmentation import find_boundaries

    lab = labels.detach().cpu().numpy()[:, 0].astype(np.int64)
    fg = (lab > 0).astype(np.float32)
    bd = np.zeros_like(fg)
    dist = np.zeros_like(fg)
    for i in range(lab.shape[0]):
        b = find_boundaries(lab[i], mode="thick")
        bd[i] = ndimage.binary_dilation(b, iterations=1) & (lab[i] > 0) | b
        dist[i] = _signed_distance(lab[i] > 0, clip)
    dev = labels.device
    return {
        "foreground": torch.from_numpy(fg[:, None]).to(dev),
        "boundary": torch.from_numpy(bd[:, None].astype(np.float32)).to(dev),
        "distance": torch.from_numpy(dist[:, None]).to(dev),
    }


def semantic_loss(
    out: dict[str, torch.Tensor], labels: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + generalised Dice (MONAI, w_c = 1/(Σ y_c)²) + MSE(tanh(distance), targets)."""
    from monai.losses import GeneralizedDiceLoss

    logits = out["logits"].float()
    lab = labels.long()
    ce = F.cross_entropy(logits, lab[:, 0])
    gd = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type="square")(logits, lab)
    parts = {"ce": ce, "gdice": gd}
    if "distance" in out:
        tgt = distance_targets(lab, n_classes)
        parts["distance"] = F.mse_loss(torch.tanh(out["distance"].float()), tgt)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def instance_loss(
    out: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE(foreground) + MSE(distance, clipped signed distance in voxels) + BCE(boundary)."""
    t = instance_targets(labels)
    parts = {
        "foreground": F.binary_cross_entropy_with_logits(
            out["foreground"].float(), t["foreground"]
        ),
        "distance": F.mse_loss(out["distance"].float(), t["distance"]),
        "boundary": F.binary_cross_entropy_with_logits(out["boundary"].float(), t["boundary"]),
    }
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def denoise_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "l1_ssim"
) -> tuple[torch.Tensor, dict[str, float]]:
    """``"l1_ssim"``: L1 + (1 − SSIM) (MONAI SSIMLoss, data range 1); ``"mse"``: MSE."""
    pred = pred.float()
    target = target.float()
    if kind == "mse":
        loss = F.mse_loss(pred, target)
        return loss, {"mse": float(loss.detach())}
    if kind != "l1_ssim":
        raise ValueError(f"denoise_loss kind={kind!r}: expected 'l1_ssim' or 'mse'")
    from monai.losses.ssim_loss import SSIMLoss

    win = int(min(7, *pred.shape[2:]))
    win = win if win % 2 else win - 1
    l1 = F.l1_loss(pred, target)
    ss = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=max(3, win))(pred, target)
    return l1 + ss, {"l1": float(l1.detach()), "ssim_loss": float(ss.detach())}
