"""Tests for cryosiam_nb.segmentation: instances, particle table, subtomograms, GT maps."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import ndimage as ndi
from skimage.morphology import ball

from cryosiam_nb import constants, metrics, segmentation
from cryosiam_nb.io import InputError

DIMS = ("z", "y", "x")


def _maps(fg, boundary, distance, voxel_size=10.0):
    return xr.Dataset(
        {
            "foreground": (DIMS, np.asarray(fg, np.float32)),
            "boundary": (DIMS, np.asarray(boundary, np.float32)),
            "distance": (DIMS, np.asarray(distance, np.float32)),
        },
        attrs={"voxel_size": voxel_size},
    )


def _paste(vol, centre, obj, value):
    r = obj.shape[0] // 2
    sl = tuple(slice(c - r, c + r + 1) for c in centre)
    vol[sl][obj] = value


@pytest.fixture(scope="module")
def crowded():
    lab = segmentation.synthetic_instances((48, 64, 64), density=0.35, radius=(4, 7), seed=3)
    gt = xr.DataArray(lab, dims=DIMS, attrs={"voxel_size": 10.0})
    return lab, segmentation.maps_from_labels(gt)


# ----------------------------------------------------------------------- maps_from_labels
def test_maps_from_labels_targets():
    lab = np.zeros((20, 20, 30), np.uint32)
    lab[5:15, 5:15, 5:15] = 1
    lab[5:15, 5:15, 15:25] = 2  # touches 1 along the plane x = 14|15
    m = segmentation.maps_from_labels(lab)
    assert set(m.data_vars) == {"foreground", "boundary", "distance"}
    np.testing.assert_array_equal(m.foreground.values, (lab > 0).astype(np.float32))
    d = m.distance.values
    assert d.min() == -1.0 and d.max() == 1.0  # signed, clipped at ±5 voxels, /5
    assert (d[lab == 0] < 0).all() and (d[lab > 0] > 0).all()
    assert d[10, 10, 4] == pytest.approx(-0.2)  # background: minus the distance to the cube
    # 1 voxel from the contact plane → 1/5; the distance separates the touching cubes
    assert d[10, 10, 14] == pytest.approx(0.2) and d[10, 10, 15] == pytest.approx(0.2)
    assert d[10, 10, 10] == pytest.approx(1.0)
    b = m.boundary.values
    assert b[10, 10, 13:17].min() == 1.0  # thick contact boundary grown by 1 voxel
    assert b[10, 10, 10] == 0.0 and b[0, 0, 0] == 0.0
    # lazy dask input gives the same maps
    lazy = segmentation.maps_from_labels(
        xr.DataArray(da.from_array(lab, chunks=(10, 10, 10)), dims=DIMS, attrs={"voxel_size": 7})
    )
    assert isinstance(lazy.distance.data, da.Array) and lazy.attrs["voxel_size"] == 7
    np.testing.assert_allclose(lazy.distance.values, d)
    np.testing.assert_array_equal(lazy.boundary.values, b)
    assert all(lazy[v].attrs["voxel_size"] == 7 for v in lazy.data_vars)


def test_maps_from_labels_equal_the_training_targets():
    """One instance-target generator: the perfect maps are the instance head's targets."""
    from cryosiam_nb.models import targets

    lab = segmentation.synthetic_instances((24, 32, 32), density=0.4, radius=(3, 6), seed=5)
    m = segmentation.maps_from_labels(lab)
    t = targets.instance_targets(lab)
    for v in ("foreground", "boundary", "distance"):
        np.testing.assert_array_equal(m[v].values, t[v][0], err_msg=v)


# ----------------------------------------------------------------------- instances
def test_gt_maps_give_high_ap(crowded):
    lab, maps = crowded
    inst = segmentation.instances(maps, progress=False)
    assert inst.dtype == np.uint32 and inst.dims == DIMS
    assert inst.attrs["voxel_size"] == 10.0
    ids = np.unique(inst.values)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # sequential ids
    ap = metrics.average_precision(inst.values, lab)
    assert ap["AP50"] >= 0.9, ap
    assert ap["AP80"] >= 0.8, ap


def test_lazy_maps_from_one_model_pass_are_computed_once(crowded):
    lab, maps = crowded
    calls = []

    def model_pass(block):  # stands in for tl.predict: one pass yields all three heads
        calls.append(block.shape)
        return block

    stacked = np.stack([maps[v].values for v in ("foreground", "boundary", "distance")])
    heads = da.from_array(stacked, chunks=(3, 24, 32, 32)).map_blocks(model_pass)
    lazy = xr.Dataset({v: (DIMS, heads[i]) for i, v in enumerate(maps.data_vars)})
    inst = segmentation.instances(lazy, progress=False)
    real = [c for c in calls if np.prod(c) > 1]  # dask also calls it on tiny meta blocks
    assert len(real) == 8  # once per chunk, not once per variable
    eager = segmentation.instances(maps, progress=False)
    np.testing.assert_array_equal(inst.values, eager.values)


def test_gt_maps_from_simulator_give_high_ap():
    from cryosiam_nb import sim

    result = sim.simulate((64, 96, 96), mode="fast", seed=1)
    vols = result.volumes
    gt = vols["instances"].values
    maps = segmentation.maps_from_labels(vols["instances"])
    inst = segmentation.instances(maps, min_size=1, progress=False)
    ap = metrics.average_precision(inst.values, gt)
    assert ap["AP50"] >= 0.9 and ap["n_gt"] > 50, ap
    # the particle table of the true labels agrees with the simulator's own table
    df = segmentation.particles(vols["instances"], semantic=vols["semantic"], progress=False)
    m = df.merge(result.particles, left_on="particle_id", right_on="id", suffixes=("", "_sim"))
    assert len(m) == len(df) == len(result.particles)
    assert (m.n_voxels == m.n_voxels_sim).all() and (m.size_category == m.size_category_sim).all()
    off = np.sqrt((m.z - m.z_sim) ** 2 + (m.y - m.y_sim) ** 2 + (m.x - m.x_sim) ** 2)
    assert off.max() < 3.0  # centroid vs the simulator's particle centre (voxels)
    assert (df.semantic_class == "particle").all()
    assert df.z_A.to_numpy() == pytest.approx(df.z.to_numpy() * vols.attrs["voxel_size"])


def test_multicut_merges_inner_faces_and_respects_boundaries():
    # a dumbbell: two balls joined by a thick neck; the distance has two maxima → two seeds
    lab = np.zeros((24, 24, 44), np.uint32)
    _paste(lab, (12, 12, 11), ball(8).astype(bool), 1)
    _paste(lab, (12, 12, 32), ball(8).astype(bool), 1)
    lab[8:17, 8:17, 11:33] = 1
    m = segmentation.maps_from_labels(lab)
    fg, dist = m.foreground.values, m.distance.values
    dist = np.clip(ndi.distance_transform_edt(lab > 0) / 10.0, 0, 1)  # maxima in the balls
    no_boundary = np.zeros_like(fg)
    ws = segmentation.instances(_maps(fg, no_boundary, dist), multicut=False, progress=False)
    assert ws.values.max() == 2  # watershed alone over-segments
    mc = segmentation.instances(_maps(fg, no_boundary, dist), multicut=True, progress=False)
    assert mc.values.max() == 1  # no boundary evidence between the fragments → merged
    assert ((mc.values > 0) == (lab > 0)).all()  # background stays background
    wall = no_boundary.copy()
    wall[:, :, 20:24] = 1.0  # a boundary across the neck → stays split
    mc = segmentation.instances(_maps(fg, wall, dist), multicut=True, progress=False)
    assert mc.values.max() == 2
    # boundary probability 1 everywhere (incl. the faces to the background) must not merge
    # separate particles through the background: background is no graph node
    two = np.zeros((16, 16, 40), np.uint32)
    _paste(two, (8, 8, 8), ball(5).astype(bool), 1)
    _paste(two, (8, 8, 30), ball(5).astype(bool), 2)
    tm = segmentation.maps_from_labels(two)
    tm["boundary"][:] = 1.0
    out = segmentation.instances(tm, progress=False).values
    assert out.max() == 2 and (out[two == 0] == 0).all()


def test_neck_distance_splits_at_thin_necks_and_merges_thick_ones():
    """With a silent boundary map, the multicut merges every watershed fragment; with
    ``neck_distance`` a thin neck (touching particles) splits and a thick one (one particle
    cut in two by its seeds) still merges."""
    silent = None

    def run(lab, **kw):
        nonlocal silent
        dist = np.clip(ndi.distance_transform_edt(lab > 0), 0, 5) / constants.DISTANCE_SCALE
        fg = (lab > 0).astype(np.float32)
        silent = np.zeros_like(fg)
        return segmentation.instances(
            _maps(fg, silent, dist), min_center_distance=0.5, progress=False, **kw
        ).values

    pair = np.zeros((20, 20, 34), np.uint32)  # two particles touching through a 2-voxel neck
    _paste(pair, (10, 10, 10), ball(5).astype(bool), 1)
    _paste(pair, (10, 10, 23), ball(5).astype(bool), 1)
    pair[9:11, 9:11, 14:20] = 1
    dumbbell = np.zeros((24, 24, 44), np.uint32)  # one particle, two maxima, thick neck
    _paste(dumbbell, (12, 12, 11), ball(8).astype(bool), 1)
    _paste(dumbbell, (12, 12, 32), ball(8).astype(bool), 1)
    dumbbell[9:16, 9:16, 11:33] = 1
    assert run(pair, multicut=False).max() == 2  # the watershed sees two fragments
    assert run(pair).max() == 1  # no boundary evidence → merged
    split = run(pair, neck_distance=3.0)
    assert split.max() == 2 and ((split > 0) == (pair > 0)).all()
    assert run(dumbbell, multicut=False).max() == 2
    assert run(dumbbell, neck_distance=3.0).max() == 1  # cut through the middle: undone
    with pytest.raises(InputError, match="neck_distance"):
        run(pair, neck_distance=-1.0)


def test_size_touching_and_roi_filters():
    lab = np.zeros((24, 24, 60), np.uint32)
    _paste(lab, (12, 12, 6), ball(2).astype(bool), 1)  # 33 voxels
    _paste(lab, (12, 12, 20), ball(5).astype(bool), 2)  # 515 voxels
    _paste(lab, (12, 12, 42), ball(8).astype(bool), 3)  # 2109 voxels
    maps = segmentation.maps_from_labels(lab)
    sizes = np.bincount(lab.ravel())[1:]
    out = segmentation.instances(maps, min_center_distance=0.5, progress=False).values
    assert out.max() == 3
    out = segmentation.instances(maps, min_size=100, max_size=1000, progress=False).values
    assert out.max() == 1 and (out > 0).sum() == sizes[1]
    # keep only instances touching semantic class 1 (a "membrane" slab next to particle 3)
    sem = np.zeros_like(lab, dtype=np.uint8)
    sem[:, :, 51:53] = 1
    out = segmentation.instances(maps, touching=(sem, 1), progress=False).values
    assert out.max() == 1 and ((out > 0) == (lab == 3)).all()
    by_name = segmentation.instances(maps, touching=(sem, "membrane"), progress=False).values
    np.testing.assert_array_equal(by_name, out)
    with pytest.raises(InputError, match="unknown class"):
        segmentation.instances(maps, touching=(sem, "membranes"), progress=False)
    # a region of interest excludes the foreground outside it
    mask = np.ones(lab.shape, bool)
    mask[:, :, 30:] = False
    out = segmentation.instances(maps, roi=mask, min_center_distance=0.5, progress=False)
    assert out.values.max() == 2 and (out.values[:, :, 30:] == 0).all()
    # the same filters block-wise (3 × 2 × 2 blocks), ids made global across blocks
    for kw in ({"touching": (sem, 1)}, {"roi": mask, "min_center_distance": 0.5}):
        whole = segmentation.instances(maps, progress=False, **kw).values
        blk = segmentation.instances(
            maps, block_shape=(12, 12, 20), halo=8, progress=False, **kw
        ).values
        np.testing.assert_array_equal(blk > 0, whole > 0)
        assert blk.max() == whole.max()
    with pytest.raises(InputError, match="missing"):
        segmentation.instances(maps.drop_vars("boundary"))
    with pytest.raises(InputError, match="boundary_bias"):
        segmentation.instances(maps, boundary_bias=1.5)
    with pytest.raises(InputError, match="roi"):
        segmentation.instances(maps, roi=mask[:-1])


def test_blockwise_equals_whole_volume(crowded, tmp_path):
    lab, maps = crowded
    whole = segmentation.instances(maps, progress=False).values
    lazy = maps.chunk({"z": 16, "y": 16, "x": 16})
    # 48×64×64 in 24×32×32 blocks → 2×2×2 = 8 blocks; labels written to a zarr store
    blk = segmentation.instances(
        lazy,
        block_shape=(24, 32, 32),
        halo=12,
        out=tmp_path / "inst.zarr",
        progress=False,
    )
    assert isinstance(blk.data, da.Array) and (tmp_path / "inst.zarr").exists()
    blk = blk.values
    ids = np.unique(blk)
    np.testing.assert_array_equal(ids, np.arange(ids.size))
    # same particles: every instance matched one to one at IoU > 0.9 (ids may differ)
    ap = metrics.average_precision(blk, whole, thresholds=[0.9])
    assert ap["n_pred"] == ap["n_gt"]
    assert ap["AP90"] >= 0.95, ap
    # instances cut by block faces were re-joined: some whole-volume instances cross faces
    crossing = sum(
        1
        for sl in ndi.find_objects(whole)
        if sl is not None and (sl[0].start < 24 < sl[0].stop or sl[1].start < 32 < sl[1].stop)
    )
    assert crossing > 10


# ----------------------------------------------------------------------- particle table
def test_particle_table_columns_and_values():
    lab = np.zeros((20, 30, 40), np.uint32)
    lab[2:6, 3:8, 4:10] = 5  # 4*5*6 = 120 voxels: tiny
    lab[10:19, 10:25, 10:30] = 9  # 9*15*20 = 2700: big
    sem = np.zeros(lab.shape, np.uint8)
    sem[lab == 5] = 3
    sem[10:19, 10:25, 10:15] = 1  # minority of particle 9
    sem[10:19, 10:25, 15:30] = 4
    inst = xr.DataArray(lab, dims=DIMS, attrs={"voxel_size": 8.0})
    df = segmentation.particles(inst, tomogram="tomo_a", semantic=sem, progress=False)
    assert list(df.columns) == [
        "particle_id",
        "tomogram",
        "z",
        "y",
        "x",
        "z_A",
        "y_A",
        "x_A",
        "voxel_size",
        "n_voxels",
        "bbox_z0",
        "bbox_y0",
        "bbox_x0",
        "bbox_z1",
        "bbox_y1",
        "bbox_x1",
        "size_category",
        "semantic_class",
    ]
    a, b = df.iloc[0], df.iloc[1]
    assert a.particle_id == 5 and b.particle_id == 9 and (df.tomogram == "tomo_a").all()
    assert (a.z, a.y, a.x) == (3.5, 5.0, 6.5)
    assert (a.z_A, a.y_A, a.x_A) == (28.0, 40.0, 52.0)
    assert (df.voxel_size == 8.0).all() and not df.attrs  # one carrier: the column
    assert a.n_voxels == 120 and b.n_voxels == 2700
    assert (b.bbox_z0, b.bbox_y0, b.bbox_x0, b.bbox_z1, b.bbox_y1, b.bbox_x1) == (
        10,
        10,
        10,
        19,
        25,
        30,
    )
    assert (a.size_category, b.size_category) == ("tiny", "big")
    assert constants.size_category([149, 150, 899, 900, 1999, 2000, 6000, 6001]).tolist() == [
        "tiny",
        "small",
        "small",
        "medium",
        "medium",
        "big",
        "very big",
        "very big",
    ]
    assert (a.semantic_class, b.semantic_class) == ("particle", "actin")
    # chunk-wise (dask) computation gives the same table
    lazy = xr.DataArray(da.from_array(lab, chunks=(7, 11, 13)), dims=DIMS, attrs=inst.attrs)
    df2 = segmentation.particles(lazy, tomogram="tomo_a", semantic=sem, progress=False)
    pd.testing.assert_frame_equal(df, df2, check_dtype=False)
    empty = segmentation.particles(np.zeros((4, 4, 4), np.uint32), progress=False)
    assert len(empty) == 0 and "particle_id" in empty.columns
    with pytest.raises(InputError):
        segmentation.particles(lab.astype(np.float32))


# ----------------------------------------------------------------------- subtomograms
def test_subtomograms_are_centred_and_padded_at_borders():
    rng = np.random.default_rng(0)
    vol = rng.random((30, 40, 50)).astype(np.float32) + 1.0  # > 0 everywhere
    table = pd.DataFrame(
        {"particle_id": [1, 2], "z": [15.0, 1.2], "y": [20.0, 38.6], "x": [25.0, 0.4]}
    )
    box = 16
    subs = segmentation.extract_subtomograms(vol, table, box=box, progress=False)
    assert subs.shape == (2, box, box, box) and subs.dtype == np.float32
    np.testing.assert_array_equal(subs[0], vol[7:23, 12:28, 17:33])
    # near the corner: centre voxel (1, 39, 0) lands at box//2, outside is zero-padded
    c = box // 2
    assert subs[1, c, c, c] == vol[1, 39, 0]
    np.testing.assert_array_equal(subs[1, c - 1 :, : c + 1, c:], vol[:9, 31:, :8])
    assert (subs[1, : c - 1] == 0).all() and (subs[1, :, c + 1 :] == 0).all()
    assert (subs[1, :, :, :c] == 0).all()
    # dask-backed tomogram: same crops
    lazy = xr.DataArray(da.from_array(vol, chunks=(10, 10, 10)), dims=DIMS)
    np.testing.assert_array_equal(
        segmentation.extract_subtomograms(lazy, table, box=box, progress=False), subs
    )

    # only the chunks a box touches are read
    class Recorder:
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.ndim, self.reads = a, a.shape, a.dtype, 3, []

        def __getitem__(self, key):
            self.reads.append(key)
            return self.a[key]

    rec = Recorder(vol)
    lazy = da.from_array(rec, chunks=(10, 10, 10), asarray=True)
    segmentation.extract_subtomograms(lazy, table.iloc[:1], box=8, progress=False)
    # a box of 8 centred at (15, 20, 25) spans z 11–18, y 16–23, x 21–28: 2 chunks, and
    # dask reads just the box's voxels from them (plus an empty read for metadata)
    sizes = [vol[k].size for k in rec.reads if vol[k].size]
    assert len(sizes) == 2 and sum(sizes) == 8**3
    with pytest.raises(InputError, match="masking"):
        segmentation.extract_subtomograms(vol, table, masking="bogus")
    with pytest.raises(InputError, match="instances"):
        segmentation.extract_subtomograms(vol, table, masking="strict")


def test_crop_box_is_one_box_of_extract_subtomograms():
    """crop_box (one box, as the explorer's thumbnails use) = extract_subtomograms' box."""
    from cryosiam_nb.segmentation.subtomograms import crop_box, round_centres

    rng = np.random.default_rng(4)
    vol = rng.random((21, 22, 23)).astype(np.float32) + 1.0
    lazy = da.from_array(vol, chunks=(8, 8, 8))
    centres = [(10.5, 3.5, 0.49), (0.0, 21.4, 22.5), (-1.5, 5.0, 30.0), (2.5, 2.5, 2.5)]
    table = pd.DataFrame(centres, columns=["z", "y", "x"])
    for box in (7, 8):
        subs = segmentation.extract_subtomograms(vol, table, box=box, progress=False)
        for i, c in enumerate(centres):
            one = crop_box(vol, c, box)
            np.testing.assert_array_equal(one, subs[i])
            np.testing.assert_array_equal(crop_box(lazy, c, box), one)
            # rounding half up: the centre voxel floor(c + 0.5) sits at box // 2
            k = round_centres(c)
            if all(0 <= a < s for a, s in zip(k, vol.shape)):
                assert one[box // 2, box // 2, box // 2] == vol[tuple(k)]
    np.testing.assert_array_equal(round_centres([0.5, 1.5, -0.5]), [1, 2, 0])
    with pytest.raises(InputError, match="box"):
        crop_box(vol, (1, 1, 1), 0)


def test_subtomogram_masks():
    vol = np.ones((32, 32, 32), np.float32)
    lab = np.zeros(vol.shape, np.uint32)
    # particle 1: a "C" shape (a ring missing a quarter) in the plane z = 14..17
    zz, yy, xx = np.indices(vol.shape)
    r = np.hypot(yy - 16, xx - 16)
    ring = (r >= 4) & (r <= 7) & (zz >= 14) & (zz <= 17) & ~((yy > 16) & (xx > 16))
    lab[ring] = 1
    lab[14:18, 24:27, 24:27] = 2  # particle 2 sits next to it
    table = segmentation.particles(lab, progress=False)
    box = 24
    none = segmentation.extract_subtomograms(vol, table, instances=lab, box=box, progress=False)
    assert (none[0] == 1).all()
    strict = segmentation.extract_subtomograms(
        vol, table, instances=lab, box=box, masking="strict", grow=2, progress=False
    )
    # strict: own voxels + 2-voxel shell, other particles' voxels and far voxels zeroed
    c0 = np.floor(table.loc[0, ["z", "y", "x"]].to_numpy(float) + 0.5).astype(int) - box // 2
    sl = tuple(slice(a, a + box) for a in c0)
    own = lab[sl] == 1
    other = (lab[sl] > 0) & ~own
    grown = ndi.binary_dilation(own, structure=ball(2))
    np.testing.assert_array_equal(strict[0] > 0, grown & ~other)
    assert other.any() and (strict[0][other] == 0).all()
    hull = segmentation.extract_subtomograms(
        vol, table, instances=lab, box=box, masking="convex_hull", progress=False
    )
    kept = hull[0] > 0
    assert kept[own].all() and not kept[~grown].all()
    # the hull fills the missing quarter of the ring: the inside of the "C" is kept...
    assert kept[16 - c0[0], 19 - c0[1], 19 - c0[2]] and kept[16 - c0[0], 16 - c0[1], 16 - c0[2]]
    # ...but nothing beyond the ring's outer radius
    assert not kept[16 - c0[0], 16 - c0[1], 16 + 9 - c0[2]]
    assert kept.sum() > own.sum()


def test_maps_from_density_picks_bright_blobs():
    """Model-free picking: separated bright blobs on a dim background become one instance each."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0.2, 0.02, size=(32, 48, 48)).astype(np.float32)
    centres = [(8, 10, 10), (16, 24, 30), (24, 36, 12)]
    zz, yy, xx = np.indices(vol.shape)
    for cz, cy, cx in centres:
        vol[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 0.8
    maps = segmentation.maps_from_density(vol)
    assert 0.2 < maps.attrs["threshold"] < 0.8
    labels = segmentation.instances(maps, min_size=5, progress=False)
    table = segmentation.particles(labels, progress=False)
    assert len(table) == 3
    found = sorted(tuple(np.round(r)) for r in table[["z", "y", "x"]].to_numpy())
    assert found == sorted(centres)
    mask = np.zeros(vol.shape, np.uint8)
    mask[:, :, 20:] = 1  # keep only the middle blob
    masked = segmentation.instances(segmentation.maps_from_density(vol, roi=mask), progress=False)
    assert len(np.unique(masked.values)) == 2


def _same_partition(a, b):
    """Two label volumes are the same partition of the voxels (ids may differ)."""
    assert ((a > 0) == (b > 0)).all()
    sel = a > 0
    pairs = np.unique(np.stack([a[sel], b[sel]], 1), axis=0)
    return len(pairs) == len(np.unique(a[sel])) == len(np.unique(b[sel]))


def test_blockwise_instances_equal_whole_volume_label():
    """The one stitching helper in instances: blobs cut by block faces are re-joined, and
    the block-wise result is the same partition as scipy.ndimage.label of the whole."""
    lab = np.zeros((40, 48, 56), np.uint32)
    rng = np.random.default_rng(7)
    centres = [(10, 12, 14), (20, 24, 28), (30, 36, 42), (10, 36, 42), (30, 12, 28), (20, 40, 10)]
    for i, c in enumerate(centres, 1):
        _paste(lab, tuple(int(v + rng.integers(-1, 2)) for v in c), ball(4).astype(bool), i)
    ref, n = ndi.label(lab > 0)
    maps = segmentation.maps_from_labels(xr.DataArray(lab, dims=DIMS, attrs={"voxel_size": 4.0}))
    whole = segmentation.instances(maps, multicut=False, min_size=1, progress=False)
    for block in ((20, 24, 28), (13, 17, 19)):  # faces run through the balls
        blk = segmentation.instances(
            maps, multicut=False, min_size=1, block_shape=block, halo=10, progress=False
        )
        assert blk.values.max() == n == 6
        assert _same_partition(blk.values, ref)
        np.testing.assert_array_equal(np.unique(blk.values), np.arange(n + 1))
    assert _same_partition(whole.values, ref)
    assert whole.attrs["voxel_size"] == 4.0


def test_outputs_carry_the_voxel_size(tmp_path):
    """instances / maps_from_density / particles: voxel size on every output (one carrier)."""
    from cryosiam_nb import io

    lab = np.zeros((16, 20, 24), np.uint32)
    _paste(lab, (8, 10, 12), ball(4).astype(bool), 1)
    vol = xr.DataArray((lab > 0).astype(np.float32), dims=DIMS, attrs={"voxel_size": 10.0})
    maps = segmentation.maps_from_density(vol)
    assert maps.attrs["voxel_size"] == 10.0
    assert all(maps[v].attrs["voxel_size"] == 10.0 for v in maps.data_vars)
    np.testing.assert_array_equal(maps["x"].values, np.arange(24) * 10.0)
    inst = segmentation.instances(maps, min_size=1, progress=False)
    assert inst.attrs["voxel_size"] == 10.0
    back = io.read(io.write(inst, tmp_path / "inst.zarr"))
    assert float(back.attrs["voxel_size"]) == 10.0
    table = segmentation.particles(inst, progress=False)
    assert len(table) == 1 and table.voxel_size.iloc[0] == 10.0
    out = segmentation.instances(maps, min_size=1, out=tmp_path / "o.zarr", progress=False)
    assert float(io.read(tmp_path / "o.zarr").attrs["voxel_size"]) == 10.0
    np.testing.assert_array_equal(out.values, inst.values)
