"""Tests for cryosiam_nb.metrics: Dice, instance AP, picking scores, PSNR, SSIM."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from cryosiam_nb import metrics
from cryosiam_nb.io import InputError


def _random_labels(shape, n, seed):
    """Random blobs: a Voronoi partition of random seeds cut by a random foreground mask."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    pts = rng.integers(0, shape, size=(n, 3))
    seeds[tuple(pts.T)] = np.arange(1, n + 1)
    _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[tuple(idx)]
    fg = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.5
    lab[~fg] = 0
    # drop a random subset of labels so that ids are not contiguous
    drop = rng.choice(np.arange(1, n + 1), size=n // 5, replace=False)
    lab[np.isin(lab, drop)] = 0
    return lab.astype(np.uint32)


def _brute_force_ap(pred, gt, t):
    p_ids = [i for i in np.unique(pred) if i]
    g_ids = [i for i in np.unique(gt) if i]
    iou = np.zeros((len(p_ids), len(g_ids)))
    for a, i in enumerate(p_ids):
        pm = pred == i
        for b, j in enumerate(g_ids):
            gm = gt == j
            iou[a, b] = (pm & gm).sum() / (pm | gm).sum()
    valid = iou > t
    if valid.size:
        r, c = linear_sum_assignment(-valid.astype(float))  # maximum number of matches
        tp = int(valid[r, c].sum())
    else:
        tp = 0
    fp, fn = len(p_ids) - tp, len(g_ids) - tp
    return tp / (tp + fp + fn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_brute_force(seed):
    gt = _random_labels((20, 24, 24), 30, seed)
    # prediction: the gt shifted, with some labels merged and some split
    pred = np.roll(gt, shift=(1, 0, -1), axis=(0, 1, 2)).astype(np.uint32)
    pred[pred == 3] = 4
    split = pred == 7
    pred[split & (np.indices(pred.shape)[2] > 12)] = 999
    thresholds = [0.1, 0.3, 0.5, 0.6, 0.75, 0.9]
    res = metrics.average_precision(pred, gt, thresholds=thresholds)
    for t in thresholds:
        assert res[f"AP{int(round(t * 100))}"] == pytest.approx(_brute_force_ap(pred, gt, t))
    assert res["mean"] == pytest.approx(np.mean([_brute_force_ap(pred, gt, t) for t in thresholds]))


def test_average_precision_dask_equals_numpy_and_identity():
    gt = _random_labels((24, 32, 32), 40, 5)
    pred = np.roll(gt, 1, axis=0)
    a = metrics.average_precision(pred, gt)
    b = metrics.average_precision(
        da.from_array(pred, chunks=(8, 16, 16)),
        xr.DataArray(da.from_array(gt, chunks=(12, 7, 9)), dims=("z", "y", "x")),
    )
    assert a["ap"] == b["ap"] and a["tp"] == b["tp"]
    assert list(a)[:10] == [f"AP{t}" for t in range(50, 100, 5)]
    perfect = metrics.average_precision(gt, gt)
    assert perfect["mean"] == 1.0 and perfect["n_gt"] == len(np.unique(gt)) - 1
    empty = np.zeros_like(gt)
    assert metrics.average_precision(empty, gt)["AP50"] == 0.0
    with pytest.raises(InputError):
        metrics.average_precision(gt[:-1], gt)


def test_dice_hand_checked():
    gt = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[0] = 1  # 16 voxels of class 1
    pred[0, :2] = 1  # 8 of them predicted
    gt[3, 0, 0] = 2
    pred[3, 0, 1] = 2  # no overlap for class 2
    d = metrics.dice(pred, gt)
    assert d[1] == pytest.approx(2 * 8 / (8 + 16))
    assert d[2] == 0.0
    assert d["mean"] == pytest.approx((2 / 3 + 0) / 2)
    named = metrics.dice(da.from_array(pred, chunks=2), gt, classes={1: "membrane", 5: "dna"})
    assert named["membrane"] == pytest.approx(2 / 3)
    assert np.isnan(named["dna"]) and named["mean"] == pytest.approx(2 / 3)


def test_psnr_and_ssim_hand_checked():
    rng = np.random.default_rng(0)
    ref = rng.random((16, 20, 20)).astype(np.float32)
    ref[0, 0, 0], ref[0, 0, 1] = 0.0, 1.0  # data range exactly 1
    x = ref + 0.1  # MSE = 0.01 → PSNR = 20 dB
    assert metrics.psnr(x, ref) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(x, ref, data_range=2.0) == pytest.approx(20 + 20 * np.log10(2), abs=1e-4)
    assert metrics.psnr(da.from_array(x, chunks=8), ref) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(ref, ref) == np.inf
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    noisy = ref + rng.normal(0, 0.2, ref.shape).astype(np.float32)
    want = structural_similarity(
        noisy.astype(np.float64), ref.astype(np.float64), data_range=1.0, win_size=7
    )
    assert metrics.ssim(noisy, ref) == pytest.approx(want, rel=1e-6)
    got = metrics.ssim(da.from_array(noisy, chunks=(8, 10, 10)), da.from_array(ref, chunks=9))
    assert got == pytest.approx(want, rel=1e-6)
    assert metrics.ssim(noisy, ref) < metrics.ssim(ref + 0.5 * (noisy - ref), ref) < 1.0


def test_picking_scores_optimal_one_to_one():
    true = np.array([[0, 0, 0], [0, 0, 4], [50, 50, 50], [90, 0, 0]], float)
    # pred 0 is closest to true 0 but must go to true 1 so that pred 1 can take true 0:
    # a greedy nearest-first matcher would get 1 match out of these two, the optimum gets 2.
    pred = np.array([[0, 0, 2.5], [0, 0, -2.0], [50, 50, 54], [20, 20, 20]], float)
    r = metrics.picking_scores(pred, true, radius=3.0)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 2)
    assert sorted(map(tuple, r["matches"])) == [(0, 1), (1, 0)]
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5
    assert r["fbeta"] == pytest.approx(0.5)
    r = metrics.picking_scores(pred, true, radius=4.5)  # pred 2 now within reach of true 2
    p, rc = 3 / 4, 3 / 4
    assert r["tp"] == 3 and r["f1"] == pytest.approx(2 * p * rc / (p + rc))
    r = metrics.picking_scores(pred[:1], true, radius=3.0)
    p, rc = 1.0, 0.25
    assert r["fbeta"] == pytest.approx(17 * p * rc / (16 * p + rc))  # CZII β = 4
    r = metrics.picking_scores(
        pred, true, 3.0, pred_classes=["a", "b", "a", "a"], true_classes=["a", "b", "a", "b"]
    )
    # matches (0→1: a vs b) and (1→0: b vs a): no class agreement
    assert r["class_agreement"] == 0.0 and r["precision_class"] == 0.0
    r = metrics.picking_scores(
        pred, pred, 1.0, pred_classes=[0, 1, 2, 3], true_classes=[0, 1, 2, 3]
    )
    assert r["tp"] == 4 and r["class_agreement"] == 1.0 and r["f1_class"] == 1.0
    empty = metrics.picking_scores(np.zeros((0, 3)), true, 3.0)
    assert empty["tp"] == 0 and empty["recall"] == 0.0
    with pytest.raises(InputError):
        metrics.picking_scores(np.zeros((3, 2)), true, 3.0)
