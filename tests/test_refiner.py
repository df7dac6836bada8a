"""The semantic refiner of the multi-task model: identity when untrained, saved and loaded
with the model, run by ``tl.predict``, trained and calibrated by the recipe."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from cryosiam_nb import models, tl
from cryosiam_nb.io import InputError
from cryosiam_nb.models.networks import SemanticRefiner


def _multitask():
    torch.manual_seed(0)
    return models.build("multitask", voxel_size=10.0, patch_size=(32, 32, 32)).eval()


def test_an_untrained_refiner_keeps_the_heads_decision_on_any_window_size():
    ref = SemanticRefiner(6).eval()
    g = torch.Generator().manual_seed(1)
    for shape in [(16, 16, 16), (20, 28, 36)]:  # 20, 28, 36: not multiples of 8
        x = torch.rand((1, 1, *shape), generator=g)
        logits = torch.randn((1, 6, *shape), generator=g)
        with torch.no_grad():
            out = ref(x, torch.rand((1, 1, *shape), generator=g), logits)
        assert out.shape == logits.shape
        assert torch.equal(out.argmax(1), logits.argmax(1))


def _trained_refiner(m):
    m.add_refiner()
    with torch.no_grad():  # a trained refiner: its correction now moves the logits
        m.refiner.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        m.refiner.head.bias.copy_(torch.tensor([0.0, 0, 0, 0, 3.0, 0]))
    return m


def test_a_refined_model_saves_loads_and_predicts_through_its_refiner(tmp_path):
    m = _multitask()
    with pytest.raises(ValueError, match="multi-task"):
        models.build("semantic").add_refiner()
    _trained_refiner(m)
    path = models.save(m, tmp_path / "r.pt")
    back = models.load(path)
    assert isinstance(back.refiner, SemanticRefiner)
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        a, b = m(x)["semantic/logits"], back(x)["semantic/logits"]
    torch.testing.assert_close(a, b)
    vol = np.random.default_rng(0).random((24, 40, 40), dtype=np.float32)
    refined = tl.predict(vol, back)["semantic_probabilities"].values
    assert back.remove_refiner() and back.refiner is None and "refiner" not in back.config
    plain = tl.predict(vol, back)["semantic_probabilities"].values
    # the +3 on actin's refined logit shows in every voxel's probability
    assert np.all(refined[4] > plain[4])


def test_predict_runs_the_refiner_as_a_second_pass_over_the_stitched_outputs():
    """What the refiner was trained on: the heads' whole-volume (stitched) probabilities.
    ``predict`` equals the heads' prediction followed by one MONAI sliding window of the
    refiner over (input, denoised, float16 probabilities), chunked or not; the distance
    and the other heads are the heads' own."""
    from monai.inferers import sliding_window_inference

    from cryosiam_nb.inference._refine import RefinerPass

    m = _trained_refiner(_multitask())
    vol = np.random.default_rng(3).random((32, 40, 36), dtype=np.float32)
    kw = {"patch_size": 16, "overlap": 0.25, "precision": "float32"}
    heads = copy.deepcopy(m)
    heads.refiner = None
    first = tl.predict(vol, heads, **kw).compute()
    inp = np.concatenate(
        [
            vol[None],
            first["denoised"].values[None],
            first["semantic_probabilities"].values.astype(np.float16).astype(np.float32),
        ]
    )
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(inp)[None],
            (16, 16, 16),
            1,
            lambda t: RefinerPass(m.refiner)(t)["semantic/logits"],
            overlap=0.25,
            mode="gaussian",
        )[0]
    want = logits.softmax(0).numpy()
    for chunks in (None, (24, 24, 24)):
        ds = tl.predict(vol, m, chunks=chunks, **kw)
        assert ds.attrs["semantic_refiner"] == "second pass"
        got = ds["semantic_probabilities"].values.astype(np.float32)
        np.testing.assert_allclose(got, want, atol=2e-3)
        labels = ds["semantic_labels"].values
        sure = np.sort(want, axis=0)[-1] - np.sort(want, axis=0)[-2] > 1e-2
        np.testing.assert_array_equal(labels[sure], want.argmax(0)[sure])
        for k in ("denoised", "semantic_distance", "instance_foreground"):
            np.testing.assert_allclose(ds[k].values, first[k].values, atol=1e-4, err_msg=k)
    assert not np.allclose(want, first["semantic_probabilities"].values, atol=1e-2)


def test_the_refined_variables_alone_run_each_window_of_both_passes_once(monkeypatch):
    """Computing only the refined probabilities (several chunks, so the passes' order
    dependencies are in play) works and runs every chunk's windows once per pass: the
    first pass is not repeated for each region of the second."""
    from cryosiam_nb.inference import _windows

    calls: dict[str, int] = {}
    run = _windows.Runner.run

    def counted(self, image, roi):
        calls[self.task] = calls.get(self.task, 0) + 1
        return run(self, image, roi)

    monkeypatch.setattr(_windows.Runner, "run", counted)
    m = _trained_refiner(_multitask())
    vol = np.random.default_rng(5).random((96, 192, 192), dtype=np.float32)
    ds = tl.predict(vol, m)
    n_chunks = int(np.prod(ds["semantic_labels"].data.numblocks))
    assert n_chunks > 1
    prob = ds["semantic_probabilities"].values
    assert calls == {"multitask": n_chunks, "refine": n_chunks}
    assert np.allclose(prob.sum(0), 1, atol=1e-2)


def test_written_refined_predictions_equal_the_computed_ones(tmp_path):
    """``write_predictions`` streams both passes (the refiner's inputs through scratch
    arrays of the temporary store, removed at the end): the store equals ``compute()``,
    whole or for a selection of variables."""
    import xarray as xr

    from cryosiam_nb.inference import write_predictions

    m = _trained_refiner(_multitask())
    vol = np.random.default_rng(4).random((40, 48, 40), dtype=np.float32)
    kw = {"patch_size": 16, "overlap": 0.25, "chunks": (24, 24, 24), "precision": "float32"}
    ds = tl.predict(vol, m, **kw)
    ref = ds.compute()
    back = xr.open_zarr(
        write_predictions(ds, tmp_path / "a.zarr", progress=False), consolidated=False
    )
    assert set(back.data_vars) == set(ref.data_vars)
    assert not any(p.name.startswith("_refiner") for p in (tmp_path / "a.zarr").iterdir())
    for k in ref.data_vars:
        np.testing.assert_array_equal(back[k].values, ref[k].values, err_msg=k)
    sel = ["semantic_labels"]
    one = xr.open_zarr(
        write_predictions(ds[sel], tmp_path / "b.zarr", progress=False), consolidated=False
    )
    assert list(one.data_vars) == sel
    np.testing.assert_array_equal(one["semantic_labels"].values, ref["semantic_labels"].values)


def test_removing_the_refiner_restores_the_heads_minimum_sizes():
    m = models.build("multitask")
    m.add_refiner()
    m.metadata["semantic_refiner"] = {"heads_min_size": [0, 600, 600, 0, 250, 0]}
    m.metadata["semantic_defaults"] = {"min_size": [0, 600, 600, 0, 600, 0]}
    assert m.remove_refiner()
    assert m.metadata["semantic_defaults"] == {"min_size": [0, 600, 600, 0, 250, 0]}
    assert "semantic_refiner" not in m.metadata and not m.remove_refiner()


def test_the_refiner_learns_what_the_heads_missed():
    """Labels that the image shows but the heads' probabilities do not: training must
    move the refined decision towards them (and leave the rest of the model alone)."""
    from cryosiam_nb.training.refiner import train_refiner

    rng = np.random.default_rng(0)
    data = []
    for _ in range(2):
        y = np.zeros((24, 24, 24), np.uint8)
        y[:, 8:14, 8:14] = 4  # an "actin" bar along z
        img = rng.normal(0.3, 0.05, y.shape).astype(np.float32)
        img[y == 4] += 0.5
        prob = np.full((6, *y.shape), 0.02, np.float32)
        prob[0] = 0.9  # the heads call everything background
        x = np.concatenate([img[None], img[None], prob]).astype(np.float16)
        data.append((x, y))
    m = _multitask()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rec = train_refiner(m, data, progress=False, patch_size=16, steps=60, lr=1e-2)
    for k, v in before.items():  # backbone and heads untouched
        torch.testing.assert_close(m.state_dict()[k], v)
    assert rec["tomograms"] == 2 and m.metadata["semantic_refiner"] is rec
    x = torch.from_numpy(data[0][0][None].astype(np.float32))
    with torch.no_grad():
        out = m.refiner(x[:, :1], x[:, 1:2], torch.log(x[:, 2:]))
    pred = out.argmax(1)[0].numpy()
    y = data[0][1]
    dice = 2 * np.sum((pred == 4) & (y == 4)) / ((pred == 4).sum() + (y == 4).sum())
    assert dice > 0.5
    trained = m.refiner
    with pytest.raises(InputError, match="unknown"):
        train_refiner(m, data, progress=False, stepz=3)
    with pytest.raises(InputError, match="smaller than the 48-voxel patch"):
        train_refiner(m, data, progress=False)
    with pytest.raises(InputError, match=r"dice_classes.*'DNA'.*'dna'"):
        train_refiner(m, data, progress=False, patch_size=16, dice_classes=("actin", "DNA"))
    assert m.refiner is trained  # rejected before the model was touched


def test_recipe_refine_only_trains_calibrates_and_records_the_refiner(tmp_path):
    from cryosiam_nb.training import recipe

    shutil.copy(models.WEIGHTS_DIR / "tiny-multitask.pt", tmp_path / "tiny-multitask.pt")
    argv = ["--quick", "--only", "multitask", "--out", str(tmp_path), "--no-progress"]
    assert recipe.main([*argv, "--refine-only"]) == 0
    m = models.load(tmp_path / "tiny-multitask.pt")
    assert isinstance(m.refiner, SemanticRefiner)
    rec = m.metadata["semantic_refiner"]
    assert len(rec["class_bias"]) == 6 and rec["class_bias"][0] == 0.0
    from cryosiam_nb.training.calibration import SEMANTIC_MIN_SIZES

    sizes = m.metadata["semantic_defaults"]["min_size"]
    assert len(sizes) == 6 and set(sizes) <= set(SEMANTIC_MIN_SIZES)
    assert [(s["n"], s["seed"]) for s in rec["sets"]] == [
        (s["n"], s["seed"]) for s in recipe.QUICK["multitask"]["refiner"]["sets"]
    ]
    assert "--refine-only" in m.metadata["commands"][-1]
    # the old refiner's sizes were dropped with it: the ascent started from the heads' own
    heads = models.load(models.WEIGHTS_DIR / "tiny-multitask.pt").metadata["semantic_refiner"]
    assert rec["heads_min_size"] == heads["heads_min_size"]
    assert [int(v) for s in rec["calibration"] for v in s["seeds"]] == [7101]
    card = (tmp_path / "tiny-multitask.md").read_text()
    assert "Semantic refiner" in card and "calibrate_refiner" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-multitask.md", "tiny-multitask.pt"]
    # calibrating the trained refiner again keeps its weights (its offsets are redone)
    assert recipe.main([*argv, "--refine-only", "--calibrate-only"]) == 0
    back = models.load(tmp_path / "tiny-multitask.pt")
    for k, v in m.refiner.state_dict().items():
        if k != "head.bias":
            torch.testing.assert_close(back.refiner.state_dict()[k], v)
    bias = m.refiner.head.bias - torch.tensor(rec["class_bias"])
    again_bias = back.refiner.head.bias - torch.tensor(
        back.metadata["semantic_refiner"]["class_bias"]
    )
    torch.testing.assert_close(again_bias, bias)  # the same raw refiner underneath
    assert back.metadata["commands"][-1].endswith("--refine-only --calibrate-only`")
    assert back.metadata["semantic_refiner"]["train_seconds"] == rec["train_seconds"]
    # a continuation stage changes the heads the refiner was trained on: it is re-trained
    assert recipe.main([*argv, "--stages", "stage4"]) == 0
    again = models.load(tmp_path / "tiny-multitask.pt")
    assert isinstance(again.refiner, SemanticRefiner)
    assert "stage4" in again.metadata["commands"][-1]
    assert not any(("--refine-only" in c) for c in again.metadata["commands"][-1:])


def test_inference_folds_the_refiners_batchnorm_and_keeps_its_output():
    from cryosiam_nb.inference._fast import inference_copy

    m = _multitask()
    m.add_refiner(norm="batch")
    m.train()  # give the BatchNorm layers statistics that are not the identity
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(2, 1, 16, 16, 16))
    m.eval()
    fast = inference_copy(m, torch.device("cpu"), "multitask")
    n_bn = sum(isinstance(k, torch.nn.BatchNorm3d) for k in m.refiner.modules())
    left = sum(isinstance(k, torch.nn.BatchNorm3d) for k in fast.refiner.modules())
    assert left < n_bn // 2  # the convolutions' norms are folded (transposed ones stay)
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            fast(x)["semantic/logits"], m(x)["semantic/logits"], atol=1e-4, rtol=1e-4
        )


def test_refined_predictions_on_a_dask_cluster_equal_the_local_ones(tmp_path):
    """Both passes run under a ``dask.distributed`` Client (threads, as in
    test_inference) and the written store equals the local result; the lazy two-pass
    graph pickles for worker processes."""
    import pickle

    import distributed
    import xarray as xr

    from cryosiam_nb.inference import write_predictions

    m = _trained_refiner(_multitask())
    vol = np.random.default_rng(6).random((32, 48, 48), dtype=np.float32)
    kw = {"patch_size": 16, "overlap": 0.25, "chunks": (24, 24, 24), "precision": "float32"}
    local = tl.predict(vol, m, **kw)["semantic_probabilities"].values
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        ds = tl.predict(vol, m, **kw)
        path = write_predictions(ds, tmp_path / "d.zarr", progress=False)
    stored = xr.open_zarr(path, consolidated=False)["semantic_probabilities"].values
    np.testing.assert_allclose(stored.astype(np.float32), local.astype(np.float32), atol=1e-3)
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again["semantic_labels"].values, ds["semantic_labels"].values)
