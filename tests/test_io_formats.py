"""Formats other tools read: OME-Zarr 0.4/0.5 with a pyramid (checked with ome-zarr-py and
ome-zarr-models), OME-Zarr 0.1–0.5 / zarr v2 input, copick and CryoET Data Portal layouts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from cryosiam_nb import io
from cryosiam_nb.io import _zarr


def _blocks_mean(x: np.ndarray) -> np.ndarray:
    z, y, w = (s // 2 for s in x.shape)
    x = x[: 2 * z, : 2 * y, : 2 * w].astype(np.float64)
    return x.reshape(z, 2, y, 2, w, 2).mean(axis=(1, 3, 5))


def _ome_group(path: Path, data: np.ndarray, ms: dict, zarr_format: int = 2):
    """A hand-made OME-Zarr image (one level '0') with multiscales entry ``ms``."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    g.create_array("0", data=data, chunks=data.shape)
    g.attrs["multiscales"] = [{"datasets": [{"path": "0"}], **ms}]
    return path


def _scale(*s: float) -> list[dict]:
    return [{"type": "scale", "scale": list(s)}]


# --------------------------------------------------------------------------- writing
@pytest.mark.parametrize(("zarr_format", "version"), [(2, "0.4"), (3, "0.5")])
def test_written_zarr_is_an_ome_zarr_image_read_by_ome_zarr_py(tmp_path, rng, zarr_format, version):
    ome_reader = pytest.importorskip("ome_zarr.reader")
    ome_io = pytest.importorskip("ome_zarr.io")
    vol = rng.normal(size=(66, 130, 132)).astype(np.float32)
    out = io.write(
        io.as_dataarray(da.from_array(vol, chunks=(32, 64, 64)), 7.5, name="tomo"),
        tmp_path / "t.zarr",
        zarr_format=zarr_format,
    )
    loc = ome_io.parse_url(str(out))
    assert loc is not None and loc.fmt.version == version
    node = next(iter(ome_reader.Reader(loc)()))
    axes = node.metadata["axes"]
    assert [(a["name"], a["type"], a["unit"]) for a in axes] == [
        (a, "space", "angstrom") for a in "zyx"
    ]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[7.5] * 3, [15.0] * 3]  # 66 → 33 < 64: two levels
    assert [tuple(d.shape) for d in node.data] == [(66, 130, 132), (33, 65, 66)]
    np.testing.assert_array_equal(np.asarray(node.data[0]), vol)
    np.testing.assert_allclose(np.asarray(node.data[1]), _blocks_mean(vol), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_written_zarr_validates_against_the_ngff_schema(tmp_path, rng, zarr_format):
    models = pytest.importorskip("ome_zarr_models")
    import zarr

    out = io.write(
        io.as_dataarray(rng.normal(size=(8, 16, 16)).astype(np.float32), 4.0),
        tmp_path / "t.zarr",
        zarr_format=zarr_format,
    )
    image = models.open_ome_zarr(zarr.open_group(str(out), mode="r"))
    assert type(image).__module__.startswith(f"ome_zarr_models.v0{2 + zarr_format}")
    if zarr_format == 2:
        assert (out / ".zgroup").is_file() and (out / "0" / ".zarray").is_file()
        assert json.loads((out / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_label_pyramid_is_strided_not_averaged(tmp_path):
    labels = np.arange(128 * 64 * 64, dtype=np.uint32).reshape(128, 64, 64) % 7
    out = io.write(io.as_dataarray(labels, 10.0), tmp_path / "lab.zarr")
    lvl1 = io.read(out, level=1, dtype=None)
    assert lvl1.dtype == np.uint32 and lvl1.attrs["voxel_size"] == 20.0
    np.testing.assert_array_equal(lvl1.values, labels[::2, ::2, ::2])
    assert set(np.unique(lvl1.values)) <= set(np.unique(labels))
    # forcing the mean on a float volume is the same as auto
    vol = labels.astype(np.float32)
    io.write(io.as_dataarray(vol, 10.0), tmp_path / "m.zarr", downsample="stride")
    np.testing.assert_array_equal(io.read(tmp_path / "m.zarr", level=1).values, vol[::2, ::2, ::2])


@pytest.mark.parametrize("chunks", [(33, 50, 64), (64, 64, 64), (128, 130, 131)])
def test_pyramid_levels_match_numpy_for_any_chunking(tmp_path, rng, chunks):
    vol = rng.normal(size=(128, 130, 131)).astype(np.float32)
    src = da.from_array(vol, chunks=chunks)
    out = io.write(io.as_dataarray(src, 2.0), tmp_path / "p.zarr")
    want = vol
    for level in range(3):  # 128 → 64 → 32 (< 64): three levels
        got = io.read(out, level=level)
        assert got.attrs["voxel_size"] == 2.0 * 2**level
        np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-5)
        want = _blocks_mean(want)
    with pytest.raises(io.InputError, match="no pyramid level 3"):
        io.read(out, level=3)
    ints = io.write(io.as_dataarray(src.astype(np.int16) * 4, 2.0), tmp_path / "i.zarr",
                    downsample="mean")  # fmt: skip
    lvl1 = io.read(ints, level=1, dtype=None)
    assert lvl1.dtype == np.int16
    np.testing.assert_array_equal(lvl1.values, np.rint(_blocks_mean(vol.astype(np.int16) * 4)))


def test_pyramid_level_rule():
    assert io.pyramid_shapes((200, 928, 960)) == [(200, 928, 960), (100, 464, 480), (50, 232, 240)]
    assert io.pyramid_shapes((2, 3, 4)) == [(2, 3, 4)]
    assert len(io.pyramid_shapes((8192,) * 3)) == _zarr.MAX_LEVELS
    assert io.pyramid_shapes((200, 928, 960), levels=1) == [(200, 928, 960)]
    assert len(io.pyramid_shapes((8, 8, 3), levels=5)) == 2  # stops before an axis hits 0
    with pytest.raises(io.InputError, match="levels"):
        io.pyramid_shapes((8, 8, 8), levels=0)


def test_source_is_computed_once_and_levels_come_from_disk(tmp_path):
    calls = []

    def spy(block):
        calls.append(block.shape)
        return block

    src = da.ones((128, 64, 64), chunks=(32, 32, 32), dtype=np.float32).map_blocks(
        spy, dtype=np.float32
    )
    out = io.write(io.as_dataarray(src, 5.0), tmp_path / "s.zarr")
    calls = [c for c in calls if 0 not in c]  # dask probes map_blocks with an empty block
    assert sorted(calls) == [(32, 32, 32)] * 16  # each source block once, none bigger
    shapes = [io.read(out, level=i, check_values=False).shape for i in range(2)]
    assert shapes == [(128, 64, 64), (64, 32, 32)]


def test_bad_write_options_are_refused_before_writing(tmp_path):
    t = io.as_dataarray(np.zeros((4, 4, 4), np.float32), 4.0)
    for kw, msg in [
        ({"zarr_format": 4}, "zarr_format"),
        ({"downsample": "median"}, "median"),
        ({"levels": 0}, "levels"),
    ]:
        with pytest.raises(io.InputError, match=msg):
            io.write(t, tmp_path / "x.zarr", **kw)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_building_the_pyramid_leaves_nothing(tmp_path, monkeypatch):
    out = io.write(io.as_dataarray(np.ones((64, 64, 64), np.float32), 4.0), tmp_path / "o.zarr")

    def boom(x, method):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_zarr, "downsample", boom)
    with pytest.raises(OSError, match="No space") as err:
        io.write(io.as_dataarray(np.zeros((64, 64, 64), np.float32), 4.0), out, overwrite=True)
    assert ".tmp-" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["o.zarr"]
    assert float(io.read(out, check_values=False).values.min()) == 1.0  # old store untouched


# --------------------------------------------------------------------------- reading
def test_read_level_choice_and_refusals(tmp_path, rng, write_mrc):
    vol = rng.normal(size=(64, 64, 64)).astype(np.float32)
    out = io.write(io.as_dataarray(vol, 6.0), tmp_path / "t.zarr")
    t0, t1, last = io.read(out), io.read(out, level=1), io.read(out, level=-1)
    assert (t0.attrs["level"], t0.attrs["voxel_size"]) == (0, 6.0)
    assert (t1.attrs["level"], t1.attrs["voxel_size"], t1.shape) == (1, 12.0, (32, 32, 32))
    assert last.attrs["level"] == 1
    np.testing.assert_allclose(t1.coords["x"].values[:2], [0.0, 12.0])
    np.testing.assert_array_equal(t0.values, vol)
    lvl = io.read(out / "1")  # one level of the image, by path
    assert lvl.attrs["voxel_size"] == 12.0 and lvl.shape == (32, 32, 32)
    with pytest.raises(io.InputError, match=r"t\.zarr: no pyramid level 2; .* 2 level\(s\)"):
        io.read(out, level=2)
    with pytest.raises(io.InputError, match=r"tomo\.mrc: an MRC file has no pyramid level 1"):
        io.read(write_mrc(vol[:4]), level=1)


@pytest.mark.parametrize(
    ("unit", "scale"),
    [
        ("angstrom", 10.0),
        ("nanometer", 1.0),
        ("nm", 1.0),
        ("micrometer", 0.001),
        ("µm", 0.001),  # micro sign
        ("μm", 0.001),  # Greek mu
        ("um", 0.001),
    ],
)
def test_zarr_v2_ome_04_units_become_angstrom(tmp_path, unit, scale):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ms = {
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": unit} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": _scale(scale, scale, scale)}],
    }
    p = _ome_group(tmp_path / "v2.zarr", data, ms, zarr_format=2)
    assert (p / ".zattrs").is_file()  # really zarr v2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = io.read(p)
    assert t.attrs["voxel_size"] == pytest.approx(10.0)
    np.testing.assert_array_equal(t.values, data)


def test_ome_zarr_03_string_axes_without_scale_warn_unknown_voxel_size(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    p = _ome_group(tmp_path / "v03.zarr", data, {"version": "0.3", "axes": ["z", "y", "x"]})
    with pytest.warns(io.VoxelSizeWarning, match=r"v03\.zarr: .*unset.*voxel_size"):
        t = io.read(p)
    assert t.attrs["voxel_size"] == 1.0
    np.testing.assert_array_equal(t.values, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.read(p, voxel_size=8.0).attrs["voxel_size"] == 8.0


def test_scale_without_unit_is_taken_as_angstrom_with_a_warning(tmp_path):
    ms = {"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"]}
    ms["datasets"] = [{"path": "0", "coordinateTransformations": _scale(9.0, 9.0, 9.0)}]
    p = _ome_group(tmp_path / "nounit.zarr", np.ones((2, 3, 4), np.float32), ms)
    with pytest.warns(io.VoxelSizeWarning, match="no unit"):
        assert io.read(p, check_values=False).attrs["voxel_size"] == 9.0


def test_anisotropic_scale_is_refused_unless_voxel_size_is_given(tmp_path):
    ms = {"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "nm"} for a in "zyx"]}
    ms["datasets"] = [{"path": "0", "coordinateTransformations": _scale(2.0, 1.0, 1.0)}]
    p = _ome_group(tmp_path / "aniso.zarr", np.ones((2, 3, 4), np.float32), ms)
    with pytest.raises(io.InputError, match=r"aniso\.zarr: anisotropic .*z=20, y=10, x=10 Å"):
        io.read(p)
    assert io.read(p, voxel_size=10.0, check_values=False).attrs["voxel_size"] == 10.0


def test_unknown_unit_is_refused(tmp_path):
    ms = {"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "parsec"} for a in "zyx"]}
    ms["datasets"] = [{"path": "0", "coordinateTransformations": _scale(1.0, 1.0, 1.0)}]
    p = _ome_group(tmp_path / "far.zarr", np.ones((2, 3, 4), np.float32), ms)
    with pytest.raises(io.InputError, match=r"far\.zarr: .*'z' has unit 'parsec'"):
        io.read(p)


def test_malformed_multiscales_are_refused(tmp_path):
    ms = {"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"]}
    ms["datasets"] = [{"path": "0", "coordinateTransformations": [{"type": "scale"}]}]
    bad = _ome_group(tmp_path / "bad.zarr", np.ones((2, 3, 4), np.float32), ms)
    import zarr

    zarr.open_group(str(bad), mode="r+").attrs["multiscales"] = [{"datasets": "0"}]
    with pytest.raises(io.InputError, match=r"bad\.zarr: malformed OME-Zarr multiscales"):
        io.read(bad)


def test_tczyx_singletons_are_dropped_and_axis_names_decide_the_order(tmp_path, rng):
    vol = rng.normal(size=(4, 5, 6)).astype(np.float32)
    axes5 = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"
    ]
    ms5 = {"version": "0.4", "axes": axes5}
    ms5["datasets"] = [{"path": "0", "coordinateTransformations": _scale(1, 1, 3, 3, 3)}]
    t = io.read(_ome_group(tmp_path / "tczyx.zarr", vol[None, None], ms5))
    assert t.shape == (4, 5, 6) and t.attrs["voxel_size"] == 3.0
    np.testing.assert_array_equal(t.values, vol)

    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "xyz"]
    msx = {"version": "0.4", "axes": axes}
    msx["datasets"] = [{"path": "0", "coordinateTransformations": _scale(3, 3, 3)}]
    t = io.read(_ome_group(tmp_path / "xyz.zarr", vol.transpose(2, 1, 0).copy(), msx))
    np.testing.assert_array_equal(t.values, vol)

    two = np.stack([vol, vol])[:, None]  # t = 2
    with pytest.raises(io.InputError, match=r"t5\.zarr: .*non-spatial axes longer than 1.*t=2"):
        io.read(_ome_group(tmp_path / "t5.zarr", two, ms5))


def test_old_plain_array_stores_and_dataset_stores_stay_readable(tmp_path, rng):
    import zarr

    from cryosiam_nb.inference import write_predictions

    vol = rng.normal(size=(6, 7, 8)).astype(np.float32)
    arr = zarr.create_array(store=str(tmp_path / "old.zarr"), shape=vol.shape, dtype="f4")
    arr[:] = vol
    arr.attrs["voxel_size"] = 4.0  # what io.write wrote before OME-Zarr
    assert io.read(tmp_path / "old.zarr").attrs["voxel_size"] == 4.0

    one = xr.Dataset({"denoised": io.as_dataarray(vol, 5.0)}, attrs={"voxel_size": 5.0})
    write_predictions(one, tmp_path / "one.zarr", progress=False)
    t = io.read(tmp_path / "one.zarr")
    assert t.attrs["voxel_size"] == 5.0
    np.testing.assert_array_equal(t.values, vol)

    two = one.assign(semantic=one["denoised"].astype(np.uint8)).transpose("x", "z", "y")
    write_predictions(two, tmp_path / "two.zarr", progress=False)
    with pytest.raises(io.InputError, match=r"two\.zarr: .*2 volumes \(denoised, semantic\)"):
        io.read(tmp_path / "two.zarr")
    sem = io.read(tmp_path / "two.zarr" / "semantic", dtype=None)  # dims put back in z, y, x
    np.testing.assert_array_equal(sem.values, vol.astype(np.uint8))


# --------------------------------------------------------------------------- copick / portal
def _tomo(path: Path, value: float, vs: float) -> Path:
    """A 64³ tomogram of mean ``value`` (a ±0.5 checkerboard: every 2×2×2 mean is ``value``)."""
    parity = np.indices((64, 64, 64)).sum(axis=0) % 2
    vol = (value + 0.5 - parity).astype(np.float32)
    return io.write(io.as_dataarray(vol, vs), path)


def test_copick_project_is_listed_and_each_tomogram_read(tmp_path):
    runs = tmp_path / "proj" / "ExperimentRuns"
    _tomo(runs / "TS_1" / "VoxelSpacing10.000" / "wbp.zarr", 1.0, 10.0)
    _tomo(runs / "TS_1" / "VoxelSpacing10.000" / "denoised.zarr", 2.0, 10.0)
    _tomo(runs / "TS_2" / "VoxelSpacing10.000" / "wbp.zarr", 3.0, 10.0)
    _tomo(runs / "TS_2" / "VoxelSpacing20.000" / "wbp.zarr", 4.0, 20.0)
    # not tomograms: a copick feature store, a segmentation, a half-written temp store
    _tomo(runs / "TS_1" / "VoxelSpacing10.000" / "wbp_cryosiam_features.zarr", 0.0, 10.0)
    _tomo(runs / "TS_1" / "Segmentations" / "10.000_me_1_membrane.zarr", 0.0, 10.0)
    (runs / "TS_2" / "VoxelSpacing10.000" / ".wbp.zarr.tmp-1-deadbeef").mkdir()
    (runs / "TS_2" / "VoxelSpacing10.000" / "failed.zarr").mkdir()  # no zarr metadata
    (runs / "TS_1" / "Picks").mkdir()

    table = io.list_tomograms(tmp_path / "proj")
    assert list(table.columns) == ["run", "voxel_spacing", "tomo_type", "path", "layout", "dataset"]
    got = [tuple(r) for r in table[["run", "voxel_spacing", "tomo_type"]].itertuples(index=False)]
    assert got == [("TS_1", 10.0, "denoised"), ("TS_1", 10.0, "wbp"), ("TS_2", 10.0, "wbp"),
                   ("TS_2", 20.0, "wbp")]  # fmt: skip
    assert set(table.layout) == {"copick"}
    level1 = [io.read(p, level=1, check_values=False) for p in table.path]
    assert [float(t.values.mean()) for t in level1] == [2.0, 1.0, 3.0, 4.0]
    assert [t.attrs["voxel_size"] for t in level1] == [20, 20, 20, 40]

    wbp10 = io.list_tomograms(tmp_path / "proj", voxel_spacing=10, tomo_type="wbp")
    assert list(wbp10.run) == ["TS_1", "TS_2"]
    with pytest.raises(io.InputError, match=r"proj: no tomogram with .*\(10, denoised\)"):
        io.list_tomograms(tmp_path / "proj", voxel_spacing=15)

    cfg = tmp_path / "copick_config.json"
    cfg.write_text(json.dumps({"config_type": "filesystem", "pickable_objects": [],
                               "overlay_root": f"local://{tmp_path / 'proj'}"}))  # fmt: skip
    assert io.list_tomograms(cfg).equals(table)


def test_bad_copick_configs_and_empty_folders_are_refused(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"overlay_root": "s3://bucket/project"}))
    with pytest.raises(io.InputError, match=r"c\.json: overlay_root is 's3://.*only local"):
        io.list_tomograms(cfg)
    cfg.write_text("{not json")
    with pytest.raises(io.InputError, match=r"c\.json: not a readable copick configuration"):
        io.list_tomograms(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.InputError, match=r"empty: found no tomograms; expected a copick"):
        io.list_tomograms(tmp_path / "empty")
    with pytest.raises(io.InputError, match=r"nope: no such file"):
        io.list_tomograms(tmp_path / "nope")


def test_data_portal_downloads_are_listed(tmp_path):
    new = tmp_path / "10445" / "TS_026" / "Reconstructions" / "VoxelSpacing13.480"
    _tomo(new / "Tomograms" / "100" / "TS_026.zarr", 1.0, 13.48)
    _tomo(new / "Annotations" / "101" / "membrane-1.0_segmentationmask.zarr", 0.0, 13.48)
    old = tmp_path / "10000" / "TS_1" / "Tomograms" / "VoxelSpacing13.480"
    _tomo(old / "CanonicalTomogram" / "TS_1.zarr", 2.0, 13.48)

    table = io.list_tomograms(tmp_path)
    rows = [tuple(r) for r in table.drop(columns="path").itertuples(index=False)]
    assert rows == [("TS_026", 13.48, "100", "portal", "10445"),
                    ("TS_1", 13.48, "CanonicalTomogram", "portal", "10000")]  # fmt: skip
    t = io.read(table.path[0])
    assert t.attrs["voxel_size"] == pytest.approx(13.48) and float(t.values.mean()) == 1.0
