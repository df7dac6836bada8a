"""The multi-task model: one backbone pass for every head, its training and its outputs."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import torch
import xarray as xr

from cryosiam_nb import models, tl
from cryosiam_nb.constants import HEAD_TASKS
from cryosiam_nb.inference import lamella_mask, outputs_of, postprocess_semantic, predict
from cryosiam_nb.io import InputError
from cryosiam_nb.models.losses import SemanticLoss
from cryosiam_nb.training.data import PatchDataset, Tomogram
from cryosiam_nb.training.multitask import (
    class_weights_of,
    multitask_loss,
    train_multitask,
    varied_training_set,
)


def _model(seed: int = 0, task: str = "multitask") -> models.CryoSiamModel:
    torch.manual_seed(seed)
    return models.build(task, "tiny", patch_size=16).eval()


def _vol(shape=(24, 40, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _count_backbone(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    model.backbone.register_forward_hook(hook)
    return calls


def test_multitask_model_has_every_head_and_survives_save_load(tmp_path):
    m = _model()
    out = m(torch.zeros(2, 1, 16, 16, 16))
    prefixes = {k.split("/")[0] for k in out}
    assert prefixes == set(HEAD_TASKS)
    assert out["semantic/logits"].shape == (2, 6, 16, 16, 16)
    assert out["lamella/logits"].shape == (2, 2, 16, 16, 16)
    assert m.part_classes["lamella"] == ("outside", "sample")
    path = models.save(m, tmp_path / "mt.pt")
    m2 = models.load(path)
    x = torch.rand(1, 1, 16, 16, 16)
    a, b = m(x), m2.eval()(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_one_backbone_pass_gives_all_outputs():
    m = _model()
    calls = _count_backbone(m)
    ds = predict(_vol(), m, batch_size=1)
    n0 = calls["n"]  # predict is lazy (one dry run at most)
    dask.compute(*[ds[v] for v in ds.data_vars])
    single = _model(task="semantic")
    calls1 = _count_backbone(single)
    ds1 = predict(_vol(), single, batch_size=1)
    n1 = calls1["n"]
    dask.compute(ds1["labels"])
    # every head of every task from the same windows as one single-task model
    assert calls["n"] - n0 == calls1["n"] - n1 > 0
    assert {"denoised", "semantic_labels", "lamella_labels", "instance_foreground"} <= set(
        ds.data_vars
    )
    for v in ds.data_vars:
        assert ds[v].attrs["voxel_size"] == ds.attrs["voxel_size"]


def test_outputs_of_gives_single_task_names_and_consumers_accept_multitask():
    m = _model()
    ds = predict(_vol(), m).compute()
    sem = outputs_of(ds, "semantic")
    assert set(sem.data_vars) == {"probabilities", "labels", "distance"}
    assert list(sem.coords["class"].values) == list(m.class_names)
    np.testing.assert_array_equal(sem["labels"].values, ds["semantic_labels"].values)
    assert outputs_of(ds, "instance").attrs["task"] == "instance"
    # the post-processing tools take the multi-task Dataset as it is
    a = lamella_mask(ds, progress=False).compute().values
    b = lamella_mask(outputs_of(ds, "lamella")["probabilities"], progress=False).compute()
    np.testing.assert_array_equal(a, b.values)
    a = postprocess_semantic(ds).compute().values
    np.testing.assert_array_equal(a, postprocess_semantic(sem).compute().values)
    la = tl.instances(ds, progress=False).values
    lb = tl.instances(outputs_of(ds, "instance"), progress=False).values
    np.testing.assert_array_equal(la, lb)
    with pytest.raises(ValueError, match="no 'dense_ssl' outputs"):
        outputs_of(ds, "dense_ssl")


def test_models_sharing_a_backbone_run_in_one_pass_and_others_are_refused():
    sem, inst = _model(1, "semantic"), _model(2, "instance")
    inst.backbone.load_state_dict(sem.backbone.state_dict())
    vol = _vol()
    both = predict(vol, [sem, inst]).compute()
    alone = predict(vol, inst).compute()
    np.testing.assert_allclose(
        both["instance_foreground"].values, alone["foreground"].values, atol=1e-5
    )
    np.testing.assert_array_equal(
        both["semantic_labels"].values, predict(vol, sem)["labels"].values
    )
    other = _model(3, "denoise")
    with pytest.raises(ValueError, match="different backbone weights"):
        predict(vol, [sem, other])
    # parts with different head widths: the combined config rebuilds the same network
    torch.manual_seed(4)
    wide = models.build("semantic", "tiny", patch_size=16, head_filters=[16, 16]).eval()
    wide.backbone.load_state_dict(inst.backbone.state_dict())
    combined = models.combine([inst, wide])
    assert combined.config["heads"]["task_filters"] == {"semantic": [16, 16]}
    rebuilt = models.build_from_config(combined.config)
    rebuilt.load_state_dict(combined.state_dict())  # raises on any shape mismatch


def _batch(shape=(2, 1, 16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(shape, generator=g)
    lab = (img > 0.7).long()
    return {
        "image": img,
        "clean": img,
        "lamella": (img > 0.2).long(),
        "semantic": lab * 3,
        "instances": lab,
    }


def test_multitask_loss_trains_every_head_and_weights_select_tasks():
    m = _model().train()
    batch = _batch()
    loss, logs = multitask_loss(m(batch["image"]), batch)
    loss.backward()
    for t in HEAD_TASKS:
        g = [p.grad for p in getattr(m.heads, t).parameters()]
        assert all(x is not None and float(x.abs().sum()) > 0 for x in g), t
        assert f"loss_{t}" in logs
    m.zero_grad()
    loss, logs = multitask_loss(m(batch["image"]), batch, weights={"denoise": 0.0})
    loss.backward()
    assert "loss_denoise" not in logs
    assert all(
        p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.heads.denoise.parameters()
    )


def test_balanced_patches_see_rare_classes_more_often():
    rng = np.random.default_rng(0)
    lab = np.zeros((32, 64, 64), np.int64)
    lab[:, :, :32] = 1  # a common class
    lab[10:14, 30:34, 50:54] = 5  # a rare one (64 voxels)
    t = Tomogram("t", rng.random(lab.shape, dtype=np.float32), {"semantic": lab})

    def share(balance: bool) -> float:
        ds = PatchDataset(
            [t],
            8,
            200,
            keys=["semantic"],
            seed=1,
            foreground_key="semantic",
            foreground_fraction=1.0,
            balance=balance,
        )
        return float(np.mean([(ds[i]["semantic"] == 5).any().item() for i in range(200)]))

    assert share(True) > 0.35
    assert share(True) > 3 * share(False)


def test_class_weights_lift_rare_classes_and_weight_the_ce_term():
    lab = np.zeros((20, 20, 20), np.int64)
    lab[:10] = 1  # half the voxels
    lab[0, 0, :8] = 2  # 8 voxels: rare
    t = Tomogram("t", np.zeros(lab.shape, np.float32), {"semantic": lab})
    w = class_weights_of([t], 4)
    assert w[0] == pytest.approx(1.0, abs=0.01) and w[1] == pytest.approx(1.0, abs=0.01)
    assert w[2] == 10.0  # (8 / 3992) ** -0.5 ≈ 22 → clipped
    assert w[3] == 1.0  # absent
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 20, 20, 20)
    target = torch.from_numpy(lab)[None]
    plain = SemanticLoss(4, distance_weight=0)({"logits": logits}, target)["ce"]
    lifted = SemanticLoss(4, distance_weight=0, class_weights=w)({"logits": logits}, target)
    assert float(lifted["ce"]) != pytest.approx(float(plain))
    with pytest.raises(InputError, match="class_weights"):
        SemanticLoss(4, class_weights=[1.0, 2.0])


def test_varied_training_set_and_a_short_joint_training(tmp_path):
    tomos = varied_training_set(3, (24, 40, 40), seed=11, mode="fast", progress=False)
    assert len({t.name for t in tomos}) == 3
    for t in tomos:
        assert t.image.shape == (24, 40, 40) and t.voxel_size == 10.0
        for k in ("clean", "semantic", "instances", "lamella"):
            assert t.labels[k].shape == t.image.shape
        assert np.issubdtype(t.labels["semantic"].dtype, np.integer)
    model, hist = train_multitask(
        tomos[:2],
        val_data=tomos[2:],
        epochs=1,
        samples_per_epoch=4,
        batch_size=2,
        patch_size=16,
        out=tmp_path / "mt.pt",
        class_weights="auto",
        progress=False,
    )
    cw = models.load(tmp_path / "mt.pt").metadata["training"]["class_weights"]["semantic"]
    assert len(cw) == 6 and min(cw) == 1.0 and max(cw) <= 10.0
    assert {"loss_denoise", "loss_lamella", "loss_semantic", "loss_instance"} <= set(hist.columns)
    assert "val_semantic_dice_mean" in hist.columns and "val_lamella_dice" in hist.columns
    loaded = models.load(tmp_path / "mt.pt")
    assert loaded.task == "multitask" and loaded.metadata["training"]["kind"] == "multitask"
    # a second stage continues a model of another size (wider heads): its sizes are kept
    # (and a semantic head wider than the others, which survives saving and loading)
    wide = models.build(
        "multitask", "tiny", head_filters=[16, 32], head_task_filters={"semantic": [24, 24]},
        voxel_size=10.0,
    )  # fmt: skip
    assert wide.heads.semantic.trunk[0].out_channels == 24
    assert wide.heads.instance.trunk[0].out_channels == 16
    cont, _ = train_multitask(
        tomos[:2], init=wide, epochs=1, samples_per_epoch=2, batch_size=2, patch_size=16,
        progress=False, out=tmp_path / "wide.pt",
    )  # fmt: skip
    assert cont.config["heads"]["filters"] == [16, 32]
    assert cont.config["heads"]["task_filters"] == {"semantic": [24, 24]}
    assert models.load(tmp_path / "wide.pt").heads.semantic.trunk[3].out_channels == 24
    with pytest.raises(ValueError, match="task_filters"):
        models.build("multitask", "tiny", head_task_filters={"nucleus": [8, 8]})


def test_instance_defaults_are_tuned_on_validation_tomograms_over_the_grid():
    from cryosiam_nb.training.multitask import tune_instance_defaults

    tomos = varied_training_set(1, (24, 40, 40), seed=21, mode="fast", progress=False)
    grid = {"threshold_foreground": (0.3, 0.5), "boundary_bias": (0.5,)}
    best, table = tune_instance_defaults(_model(), tomos, grid=grid, progress=False)
    assert set(best) == set(grid) and best["threshold_foreground"] in (0.3, 0.5)
    assert len(table) == 2 and {"ap50", "f1_small", "score"} <= set(table.columns)
    # best first: settings reaching the small-particle F1 floor, then by score
    met = table["f1_floor_met"].to_numpy()
    assert not (~met[:-1] & met[1:]).any()
    for _, part in table.groupby("f1_floor_met"):
        assert part["score"].is_monotonic_decreasing
    # a tomogram without small particles adds no small-particle F1 (not a 0 to the mean):
    # perfect maps of the full labels score the same with or without a second tomogram
    # whose small particles are erased from the truth
    from cryosiam_nb.segmentation import maps_from_labels

    t = tomos[0]
    gt = t.labels["instances"]
    ids, n = np.unique(gt[gt > 0], return_counts=True)
    assert (n < 150).any()
    no_small = Tomogram(
        "no_small", t.image, {**t.labels, "instances": np.where(np.isin(gt, ids[n < 150]), 0, gt)}
    )
    perfect = maps_from_labels(gt).compute()
    kw = {"grid": {"threshold_foreground": (0.5,)}, "progress": False}
    _, one = tune_instance_defaults(None, [t], predictions=[perfect], **kw)
    _, both = tune_instance_defaults(None, [t, no_small], predictions=[perfect] * 2, **kw)
    assert one["f1_small"].iloc[0] > 0.5
    np.testing.assert_allclose(both["f1_small"], one["f1_small"])


def test_instance_tuning_ranks_settings_below_the_small_f1_floor_last():
    """A higher AP-50 + F1 score must not win with small-particle F1 under the floor (the
    optional stage 9 calibrated that way); ties keep ``tl.instances``' own defaults."""
    import pandas as pd

    from cryosiam_nb.training.multitask import _rank_settings

    rows = pd.DataFrame(
        {
            "threshold_foreground": [0.2, 0.3, 0.4, 0.5],
            "ap50": [0.40, 0.30, 0.30, 0.10],
            "f1_small": [0.55, 0.72, 0.72, 0.90],
        }
    )
    rows["score"] = (rows["ap50"] + rows["f1_small"]) / 2
    defaults = {"threshold_foreground": 0.4}
    free = _rank_settings(rows, defaults, None)
    assert free["threshold_foreground"].tolist() == [0.4, 0.3, 0.5, 0.2]
    floored = _rank_settings(rows, defaults, 0.7)
    assert floored["threshold_foreground"].tolist() == [0.4, 0.3, 0.5, 0.2]
    rows.loc[0, "ap50"] = 0.9  # the best score, but small particles below the floor
    rows["score"] = (rows["ap50"] + rows["f1_small"]) / 2
    assert _rank_settings(rows, defaults, None)["threshold_foreground"].iloc[0] == 0.2
    floored = _rank_settings(rows, defaults, 0.7)
    assert floored["threshold_foreground"].tolist() == [0.4, 0.3, 0.5, 0.2]
    assert floored["f1_floor_met"].tolist() == [True, True, True, False]
    # nothing reaches the floor: the score decides
    assert _rank_settings(rows, defaults, 0.95)["threshold_foreground"].iloc[0] == 0.2


def test_every_recipe_stage_has_settings_and_a_card_note():
    """``--stages NAME`` must not fail at the card after training: each stage the recipe
    offers has its settings and the sentence the model card prints for it."""
    from cryosiam_nb.training import multitask_recipe
    from cryosiam_nb.training.multitask_card import STAGE_NOTES
    from cryosiam_nb.training.recipe import RECIPE

    for name in multitask_recipe.STAGES + multitask_recipe.OPTIONAL_STAGES:
        assert RECIPE["multitask"].get(name, {}).get("epochs"), name
        assert STAGE_NOTES.get(name), name


def test_recipe_continues_the_shipped_model_with_a_stage_and_leaves_no_side_files(tmp_path):
    import shutil

    from cryosiam_nb.training import recipe

    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", tmp_path / "tiny-multitask.pt")
    argv = ["--quick", "--only", "multitask", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(InputError, match="stage99"):
        recipe.main([*argv, "--stages", "stage99"])
    assert recipe.main([*argv, "--stages", "stage4"]) == 0
    m = models.load(tmp_path / "tiny-multitask.pt")
    shipped = list(models.load("tiny-multitask").metadata["stages"])
    assert list(m.metadata["stages"]) == [*shipped, "stage4"]
    assert m.metadata["stages"]["stage4"]["class_weights"]["semantic"][0] == 1.0
    assert m.metadata["stages"]["stage4"]["small_weight"] == 4.0
    card = (tmp_path / "tiny-multitask.md").read_text()
    assert "Stage4 steps" in card and "small-particle instance weight 4.0" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-multitask.md", "tiny-multitask.pt"]


def test_stage_trains_the_raw_logits_not_the_calibrated_ones(tmp_path):
    """A continuation stage undoes the shipped model's semantic prior correction first."""
    import shutil

    from cryosiam_nb.models.logits import logit_layer as _logit_layer
    from cryosiam_nb.training.multitask_recipe import train_stage
    from cryosiam_nb.training.recipe import QUICK, _overridden

    path = tmp_path / "tiny-multitask.pt"
    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", path)
    before = models.load(path)
    shift = np.asarray(before.metadata["semantic_prior"]["shift"], np.float32)
    assert np.abs(shift).max() > 0
    conv, off = _logit_layer(before, "semantic")
    raw = conv.bias.detach()[off : off + len(shift)] - torch.from_numpy(shift)
    mc = dict(QUICK["multitask"])
    mc["stage4"] = {**mc["stage4"], "lr": 0.0}  # no weight moves: only the undo shows
    train_stage(path, _overridden(QUICK, multitask=mc), "stage4", progress=False)
    after = models.load(path)
    assert "semantic_prior" not in after.metadata
    conv, off = _logit_layer(after, "semantic")
    torch.testing.assert_close(conv.bias.detach()[off : off + len(shift)], raw)


def test_a_stage_trains_on_its_own_patch_size_and_the_card_says_so(tmp_path):
    """A stage's ``patch_size`` reaches the patches it trains on, is recorded with the
    stage, and the card prints each stage's own patch (older stages: the preset's)."""
    import shutil

    from cryosiam_nb.training.multitask_card import _stage_patch
    from cryosiam_nb.training.multitask_recipe import train_stage
    from cryosiam_nb.training.recipe import QUICK, _overridden

    path = tmp_path / "tiny-multitask.pt"
    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", path)
    mc = dict(QUICK["multitask"])
    mc["stage4"] = {**mc["stage4"], "patch_size": 24, "lr": 0.0}
    train_stage(path, _overridden(QUICK, multitask=mc), "stage4", progress=False)
    m = models.load(path)
    stages = m.metadata["stages"]
    assert stages["stage4"]["patch_size"] == [24, 24, 24]
    assert _stage_patch(stages["stage4"], m) == (24, 24, 24)
    assert _stage_patch(stages["stage9"], m) == (32, 32, 32)  # trained before it was recorded


@pytest.mark.parametrize("task", ["multitask", "semantic"])
def test_shift_logits_adds_the_shift_to_the_semantic_logits_only(task):
    from cryosiam_nb.training.calibration import shift_logits

    m = _model(3, task)
    x = torch.from_numpy(_vol((16, 16, 16), seed=4))[None, None]
    key = "semantic/logits" if task == "multitask" else "logits"
    with torch.inference_mode():
        before = {k: v.clone() for k, v in m(x).items()}
    shift = np.array([0.0, -1.5, -2.0, 0.5, -1.0, 0.25], np.float32)
    shift_logits(m, shift)
    with torch.inference_mode():
        after = m(x)
    delta = (after[key] - before[key]).mean(dim=(0, 2, 3, 4)).numpy()
    np.testing.assert_allclose(delta, shift, atol=1e-5)
    for k in before:
        if k != key:
            torch.testing.assert_close(after[k], before[k])
    with pytest.raises(InputError, match="fewer channels"):
        shift_logits(m, np.zeros(40))


def test_voxel_size_offsets_interpolate_between_sizes_and_hold_at_the_ends():
    from cryosiam_nb.models.logits import voxel_size_offsets

    table = {"voxel_size": [8.0, 10.0, 14.0], "offset": [[0, 1, 0], [0, 0, 2], [0, -1, 0]]}
    np.testing.assert_allclose(voxel_size_offsets(table, 10.0), [0, 0, 2])
    np.testing.assert_allclose(voxel_size_offsets(table, 9.0), [0, 0.5, 1])
    np.testing.assert_allclose(voxel_size_offsets(table, 13.0), [0, -0.75, 0.5])
    np.testing.assert_allclose(voxel_size_offsets(table, 5.0), [0, 1, 0])  # below: 8 Å's
    np.testing.assert_allclose(voxel_size_offsets(table, 30.0), [0, -1, 0])  # above: 14 Å's
    with pytest.raises(InputError, match="increase"):
        voxel_size_offsets({"voxel_size": [10.0, 8.0], "offset": [[0], [1]]}, 9.0)
    with pytest.raises(InputError, match="'offset'"):
        voxel_size_offsets({"voxel_size": [10.0], "offset": [[0], [1]]}, 9.0)
    with pytest.raises(InputError, match="positive"):
        voxel_size_offsets(table, 0.0)


def test_predict_adds_the_offsets_for_the_voxel_size_the_data_was_acquired_at():
    """A model with per-voxel-size semantic offsets gets those of the input's acquisition
    voxel size: ``pp.rescale``'s ``rescaled_from``, else the data's own, else the model's.
    The caller's model is never changed."""
    from cryosiam_nb import pp
    from cryosiam_nb.models.logits import logit_layer

    m = _model(5)
    m.voxel_size = 10.0
    plain = _model(5)
    plain.voxel_size = 10.0
    big = [0.0, 0.0, 0.0, 0.0, 60.0, 0.0]  # actin everywhere
    m.metadata["semantic_prior"] = {
        "by_voxel_size": {"voxel_size": [10.0, 14.0], "offset": [[0.0] * 6, big]}
    }
    conv, off = logit_layer(m, "semantic")
    bias = conv.bias.detach().clone()
    at14 = xr.DataArray(_vol((17, 29, 29), seed=2), dims=("z", "y", "x"))
    at14.attrs["voxel_size"] = 14.0
    x = pp.rescale(at14, 10.0)  # attrs["rescaled_from"] = 14
    assert x.attrs["rescaled_from"] == 14.0
    ds = predict(x, m, patch_size=16, precision="float32").compute()
    assert ds.attrs["semantic_offsets_voxel_size"] == 14.0
    assert ds.attrs["semantic_offsets"] == big
    assert (ds["semantic_labels"].values == 4).all()
    torch.testing.assert_close(conv.bias.detach(), bias)  # the caller's model untouched
    # the same voxels acquired at 10 Å (no rescaled_from; a bare array: the model's 10 Å):
    # zero offsets, the plain model's output, and other heads are never shifted
    ref = predict(x.values, plain, patch_size=16, precision="float32").compute()
    for data in (x.values, xr.DataArray(x.values, dims=("z", "y", "x"), attrs={"voxel_size": 10})):
        out = predict(data, m, patch_size=16, precision="float32").compute()
        assert out.attrs["semantic_offsets"] == [0.0] * 6
        np.testing.assert_array_equal(out["semantic_labels"].values, ref["semantic_labels"].values)
    np.testing.assert_array_equal(ds["lamella_labels"].values, ref["lamella_labels"].values)
    # 12 Å: halfway, actin logits +30 — still actin everywhere
    at12 = xr.DataArray(x.values, dims=("z", "y", "x"), attrs={"voxel_size": 12.0})
    out = predict(at12, m, patch_size=16, precision="float32").compute()
    assert out.attrs["semantic_offsets"][4] == 30.0
    # without a table nothing is recorded
    assert "semantic_offsets" not in ref.attrs


def test_the_ascent_s_one_class_argmax_equals_the_full_argmax_ties_included():
    """Coordinate ascent moves one class' offset at a time and reuses the other classes'
    best; its labels must equal ``np.argmax`` of the shifted logits (a tie to the lower
    class)."""
    from cryosiam_nb.training.calibration import _argmax_with, _best_other

    rng = np.random.default_rng(0)
    lp = rng.integers(0, 4, (6, 7, 8, 9)).astype(np.float32) / 2  # many exact ties
    for c in range(6):
        for bias in (np.zeros(6, np.float32), rng.integers(-2, 3, 6).astype(np.float32) / 2):
            other = _best_other(lp, bias, c)
            for step in (-1.0, -0.5, 0.0, 0.5, 1.0):
                b = bias.copy()
                b[c] += step
                ref = np.argmax(lp + b[:, None, None, None], axis=0)
                np.testing.assert_array_equal(_argmax_with(lp[c] + b[c], c, other), ref)


def test_voxel_size_offsets_are_chosen_per_size_with_the_minimum_sizes_fixed():
    from cryosiam_nb.training.calibration import class_bias_ascent

    rng = np.random.default_rng(0)
    gt = np.zeros((12, 12, 12), np.int64)
    gt[2:6, 2:10, 2:10] = 1
    lp = np.log(np.full((2, *gt.shape), 0.5, np.float32))
    lp[1] += np.where(gt == 1, 0.3, -0.3) - 0.6 + 0.05 * rng.standard_normal(gt.shape)
    bias, table = class_bias_ascent([lp], [gt], start_min_size=[0, 600])
    # a minimum size above the class' largest component keeps it off whatever the offset:
    # the sizes are fixed (not chosen) when no ``min_sizes`` are given
    assert table.iloc[-1]["min_size"] == [0, 600] and len(table) == 1
    bias, table = class_bias_ascent([lp], [gt], start_min_size=[0, 0])
    assert bias[1] > 0 and table.iloc[-1]["semantic_dice"] == 1.0
    with pytest.raises(InputError, match="start_min_size"):
        class_bias_ascent([lp], [gt], start_min_size=[0])


def test_semantic_prior_is_calibrated_on_validation_tomograms():
    from cryosiam_nb.training.calibration import (
        PRIOR_ALPHAS,
        calibrate_semantic_prior,
        prior_shift,
    )

    tomos = varied_training_set(1, (24, 40, 40), seed=22, mode="fast", progress=False)
    m = _model(5)
    with pytest.raises(InputError, match="class weights"):
        calibrate_semantic_prior(m, tomos, progress=False)
    m.metadata["training"] = {"class_weights": {"semantic": [1.0, 4.0, 10.0, 2.0, 10.0, 10.0]}}
    alpha, table = calibrate_semantic_prior(m, tomos, progress=False)
    assert alpha in PRIOR_ALPHAS and len(table) == len(PRIOR_ALPHAS)
    assert table["semantic_dice"].is_monotonic_decreasing
    assert table.iloc[0]["alpha"] == alpha
    np.testing.assert_allclose(prior_shift([1.0, np.e], 0.5), [0.0, -0.5], atol=1e-6)
    with pytest.raises(InputError, match="positive"):
        prior_shift([1.0, 0.0], 0.5)


def test_class_bias_ascent_undoes_a_class_the_network_over_paints():
    """A class whose logit is 2 too high swallows its neighbours; the per-class offsets
    found on the labels must take that back and restore the Dice."""
    from cryosiam_nb.training.calibration import class_bias_ascent

    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, size=(8, 12, 12)) for _ in range(2)]
    logps = []
    for g in labels:
        lp = np.log(np.full((4, *g.shape), 0.1, np.float32))
        np.put_along_axis(lp, g[None], np.log(0.7), axis=0)
        lp += rng.normal(0, 0.3, lp.shape).astype(np.float32)
        lp[2] += 2.0  # class 2 over-painted
        logps.append(lp)
    bias, table = class_bias_ascent(logps, labels)
    assert table.iloc[0]["round"] == 0 and table.iloc[0]["semantic_dice"] < 0.7
    assert table["semantic_dice"].is_monotonic_increasing
    assert bias[0] == 0.0 and -3.0 <= bias[2] <= -1.0  # the over-paint taken back
    assert table.iloc[-1]["semantic_dice"] > 0.95
    with pytest.raises(InputError, match="one label volume"):
        class_bias_ascent(logps, labels[:1])


def test_class_objective_weighs_a_class_in_one_tomogram_like_a_class_in_all():
    """Microtubules present in one validation tomogram of four must count as much as
    membranes present in all: the "class" objective gives them that weight, the
    "tomogram" one a quarter of it; the ascent then raises an under-called rare class
    only under the "class" objective."""
    from cryosiam_nb.training.calibration import class_bias_ascent, pooled_dice

    per = [{0: 1.0, 1: 1.0, 2: 0.0}] + [{0: 1.0, 1: 1.0}] * 3
    assert pooled_dice(per, "class") == pytest.approx(2 / 3)
    assert pooled_dice(per, "tomogram") == pytest.approx((2 / 3 + 3) / 4)
    with pytest.raises(InputError, match="objective"):
        pooled_dice(per, "voxel")

    # four tomograms, membranes in all (class 1), a rare class (2) in the first only, where
    # its logit is 0.4 too low; raising it by 0.5 finds it but also turns half of the
    # other tomograms' membranes (logit 2 only 0.45 below logit 1 there) into class 2
    labels, logps = [], []
    for i in range(4):
        g = np.zeros((8, 16, 16), np.int64)
        g[2:6, 2:14, 2:8] = 1
        lp = np.zeros((3, *g.shape), np.float32) - 3.0
        lp[0][g == 0] = 0.0
        lp[1][g == 1] = 0.0
        if i == 0:
            g[3:5, 4:12, 10:14] = 2
            lp[0][g == 2], lp[2][g == 2] = 0.0, -0.4
        else:
            lp[2][2:6, 2:14, 2:5] = -0.45
        labels.append(g)
        logps.append(lp)
    by_class, table = class_bias_ascent(logps, labels, objective="class")
    assert by_class[2] >= 0.5 and table.iloc[-1]["semantic_dice"] > 0.99
    by_tomo, _ = class_bias_ascent(logps, labels, objective="tomogram")
    assert by_tomo[2] == 0.0  # a quarter of the weight does not pay for the membranes
    with pytest.raises(InputError, match="objective"):
        class_bias_ascent(logps, labels, objective="voxel")


def test_class_bias_ascent_drops_specks_of_a_rare_class_and_matches_postprocess_semantic():
    """A rare class painted as scattered specks besides its one true filament: no offset
    can separate them, a minimum component size can; the in-memory filter the ascent
    scores with must be the one ``tl.postprocess_semantic`` applies out of core."""
    import dask.array as da
    import xarray as xr

    from cryosiam_nb import tl
    from cryosiam_nb.training.calibration import _drop_small, class_bias_ascent

    rng = np.random.default_rng(3)
    labels, logps = [], []
    for _ in range(2):
        g = np.zeros((24, 32, 32), np.int64)
        g[8:16, 4:12, 4:12] = 1  # a particle
        g[10:13, 20:23, 2:30] = 2  # a filament of the rare class (252 voxels)
        pred = g.copy()
        for z, y, x in rng.integers(0, 24, size=(40, 3)):  # 40 one-voxel specks of class 2
            pred[z, y + 4, x + 4] = 2
        lp = np.log(np.full((3, *g.shape), 0.05, np.float32))
        np.put_along_axis(lp, pred[None], np.log(0.9), axis=0)
        labels.append(g)
        logps.append(lp)
    bias, table = class_bias_ascent(logps, labels, min_sizes=(0, 5, 50, 1000))
    assert table.iloc[0]["min_size"] == [0, 0, 0]
    sizes = table.iloc[-1]["min_size"]
    assert sizes[2] in (5, 50)  # the specks go, the filament (252 voxels) stays
    assert table.iloc[-1]["semantic_dice"] > 0.99 > table.iloc[0]["semantic_dice"]
    # without min_sizes the table still carries the (all-off) sizes
    _, plain = class_bias_ascent(logps, labels)
    assert plain.iloc[-1]["min_size"] == [0, 0, 0]

    rnd = (rng.random((20, 20, 20)) * 4).astype(np.uint8)
    arr = xr.DataArray(da.from_array(rnd, chunks=7), dims=("z", "y", "x"))
    np.testing.assert_array_equal(
        _drop_small(rnd, [0, 3, 0, 6]),
        tl.postprocess_semantic(arr, min_size=[0, 3, 0, 6], progress=False).values,
    )


def test_recipe_calibrate_only_replaces_the_prior_correction_instead_of_stacking(
    tmp_path, monkeypatch
):
    import shutil

    from cryosiam_nb.models.logits import logit_layer as _logit_layer
    from cryosiam_nb.training import calibration, multitask_recipe, recipe
    from cryosiam_nb.training.calibration import SEMANTIC_MIN_SIZES

    # the instance post-processing is chosen on the calibration set alone (default
    # imaging, realistic size), not on the stages' small varied-SNR validation tomograms
    tuned_on: list[list[str]] = []
    real_tune = multitask_recipe.tune_instance_defaults

    def recording_tune(model, tomograms, **kw):
        tuned_on.append([t.name for t in tomograms])
        return real_tune(model, tomograms, **kw)

    monkeypatch.setattr(multitask_recipe, "tune_instance_defaults", recording_tune)
    # the semantic offsets and the lamella threshold see the whole recipe's pool, however
    # the weights came about: stage 1's and every chained stage's validation tomograms plus
    # the calibration set (not stage 1's alone under --calibrate-only)
    seen: dict[str, list[list[str]]] = {
        "calibrate_class_bias": [],
        "calibrate_lamella_threshold": [],
    }

    def recording(name):
        real = getattr(calibration, name)

        def run(model, tomograms, **kw):
            seen[name].append([t.name for t in tomograms])
            return real(model, tomograms, **kw)

        return run

    for name in seen:
        monkeypatch.setattr(calibration, name, recording(name))
    # the per-voxel-size offsets see the voxel_calibration scenes acquired at each size
    per_size: list[dict[float, list[str]]] = []
    real_vs = calibration.calibrate_voxel_size_offsets

    def recording_vs(model, by_voxel_size, min_size, **kw):
        per_size.append({v: [t.name for t in ts] for v, ts in by_voxel_size.items()})
        return real_vs(model, by_voxel_size, min_size, **kw)

    monkeypatch.setattr(calibration, "calibrate_voxel_size_offsets", recording_vs)
    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", tmp_path / "tiny-multitask.pt")
    argv = ["--quick", "--only", "multitask", "--out", str(tmp_path), "--no-progress"]
    biases, runs = [], []
    hand = "## Selection and held-out quality\n\n- chosen on validation seeds 7201–7205 (by hand)\n"
    for _ in range(2):
        assert recipe.main([*argv, "--calibrate-only"]) == 0
        card_path = tmp_path / "tiny-multitask.md"
        if not runs:  # a hand-written section added after the first run must survive the second
            card_path.write_text(card_path.read_text().replace("## Limits", hand + "\n## Limits"))
        m = models.load(tmp_path / "tiny-multitask.pt")
        runs.append(m.metadata["commands"])
        conv, off = _logit_layer(m, "semantic")
        biases.append(conv.bias.detach()[off : off + 6].clone())
        prior = m.metadata["semantic_prior"]
        assert len(prior["shift"]) == 6 and prior["shift"][0] == 0.0
        assert len(prior["class_bias"]) == 6 and prior["class_bias"][0] == 0.0
        assert set(m.metadata["instance_defaults"]) >= {"threshold_foreground", "average_edt"}
        assert 0.5 <= m.metadata["lamella_defaults"]["threshold"] <= 0.9
        sizes = m.metadata["semantic_defaults"]["min_size"]
        assert len(sizes) == 6 and set(sizes) <= set(SEMANTIC_MIN_SIZES)
        table = prior["by_voxel_size"]
        assert table["voxel_size"] == [10.0, 14.0]
        assert all(len(o) == 6 and o[0] == 0.0 for o in table["offset"])
        assert all(d1 >= d0 for d0, d1 in zip(table["dice_before"], table["dice"]))
    assert len(per_size) == 2 and per_size[0] == per_size[1]
    assert per_size[0][10.0] == ["sim_7101_general_default"]
    assert per_size[0][14.0] == ["sim_7101_general_default_14A"]
    cal = [t.name for t in multitask_recipe.calibration_set(recipe.QUICK["multitask"], False)]
    assert cal and tuned_on == [cal, cal]
    mc = recipe.QUICK["multitask"]
    pool = [t.name for t in multitask_recipe.recipe_validation_set(mc, False)] + cal
    assert seen["calibrate_lamella_threshold"] == [pool, pool]
    assert seen["calibrate_class_bias"] == [pool, pool]
    # more than stage 1's own: the low-SNR stages' validation tomograms differ from it
    assert len(pool) - len(cal) > mc["val_n"]
    # the same calibration data choose the same α: the bias must not move the second time
    torch.testing.assert_close(biases[0], biases[1])
    card = (tmp_path / "tiny-multitask.md").read_text()
    assert "Semantic prior correction" in card and "--calibrate-only" in card
    assert "per-class offsets" in card
    assert "Semantic post-processing" in card and "semantic_defaults" in card
    assert card.count("- chosen on validation seeds 7201–7205 (by hand)") == 1
    # each run is appended to the command history the card lists
    assert runs[1][:-1] == runs[0] and "--calibrate-only" in runs[1][-1]
    assert "Runs that made these weights" in card and runs[1][-1] in card


def test_lamella_threshold_is_calibrated_on_validation_tomograms():
    from cryosiam_nb.training.calibration import (
        LAMELLA_THRESHOLDS,
        calibrate_lamella_threshold,
    )

    tomos = varied_training_set(1, (24, 40, 40), seed=23, mode="fast", progress=False)
    thr, table = calibrate_lamella_threshold(_model(6), tomos, progress=False)
    assert thr in LAMELLA_THRESHOLDS and table.iloc[0]["threshold"] == thr
    assert table["lamella_dice"].is_monotonic_decreasing and len(table) == 5
    with pytest.raises(InputError, match="at least one"):
        calibrate_lamella_threshold(_model(6), [], progress=False)


def test_an_instance_only_stage_changes_the_instance_head_and_nothing_else(tmp_path):
    """Stage 6 trains the instance head alone: the backbone (frozen) and the heads with loss
    weight 0 keep their weights and BatchNorm statistics; only the semantic logits' bias
    moves (the prior correction is re-calibrated afterwards)."""
    import shutil

    from cryosiam_nb.training import recipe

    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", tmp_path / "tiny-multitask.pt")
    before = models.load(tmp_path / "tiny-multitask.pt").state_dict()
    argv = ["--quick", "--only", "multitask", "--out", str(tmp_path), "--no-progress"]
    assert recipe.main([*argv, "--stages", "stage6"]) == 0
    m = models.load(tmp_path / "tiny-multitask.pt")
    after = m.state_dict()
    assert m.metadata["stages"]["stage6"]["freeze"] == "backbone"
    # the semantic refiner reads the heads' output: the recipe trains a new one after a stage
    assert m.refiner is not None
    changed = {
        k for k in before if not k.startswith("refiner.") and not torch.equal(before[k], after[k])
    }
    assert changed and all(k.startswith("heads.instance.") or k.endswith(".bias") for k in changed)
    assert any(k.startswith("heads.instance.") for k in changed)
    others = [k for k in changed if not k.startswith("heads.instance.")]
    assert all(k.startswith("heads.semantic.") for k in others)  # the prior shift only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-multitask.md", "tiny-multitask.pt"]
