"""Tests for cryosiam_nb.inference: chunked sliding-window prediction and post-processing."""

from __future__ import annotations

import pickle
import threading

import dask
import dask.array as da
import distributed
import numpy as np
import pytest
import torch
import xarray as xr
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from cryosiam_nb import io, models
from cryosiam_nb.constants import DIMS
from cryosiam_nb.inference import (
    lamella_mask,
    postprocess_semantic,
    write_predictions,
)
from cryosiam_nb.inference import predict as _predict
from cryosiam_nb.io import InputError

torch.set_num_threads(2)

PATCH = (16, 16, 16)


def predict(data, model, **kw):
    """``predict`` at the model's own patch, overlap 0.5, float32: the chunking contract is
    tested on these settings; the default window / precision have tests of their own."""
    if not isinstance(model, (list, tuple)):
        kw.setdefault("patch_size", model.patch_size)
    kw.setdefault("overlap", 0.5)
    kw.setdefault("precision", "float32")
    return _predict(data, model, **kw)


_HEADS = {
    "denoise": (("denoised", 1),),
    "semantic": (("logits", 3), ("distance", 3)),
    "lamella": (("logits", 2), ("distance", 2)),
    "instance": (("foreground", 1), ("distance", 1), ("boundary", 1)),
    "dense_ssl": (),
}


class _Calls:
    """A call counter that a model shares with its deep copies (pickling makes a new one)."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"n": self.n}

    def __setstate__(self, state):
        self.n = state["n"]
        self.lock = threading.Lock()


class ToyNet(nn.Module):
    """A conforming CryoSiam-like model: two 3×3×3 convs (receptive field 5³) + 1×1 heads."""

    def __init__(self, task: str = "semantic", patch=PATCH, dim: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.task = task
        self.patch_size = tuple(patch)
        heads = _HEADS[task]
        self.class_names = (
            tuple(f"c{i}" for i in range(heads[0][1])) if task in ("semantic", "lamella") else None
        )
        self.voxel_size = None
        self.config = {}
        self.enc = nn.Sequential(
            nn.Conv3d(1, dim, 3, padding=1), nn.ReLU(), nn.Conv3d(dim, dim, 3, padding=1)
        )
        self.heads = nn.ModuleDict({k: nn.Conv3d(dim, c, 1) for k, c in heads})
        self._counter = _Calls()

    @property
    def calls(self) -> int:
        """Forward calls of this model and of its inference copies (predict runs a copy)."""
        return self._counter.n

    @calls.setter
    def calls(self, n: int) -> None:
        self._counter.n = n

    def backbone(self, x):
        return self.enc(x)

    def forward(self, x):
        with self._counter.lock:
            self._counter.n += 1
        z = self.enc(x)
        return {k: h(z) for k, h in self.heads.items()}


def _tomo(shape, seed=0, chunks=(32, 64, 64)):
    vol = np.random.default_rng(seed).random(shape, dtype=np.float32)
    arr = xr.DataArray(
        da.from_array(vol, chunks=chunks), dims=("z", "y", "x"), attrs={"voxel_size": 10.0}
    )
    arr = arr.assign_coords({d: np.arange(n) * 10.0 for d, n in zip(("z", "y", "x"), shape)})
    return vol, arr


def _monolithic(model, vol, patch=PATCH, overlap=0.5):
    """Reference: one MONAI sliding_window_inference over the whole volume."""
    with torch.no_grad():
        return sliding_window_inference(
            torch.from_numpy(vol)[None, None],
            patch,
            4,
            model,
            overlap=overlap,
            mode="gaussian",
        )


BIG = (32, 32, 32)


def test_chunked_equals_monolithic_96x128x128():
    """Acceptance: chunked == one monolithic MONAI sliding_window_inference within 1e-4."""
    vol, arr = _tomo((96, 128, 128))
    model = ToyNet("denoise", patch=BIG, dim=2).eval()
    ds = predict(arr, model, overlap=0.5, chunks=(32, 48, 64), batch_size=4)
    assert isinstance(ds["denoised"].data, da.Array)  # lazy
    assert ds["denoised"].data.chunksize == (32, 48, 64)
    got = ds["denoised"].values
    ref = _monolithic(model, vol, BIG)["denoised"][0, 0].numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_semantic_heads_match_monolithic():
    vol, arr = _tomo((40, 48, 56))
    model = ToyNet("semantic").eval()
    got = predict(arr, model, chunks=(16, 32, 32)).compute()
    ref = _monolithic(model, vol)
    prob_ref = torch.softmax(ref["logits"][0], 0).numpy()
    dist_ref = torch.tanh(ref["distance"][0]).numpy()
    # float16 storage (contract): compare at float16 resolution
    np.testing.assert_allclose(got["probabilities"].values.astype(np.float32), prob_ref, atol=1e-3)
    np.testing.assert_allclose(got["distance"].values.astype(np.float32), dist_ref, atol=1e-3)
    lab_ref = ref["logits"][0].argmax(0).numpy()
    assert (got["labels"].values == lab_ref).mean() > 0.9999


@pytest.mark.parametrize(
    "shape,patch,overlap,chunks",
    [
        (
            (37, 70, 53),
            (16, 16, 16),
            0.5,
            (16, 32, 24),
        ),  # nothing divides; MONAI shifts last window
        ((20, 45, 9), (8, 12, 16), 0.25, None),  # anisotropic patch, x smaller than patch
    ],
)
def test_chunked_equals_monolithic_non_divisible(shape, patch, overlap, chunks):
    vol, arr = _tomo(shape, seed=3, chunks=(7, 13, 11))
    model = ToyNet("instance", patch=patch).eval()
    ds = predict(arr, model, patch_size=patch, overlap=overlap, chunks=chunks).compute()
    ref = _monolithic(model, vol, patch, overlap)
    np.testing.assert_allclose(
        ds["foreground"].values, torch.sigmoid(ref["foreground"][0, 0]).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        ds["boundary"].values, torch.sigmoid(ref["boundary"][0, 0]).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(ds["distance"].values, ref["distance"][0, 0].numpy(), atol=1e-4)


def test_outputs_per_task_dtypes_dims_coords():
    vol, arr = _tomo((24, 40, 40))
    expect = {
        "denoise": {"denoised": (np.float32, ("z", "y", "x"))},
        "semantic": {
            "probabilities": (np.float16, ("class", "z", "y", "x")),
            "labels": (np.uint8, ("z", "y", "x")),
            "distance": (np.float16, ("class", "z", "y", "x")),
        },
        "instance": {
            "foreground": (np.float32, ("z", "y", "x")),
            "boundary": (np.float32, ("z", "y", "x")),
            "distance": (np.float32, ("z", "y", "x")),
        },
        "dense_ssl": {"embedding": (np.float16, ("feature", "z", "y", "x"))},
    }
    for task, variables in expect.items():
        ds = predict(arr, ToyNet(task))
        assert set(ds.data_vars) == set(variables), task
        for name, (dtype, dims) in variables.items():
            assert ds[name].dtype == dtype, (task, name)
            assert ds[name].dims == dims, (task, name)
        np.testing.assert_array_equal(ds["z"].values, arr["z"].values)
        assert ds.attrs["voxel_size"] == 10.0
    ds = predict(arr, ToyNet("semantic")).compute()
    assert list(ds["class"].values) == ["c0", "c1", "c2"]
    np.testing.assert_allclose(ds["probabilities"].sum("class").values, 1.0, atol=5e-3)
    assert ds["labels"].max() <= 2
    emb = predict(arr, ToyNet("dense_ssl"))["embedding"]
    assert emb.sizes["feature"] == 4


def _check_calls(model: ToyNet) -> int:
    """Forward calls spent checking one inference copy of ``model`` on its probe input."""
    from cryosiam_nb.inference._fast import inference_copy
    from cryosiam_nb.inference._windows import _probe

    before = model.calls
    inference_copy(model, torch.device("cpu"), model.task, _probe(model.patch_size))
    n = model.calls - before
    model.calls = before
    assert n <= 4  # plain vs folded, plain vs fused: two forwards each at most
    return n


def test_each_window_runs_the_model_once():
    """All heads come from one pass, and chunking adds no window evaluations."""
    vol, arr = _tomo((40, 48, 56))
    model = ToyNet("semantic").eval()
    checks = _check_calls(model)
    ds = predict(arr, model, chunks=(16, 16, 32), batch_size=1)
    n0 = model.calls  # predict itself is lazy
    dask.compute(ds["probabilities"], ds["labels"], ds["distance"])
    n_windows = 4 * 5 * 6  # MONAI's grid: (40-16)/8+1, (48-16)/8+1, (56-16)/8+1
    assert model.calls - n0 == n_windows + checks  # one inference copy per computation


def test_roi_skips_chunks_and_is_exact_inside():
    vol, arr = _tomo((48, 64, 64))
    model = ToyNet("denoise", seed=2).eval()
    checks = _check_calls(model)
    full = predict(arr, model, chunks=32, batch_size=1)["denoised"].values
    n_full = model.calls - checks
    mask = np.zeros(vol.shape, np.uint8)
    mask[20:30, 8:40, 10:50] = 1  # a small box: most chunks have no sample
    model.calls = 0
    ds = predict(arr, model, chunks=32, batch_size=1, roi=mask)
    n_dry = model.calls
    got = ds["denoised"].values
    n_masked = model.calls - n_dry - checks
    assert n_full == 5 * 7 * 7  # every window of MONAI's grid
    assert n_masked == 3 * 5 * 7  # only windows containing a masked voxel run
    inside = mask > 0
    assert np.abs(got[inside] - full[inside]).max() < 1e-5
    assert np.all(got[~inside] == 0)
    # an all-zero mask runs nothing
    model.calls = 0
    empty = predict(arr, model, chunks=32, roi=np.zeros(vol.shape, np.uint8))
    assert float(empty["denoised"].max()) == 0.0 and model.calls == 0


def test_write_predictions_streams_to_zarr(tmp_path):
    vol, arr = _tomo((40, 48, 56))
    model = ToyNet("semantic").eval()
    ds = predict(arr, model, chunks=(16, 32, 32))
    out = tmp_path / "pred.zarr"
    write_predictions(ds, out, progress=False)
    back = xr.open_zarr(out, consolidated=False)
    assert back["probabilities"].dtype == np.float16
    assert back["probabilities"].data.chunksize == (3, 16, 32, 32)
    np.testing.assert_array_equal(back["labels"].values, ds["labels"].values)
    assert back.attrs["task"] == "semantic"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic: no leftovers
    with pytest.raises(FileExistsError):
        write_predictions(ds, out, progress=False, overwrite=False)


def test_write_predictions_writes_each_chunk_in_one_ordered_task(tmp_path):
    """A predict Dataset is written by its own chunk tasks (all variables at once, so a
    chunk's memory goes as soon as it is on disk); the store equals the computed Dataset.
    A changed Dataset goes through xarray's generic writer and is stored as changed."""
    from cryosiam_nb import models
    from cryosiam_nb.inference.prediction import _ordered_of

    vol, arr = _tomo((40, 48, 56))
    torch.manual_seed(0)
    model = models.build("multitask", "tiny", patch_size=16).eval()
    ds = predict(arr, model, chunks=(32, 32, 32), patch_size=16, precision="float32")
    assert _ordered_of(ds) is not None and _ordered_of(ds[["denoised"]]) is not None
    ref = ds.compute()
    back = xr.open_zarr(
        write_predictions(ds, tmp_path / "a.zarr", progress=False), consolidated=False
    )
    assert set(back.data_vars) == set(ref.data_vars)
    for k in ref.data_vars:
        assert back[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(back[k].values, ref[k].values, err_msg=k)
    assert back.attrs["task"] == "multitask"
    assert back["semantic_probabilities"].data.chunksize[1:] == (32, 32, 32)
    one = xr.open_zarr(
        write_predictions(ds[["denoised"]], tmp_path / "b.zarr", progress=False), consolidated=False
    )
    assert list(one.data_vars) == ["denoised"]
    np.testing.assert_array_equal(one["denoised"].values, ref["denoised"].values)
    changed = ds.assign(denoised=ds["denoised"] * 2)
    assert _ordered_of(changed) is None
    two = xr.open_zarr(
        write_predictions(changed, tmp_path / "c.zarr", progress=False), consolidated=False
    )
    np.testing.assert_allclose(two["denoised"].values, 2 * ref["denoised"].values)
    # the record goes with the Dataset (it holds the input volume)
    import gc

    from cryosiam_nb.inference import prediction

    n = len(prediction._ORDERED)
    del ds, changed
    gc.collect()
    assert len(prediction._ORDERED) == n - 1


def test_local_cluster_same_result(tmp_path):
    """The same call under a 2-worker dask.distributed LocalCluster gives the same result.

    Threads inside one process keep the test fast (worker processes importing torch take
    ~1 min on 2 shared cores); that the graph ships to worker processes is checked by
    round-tripping it through pickle below.
    """
    vol, arr = _tomo((48, 64, 64))
    model = ToyNet("denoise", seed=4).eval()
    local = predict(arr, model, chunks=32)["denoised"].values
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        ds = predict(arr, model, chunks=32)
        got = client.compute(ds["denoised"]).result().values
        assert len(client.scheduler_info()["workers"]) == 2
        path = write_predictions(ds, tmp_path / "p.zarr", progress=False)
        stored = xr.open_zarr(path, consolidated=False)["denoised"].values
    assert np.abs(got - local).max() < 1e-6
    np.testing.assert_array_equal(stored, got)


def test_graph_pickles_for_worker_processes():
    """dask.distributed with processes pickles the graph: the model must travel with it."""
    vol, arr = _tomo((24, 32, 32))
    model = ToyNet("instance").eval()
    ds = predict(arr, model)
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again["foreground"].values, ds["foreground"].values)


def test_bad_input_raises_clear_errors():
    vol, arr = _tomo((24, 40, 40))
    model = ToyNet("semantic")
    with pytest.raises(InputError, match="chunks"):
        predict(arr, model, chunks=20)  # not a multiple of the stride (8)
    with pytest.raises(InputError, match="overlap"):
        predict(arr, model, overlap=1.0)
    with pytest.raises(InputError, match="roi"):
        predict(arr, model, roi=np.ones((3, 3, 3)))
    with pytest.raises(InputError, match="3-D"):
        predict(vol[0], model)
    bad = ToyNet("semantic")
    bad.task = "classify"
    with pytest.raises(InputError, match="task"):
        predict(arr, bad)


def test_postprocess_semantic_drops_small_components_across_chunks():
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[2:30, 5:9, 5:9] = 1  # 448 voxels of class 1, crosses z-chunk borders
    lab[33:36, 30:33, 30:33] = 1  # 27 voxels of class 1
    lab[10:13, 20:22, 15:23] = 2  # 48 voxels of class 2, crosses y and x chunk borders
    lab[30:31, 20:21, 20:21] = 2  # 1 voxel of class 2
    lab[14:18, 14:18, 14:18] = 2  # 64 voxels of class 2 touching nothing
    lab[14:18, 18:20, 14:18] = 1  # class-1 block touching the class-2 block: no merge
    arr = xr.DataArray(da.from_array(lab, chunks=(12, 21, 16)), dims=("z", "y", "x"))
    ds = xr.Dataset({"labels": arr}, coords={"class": ["bg", "membrane", "particle"]})

    out = postprocess_semantic(ds, min_size=40, progress=False)
    assert isinstance(out.data, da.Array) and out.dtype == np.uint8
    res = out.values
    assert (res[2:30, 5:9, 5:9] == 1).all()
    assert (res[33:36, 30:33, 30:33] == 0).all()  # 27 < 40
    assert (res[10:13, 20:22, 15:23] == 2).all()  # 48 ≥ 40 although split over 4 chunks
    assert res[30, 20, 20] == 0
    assert (res[14:18, 14:18, 14:18] == 2).all()
    assert (res[14:18, 18:20, 14:18] == 0).all()  # 32 voxels of class 1, not merged with 2

    # per-class thresholds by name; classes not named are untouched
    res2 = postprocess_semantic(ds, min_size={"particle": 50}, progress=False).values
    assert (res2[33:36, 30:33, 30:33] == 1).all()
    assert (res2[10:13, 20:22, 15:23] == 0).all()  # 48 < 50
    assert (res2[14:18, 14:18, 14:18] == 2).all()
    # one value per class index (the tuned metadata's form): the same result
    res_list = postprocess_semantic(ds, min_size=[0, 0, 50], progress=False).values
    np.testing.assert_array_equal(res_list, res2)
    with pytest.raises(InputError, match="min_size"):
        postprocess_semantic(ds, min_size=[0, -1, 50], progress=False)

    # same as a monolithic scipy computation on random labels
    rnd = (np.random.default_rng(1).random((30, 30, 30)) * 3).astype(np.uint8)
    arr = xr.DataArray(da.from_array(rnd, chunks=10), dims=("z", "y", "x"))
    res3 = postprocess_semantic(arr, min_size=5, progress=False).values
    expect = rnd.copy()
    for c in (1, 2):
        cc, _ = ndimage.label(rnd == c)
        sizes = np.bincount(cc.ravel())
        small = (sizes < 5)[cc] & (cc > 0)
        expect[small] = 0
    np.testing.assert_array_equal(res3, expect)
    with pytest.raises(InputError, match="min_size"):
        postprocess_semantic(ds, min_size={"nucleus": 3}, progress=False)


def test_lamella_mask_smooth_threshold_largest_hull():
    shape = (40, 48, 48)
    prob = np.zeros(shape, np.float32)
    # a slab of sample, slightly tilted, with a notch, plus a small bright blob outside
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    slab = (np.abs(zz - 20 - 0.1 * (yy - 24)) < 8) & (np.abs(xx - 24) < 18) & (np.abs(yy - 24) < 18)
    prob[slab] = 1.0
    prob[16:24, 20:28, 36:42] = 0.0  # a notch: the convex hull fills it back in
    prob[2:5, 2:8, 2:8] = 1.0  # speck far from the slab
    arr = xr.DataArray(da.from_array(prob, chunks=(16, 24, 24)), dims=("z", "y", "x"))
    two_class = xr.concat([1 - arr, arr], dim="class").assign_coords(
        {"class": ["outside", "lamella"]}
    )
    sigma = (2.0, 1.0, 1.0)
    out = lamella_mask(two_class, sigma=sigma, threshold=0.9, factor=1, progress=False)
    assert out.dtype == np.uint8 and out.dims == ("z", "y", "x")
    res = out.values
    # reference: the same steps monolithically
    sm = ndimage.gaussian_filter(prob, sigma, mode="reflect", truncate=4.0)
    th = sm > 0.9
    cc, _ = ndimage.label(th)
    largest = cc == np.argmax(np.bincount(cc.ravel())[1:]) + 1
    from skimage.morphology import convex_hull_image

    expect = np.stack([convex_hull_image(s) if s.any() else s for s in largest]).astype(np.uint8)
    np.testing.assert_array_equal(res, expect)
    assert res[3, 4, 4] == 0  # speck dropped (not the largest component)
    assert res[20, 24, 38] == 1  # the notch is filled by the hull
    assert res[20, 24, 24] == 1 and res[20, 24, 2] == 0
    same = lamella_mask(arr, sigma=sigma, factor=1, progress=False).values  # a bare probability
    np.testing.assert_array_equal(same, res)


def test_coarse_lamella_mask_agrees_with_full_resolution():
    """The default works on a 2× coarser grid: the slab is the same up to its border."""
    shape = (64, 96, 96)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    slab = (np.abs(zz - 31 - 0.1 * (yy - 48)) < 20).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)
    prob = xr.DataArray(da.from_array(np.clip(slab + noise, 0, 1), chunks=32), dims=DIMS)
    full = lamella_mask(prob, factor=1, progress=False).values
    coarse = lamella_mask(prob, progress=False)
    assert coarse.shape == shape and coarse.chunks == prob.chunks
    assert full.sum() > 0.1 * full.size
    agree = float((coarse.values == full).mean())
    assert agree > 0.97, agree
    inter = (coarse.values & full).sum()
    assert 2 * inter / (coarse.values.sum() + full.sum()) > 0.95  # border ±1 voxel


def test_with_the_tiny_cryosiam_model():
    """The real network of cryosiam_nb.models (tiny preset) through predict."""
    torch.manual_seed(0)
    model = models.build("semantic", preset="tiny").eval()
    z, y, x = model.patch_size
    vol, arr = _tomo((z, y + y // 2, x), seed=5, chunks=(z, y, x))
    ds = predict(arr, model, batch_size=2)
    n = len(model.class_names)
    assert ds["probabilities"].shape == (n, *vol.shape)
    assert list(ds["class"].values) == list(model.class_names)
    got = ds.compute()
    ref = _monolithic(model, vol, tuple(model.patch_size))
    np.testing.assert_allclose(
        got["probabilities"].values.astype(np.float32),
        torch.softmax(ref["logits"][0], 0).numpy(),
        atol=1e-3,
    )
    np.testing.assert_array_equal(got["labels"].values, ref["logits"][0].argmax(0).numpy())
    assert not model.training


def test_voxel_size_on_every_variable_and_written_by_io(tmp_path):
    """predict on a 10 Å tomogram: io.write(ds[var]) writes 10 Å (one carrier: attrs)."""
    vol, arr = _tomo((24, 32, 32))
    for task, names in (("denoise", ("denoised",)), ("semantic", ("labels", "probabilities"))):
        ds = predict(arr, ToyNet(task))
        assert ds.attrs["voxel_size"] == 10.0
        for name in ds.data_vars:
            assert ds[name].attrs["voxel_size"] == 10.0, (task, name)
        np.testing.assert_array_equal(ds["x"].values, np.arange(32) * 10.0)
        for name in names:
            if ds[name].ndim != 3:
                continue
            out = io.write(ds[name], tmp_path / f"{task}_{name}.zarr")
            back = io.read(out)
            assert float(back.attrs["voxel_size"]) == pytest.approx(10.0)
            np.testing.assert_array_equal(back.values, ds[name].values)
    ds = predict(arr, ToyNet("semantic"))
    post = postprocess_semantic(ds, min_size=3, progress=False)
    assert post.attrs["voxel_size"] == 10.0
    back = io.read(io.write(post, tmp_path / "post.zarr"))
    assert float(back.attrs["voxel_size"]) == pytest.approx(10.0)
    lam = lamella_mask(predict(arr, ToyNet("lamella")), sigma=(1, 1, 1), progress=False)
    assert lam.attrs["voxel_size"] == 10.0
    np.testing.assert_array_equal(lam["z"].values, arr["z"].values)
    # a bare array has 1 Å (as io.as_dataarray)
    assert predict(vol, ToyNet("denoise"))["denoised"].attrs["voxel_size"] == 1.0


@pytest.mark.parametrize("chunks", [7, (5, 11, 16), 40])
def test_block_stitching_equals_whole_volume_label(chunks):
    """The one stitching helper: chunked components == scipy.ndimage.label on the whole."""
    from cryosiam_nb.inference.stitching import block_components, filter_components, label_block

    rnd = np.random.default_rng(4).random((21, 33, 40))
    lab = np.zeros(rnd.shape, np.uint8)
    lab[rnd > 0.55] = 1
    lab[rnd > 0.8] = 2
    arr = da.from_array(lab, chunks=chunks)
    per_block, size, cls = block_components(arr, (1, 2), progress=False)
    # paint each voxel with its global component id (+1) and compare with a whole-volume label
    starts = [np.cumsum((0,) + c[:-1]) for c in arr.chunks]
    got = np.zeros(lab.shape, np.int64)
    for b in np.ndindex(arr.numblocks):
        sl = tuple(slice(s[i], s[i] + c[i]) for s, c, i in zip(starts, arr.chunks, b))
        local, _, _ = label_block(lab[sl], (1, 2))
        got[sl] = np.concatenate([[0], per_block[b] + 1])[local]
    for c in (1, 2):
        ref, n = ndimage.label(lab == c)
        sel = ref > 0
        pairs = np.unique(np.stack([ref[sel], got[sel]], 1), axis=0)
        assert len(pairs) == n  # a bijection: same partition of the voxels
        assert len(np.unique(pairs[:, 1])) == n
        assert np.all(cls[pairs[:, 1] - 1] == c)
        np.testing.assert_array_equal(
            np.sort(size[pairs[:, 1] - 1]), np.sort(np.bincount(ref[sel])[1:])
        )
    keep = size >= 4
    out = filter_components(arr, (1, 2), per_block, keep).compute()
    expect = lab.copy()
    for c in (1, 2):
        ref, _ = ndimage.label(lab == c)
        expect[((np.bincount(ref.ravel()) < 4)[ref]) & (ref > 0)] = 0
    np.testing.assert_array_equal(out, expect)


def test_merge_pairs_is_connected_components():
    from cryosiam_nb.inference.stitching import merge_pairs

    n, comp = merge_pairs(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert n == 3
    assert comp[0] == comp[1] == comp[2] and comp[4] == comp[5] and comp[3] not in comp[[0, 4]]


# ------------------------------------------------------------------ inference defaults / speed
def test_default_window_is_decoupled_from_the_training_patch():
    from cryosiam_nb.inference import DEFAULT_WINDOW, inference_window

    model = ToyNet("denoise")  # training patch 16³
    assert inference_window(model, (200, 300, 400)) == (DEFAULT_WINDOW,) * 3
    # clipped to a short axis, never below the training patch (MONAI pads that axis)
    assert inference_window(model, (40, 300, 8)) == (40, DEFAULT_WINDOW, 16)
    big = ToyNet("denoise", patch=(128, 128, 128))
    assert inference_window(big, (200, 300, 400)) == (128, 128, 128)
    _, arr = _tomo((40, 48, 56))
    ds = _predict(arr, model, precision="float32")
    want = [max(16, min(n, DEFAULT_WINDOW)) for n in (40, 48, 56)]
    assert ds.attrs["patch_size"] == want and ds.attrs["precision"] == "float32"


def test_default_window_chunked_equals_monolithic_in_float32():
    """The exactness contract holds for the default window and overlap too."""
    from cryosiam_nb.inference import DEFAULT_OVERLAP, DEFAULT_WINDOW

    vol, arr = _tomo((40, 200, 230))
    model = ToyNet("denoise", patch=BIG, dim=2).eval()
    ds = _predict(arr, model, precision="float32")
    assert ds.attrs["overlap"] == DEFAULT_OVERLAP
    win = (40, DEFAULT_WINDOW, DEFAULT_WINDOW)
    assert ds.attrs["patch_size"] == list(win)
    got = ds["denoised"].values
    ref = _monolithic(model, vol, win, DEFAULT_OVERLAP)["denoised"][0, 0].numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_inference_copy_folds_batchnorm_exactly_and_leaves_the_model_alone():
    from cryosiam_nb.inference._fast import fold_batchnorm, inference_copy

    torch.manual_seed(0)
    m = models.build("multitask", "tiny", patch_size=16)
    for mod in m.modules():  # non-trivial running statistics
        if isinstance(mod, nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = inference_copy(m, torch.device("cpu"), "multitask")
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    n_bn = sum(isinstance(x, nn.BatchNorm3d) for x in fast.modules())
    assert n_bn < sum(isinstance(x, nn.BatchNorm3d) for x in m.modules()) // 3
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.inference_mode():
        a, b = m.eval()(x), fast(x)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert fold_batchnorm(nn.Sequential(nn.Conv3d(1, 2, 1))) == 0


def test_inference_copy_falls_back_when_folding_would_change_the_output():
    """A model whose bn1 is not applied right after conv1 must not be folded."""
    from cryosiam_nb.inference._fast import inference_copy

    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(1, 2, 3, padding=1)
            self.bn1 = nn.BatchNorm3d(2)

        def forward(self, x):
            y = self.conv1(x)
            return {"denoised": self.bn1(torch.relu(y)).sum(1, keepdim=True)}

    t = Tricky().eval()
    t.bn1.running_mean.fill_(0.3)
    t.bn1.running_var.fill_(2.0)
    fast = inference_copy(t, torch.device("cpu"), "denoise")
    assert isinstance(fast.bn1, nn.BatchNorm3d)  # the plain copy
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x)["denoised"], t(x)["denoised"])


def test_cpu_fusion_keeps_the_outputs_of_the_shipped_model(monkeypatch):
    """conv + residual add + ReLU fused for oneDNN: the same maps."""
    import copy

    from cryosiam_nb.inference import _fusion
    from cryosiam_nb.inference._fast import fold_batchnorm, inference_copy

    if not _fusion.fusion_available():
        pytest.skip("this PyTorch build has no oneDNN fused convolution")
    model = models.load("tiny-multitask")
    plain = copy.deepcopy(model).float().eval()
    fold_batchnorm(plain)
    fast = inference_copy(model, torch.device("cpu"), "multitask", (24, 24, 24))
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"_FusedFPN", "_FusedBottleneck", "FusedConv3d"} <= kinds
    x = torch.rand(1, 1, 24, 32, 40, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, got = plain(x), fast(x)
        assert set(got) == set(ref)
        for k in ref:  # float32: the same arithmetic, oneDNN's summation order
            torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, got16 = plain(x), fast(x)
    for k in ref:  # bfloat16: a fused add is rounded once instead of twice
        err = (got16[k].float() - ref[k]).abs().mean() / (ref[k].abs().mean() + 1e-6)
        err_ref = (ref16[k].float() - ref[k]).abs().mean() / (ref[k].abs().mean() + 1e-6)
        assert err < 2 * err_ref + 1e-3, k
    # without oneDNN's op the fused modules fall back to plain PyTorch ops, same maps
    monkeypatch.setattr(_fusion, "_pointwise", lambda: None)
    with torch.inference_mode():
        for k, v in fast(x).items():
            torch.testing.assert_close(v, ref[k], atol=1e-4, rtol=1e-4)


def test_inference_copy_drops_a_fusion_that_changes_the_output(monkeypatch):
    from cryosiam_nb.inference import _fusion
    from cryosiam_nb.inference._fast import inference_copy

    real = _fusion.FusedConv3d.forward
    monkeypatch.setattr(
        _fusion.FusedConv3d, "forward", lambda self, x, residual=None: real(self, x, residual) + 1
    )
    fast = inference_copy(models.load("tiny-multitask"), torch.device("cpu"), "multitask")
    assert not any(isinstance(m, _fusion.FusedConv3d) for m in fast.modules())


def test_precision_choices_and_bfloat16_tolerance():
    from cryosiam_nb.inference._fast import cpu_has_native_bf16, resolve_precision

    cpu = torch.device("cpu")
    auto = resolve_precision("auto", None, cpu)
    assert auto == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_precision("auto", None, torch.device("cuda")) == torch.float16
    assert resolve_precision("bfloat16", False, cpu) == torch.float32  # amp=False wins
    with pytest.raises(InputError, match="precision"):
        _predict(np.zeros((16, 16, 16), np.float32), ToyNet("denoise"), precision="int8")
    # reduced precision stays close to float32 on the shipped multi-task model
    from cryosiam_nb import sim

    m = models.load("tiny-multitask")
    s = sim.simulate((32, 64, 64), voxel_size=10.0, seed=3, mode="fast", progress=False)
    vol = s.volumes["noisy"]
    f32 = _predict(vol, m, precision="float32").compute()
    b16 = _predict(vol, m, precision="bfloat16").compute()
    assert b16.attrs["precision"] == "bfloat16"
    diff = np.abs(b16["denoised"].values - f32["denoised"].values)
    assert diff.mean() < 0.01 and np.quantile(diff, 0.999) < 0.05
    agree = float((b16["semantic_labels"] == f32["semantic_labels"]).mean())
    assert agree > 0.97


def test_tta_averages_the_flipped_predictions():
    """tta=n: each window's raw outputs are the mean over n flips, each flipped back."""
    from cryosiam_nb.inference._windows import TTA_FLIPS

    vol, arr = _tomo((32, 48, 48))
    model = ToyNet("denoise", patch=BIG, dim=2).eval()
    got = predict(arr, model, tta=True)
    assert got.attrs["tta_flips"] == 8
    got = got["denoised"].values

    class Flipped(nn.Module):
        def forward(self, x):
            outs = [torch.flip(model(torch.flip(x, d))["denoised"], d) for d in TTA_FLIPS]
            return {"denoised": torch.stack(outs).mean(0)}

    ref = _monolithic(Flipped(), vol, BIG)["denoised"][0, 0].numpy()
    assert np.abs(got - ref).max() < 1e-4
    plain = predict(arr, model)["denoised"].values
    assert np.abs(got - plain).max() > 1e-3  # a flip-variant model: TTA changes the output
    with pytest.raises(InputError, match="tta"):
        predict(arr, model, tta=9)
