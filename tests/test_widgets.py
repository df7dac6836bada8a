"""The ipywidgets tuners (``cryosiam_nb.pl.widgets``), driven programmatically: set slider
values, check that the particle count, the preview and the returned parameters follow."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import xarray as xr

from cryosiam_nb import sim
from cryosiam_nb.inference import lamella_mask
from cryosiam_nb.io import InputError
from cryosiam_nb.pl import widgets
from cryosiam_nb.segmentation import instances, maps_from_labels


@pytest.fixture(scope="module")
def simulation():
    return sim.simulate((32, 64, 64), voxel_size=10.0, seed=3, mode="fast", progress=False)


@pytest.fixture(scope="module")
def maps(simulation):
    return maps_from_labels(simulation.volumes["instances"]).compute()


def _png(tuner) -> bytes:
    (out,) = tuner.output.outputs
    return base64.b64decode(out["data"]["image/png"])


def test_instance_tuner_count_and_preview_follow_the_sliders(simulation, maps):
    noisy = simulation.volumes["noisy"]
    tuner = widgets.tune_instances(maps, tomogram=noisy, crop=(slice(None),) * 3, min_size=5)
    n0, png0, updates = tuner.n_particles, _png(tuner), tuner.n_updates
    assert png0.startswith(b"\x89PNG")
    # perfect maps: the crop (the whole volume) gives about the simulated particles
    n_true = len(np.unique(simulation.volumes["instances"].values)) - 1
    assert 0.7 * n_true <= n0 <= 1.2 * n_true, (n0, n_true)
    assert f"<b>{n0}</b> particles" in tuner.status.value

    tuner.sliders["min_size"].value = 400  # only the largest particles stay
    assert tuner.n_updates == updates + 1
    assert 0 < tuner.n_particles < n0
    assert f"<b>{tuner.n_particles}</b> particles" in tuner.status.value
    assert _png(tuner) != png0
    sizes = np.bincount(tuner.labels.ravel())[1:]
    assert sizes.min() >= 400

    tuner.sliders["min_size"].value = 5
    assert tuner.n_particles == n0
    tuner.sliders["threshold_foreground"].value = 0.95
    assert tuner.n_particles <= n0
    assert tuner.labels.sum() < instances(maps, min_size=5, progress=False).values.sum()

    before = tuner.labels.copy()
    tuner.z.value = 5  # a new slice is drawn, nothing is recomputed
    assert tuner.n_updates > updates and np.array_equal(tuner.labels, before)
    assert "z = 5" in tuner.figure.axes[0].get_title()


def test_seed_distances_stay_ordered(maps):
    tuner = widgets.tune_instances(maps, crop=32)
    lo, hi = tuner.sliders["min_center_distance"], tuner.sliders["max_center_distance"]
    lo.value = 3.0
    hi.value = 2.0  # below min: min follows
    assert lo.value == hi.value == 2.0
    lo.value = 3.5  # above max: max follows
    assert hi.value == 3.5
    assert tuner.params["min_center_distance"] == tuner.params["max_center_distance"] == 3.5


def test_instance_apply_runs_the_whole_tomogram_and_returns_the_params(maps):
    # a model's tuned defaults (which may include neck_distance) are accepted as start values
    tuner = widgets.tune_instances(
        maps, crop=(slice(8, 24), slice(16, 48), slice(16, 48)), neck_distance=1.5
    )
    assert tuner._background.shape == (16, 32, 32)
    assert tuner.sliders["neck_distance"].value == 1.5
    tuner.sliders["boundary_bias"].value = 0.7
    tuner.sliders["min_size"].value = 20
    tuner.sliders["multicut"].value = False
    tuner.sliders["average_edt"].value = True
    params = tuner.apply()
    assert params == {
        "threshold_foreground": 0.5,
        "min_center_distance": 1.0,
        "max_center_distance": 4.5,
        "boundary_bias": 0.7,
        "neck_distance": 1.5,
        "min_size": 20,
        "multicut": False,
        "average_edt": True,
    }
    assert tuner.result.shape == (32, 64, 64)
    direct = instances(maps, progress=False, **params)
    np.testing.assert_array_equal(tuner.result.values, direct.values)
    assert f"<b>{int(direct.max())}</b> particles" in tuner.status.value


def test_lamella_tuner(simulation):
    truth = simulation.volumes["lamella"]
    rng = np.random.default_rng(0)
    sample = np.clip(0.15 + 0.7 * truth.values + rng.normal(0, 0.05, truth.shape), 0, 1)
    probs = xr.DataArray(
        np.stack([1 - sample, sample]).astype(np.float32),
        dims=("class", "z", "y", "x"),
        attrs={"voxel_size": 10.0},
    )
    tuner = widgets.tune_lamella(
        xr.Dataset({"probabilities": probs}),
        tomogram=simulation.volumes["noisy"],
        instances=simulation.volumes["instances"],
        sigma=(2.0, 2.0, 2.0),
        threshold=0.5,
    )
    assert tuner._background.shape == (32, 64, 64)  # every z; the volume is < 128 in y, x
    frac = tuner.fraction
    assert abs(frac - float(truth.mean())) < 0.1, (frac, float(truth.mean()))
    assert tuner.n_particles > 0 and "particles inside" in tuner.status.value
    png = _png(tuner)
    tuner.sliders["threshold"].value = 0.8  # above the sample's 0.85: almost nothing left
    assert tuner.fraction < frac
    assert _png(tuner) != png
    assert "xz" in tuner.figure.axes[1].get_title()
    tuner.sliders["threshold"].value = 0.6
    tuner.sliders["sigma_yx"].value = 3.0
    params = tuner.apply()
    assert params == {"threshold": 0.6, "sigma": (2.0, 3.0, 3.0)}
    expected = lamella_mask(probs, progress=False, **params).values
    np.testing.assert_array_equal(tuner.result.values, expected)


def test_every_tuning_parameter_of_tl_instances_has_a_slider(maps):
    """A new ``tl.instances`` option must get a slider (or be declared not a tuning knob),
    and the tuner must accept every key the recipe stores in ``instance_defaults``."""
    import inspect

    from cryosiam_nb import tl
    from cryosiam_nb.training.multitask import INSTANCE_GRID

    not_knobs = {"maps", "roi", "touching", "out", "progress", "block_shape", "halo"}
    not_knobs |= {"max_size", "distance_scale", "sigma"}  # rarely changed; code only
    params = set(inspect.signature(tl.instances).parameters)
    assert params - not_knobs == set(widgets.INSTANCE_SLIDERS)
    tuner = widgets.tune_instances(maps, **{k: v[-1] for k, v in INSTANCE_GRID.items()})
    assert set(tuner.sliders) >= set(widgets.INSTANCE_SLIDERS)
    assert all(tuner.params[k] == v[-1] for k, v in INSTANCE_GRID.items())


def test_bad_input_is_refused(maps):
    with pytest.raises(InputError, match="unknown parameter"):
        widgets.tune_instances(maps, threshold=0.3)
    with pytest.raises(InputError, match="crop"):
        widgets.tune_instances(maps, crop=(slice(0, 4), slice(0, 4)))
    with pytest.raises(InputError, match="foreground"):
        widgets.tune_instances(maps[["foreground"]])
    with pytest.raises(InputError, match="probabilities"):
        widgets.tune_lamella(xr.Dataset({"p": maps["foreground"]}))


def test_tuners_take_a_multitask_prediction(simulation, maps):
    """A one-pass multi-task prediction (``instance_*`` / ``lamella_*`` variables) is tuned
    through its instance and lamella heads, as ``tl.instances`` / ``tl.lamella_mask`` do."""
    truth = simulation.volumes["lamella"]
    sample = (0.1 + 0.8 * truth.values).astype(np.float32)
    pred = xr.Dataset(
        {
            **{f"instance_{k}": maps[k] for k in ("foreground", "boundary", "distance")},
            "lamella_probabilities": (
                ("lamella_class", "z", "y", "x"),
                np.stack([1 - sample, sample]),
            ),
        },
        attrs={"task": "multitask", "voxel_size": 10.0},
    )
    tuner = widgets.tune_instances(pred, crop=(slice(None),) * 3, min_size=5)
    single = widgets.tune_instances(maps, crop=(slice(None),) * 3, min_size=5)
    assert tuner.n_particles == single.n_particles > 0
    params = tuner.apply()
    np.testing.assert_array_equal(
        tuner.result.values, instances(maps, progress=False, **params).values
    )
    lam = widgets.tune_lamella(pred, sigma=(2.0, 2.0, 2.0), threshold=0.5)
    assert abs(lam.fraction - float(truth.mean())) < 0.1
    with pytest.raises(InputError, match="no 'lamella' outputs"):
        widgets.tune_lamella(pred[["instance_foreground"]].assign_attrs(task="multitask"))
