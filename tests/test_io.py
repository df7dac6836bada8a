"""Reading/writing tomograms: voxel size, axis order, bad input, atomic writes."""

from __future__ import annotations

import warnings

import dask.array as da
import mrcfile
import numpy as np
import pytest
import xarray as xr

from cryosiam_nb import io


def test_read_mrc_is_lazy_zyx_with_angstrom_coords(write_mrc, rng):
    vol = rng.normal(size=(12, 20, 30)).astype(np.float32)
    vol[3, 5, 7] = 42.0  # a marker to check axis order
    path = write_mrc(vol, voxel_size=6.8)
    t = io.read(path, chunks=(4, 10, 10))
    assert isinstance(t, xr.DataArray)
    assert isinstance(t.data, da.Array)
    assert t.dims == ("z", "y", "x")
    assert t.shape == (12, 20, 30)
    assert t.attrs["voxel_size"] == pytest.approx(6.8, rel=1e-6)
    assert float(t.isel(z=3, y=5, x=7)) == 42.0
    np.testing.assert_allclose(t.coords["x"].values[:3], [0, 6.8, 13.6], rtol=1e-6)
    assert t.coords["z"].values[-1] == pytest.approx(11 * 6.8, rel=1e-6)
    np.testing.assert_array_equal(t.values, vol)


@pytest.mark.parametrize("header_vs", [0.0, 1.0])
def test_unset_voxel_size_warns_and_override_wins(write_mrc, rng, header_vs):
    path = write_mrc(rng.normal(size=(4, 8, 8)).astype(np.float32), voxel_size=header_vs)
    with pytest.warns(io.VoxelSizeWarning, match="voxel_size"):
        io.read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = io.read(path, voxel_size=10.5)
    assert t.attrs["voxel_size"] == 10.5
    assert t.coords["y"].values[1] == pytest.approx(10.5)


def test_bad_voxel_size_argument(write_mrc, rng):
    path = write_mrc(rng.normal(size=(4, 8, 8)).astype(np.float32))
    with pytest.raises(io.InputError, match="voxel size"):
        io.read(path, voxel_size=-2)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.mrc"
    with pytest.raises(io.InputError, match="nope.mrc.*no such file"):
        io.read(p)


def test_random_bytes_are_not_an_mrc(tmp_path, rng):
    p = tmp_path / "junk.mrc"
    p.write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(io.InputError, match="junk.mrc.*not a valid MRC"):
        io.read(p)


def test_truncated_mrc(write_mrc, rng):
    path = write_mrc(rng.normal(size=(8, 16, 16)).astype(np.float32), name="cut.mrc")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(io.InputError, match="cut.mrc.*truncated"):
        io.read(path)


def test_2d_image_is_refused(write_mrc, rng):
    path = write_mrc(rng.normal(size=(16, 16)).astype(np.float32), name="flat.mrc")
    with pytest.raises(io.InputError, match="flat.mrc.*2-D"):
        io.read(path)


def test_complex_mode_is_refused(tmp_path):
    p = tmp_path / "fft.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.ones((4, 8, 8), dtype=np.complex64))
    with pytest.raises(io.InputError, match="fft.mrc.*mode 4.*complex"):
        io.read(p)


def test_all_nan_is_refused(write_mrc):
    path = write_mrc(np.full((4, 8, 8), np.nan, dtype=np.float32), name="nan.mrc")
    with pytest.raises(io.InputError, match="nan.mrc.*no finite values"):
        io.read(path)


def test_inf_volume_is_refused(write_mrc):
    path = write_mrc(np.full((4, 8, 8), np.inf, dtype=np.float32), name="inf.mrc")
    with pytest.raises(io.InputError, match="inf.mrc.*NaN or Inf"):
        io.read(path)


def test_empty_volume_is_refused(tmp_path):
    import zarr

    p = tmp_path / "empty.zarr"
    zarr.create_array(store=str(p), shape=(0, 8, 8), chunks=(1, 8, 8), dtype="f4")
    with pytest.raises(io.InputError, match="empty.zarr.*empty"):
        io.read(p)


def test_input_error_is_value_error():
    assert issubclass(io.InputError, ValueError)


def test_int16_mrc_reads_as_float32(write_mrc, rng):
    vol = rng.integers(-100, 100, size=(4, 8, 8)).astype(np.int16)
    t = io.read(write_mrc(vol))
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t.values, vol.astype(np.float32))


@pytest.mark.parametrize("suffix", [".mrc", ".zarr"])
def test_write_roundtrip_keeps_voxel_size(tmp_path, rng, suffix):
    vol = rng.normal(size=(10, 12, 14)).astype(np.float32)
    arr = io.as_dataarray(da.from_array(vol, chunks=(3, 5, 7)), voxel_size=13.6)
    out = io.write(arr, tmp_path / f"out{suffix}")
    back = io.read(out)
    assert back.attrs["voxel_size"] == pytest.approx(13.6, rel=1e-6)
    np.testing.assert_array_equal(back.values, vol)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_write_is_atomic_on_failure(tmp_path):
    def boom(block):
        raise RuntimeError("compute failed")

    bad = da.zeros((8, 8, 8), chunks=4, dtype=np.float32).map_blocks(boom, dtype=np.float32)
    arr = io.as_dataarray(bad, voxel_size=5.0)
    for suffix in (".mrc", ".zarr"):
        with pytest.raises(RuntimeError, match="compute failed"):
            io.write(arr, tmp_path / f"half{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_to_overwrite_by_default(tmp_path, rng):
    arr = io.as_dataarray(rng.normal(size=(4, 4, 4)).astype(np.float32), voxel_size=2.0)
    io.write(arr, tmp_path / "a.mrc")
    with pytest.raises(FileExistsError, match="a.mrc"):
        io.write(arr, tmp_path / "a.mrc")
    io.write(arr * 2, tmp_path / "a.mrc", overwrite=True)
    np.testing.assert_allclose(io.read(tmp_path / "a.mrc").values, arr.values * 2)


def test_write_streams_block_by_block(tmp_path):
    """MRC output is stored block by block: no block larger than a dask chunk is computed."""
    seen = []

    def spy(block):
        seen.append(block.shape)
        return block

    src = da.ones((16, 8, 8), chunks=(4, 8, 8), dtype=np.float32).map_blocks(spy, dtype=np.float32)
    io.write(io.as_dataarray(src, 3.0), tmp_path / "s.mrc")
    assert seen and all(s[0] <= 4 for s in seen if s)
    np.testing.assert_array_equal(io.read(tmp_path / "s.mrc", check_values=False).values, 1.0)


def test_read_ome_zarr_multiscale(tmp_path, rng):
    import zarr

    vol = rng.normal(size=(6, 8, 10)).astype(np.float32)
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    g.create_array("0", data=vol, chunks=(3, 4, 5))
    g.attrs["multiscales"] = [
        {
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")],
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.2] * 3}]}
            ],
        }
    ]
    t = io.read(tmp_path / "ome.zarr")
    assert t.attrs["voxel_size"] == pytest.approx(12.0)
    np.testing.assert_array_equal(t.values, vol)


def test_mrc_volume_pickles_without_data(write_mrc, rng):
    import pickle

    path = write_mrc(rng.normal(size=(8, 16, 16)).astype(np.float32))
    t = io.read(path)
    blob = pickle.dumps(t.data)
    assert len(blob) < 8 * 16 * 16 * 4  # the graph carries the path, not the voxels
    np.testing.assert_array_equal(pickle.loads(blob).compute(), t.values)


def test_mrc_output_is_byte_identical_for_same_input(tmp_path, rng):
    arr = io.as_dataarray(rng.normal(size=(4, 6, 8)).astype(np.float32), voxel_size=4.0)
    a = io.write(arr, tmp_path / "a.mrc").read_bytes()
    b = io.write(arr, tmp_path / "b.mrc").read_bytes()
    assert a == b


def test_label_volume_keeps_integer_dtype_when_asked(tmp_path):
    labels = np.zeros((4, 6, 8), np.uint16)
    labels[1, 2, 3] = 7
    io.write(io.as_dataarray(labels, voxel_size=4.0), tmp_path / "l.mrc")
    back = io.read(tmp_path / "l.mrc", dtype=None)
    assert back.dtype == np.uint16 and int(back[1, 2, 3]) == 7
