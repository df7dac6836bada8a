"""Augmentations (SPEC §3): parameter ranges, label alignment, crop pairs, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosiam_nb import transforms as T

torch.set_num_threads(1)


def _vol(shape=(24, 24, 24), seed=0):
    return np.random.default_rng(seed).random((1, *shape)).astype(np.float32)


def test_voxel_mask_fraction_in_range_and_independent():
    m = T.RandVoxelMaskd("image")
    m.set_random_state(3)
    x = torch.ones(1, 24, 24, 24)
    fracs, masks = [], []
    for _ in range(30):
        out = m({"image": x})["image"]
        frac = float((out == 0).float().mean())
        fracs.append(frac)
        masks.append(out == 0)
        # the measured fraction follows the drawn one (24³ voxels: binomial sd < 0.004)
        assert abs(frac - m.params["fraction"]) < 0.02
    assert 0.1 - 0.02 <= min(fracs) and max(fracs) <= 0.5 + 0.02
    assert max(fracs) - min(fracs) > 0.1  # it really varies over [0.1, 0.5]
    assert not torch.equal(masks[0], masks[1])  # independent masks per call


def test_noise_sigma_range_and_renormalised():
    t = T.RandGaussianNoiseRenormd("image")
    t.set_random_state(0)
    x = np.full((1, 16, 16, 16), 0.5, np.float32)
    sigmas = []
    for _ in range(40):
        out = t({"image": x})["image"]
        sigmas.append(t.params["sigma"])
        assert isinstance(out, np.ndarray)
        assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    assert 0.1 <= min(sigmas) and max(sigmas) <= 0.5


def test_lowpass_and_highpass_sigma_ranges_and_effect():
    low = T.RandLowPassd("image")
    high = T.RandHighPassd("image")
    low.set_random_state(1)
    high.set_random_state(1)
    x = _vol()
    for _ in range(25):
        lo = low({"image": x})["image"]
        hi = high({"image": x})["image"]
        assert 0.5 <= low.params["sigma"] <= 2.0
        assert 0.1 <= high.params["sigma1"] <= 0.5 and 1.0 <= high.params["sigma2"] <= 1.5
        assert lo.std() < x.std()  # blurring white noise lowers its variance
        assert hi.min() >= 0 and hi.max() <= 1 + 1e-6
    # a constant volume has no high frequencies: DoG is flat
    flat = high({"image": np.full((1, 24, 24, 24), 0.3, np.float32)})["image"]
    assert np.ptp(flat[:, 8:-8, 8:-8, 8:-8]) < 1e-3


def test_bad_ranges_raise():
    with pytest.raises(ValueError, match="fraction_range"):
        T.RandVoxelMaskd("image", fraction_range=(0.6, 0.2))
    with pytest.raises(ValueError, match="sigma1_range"):
        T.RandHighPassd("image", sigma1_range=(0.1, 2.0), sigma2_range=(1.0, 1.5))
    with pytest.raises(ValueError, match="crop_size"):
        T.RandOverlappingCropPaird("image", (8, 8))


def test_ssl_view_seeded_determinism_and_variety():
    x = _vol()
    a = T.ssl_view_transform()
    b = T.ssl_view_transform()
    a.set_random_state(7)
    b.set_random_state(7)
    outs_a = [a({"image": x})["image"] for _ in range(5)]
    outs_b = [b({"image": x})["image"] for _ in range(5)]
    for u, v in zip(outs_a, outs_b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # successive draws differ, and masking zeroes 10-50 % of voxels
    assert not np.array_equal(np.asarray(outs_a[0]), np.asarray(outs_a[1]))
    for u in outs_a:
        z = float((np.asarray(u) == 0).mean())
        assert 0.08 <= z <= 0.6


def test_crop_pair_overlap_and_boxes():
    region = torch.arange(32 * 28 * 30, dtype=torch.float32).reshape(1, 32, 28, 30)
    t = T.RandOverlappingCropPaird("image", (16, 12, 20), min_overlap=0.5)
    t.set_random_state(0)
    for _ in range(50):
        d = t({"image": region})
        b1, b2 = d["box_1"], d["box_2"]
        assert d["image_1"].shape == (1, 16, 12, 20) == d["image_2"].shape
        # boxes index the region exactly
        for i in (1, 2):
            b = d[f"box_{i}"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] <= np.array([32, 28, 30])).all()
            sl = tuple(slice(lo, hi) for lo, hi in b)
            assert torch.equal(d[f"image_{i}"], region[(slice(None), *sl)])
        inter = T.box_overlap(b1, b2)
        assert inter is not None
        assert ((inter[:, 1] - inter[:, 0]) >= np.ceil(0.5 * np.array([16, 12, 20]))).all()
        s1, s2 = T.overlap_slices(b1, b2)
        assert torch.equal(d["image_1"][(slice(None), *s1)], d["image_2"][(slice(None), *s2)])


def test_crop_pair_region_too_small():
    t = T.RandOverlappingCropPaird("image", 16)
    with pytest.raises(ValueError, match="smaller than crop_size"):
        t({"image": torch.zeros(1, 10, 20, 20)})


def test_overlap_slices_disjoint_raises():
    with pytest.raises(ValueError, match="do not overlap"):
        T.overlap_slices(np.array([[0, 4]] * 3), np.array([[4, 8]] * 3))


def _cube_pair():
    img = np.zeros((1, 32, 32, 32), np.float32)
    img[:, 6:16, 10:22, 4:26] = 1.0  # asymmetric box so flips/rotations are visible
    img[:, 20:26, 20:28, 20:24] = 0.6
    lab = np.zeros((1, 32, 32, 32), np.int64)
    lab[:, 6:16, 10:22, 4:26] = 3
    lab[:, 20:26, 20:28, 20:24] = 5
    return img, lab


def test_geometric_augmentation_moves_labels_with_image():
    img, lab = _cube_pair()
    t = T.finetune_geometric_transform("image", "label", prob=0.5, affine_prob=1.0)
    t.set_random_state(11)
    changed = 0
    for _ in range(8):
        d = t({"image": img, "label": lab})
        im, lb = d["image"], d["label"]
        assert lb.dtype == torch.int64
        assert set(torch.unique(lb).tolist()) <= {0, 3, 5}  # nearest neighbour: no new values
        fg_img = im[0] > 0.3
        fg_lab = lb[0] > 0
        dice = 2 * (fg_img & fg_lab).sum() / (fg_img.sum() + fg_lab.sum())
        assert dice > 0.9
        # the bright cube carries label 3, the dim one label 5
        assert (lb[0][im[0] > 0.85] == 3).float().mean() > 0.9
        changed += int(not torch.equal(lb, torch.as_tensor(lab)))
    assert changed >= 6


def test_subtomo_view_shapes_determinism_and_rotation():
    x = np.zeros((1, 24, 24, 24), np.float32)
    x[:, 8:16, 10:14, 6:18] = 1.0
    a = T.subtomo_view_transform(24, intensity=False, max_translation=2)
    b = T.subtomo_view_transform(24, intensity=False, max_translation=2)
    a.set_random_state(5)
    b.set_random_state(5)
    va, vb = a({"image": x})["image"], b({"image": x})["image"]
    assert va.shape == (1, 24, 24, 24) and isinstance(va, torch.Tensor)
    assert torch.equal(va, vb)
    vc = a({"image": x})["image"]
    assert not torch.equal(va, vc)
    rot = a.transforms[0]
    R = rot.matrix[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)  # a proper rotation
    assert abs(np.linalg.det(R) - 1) < 1e-6
    assert np.all(np.abs(rot.matrix[:3, 3]) <= 2.0)


def test_subtomo_rotation_angles_cover_full_range():
    t = T.RandUniformRotateTranslated("image", max_translation=10)
    t.set_random_state(0)
    angles, shifts = [], []
    for _ in range(200):
        t.randomize()
        R = t.matrix[:3, :3]
        angles.append(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
        shifts.append(t.matrix[:3, 3])
    angles = np.array(angles)
    assert angles.max() > 150 and angles.min() < 60  # uniform on SO(3): angles up to 180°
    assert np.abs(np.array(shifts)).max() <= 10.0


def test_overlap_slices_is_the_one_used_by_the_dense_loss():
    """One overlap_slices: at factor 1 it selects box_overlap; the dense loss reads it."""
    from cryosiam_nb.models import losses

    rng = np.random.default_rng(0)
    for _ in range(20):
        lo1, lo2 = rng.integers(0, 8, 3), rng.integers(0, 8, 3)
        b1 = np.stack([lo1, lo1 + 12], axis=1)
        b2 = np.stack([lo2, lo2 + 12], axis=1)
        inter = T.box_overlap(b1, b2)
        s1, s2 = T.overlap_slices(b1, b2)
        assert [(s.start, s.stop) for s in s1] == [(a - o, b - o) for (a, b), o in zip(inter, lo1)]
        assert [(s.start, s.stop) for s in s2] == [(a - o, b - o) for (a, b), o in zip(inter, lo2)]
        # at half resolution: only map voxels entirely inside the overlap, same count
        h1, h2 = T.overlap_slices(b1, b2, factor=2, shape1=(6, 6, 6), shape2=(6, 6, 6))
        assert [s.stop - s.start for s in h1] == [s.stop - s.start for s in h2]
        for s, o, (a, b) in zip(h1, lo1, inter):
            assert o + 2 * s.start >= a and o + 2 * s.stop <= b
    # the loss takes both box layouts and agrees with slicing by overlap_slices
    g = torch.Generator().manual_seed(0)
    region = torch.randn(1, 4, 20, 20, 20, generator=g)
    b1, b2 = np.array([[0, 12], [2, 14], [4, 16]]), np.array([[6, 18], [0, 12], [8, 20]])
    crop = lambda b: region[(slice(None), slice(None), *(slice(*r) for r in b))]  # noqa: E731
    one = torch.ones(1, 3)
    views = [
        {"global_z": one, "global_p": one, "dense_z": crop(b), "dense_p": crop(b).clone()}
        for b in (b1, b2)
    ]
    flat = lambda b: np.concatenate([b[:, 0], b[:, 1]])  # noqa: E731
    a = losses.dense_simsiam_loss(*views, b1, b2)["dense"]
    b = losses.dense_simsiam_loss(*views, flat(b1), flat(b2))["dense"]
    assert a.item() == pytest.approx(-1.0, abs=1e-5) and a.item() == pytest.approx(b.item())
