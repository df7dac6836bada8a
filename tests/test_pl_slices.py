"""Tests of the static quick-look figures: pl.slices, pl.orthoslices, pl.loss_curves."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.figure import Figure

from cryosiam_nb import pl
from cryosiam_nb.io import InputError


@pytest.fixture(scope="module")
def simulation():
    from cryosiam_nb import sim

    return sim.simulate((32, 48, 64), seed=0, mode="fast", progress=False)


def _image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def test_slices_of_a_simulation_shows_volumes_side_by_side(simulation):
    fig = pl.slices(simulation, z=10)
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    titles = [ax.get_title() for ax in axes]
    assert titles == ["clean", "noisy", "semantic", "instances", "lamella"]
    # the image panels show the requested z slice of the right volume
    clean_img = axes[0].images[0].get_array()
    np.testing.assert_allclose(clean_img, simulation.volumes["clean"].values[10])
    # label panels draw the labels over the first image
    inst = axes[3].images[-1].get_array()
    np.testing.assert_array_equal(
        np.ma.filled(inst, 0), simulation.volumes["instances"].values[10].astype(np.int64)
    )
    assert fig._suptitle.get_text() == "z = 10"
    # axes are in Å
    x0, x1 = axes[0].images[0].get_extent()[:2]
    assert x1 - x0 == pytest.approx(64 * 10.0)
    assert _png_bytes(fig)[:4] == b"\x89PNG"


def test_slices_variables_overlays_and_axis(simulation):
    fig = pl.slices(simulation, variables=["noisy"], overlays=["semantic"], axis="y")
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["noisy"]
    assert len(axes[0].images) == 2  # image + semantic overlay
    assert axes[0].images[0].get_array().shape == (32, 64)  # an x-z view
    legend = axes[0].get_legend()
    assert legend is not None
    names = {t.get_text() for t in legend.get_texts()}
    assert "particle" in names


def test_slices_of_a_dataarray_with_label_overlays(simulation):
    ds = simulation.volumes
    fig = pl.slices(ds["noisy"], overlays={"semantic": ds["semantic"], "truth": ds["instances"]})
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["noisy", "semantic", "truth"]
    assert len(axes[0].images) == 1 and len(axes[1].images) == 2
    # plain numpy input works too (axes in voxels)
    fig2 = pl.slices(np.zeros((4, 5, 6), np.float32))
    assert _image_axes(fig2)[0].images[0].get_array().shape == (5, 6)


def test_slices_bad_input_names_the_problem(simulation):
    with pytest.raises(InputError, match="variables"):
        pl.slices(simulation, variables=["nonexistent"])
    with pytest.raises(InputError, match="slice index"):
        pl.slices(simulation, z=500)
    with pytest.raises(InputError, match="overlays"):
        pl.slices(simulation.volumes["clean"], overlays={"bad": np.zeros((2, 2, 2))})
    with pytest.raises(InputError, match="3-D"):
        pl.slices(np.zeros((4, 4)))
    with pytest.raises(InputError, match="axis"):
        pl.slices(simulation, axis="t")


def test_slices_interactive_delegates_to_the_viewer(simulation, monkeypatch):
    calls = {}

    def fake_viewer(data, **kw):
        calls["data"], calls["kw"] = data, kw
        return "viewer"

    fake = types.ModuleType("cryosiam_nb.pl.viewer")
    fake.slice_viewer = fake_viewer
    monkeypatch.setitem(sys.modules, "cryosiam_nb.pl.viewer", fake)
    out = pl.slices(simulation, interactive=True, width=300)
    assert out == "viewer"
    assert calls["data"].name == "noisy"
    assert set(calls["kw"]["overlays"]) == {"semantic", "instances", "lamella"}
    assert calls["kw"]["width"] == 300
    assert len(calls["kw"]["particles"]) == len(simulation.particles)
    pl.slices(
        simulation.volumes["clean"],
        overlays={"s": simulation.volumes["semantic"]},
        interactive=True,
    )
    assert calls["data"].name == "clean" and list(calls["kw"]["overlays"]) == ["s"]


def test_orthoslices_cut_through_the_requested_voxel():
    vol = xr.DataArray(
        np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8),
        dims=("z", "y", "x"),
        attrs={"voxel_size": 5.0},
    )
    fig = pl.orthoslices(vol, z=1, y=2, x=3)
    axes = _image_axes(fig)
    assert len(axes) == 3
    arrays = {ax.get_title(): ax.images[0].get_array() for ax in axes}
    np.testing.assert_array_equal(arrays["x-y (z=1)"], vol.values[1])
    np.testing.assert_array_equal(arrays["x-z (y=2)"], vol.values[:, 2])
    np.testing.assert_array_equal(arrays["z-y (x=3)"], vol.values[:, :, 3].T)
    with pytest.raises(InputError):
        pl.orthoslices(xr.Dataset({"a": vol}))


@pytest.mark.parametrize(
    "history, labels, train",
    [
        (
            pd.DataFrame({"epoch": [0, 1, 2], "train": [1.0, 0.5, 0.3], "val": [1.1, 0.7, 0.6]}),
            ["train", "val"],
            [1.0, 0.5, 0.3],
        ),
        ({"train": [1.0, 0.5, 0.3], "val": [1.1, 0.7]}, ["train", "val"], [1.0, 0.5, 0.3]),
        ([{"epoch": 0, "train": 1.0}, {"epoch": 1, "train": 0.4}], ["train"], [1.0, 0.4]),
    ],
)
def test_loss_curves_draw_one_line_per_loss(history, labels, train):
    fig = pl.loss_curves(history)
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == labels
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), train)


def test_loss_curves_log_scale_smoothing_and_errors():
    df = pd.DataFrame({"step": np.arange(20), "loss": np.linspace(1, 0.01, 20)})
    fig = pl.loss_curves(df, logy=True, smooth=5)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "step"
    assert len(ax.get_lines()) == 2  # raw (faint) + running mean
    with pytest.raises(InputError, match="keys"):
        pl.loss_curves(df, keys=["nope"])
    with pytest.raises(InputError, match="history"):
        pl.loss_curves(42)
    with pytest.raises(InputError, match="empty"):
        pl.loss_curves(pd.DataFrame())


def test_every_view_uses_the_one_semantic_colour_table():
    from cryosiam_nb.constants import SEMANTIC_CLASSES, SEMANTIC_COLORS
    from cryosiam_nb.pl import static, viewer

    cmap, _, _, names = static._label_cmap("semantic", np.arange(6), None)
    assert names == list(SEMANTIC_CLASSES)
    from matplotlib.colors import to_hex

    assert [to_hex(c) for c in cmap.colors[1:]] == [SEMANTIC_COLORS[c] for c in names[1:]]
    # the interactive viewer colours labels 1..5 with the same colours, in the same order
    assert viewer._SEMANTIC_OVERLAY[:5] == tuple(SEMANTIC_COLORS[c] for c in SEMANTIC_CLASSES[1:])
