"""Normalisation (out-of-core percentiles) and rescaling."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from cryosiam_nb import io, pp


@pytest.mark.parametrize("dist", ["normal", "heavy_tail", "discrete"])
def test_percentiles_match_numpy(rng, dist):
    if dist == "normal":
        vol = rng.normal(size=(32, 40, 48))
    elif dist == "heavy_tail":
        vol = rng.standard_cauchy(size=(32, 40, 48))
    else:
        vol = rng.integers(-500, 500, size=(32, 40, 48)).astype(float)
    vol = vol.astype(np.float32)
    got = pp.percentiles(da.from_array(vol, chunks=(8, 16, 16)), (0.1, 99.9))
    ref = np.percentile(vol, [0.1, 99.9])
    span = ref[1] - ref[0]
    assert abs(got[0] - ref[0]) / span < 1e-3
    assert abs(got[1] - ref[1]) / span < 1e-3


def test_normalize_matches_in_memory_reference(rng, write_mrc):
    vol = (rng.gamma(2.0, size=(24, 32, 40)) * 50 + 1000).astype(np.float32)
    t = io.read(write_mrc(vol), chunks=(8, 16, 16))
    n = pp.normalize(t, invert=True)
    lo, hi = np.percentile(-vol, [0.1, 99.9])
    ref = np.clip((-vol - lo) / (hi - lo), 0, 1)
    out = n.values
    assert out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.abs(out - ref).max() < 1e-3
    assert n.dims == ("z", "y", "x") and n.attrs["voxel_size"] == t.attrs["voxel_size"]
    assert n.attrs["normalization"]["invert"] is True


def test_invert_flips_contrast(rng):
    vol = np.zeros((8, 16, 16), np.float32)
    vol[4, 8, 8] = -10.0  # a dark "protein" voxel on bright ice
    vol += rng.normal(scale=0.01, size=vol.shape).astype(np.float32)
    inv = pp.normalize(vol, invert=True).values
    raw = pp.normalize(vol, invert=False).values
    assert inv[4, 8, 8] == pytest.approx(1.0)
    assert raw[4, 8, 8] == pytest.approx(0.0)


def test_normalize_is_lazy(rng):
    vol = da.from_array(rng.normal(size=(16, 16, 16)).astype(np.float32), chunks=8)
    n = pp.normalize(vol)
    assert isinstance(n.data, da.Array)


def test_nan_voxels_raise_or_fill(rng, write_mrc):
    vol = rng.normal(size=(8, 16, 16)).astype(np.float32)
    vol[2, 3, 4] = np.nan
    t = io.read(write_mrc(vol, name="holes.mrc"))
    with pytest.raises(io.InputError, match="holes.mrc.*1 voxels are NaN"):
        pp.normalize(t)
    filled = pp.normalize(t, nonfinite="fill").values
    assert np.isfinite(filled).all() and filled[2, 3, 4] == 0


def test_constant_volume_does_not_divide_by_zero():
    out = pp.normalize(np.ones((4, 4, 4), np.float32)).values
    assert np.isfinite(out).all()


def test_rescale_changes_grid_and_keeps_content(rng):
    z, y, x = np.meshgrid(np.arange(32), np.arange(48), np.arange(40), indexing="ij")
    vol = np.sin(x / 6.0) + np.cos(y / 7.0) + 0.1 * z  # smooth: survives resampling
    arr = io.as_dataarray(da.from_array(vol.astype(np.float32), chunks=(16, 16, 16)), 5.0)
    out = pp.rescale(arr, 10.0, chunks=(8, 8, 8))
    assert out.shape == (16, 24, 20)
    assert out.attrs["voxel_size"] == 10.0
    # physical positions of voxel centres are preserved: sample the smooth function there
    zz, yy, xx = np.meshgrid(*(np.arange(n) * 2 + 0.5 for n in out.shape), indexing="ij")
    expect = np.sin(xx / 6.0) + np.cos(yy / 7.0) + 0.1 * zz
    inner = (slice(2, -2),) * 3
    assert np.abs(out.values[inner] - expect[inner]).max() < 0.1
    # chunking must not show: same result with one chunk
    one = pp.rescale(io.as_dataarray(vol.astype(np.float32), 5.0), 10.0, chunks=(16, 24, 20))
    np.testing.assert_allclose(out.values, one.values, atol=1e-5)


def test_rescale_needs_voxel_size():
    arr = io.as_dataarray(np.ones((4, 4, 4), np.float32), voxel_size=3.0)
    with pytest.raises(io.InputError, match="voxel_size"):
        pp.rescale(arr, -1)


def test_rescale_coords_follow_the_io_convention(tmp_path):
    # One carrier, one rule: coords are index * voxel size (Å), as io.read writes them,
    # and the voxel size survives a write / read round trip.
    arr = io.as_dataarray(np.ones((8, 12, 10), np.float32), voxel_size=5.0)
    out = pp.rescale(arr, 10.0)
    for d, n in zip("zyx", out.shape):
        np.testing.assert_allclose(out.coords[d].values, np.arange(n) * 10.0)
    back = io.read(io.write(out, tmp_path / "r.zarr"))
    assert back.attrs["voxel_size"] == 10.0
    for d in "zyx":
        np.testing.assert_allclose(back.coords[d].values, out.coords[d].values)


def test_as_volume_names_the_input_and_the_problem():
    with pytest.raises(io.InputError, match="labels: expected a 3-D"):
        io.as_volume(np.zeros((4, 4)), "labels")
    with pytest.raises(io.InputError, match="tomo: the volume is empty"):
        io.as_volume(np.zeros((0, 4, 4)), "tomo")
    lazy = da.zeros((4, 4, 4), chunks=2)
    assert io.as_volume(lazy) is lazy  # dask stays lazy
    assert io.voxel_size_of(None, np.zeros(3), io.as_dataarray(lazy, 7.5)) == 7.5
