"""Losses and targets on hand-made inputs (SPEC §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosiam_nb import models
from cryosiam_nb.io import InputError
from cryosiam_nb.models import losses, targets
from cryosiam_nb.transforms import overlap_slices

torch.set_num_threads(2)


def _views(n=2, c=8, s1=(16, 16, 16), s2=(16, 16, 16), seed=0, same=False):
    g = torch.Generator().manual_seed(seed)

    def one(shape):
        z = torch.randn(n, c, *shape, generator=g)
        return {
            "global_z": torch.randn(n, 32, generator=g),
            "global_p": torch.randn(n, 32, generator=g),
            "dense_z": z,
            "dense_p": torch.randn(n, c, *shape, generator=g),
            "level2_z": torch.randn(n, c, *(s // 2 for s in shape), generator=g),
            "level2_p": torch.randn(n, c, *(s // 2 for s in shape), generator=g),
        }

    a = one(s1)
    if same:  # predictions equal the other view's projections: a perfect SimSiam
        for k in ("global", "dense", "level2"):
            a[f"{k}_p"] = a[f"{k}_z"].clone()
        return a, {k: v.clone() for k, v in a.items()}
    return a, one(s2)


def test_identical_views_give_minus_one_per_term():
    o1, o2 = _views(same=True)
    out = losses.dense_simsiam_loss(o1, o2)
    for k in ("global", "dense", "level2"):
        assert out[k].item() == pytest.approx(-1.0, abs=1e-5), k
    assert out["loss"].item() == pytest.approx(-3.0, abs=1e-5)
    # the same with boxes of two aligned views
    box = (0, 0, 0, 16, 16, 16)
    out = losses.dense_simsiam_loss(o1, o2, box, box)
    assert out["dense"].item() == pytest.approx(-1.0, abs=1e-5)
    sub = {"z": o1["global_z"], "p": o1["global_z"].clone()}
    assert losses.simsiam_loss(sub, dict(sub)).item() == pytest.approx(-1.0, abs=1e-5)
    # opposite directions: +1
    neg = {"z": -o1["global_z"], "p": -o1["global_z"]}
    assert losses.simsiam_loss(sub, neg).item() == pytest.approx(1.0, abs=1e-5)


def test_stop_gradient_on_projection():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    losses.negative_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_dense_loss_uses_only_the_overlap():
    """Views cropped at (0,0,0)-(16,16,16) and (8,4,0)-(24,20,16) of a region: the
    dense/level terms must not change when voxels outside the overlap change, and must
    change when voxels inside it do."""
    box1 = [[0, 16], [0, 16], [0, 16]]  # (3, 2) form
    box2 = (8, 4, 0, 24, 20, 16)  # (6,) form
    o1, o2 = _views(seed=1)
    ref = losses.dense_simsiam_loss(o1, o2, box1, box2)

    # overlap in view 1 is [8:16, 4:16, 0:16]; in view 2 it is [0:8, 0:12, 0:16]
    for key, view, sl in [
        ("dense_z", o1, (slice(None), slice(None), slice(0, 8))),
        ("dense_p", o2, (slice(None), slice(None), slice(8, 16))),
        ("dense_p", o2, (slice(None), slice(None), slice(0, 8), slice(12, 16))),
        ("level2_z", o1, (slice(None), slice(None), slice(0, 4))),  # halved box: z 4:8
        ("level2_p", o2, (slice(None), slice(None), slice(0, 4), slice(6, 8))),
    ]:
        changed = {k: v.clone() for k, v in view.items()}
        changed[key][sl] = torch.randn_like(changed[key][sl]) * 10
        a, b = (changed, o2) if view is o1 else (o1, changed)
        out = losses.dense_simsiam_loss(a, b, box1, box2)
        for t in ("dense", "level2"):
            assert out[t].item() == pytest.approx(ref[t].item(), abs=1e-6), (key, sl, t)

    inside = {k: v.clone() for k, v in o1.items()}
    inside["dense_p"][:, :, 10, 5, 3] += 5.0
    inside["level2_p"][:, :, 5, 3, 1] += 5.0
    out = losses.dense_simsiam_loss(inside, o2, box1, box2)
    assert out["dense"].item() != pytest.approx(ref["dense"].item(), abs=1e-6)
    assert out["level2"].item() != pytest.approx(ref["level2"].item(), abs=1e-6)


def test_overlap_alignment_with_a_real_region():
    """A map that is a function of region position gives a perfect match (−1) over the
    overlap of two shifted crops at full and half resolution."""
    g = torch.Generator().manual_seed(2)
    region = torch.randn(1, 4, 32, 32, 32, generator=g)
    half = torch.randn(1, 4, 16, 16, 16, generator=g)
    b1, b2 = (0, 2, 4, 24, 26, 28), (8, 10, 0, 32, 32, 24)

    def crop(b):
        z0, y0, x0, z1, y1, x1 = b
        d = region[:, :, z0:z1, y0:y1, x0:x1]
        h = half[:, :, z0 // 2 : z1 // 2, y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        return {"global_z": torch.ones(1, 3), "global_p": torch.ones(1, 3), "dense_z": d,
                "dense_p": d.clone(), "level2_z": h, "level2_p": h.clone()}  # fmt: skip

    out = losses.dense_simsiam_loss(crop(b1), crop(b2), b1, b2)
    assert out["dense"].item() == pytest.approx(-1.0, abs=1e-5)
    assert out["level2"].item() == pytest.approx(-1.0, abs=1e-5)
    s1, s2 = overlap_slices(np.reshape(b1, (2, 3)).T, np.reshape(b2, (2, 3)).T, factor=2)
    assert [s.stop - s.start for s in s1] == [8, 8, 10]


def test_dense_loss_errors():
    o1, o2 = _views(s2=(12, 16, 16))
    with pytest.raises(ValueError, match="need box1/box2"):
        losses.dense_simsiam_loss(o1, o2)
    with pytest.raises(ValueError, match="do not overlap"):
        losses.dense_simsiam_loss(o1, o2, (0, 0, 0, 16, 16, 16), (16, 0, 0, 28, 16, 16))
    with pytest.raises(ValueError, match="box2"):
        losses.dense_simsiam_loss(o1, o2, (0, 0, 0, 16, 16, 16), (1, 2, 3))
    with pytest.raises(ValueError, match="both box1 and box2"):
        losses.dense_simsiam_loss(o1, o2, (0, 0, 0, 16, 16, 16))


def test_dense_loss_with_model_backpropagates():
    torch.manual_seed(0)
    model = models.build("dense_ssl", "tiny").train()
    region = torch.rand(2, 1, 12, 12, 12)
    v1, v2 = region[:, :, :8, :8, :8], region[:, :, 4:, 4:, 4:]
    o1, o2 = model.ssl_forward(v1, v2)
    out = losses.dense_simsiam_loss(o1, o2, (0, 0, 0, 8, 8, 8), (4, 4, 4, 12, 12, 12))
    assert -3.0 <= out["loss"].item() <= 3.0
    out["loss"].backward()
    assert model.backbone.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.backbone.level_predictor_2[0].weight.grad.abs().sum() > 0


def test_distance_targets():
    lab = np.zeros((1, 11, 11, 11), np.int64)
    lab[0, 2:9, 2:9, 2:9] = 1  # a 7³ cube
    d = targets.distance_targets(lab, 3)
    assert d.shape == (1, 3, 11, 11, 11) and d.dtype == np.float32
    assert d[0, 1, 5, 5, 5] == pytest.approx(4 / 5)  # centre: 4 voxels to the outside
    assert d[0, 1, 2, 5, 5] == pytest.approx(1 / 5)  # on the face
    assert d[0, 1, 1, 5, 5] == pytest.approx(-1 / 5)  # just outside
    assert d[0, 0, 5, 5, 5] == pytest.approx(-4 / 5)  # background map is the mirror
    assert np.all(d[0, 2] == -1.0)  # absent class
    assert d.min() >= -1 and d.max() <= 1
    t = targets.distance_targets(torch.from_numpy(lab)[:, None], 3, clip=2)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 3, 11, 11, 11)
    assert t[0, 1, 5, 5, 5].item() == 1.0  # clipped at 2 voxels
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        targets.distance_targets(lab + 1, 2)


def test_instance_targets_separate_touching_instances():
    lab = np.zeros((12, 12, 20), np.int64)
    lab[2:10, 2:10, 2:10] = 1
    lab[2:10, 2:10, 10:18] = 2  # touches instance 1 at x = 9 | 10
    t = targets.instance_targets(lab)
    fg, bd, dist = t["foreground"][0], t["boundary"][0], t["distance"][0]
    assert fg.sum() == (lab > 0).sum()
    assert bd[6, 6, 9] == 1 and bd[6, 6, 10] == 1  # the contact is boundary
    assert bd[6, 6, 5] == 0  # the middle of a particle is not
    assert bd[6, 6, 8] == 1 and bd[6, 6, 11] == 1  # grown by one voxel on both sides
    assert bd[6, 6, 2] == 0 and bd[6, 6, 1] == 0  # the instance/background edge is not boundary
    assert dist[6, 6, 9] == pytest.approx(1 / 5)  # next to the other instance: small
    assert dist[6, 6, 6] > dist[6, 6, 9]
    assert dist[0, 0, 0] == pytest.approx(-np.sqrt(12) / 5)  # corner: √12 voxels away
    assert dist.max() <= 1 and dist.min() >= -1
    tt = targets.instance_targets(torch.from_numpy(lab)[None, None])
    assert tt["distance"].shape == (1, 1, 12, 12, 20)
    torch.testing.assert_close(tt["distance"][0], torch.from_numpy(t["distance"]))


def test_semantic_loss_prefers_the_truth():
    lab = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    lab[0, 3:9, 3:9, 3:9] = 1
    lab[0, :, :, 10:] = 2
    onehot = torch.nn.functional.one_hot(lab, 3).permute(0, 4, 1, 2, 3).float()
    dist = targets.distance_targets(lab, 3)
    good = {"logits": onehot * 20 - 10, "distance": torch.atanh(dist.clamp(-0.999, 0.999))}
    bad = {"logits": -good["logits"], "distance": -good["distance"]}
    loss = losses.SemanticLoss(3)
    g, b = loss(good, lab), loss(bad, lab[:, None])
    assert set(g) == {"loss", "ce", "dice", "distance"}
    assert g["ce"] < 1e-3 and g["dice"] < 1e-3 and g["distance"] < 1e-5
    for k in g:
        assert b[k] > g[k] + 0.5 or k == "distance" and b[k] > 0.1, k
    with pytest.raises(ValueError, match="loss expects 4"):
        losses.SemanticLoss(4)(good, lab)


def test_instance_loss():
    lab = np.zeros((1, 12, 12, 12), np.int64)
    lab[0, 2:8, 2:8, 2:8] = 1
    t = {k: torch.from_numpy(v) for k, v in targets.instance_targets(lab).items()}
    perfect = {
        "foreground": (t["foreground"] * 2 - 1) * 30,
        "boundary": (t["boundary"] * 2 - 1) * 30,
        "distance": t["distance"].clone(),
    }
    out = losses.InstanceLoss()(perfect, t)
    assert set(out) == {"loss", "foreground", "boundary", "distance"}
    assert out["loss"].item() < 1e-6
    zero = {k: torch.zeros_like(v) for k, v in perfect.items()}
    out2 = losses.InstanceLoss()(zero, instances=torch.from_numpy(lab))
    assert out2["foreground"].item() == pytest.approx(np.log(2), abs=1e-5)
    assert out2["loss"] > out["loss"] + 1


def test_small_instances_weigh_more_in_the_instance_loss():
    lab = np.zeros((1, 20, 20, 20), np.int64)
    lab[0, 2:4, 2:4, 2:4] = 1  # 8 voxels: small
    lab[0, 8:16, 8:16, 8:16] = 2  # 512 voxels: large
    w = targets.small_instance_weights(lab, max_size=150, weight=4.0)
    assert w.shape == (1, 1, 20, 20, 20) and w.dtype == np.float32
    # the small particle and its 6-connected shell (8 + 24 voxels), nothing else
    assert (w == 4.0).sum() == 32 and (w == 1.0).sum() == w.size - 32
    assert w[0, 0, 3, 3, 3] == 4.0 and w[0, 0, 12, 12, 12] == 1.0
    zero = {k: torch.zeros(1, 1, 20, 20, 20) for k in ("foreground", "boundary", "distance")}
    plain = losses.InstanceLoss()(zero, instances=torch.from_numpy(lab))
    weighted = losses.InstanceLoss(small_weight=4.0)(zero, instances=torch.from_numpy(lab))
    assert weighted["distance"] > plain["distance"] and weighted["foreground"] > plain["foreground"]
    assert weighted["boundary"] == plain["boundary"]
    big_only = torch.from_numpy(np.where(lab == 2, 2, 0))
    a = losses.InstanceLoss()(zero, instances=big_only)["loss"]
    b = losses.InstanceLoss(small_weight=4.0)(zero, instances=big_only)["loss"]
    assert a == pytest.approx(b.item())
    t = {k: torch.from_numpy(v) for k, v in targets.instance_targets(lab).items()}
    with pytest.raises(InputError, match="instance labels"):
        losses.InstanceLoss(small_weight=4.0)(zero, t)


def test_denoise_loss():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, 16, generator=g)
    noisy = (clean + 0.3 * torch.randn(2, 1, 16, 16, 16, generator=g)).clamp(0, 1)
    for kind in ("mse", "l1_ssim"):
        loss = losses.DenoiseLoss(kind)
        perfect = loss({"denoised": clean.clone()}, clean)
        worse = loss(noisy, clean)
        assert perfect["loss"].item() == pytest.approx(0.0, abs=1e-4)
        assert worse["loss"] > perfect["loss"] + 0.05
    assert set(losses.DenoiseLoss()(noisy, clean)) == {"loss", "l1", "ssim"}
    # a patch smaller than the SSIM window still works
    assert torch.isfinite(
        losses.DenoiseLoss()(noisy[..., :5, :5, :5], clean[..., :5, :5, :5])["loss"]
    )
    with pytest.raises(ValueError, match="kind='l2'"):
        losses.DenoiseLoss("l2")


def test_contrastive_loss_values():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = losses.contrastive_loss(e, e * 3, torch.ones(2))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # orthogonal unit vectors: d = √2; positive → d² = 2, negative beyond margin → 0
    e2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert losses.contrastive_loss(e, e2, torch.ones(2)).item() == pytest.approx(2.0, abs=1e-5)
    assert losses.contrastive_loss(e, e2, torch.zeros(2), margin=1.0).item() == pytest.approx(0.0)
    m = 2.0
    expected = (m - np.sqrt(2)) ** 2
    assert losses.contrastive_loss(e, e2, torch.zeros(2), margin=m).item() == pytest.approx(
        expected, abs=1e-5
    )


def test_contrastive_pairs_hard_negatives():
    classes = np.array(["ribo"] * 5 + ["proteasome"] * 5 + ["small1"] * 4 + ["small2"] * 4)
    sizes = np.array(["big"] * 10 + ["small"] * 8)
    i, j, y = losses.contrastive_pairs(classes, sizes, n_pairs=200, seed=7)
    assert len(i) == 200 and y.sum() == 100
    assert np.all(i != j)
    pos, neg = y == 1, y == 0
    assert np.all(classes[i[pos]] == classes[j[pos]])
    assert np.all(classes[i[neg]] != classes[j[neg]])
    assert np.all(sizes[i[neg]] == sizes[j[neg]])  # hard negatives: same size category
    i2, j2, y2 = losses.contrastive_pairs(classes, sizes, n_pairs=200, seed=7)
    assert np.array_equal(i, i2) and np.array_equal(j, j2) and np.array_equal(y, y2)
    i3, _, _ = losses.contrastive_pairs(classes, sizes, n_pairs=200, seed=8)
    assert not np.array_equal(i, i3)
    # a size category with a single class falls back to any other class
    i, j, y = losses.contrastive_pairs(["a", "a", "b", "b"], ["x", "x", "y", "y"], 20, seed=0)
    assert np.all(
        (np.array(["a", "a", "b", "b"])[i] != np.array(["a", "a", "b", "b"])[j]) == (y == 0)
    )
    with pytest.raises(ValueError, match="two classes"):
        losses.contrastive_pairs(["a", "a"], None)
