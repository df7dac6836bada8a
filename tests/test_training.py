"""Training: per-tomogram split, datasets, and 2-iteration smoke tests of every trainer
(finite loss, checkpoint saved, resume continues the step count)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cryosiam_nb import pp, tl
from cryosiam_nb.training import data as D

torch.set_num_threads(1)

# very small networks so that every trainer runs in seconds on 2 shared cores
SMALL = dict(
    filters=(4, 4, 8, 8),
    fpn_channels=8,
    dense_dim=8,
    dense_pred_dim=4,
    dim=16,
    pred_dim=4,
    conv1_kernel=3,
)
SMALL_SUB = dict(filters=(4, 4, 8, 8), dim=16, pred_dim=4, conv1_kernel=3)
# 2 steps of 2 patches per epoch, a third of the tomograms held out
PATCHES = dict(batch_size=2, samples_per_epoch=4, val_fraction=0.34)


def _synthetic(n=3, shape=(20, 24, 24), seed=0):
    """Tomograms with two blob classes, instances, a lamella slab, clean and noisy."""
    rng = np.random.default_rng(seed)
    out = []
    zz, yy, xx = np.indices(shape)
    for i in range(n):
        clean = np.zeros(shape, np.float32)
        sem = np.zeros(shape, np.uint8)
        inst = np.zeros(shape, np.uint32)
        rows = []
        for k in range(6):
            c = rng.uniform(4, np.array(shape) - 4)
            r = 2.5 if k % 2 else 3.5
            m = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
            clean[m] = 1.0 if k % 2 else 0.6
            sem[m] = 3 if k % 2 else 1
            inst[m] = k + 1
            rows.append(
                dict(
                    id=k + 1,
                    species="a" if k % 2 else "b",
                    size_category="small",
                    z=c[0],
                    y=c[1],
                    x=c[2],
                    n_voxels=int(m.sum()),
                )
            )
        lam = np.zeros(shape, np.uint8)
        lam[3:-3] = 1
        noisy = clean + rng.normal(0, 0.3, shape).astype(np.float32)
        out.append(
            D.Tomogram(
                f"t{i}",
                pp.normalize(noisy, invert=False).values,
                {"clean": clean, "semantic": sem, "instances": inst, "lamella": lam},
                voxel_size=10.0,
                particles=pd.DataFrame(rows),
            )
        )
    return out


# --------------------------------------------------------------------------- data
def test_split_is_deterministic_disjoint_and_order_free():
    names = [f"tomo{i}" for i in range(20)]
    tr, va = D.split_tomograms(names, 0.2, seed=3)
    tr2, va2 = D.split_tomograms(list(reversed(names)), 0.2, seed=3)
    assert (tr, va) == (tr2, va2)
    assert not set(tr) & set(va) and set(tr) | set(va) == set(names)
    assert len(va) == 4
    assert D.split_tomograms(names, 0.2, seed=4)[1] != va  # the seed matters
    assert len(D.split_tomograms(["a", "b"], 0.1, seed=0)[1]) == 1  # at least one val tomo
    with pytest.raises(ValueError, match="unique"):
        D.split_tomograms(["a", "a"], 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_tomograms(names, 1.0)


def test_patch_dataset_deterministic_and_aligned():
    from cryosiam_nb.transforms import finetune_geometric_transform

    tomos = _synthetic(2)
    tf = finetune_geometric_transform("image", "semantic")
    ds = D.PatchDataset(
        tomos, 12, 6, keys=["semantic"], transform=tf, seed=1, foreground_key="semantic"
    )
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["semantic"], b["semantic"])
    assert a["image"].shape == (1, 12, 12, 12) and a["semantic"].dtype == torch.int64
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])
    with pytest.raises(ValueError, match="has no 'nope'"):
        D.PatchDataset(tomos, 8, 2, keys=["nope"])


def test_crop_pair_dataset_boxes_match_views():
    tomos = _synthetic(1)
    ds = D.CropPairDataset(tomos, (16, 16, 16), (10, 10, 10), 4, view_transform=None, seed=0)
    item = ds[0]
    from cryosiam_nb.transforms import overlap_slices

    s1, s2 = overlap_slices(item["box_1"].numpy(), item["box_2"].numpy())
    assert torch.equal(item["view_1"][(slice(None), *s1)], item["view_2"][(slice(None), *s2)])
    assert item["box_1"].shape == (3, 2)


def test_as_tomograms_from_dicts_and_errors(tmp_path):
    vol = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    lab = (vol > 0.5).astype(np.uint8)
    t = D.as_tomograms([{"image": vol, "semantic": lab, "voxel_size": 7.0}])[0]
    assert t.voxel_size == 7.0 and t.image.min() == 0 and t.image.max() == 1
    with pytest.raises(ValueError, match="label 'semantic' has shape"):
        D.as_tomograms([{"image": vol, "semantic": lab[:4]}])
    with pytest.raises(ValueError, match="no such training data folder"):
        D.as_tomograms(tmp_path / "missing")


def test_training_normalisation_is_pp_normalize():
    """One percentile normalisation: training tomograms are normalised like inference input."""
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 1.0, (16, 18, 20)).astype(np.float32)
    t = D.as_tomograms([{"image": vol, "clean": vol * 2}])[0]
    ref = pp.normalize(vol, invert=False).values
    np.testing.assert_array_equal(t.image, ref)
    np.testing.assert_array_equal(t.labels["clean"], pp.normalize(vol * 2, invert=False).values)
    # and both agree with the exact numpy percentile definition (to pp's histogram resolution)
    lo, hi = np.percentile(vol, [0.1, 99.9])
    exact = np.clip((vol - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(t.image, exact, atol=1e-4)


@pytest.mark.parametrize("masking", ["none", "strict", "convex_hull"])
def test_training_boxes_equal_tl_extract_subtomograms(masking):
    """One extractor: the SSL training boxes are the boxes tl.extract_subtomograms feeds
    tl.embed, for the same particles, rounding (half up) and masking."""
    tomos = _synthetic(2)
    # off-grid centres, some at .5 and near the border: the rounding rule matters
    for t in tomos:
        t.particles.loc[0, ["z", "y", "x"]] = [2.5, 3.5, 21.5]
        t.particles.loc[1, "x"] = t.particles.loc[1, "x"] + 0.5
    from cryosiam_nb.training.ssl import subtomograms_from_tomograms

    sub, meta = subtomograms_from_tomograms(tomos, 12, masking=masking, grow=1)
    ref = []
    for t in tomos:
        table = t.particles.rename(columns={"id": "particle_id"})
        ref.append(
            tl.extract_subtomograms(
                t.image,
                table,
                box=12,
                instances=t.labels["instances"],
                masking=masking,
                grow=1,
                progress=False,
            )
        )
    np.testing.assert_array_equal(sub, np.concatenate(ref))
    assert len(meta) == len(sub) == 12
    c = 12 // 2  # particle 3 of t0 is untouched: its centre voxel is its own, and kept
    assert sub[2, c, c, c] > 0
    if masking != "none":
        assert (sub[0] == 0).all()  # particle 1 was moved off its voxels: all masked away
    with pytest.raises(ValueError, match="masking"):
        subtomograms_from_tomograms(tomos, 12, masking="bogus")


# --------------------------------------------------------------------------- trainers
def _resume_check(train, out, *args, **kw):
    """``train(*args, **kw)`` silently for one epoch of 2 steps, then resumed to two
    epochs: finite loss, checkpoint written, the step count continued."""
    kw.update(progress=False, seed=0)
    _, h1 = train(*args, epochs=1, out=out, **kw)
    assert np.isfinite(h1["loss"]).all()
    assert out.exists()
    steps = int(h1["step"].iloc[-1])
    assert steps == 2
    model, h2 = train(*args, epochs=2, out=out, resume=True, **kw)
    assert list(h2["epoch"]) == [1, 2]
    assert int(h2["step"].iloc[-1]) == 2 * steps  # continued, not restarted
    from cryosiam_nb import models

    loaded = models.load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].cpu(), v.cpu()), k
    return model, h2


def test_pretrain_dense_smoke_and_resume(tmp_path):
    from cryosiam_nb.training import pretrain_dense

    model, h = _resume_check(
        pretrain_dense,
        tmp_path / "dense.pt",
        _synthetic(3),
        region_size=16,
        crop_size=12,
        **PATCHES,
        **SMALL,
    )
    assert "val_loss" in h and np.isfinite(h["val_loss"]).all()
    assert (tmp_path / "dense.history.csv").exists()
    assert model.metadata["voxel_size"] == 10.0


@pytest.mark.parametrize("task", ["denoise", "semantic", "lamella", "instance"])
def test_finetune_smoke_and_resume(tmp_path, task):
    from cryosiam_nb.training import finetune

    model, h = _resume_check(
        finetune, tmp_path / f"{task}.pt", task, _synthetic(3), patch_size=12, **PATCHES, **SMALL
    )
    metric = {"denoise": "val_psnr", "semantic": "val_dice_mean", "lamella": "val_dice_mean"}.get(
        task, "val_dice_foreground"
    )
    assert metric in h
    assert model.metadata["metrics"]


def test_finetune_from_backbone_freezes_encoder():
    from cryosiam_nb import models
    from cryosiam_nb.training import finetune

    bb = models.build("dense_ssl", "tiny", **SMALL)
    enc0 = {k: v.clone() for k, v in bb.backbone.encoder.state_dict().items()}
    model, _ = finetune(
        "semantic",
        _synthetic(2),
        backbone=bb,
        freeze="encoder",
        epochs=1,
        batch_size=2,
        samples_per_epoch=4,
        patch_size=12,
        val_fraction=0,
        progress=False,
    )
    for k, v in model.backbone.encoder.state_dict().items():
        assert torch.equal(v, enc0[k]), k  # frozen: weights and BN statistics unchanged
    with pytest.raises(ValueError, match="freeze"):
        finetune("semantic", _synthetic(1), freeze="decoder")


def test_pretrain_subtomo_and_contrastive_smoke(tmp_path):
    from cryosiam_nb.training import pretrain_subtomo, refine_contrastive
    from cryosiam_nb.training.ssl import subtomograms_from_tomograms

    tomos = _synthetic(3)
    model, _ = _resume_check(
        pretrain_subtomo,
        tmp_path / "sub.pt",
        tomos,
        box=12,
        batch_size=4,
        samples_per_epoch=8,
        val_fraction=0.34,
        **SMALL_SUB,
    )
    sub, meta = subtomograms_from_tomograms(tomos, 12)
    assert len(sub) == len(meta) == 18
    labels = meta["species"].to_numpy(), meta["size_category"].to_numpy()
    _resume_check(
        refine_contrastive,
        tmp_path / "con.pt",
        model,
        sub,
        *labels,
        pairs_per_epoch=8,
        batch_size=4,
    )
    emb = model.embed(torch.from_numpy(sub[:3, None]))
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)


def test_cli_finetune_from_mrc_files(tmp_path, capsys):
    import mrcfile

    from cryosiam_nb import models
    from cryosiam_nb.training import main_train

    t = _synthetic(1, shape=(16, 16, 16))[0]
    img, lab = tmp_path / "tomo.mrc", tmp_path / "labels.mrc"
    with mrcfile.new(img) as m:
        m.set_data(t.image.astype(np.float32))
        m.voxel_size = 10.0
    with mrcfile.new(lab) as m:
        m.set_data(t.labels["semantic"].astype(np.int8))
        m.voxel_size = 10.0
    out = tmp_path / "seg.pt"
    argv = ["finetune", "semantic", "--image", str(img), "--target", str(lab)]
    argv += ["--out", str(out), "--epochs", "1", "--batch-size", "2", "--samples-per-epoch", "2"]
    argv += ["--val-fraction", "0", "--no-progress"]
    assert main_train(argv) == 0
    model = models.load(out)
    assert model.task == "semantic" and model.voxel_size == 10.0
    assert "saved" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main_train(["finetune", "semantic", "--out", str(out)])  # no data given
