"""Tests of the simulator (cryosiam_nb.sim): ground-truth consistency, imaging physics,
determinism, the species catalogue and the on-disk dataset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cryosiam_nb import sim
from cryosiam_nb.io import InputError
from cryosiam_nb.sim import imaging, shapes, structures

SHAPE = (64, 96, 96)


@pytest.fixture(scope="module")
def tilt_sim() -> sim.Simulation:
    return sim.simulate(SHAPE, voxel_size=10.0, sample="general", seed=0, progress=False)


@pytest.fixture(scope="module")
def fast_sim() -> sim.Simulation:
    return sim.simulate(SHAPE, sample="general", seed=0, mode="fast", progress=False)


@pytest.fixture(scope="module", params=["transcription", "chromatin"])
def other_sim(request) -> sim.Simulation:
    return sim.simulate(SHAPE, sample=request.param, seed=2, mode="fast", progress=False)


# --------------------------------------------------------------------------- contract
def test_volumes_follow_the_contract(tilt_sim):
    ds = tilt_sim.volumes
    assert isinstance(ds, xr.Dataset)
    expected = {
        "clean": np.float32,
        "noisy": np.float32,
        "semantic": np.uint8,
        "instances": np.uint32,
        "lamella": np.uint8,
    }
    for var, dtype in expected.items():
        assert ds[var].dims == ("z", "y", "x")
        assert ds[var].dtype == dtype, var
        assert ds[var].shape == SHAPE
    assert ds.attrs["voxel_size"] == 10.0
    np.testing.assert_allclose(ds["x"].values[:3], [0.0, 10.0, 20.0])  # coords in Å
    clean, noisy = ds["clean"].values, ds["noisy"].values
    assert clean.min() >= 0 and clean.max() <= 1.0 and clean.max() > 0.8
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert set(np.unique(ds["semantic"].values)) <= set(range(len(sim.SEMANTIC_CLASSES)))
    assert sim.SEMANTIC_CLASSES == (
        "background",
        "membrane",
        "microtubule",
        "particle",
        "actin",
        "dna",
    )
    cols = ["id", "species", "size_category", "z", "y", "x"]
    cols += ["rot_0", "rot_1", "rot_2", "rot_3", "n_voxels", "mass_kda"]
    assert list(tilt_sim.particles.columns) == cols
    q = tilt_sim.particles[["rot_0", "rot_1", "rot_2", "rot_3"]].to_numpy()
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)


def test_instance_ids_match_the_table(tilt_sim, other_sim):
    for s in (tilt_sim, other_sim):
        inst = s.volumes["instances"].values
        ids = set(np.unique(inst).tolist()) - {0}
        assert ids == set(s.particles["id"].tolist())
        assert len(s.particles) > 20
        counts = np.bincount(inst.ravel())
        np.testing.assert_array_equal(counts[s.particles["id"].to_numpy()], s.particles["n_voxels"])


def test_semantic_is_particle_exactly_where_instances(tilt_sim, other_sim):
    for s in (tilt_sim, other_sim):
        sem = s.volumes["semantic"].values
        inst = s.volumes["instances"].values
        np.testing.assert_array_equal(sem == 3, inst > 0)


def test_every_centre_lies_inside_its_instance(tilt_sim, other_sim):
    for s in (tilt_sim, other_sim):
        inst = s.volumes["instances"].values
        p = s.particles
        zyx = p[["z", "y", "x"]].to_numpy().round().astype(int)
        np.testing.assert_array_equal(inst[zyx[:, 0], zyx[:, 1], zyx[:, 2]], p["id"].to_numpy())


def test_size_categories_follow_voxel_bounds(tilt_sim):
    p = tilt_sim.particles
    for cat, lo, hi in sim.SIZE_CATEGORIES:
        sel = p[p["size_category"] == cat]
        assert ((sel["n_voxels"] >= lo) & (sel["n_voxels"] < hi)).all(), cat


def test_everything_lies_inside_the_lamella(tilt_sim):
    ds = tilt_sim.volumes
    lam = ds["lamella"].values.astype(bool)
    assert not (ds["semantic"].values[~lam] > 0).any()
    assert not (ds["clean"].values[~lam] > 0).any()
    # slab thickness (nm) matches the parameters, centred column
    col = lam[:, SHAPE[1] // 2, SHAPE[2] // 2].sum()
    assert abs(col * 1.0 - tilt_sim.params["thickness_nm"]) <= 2.5


def test_all_five_size_categories_at_default_voxel_size():
    scene = structures.build_scene(
        (128, 256, 256), 10.0, "general", np.random.default_rng(0), thickness_nm=80.0
    )
    cats = set(scene.particles["size_category"])
    assert cats == {"tiny", "small", "medium", "big", "very big"}
    # the general sample also has membranes and filaments
    present = set(np.unique(scene.semantic).tolist())
    assert {1, 3} <= present and (2 in present or 4 in present)


def test_sample_types_have_their_content(other_sim):
    s = other_sim
    species = set(s.particles["species"])
    sem = set(np.unique(s.volumes["semantic"].values).tolist())
    if s.params["sample"] == "chromatin":
        assert species == {"nucleosome_like"}
        assert 5 in sem and 1 not in sem
    else:
        assert species <= {
            "ribosome_70S_like",
            "ribosome_50S_like",
            "ribosome_30S_like",
            "rna_polymerase_like",
        }
        assert len(species) >= 3
        assert 5 in sem and 1 not in sem


def test_chromatin_nucleosomes_sit_near_dna():
    s = sim.simulate(SHAPE, sample="chromatin", seed=5, mode="fast", progress=False)
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(s.volumes["semantic"].values != 5)
    zyx = s.particles[["z", "y", "x"]].to_numpy().astype(int)
    near = dist[zyx[:, 0], zyx[:, 1], zyx[:, 2]] < 12  # voxels (12 nm at 10 Å)
    assert near.mean() > 0.4


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_arrays_and_other_seed_differs():
    small = (32, 64, 64)
    for mode in ("tilt", "fast"):
        a = sim.simulate(small, seed=7, mode=mode, progress=False)
        b = sim.simulate(small, seed=7, mode=mode, progress=False)
        c = sim.simulate(small, seed=8, mode=mode, progress=False)
        for var in ("clean", "noisy", "semantic", "instances", "lamella"):
            np.testing.assert_array_equal(a.volumes[var].values, b.volumes[var].values)
        assert a.particles.equals(b.particles)
        assert not np.array_equal(a.volumes["clean"].values, c.volumes["clean"].values)
        assert not np.array_equal(a.volumes["noisy"].values, c.volumes["noisy"].values)


def test_changing_snr_keeps_the_scene():
    small = (32, 64, 64)
    a = sim.simulate(small, seed=3, mode="fast", snr=0.1, progress=False)
    b = sim.simulate(small, seed=3, mode="fast", snr=1.0, progress=False)
    np.testing.assert_array_equal(a.volumes["instances"].values, b.volumes["instances"].values)
    assert not np.array_equal(a.volumes["noisy"].values, b.volumes["noisy"].values)


# --------------------------------------------------------------------------- imaging physics
def _wedge_power_ratio(vol: np.ndarray, tilt_range: float, margin: float) -> float:
    """Mean Fourier power at angles from the (x, y) plane > tilt_range + margin over the
    mean power in the sampled region (|angle| <= tilt_range), DC excluded."""
    v = vol.astype(np.float64) - vol.mean()
    p = np.abs(np.fft.fftn(v)) ** 2
    kz = np.fft.fftfreq(vol.shape[0])[:, None, None]
    kx = np.fft.fftfreq(vol.shape[2])[None, None, :]
    ang = np.broadcast_to(np.degrees(np.arctan2(np.abs(kz), np.abs(kx))), p.shape)
    sampled = ang <= tilt_range
    sampled[0, 0, 0] = False
    return float(p[ang > tilt_range + margin].mean() / p[sampled].mean())


def test_missing_wedge_in_tilt_reconstruction(tilt_sim):
    """Fourier power of ``noisy`` inside the missing wedge < 10 % of that outside.

    Each tilt samples a Fourier plane; with a 3° step the last plane (60°) represents
    angles up to 60° + step/2, so the wedge is taken from there. (At exactly 60° the ratio
    is ~0.10 for a 64-voxel-thick volume: the finite z extent blurs each plane by 1/nz.)
    """
    p = tilt_sim.params
    ratio = _wedge_power_ratio(
        tilt_sim.volumes["noisy"].values, p["tilt_range"], p["tilt_step"] / 2
    )
    assert ratio < 0.10
    # deep inside the wedge there is almost nothing
    assert _wedge_power_ratio(tilt_sim.volumes["noisy"].values, 60.0, 10.0) < 0.04


def test_missing_wedge_in_fast_mode(fast_sim):
    assert _wedge_power_ratio(fast_sim.volumes["noisy"].values, 60.0, 0.0) < 0.01


def test_missing_wedge_follows_tilt_range():
    s = sim.simulate((32, 64, 64), seed=1, mode="fast", tilt_range=40, progress=False)
    v = s.volumes["noisy"].values
    assert _wedge_power_ratio(v, 40.0, 0.0) < 0.01
    # the band 45–60° is sampled with ±60° but empty with ±40°
    full = sim.simulate((32, 64, 64), seed=1, mode="fast", tilt_range=60, progress=False)
    band = _wedge_power_ratio(full.volumes["noisy"].values, 45.0, 0.0)
    assert band > 5 * _wedge_power_ratio(v, 45.0, 0.0)


@pytest.mark.parametrize("snr", [0.03, 0.1, 1.0])
def test_measured_snr_is_within_25_percent(snr):
    """SNR = Σ_i var(S_i) / Σ_i var(N_i) over tilt images (see sim.imaging)."""
    s = sim.simulate((32, 64, 64), seed=4, snr=snr, progress=False)
    ts = s.tilt_series
    signal = ts["clean"].values
    noise = ts["noisy"].values - signal
    measured = (
        signal.reshape(len(signal), -1).var(1).sum() / noise.reshape(len(noise), -1).var(1).sum()
    )
    assert abs(measured / snr - 1) < 0.25
    assert abs(s.params["snr_realised"] / snr - 1) < 0.25


def test_dose_sets_noise_and_thick_samples_are_noisier():
    kw = {"seed": 2, "progress": False, "dose": 100.0, "crowding": 0.1}
    thin = sim.simulate((48, 64, 64), thickness_nm=25.0, **kw)
    thick = sim.simulate((48, 64, 64), thickness_nm=40.0, **kw)
    low = sim.simulate((48, 64, 64), thickness_nm=25.0, **{**kw, "dose": 20.0})
    assert low.params["snr_realised"] < 0.4 * thin.params["snr_realised"]
    # the thick lamella transmits fewer electrons at every tilt
    t_thin = thin.tilt_series["transmission"].values
    t_thick = thick.tilt_series["transmission"].values
    assert np.all(t_thick < t_thin)
    assert t_thin[0] < t_thin[len(t_thin) // 2]  # high tilt = longer path


def test_protein_is_bright_in_noisy_and_dark_in_raw(tilt_sim, fast_sim):
    for s in (tilt_sim, fast_sim):
        ds = s.volumes
        prot = ds["instances"].values > 0
        bg = (ds["lamella"].values > 0) & (ds["semantic"].values == 0)
        noisy = ds["noisy"].values
        raw = s.raw_noisy.values
        assert noisy[prot].mean() > noisy[bg].mean()
        assert raw[prot].mean() < raw[bg].mean()
        np.testing.assert_allclose(raw, 1 - noisy, atol=1e-6)
        # and the noisy volume correlates with the clean one
        c = np.corrcoef(ds["clean"].values.ravel(), noisy.ravel())[0, 1]
        assert c > 0.1


def test_ctf_sign_and_wavelength():
    assert abs(imaging.electron_wavelength(300) - 0.01969) < 1e-4
    assert imaging.ctf(np.array([0.0]), 3e4)[0] < 0  # amplitude contrast: dark protein
    k = np.linspace(0, 0.05, 200)
    c = imaging.ctf(k, 5e4)
    assert np.sum(np.diff(np.sign(c)) != 0) >= 2  # oscillates


def test_projector_is_consistent():
    """The tilt projector preserves mass and its 0° projection is the sum along z."""
    rng = np.random.default_rng(0)
    vol = rng.random((16, 8, 20)).astype(np.float32)
    angles = np.array([-30.0, 0.0, 45.0])
    n_det = imaging.detector_width(16, 20, angles)
    proj = imaging.tilt_projector(16, 20, angles, n_det)
    p = imaging._project(vol, proj, 3, n_det)
    np.testing.assert_allclose(p.sum((1, 2)), vol.sum(), rtol=1e-4)
    off = (n_det - 20) // 2
    np.testing.assert_allclose(p[1][:, off : off + 20], vol.sum(0), rtol=1e-5)


# --------------------------------------------------------------------------- species
def test_species_catalogue_spans_all_categories():
    tab = sim.species_table()
    assert len(tab) >= 12
    assert set(tab["size_category_10A"]) == {"tiny", "small", "medium", "big", "very big"}
    assert set(sim.SPECIES) == set(tab["name"])
    for sample in sim.SAMPLES:
        assert any(sample in s.samples for s in sim.SPECIES.values())


def _axis_quaternion(axis_zyx: np.ndarray, angle: float) -> np.ndarray:
    ax = np.asarray(axis_zyx, float)[::-1] / np.linalg.norm(axis_zyx)  # quaternions are xyz
    return np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * ax])


def test_species_are_not_symmetric():
    """No species has a rotational symmetry, so orientation always matters.

    Distinct principal moments rule out every symmetry except 180° turns about the three
    principal axes (the symmetry group of the inertia ellipsoid); those must change the shape.
    """
    for sp in sim.SPECIES.values():
        d, _, step, n = shapes._reference_fields(sp.name, 10.0)
        pts = np.argwhere(d < 0) * step
        pts = pts - pts.mean(0)
        ev, vecs = np.linalg.eigh(pts.T @ pts / len(pts))
        gaps = np.diff(ev) / ev[-1]
        assert gaps.min() > 0.02, (sp.name, ev)
        quats = [np.array([1.0, 0, 0, 0])] + [_axis_quaternion(v, np.pi) for v in vecs.T]
        _, masks, _ = shapes.render_particles(sp, np.stack(quats), 5.0)
        for q, rot in zip(quats[1:], masks[1:]):
            iou = (masks[0] & rot).sum() / (masks[0] | rot).sum()
            assert iou < 0.9, (sp.name, q, iou)


def test_quaternion_convention_matches_scipy():
    from scipy.spatial.transform import Rotation

    q = shapes.random_quaternions(np.random.default_rng(0), 5)
    for qi in q:
        m_xyz = Rotation.from_quat(qi, scalar_first=True).as_matrix()
        m_zyx = shapes.quat_to_matrix_zyx(qi)
        np.testing.assert_allclose(m_zyx, m_xyz[::-1, ::-1], atol=1e-12)


def test_larger_voxels_give_smaller_particles():
    fine = sim.simulate((32, 64, 64), voxel_size=10.0, seed=1, mode="fast", progress=False)
    coarse = sim.simulate((32, 64, 64), voxel_size=20.0, seed=1, mode="fast", progress=False)
    f = fine.particles.groupby("species")["n_voxels"].median()
    c = coarse.particles.groupby("species")["n_voxels"].median()
    common = f.index.intersection(c.index)
    big = [s for s in common if f[s] > 500]
    assert big
    for s in big:
        assert 0.08 < c[s] / f[s] < 0.2  # ~1/8


def test_crowding_controls_particle_volume():
    lo = sim.simulate((32, 64, 64), seed=1, mode="fast", crowding=0.05, progress=False)
    hi = sim.simulate((32, 64, 64), seed=1, mode="fast", crowding=0.3, progress=False)
    assert hi.params["crowding_achieved"] > 2 * lo.params["crowding_achieved"]


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"sample": "bacteria"}, "sample"),
        ({"mode": "slow"}, "mode"),
        ({"snr": -1.0}, "snr"),
        ({"snr": 0.1, "dose": 50.0}, "dose"),
        ({"voxel_size": 0}, "voxel_size"),
        ({"tilt_range": 95}, "tilt_range"),
        ({"crowding": 0.95}, "crowding"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, word):
    with pytest.raises(InputError, match=word):
        sim.simulate((32, 48, 48), progress=False, **kwargs)


def test_bad_shape_raises():
    with pytest.raises(InputError, match="shape"):
        sim.simulate((8, 48, 48), progress=False)
    with pytest.raises(InputError, match="shape"):
        sim.simulate((48, 48), progress=False)


# --------------------------------------------------------------------------- dataset on disk
def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_write_dataset_is_deterministic_and_round_trips(tmp_path):
    kw = dict(n=2, shape=(32, 48, 48), seed=11, sample=["general", "chromatin"], mode="fast")
    m1 = sim.write_dataset(tmp_path / "a", progress=False, **kw)
    m2 = sim.write_dataset(tmp_path / "b", progress=False, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    man = json.loads(m1.read_text())
    assert [t["sample"] for t in man["tomograms"]] == ["general", "chromatin"]
    assert man["semantic_classes"] == list(sim.SEMANTIC_CLASSES)
    for t in man["tomograms"]:
        for rel in t["files"].values():
            assert (tmp_path / "a" / rel).exists()
    # no temporary leftovers next to the dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # what is on disk is what simulate() gives for the manifest's seed
    tomos = sim.read_dataset(tmp_path / "a")
    assert [t.name for t in tomos] == ["tomo_000", "tomo_001"]
    t0 = man["tomograms"][0]
    ref = sim.simulate((32, 48, 48), seed=t0["seed"], sample="general", mode="fast", progress=False)
    for var in ("semantic", "instances", "lamella"):
        assert tomos[0].volumes[var].dtype == ref.volumes[var].dtype
        np.testing.assert_array_equal(tomos[0].volumes[var].values, ref.volumes[var].values)
    np.testing.assert_allclose(tomos[0].volumes["noisy"].values, ref.volumes["noisy"].values)
    assert tomos[0].particles["id"].tolist() == ref.particles["id"].tolist()
    np.testing.assert_allclose(tomos[0].particles["z"], ref.particles["z"])
    assert m2.exists()
    tab = sim.dataset_table(tmp_path / "a")
    assert list(tab["name"]) == ["tomo_000", "tomo_001"]


def test_write_dataset_refuses_to_overwrite_and_writes_zarr(tmp_path):
    kw = dict(n=1, shape=(32, 48, 48), seed=1, mode="fast", progress=False)
    sim.write_dataset(tmp_path / "d", format="zarr", table_format="parquet", **kw)
    with pytest.raises(InputError, match="exists"):
        sim.write_dataset(tmp_path / "d", **kw)
    tomos = sim.read_dataset(tmp_path / "d")
    assert (tmp_path / "d" / "tomo_000" / "noisy.zarr").is_dir()
    assert tomos[0].volumes["instances"].dtype == np.uint32
    assert len(tomos[0].particles) > 0
    with pytest.raises(InputError, match="format"):
        sim.write_dataset(tmp_path / "e", format="tiff", **kw)
    with pytest.raises(InputError, match="manifest"):
        sim.read_dataset(tmp_path / "nothing")
