"""Tests for pl.umap: the scatter of a particle embedding coloured by an obs column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from cryosiam_nb import pl
from cryosiam_nb.constants import INSTANCE_COLORS
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.embedding import EXCLUDED_COLOR, umap
from cryosiam_nb.pl.static import Figure


def _particles(n: int = 30) -> Particles:
    rng = np.random.default_rng(0)
    table = pd.DataFrame({c: rng.uniform(0, 50, n) for c in ("z", "y", "x")})
    table["score"] = np.linspace(0, 1, n)
    p = Particles.from_table(table, tomogram="t", voxel_size=10.0)
    p.obs["cluster"] = np.array(["0", "1", "10", "2", "1.1"])[np.arange(n) % 5]
    p.obsm["umap"] = rng.normal(size=(n, 2)).astype(np.float32)
    return p


def _facecolors(ax) -> list[set[str]]:
    return [{to_hex(c) for c in coll.get_facecolors()} for coll in ax.collections]


def test_categorical_colours_legend_and_excluded_grey():
    p = _particles()
    p.exclude(p.ids[:3])
    fig = umap(p)
    assert isinstance(fig, Figure) and fig._repr_png_()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["0", "1", "1.1", "2", "10", "(excluded)"]  # natural order
    colours = _facecolors(ax)
    assert colours[0] == {EXCLUDED_COLOR}  # excluded drawn first, underneath
    assert colours[1:] == [{INSTANCE_COLORS[i]} for i in range(5)]
    # every particle is drawn exactly once
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(p)
    # excluded particles sit at their own coordinates
    np.testing.assert_allclose(ax.collections[0].get_offsets(), p.obsm["umap"][:3])
    hidden = umap(p, show_excluded=False).axes[0]
    assert sum(len(c.get_offsets()) for c in hidden.collections) == len(p) - 3


def test_numeric_colour_gets_a_colorbar_and_draws_into_given_axes():
    p = _particles()
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    out = pl.umap(p, color="score", ax=ax, size=5, title="score")
    assert out is fig and len(fig.axes) == 2  # the given axes and its colorbar
    assert ax.get_title() == "score" and ax.get_legend() is None
    assert ax.collections[0].get_sizes().tolist() == [5.0]
    np.testing.assert_allclose(ax.collections[0].get_array(), p.obs["score"])


def test_palette_and_missing_values():
    p = _particles(10)
    p.obs.loc[p.ids[:2], "cluster"] = None
    fig = umap(p, palette={"0": "#000000"}, color="cluster")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "(missing)" and "0" in labels
    assert {"#000000"} in _facecolors(fig.axes[0])


def test_clear_errors():
    p = _particles()
    with pytest.raises(InputError, match="no column 'species'"):
        umap(p, color="species")
    del p.obsm["umap"]
    with pytest.raises(InputError, match=r"obsm\['umap'\].*run tl.umap"):
        umap(p)
    p.obsm["one"] = np.zeros((len(p), 1))
    with pytest.raises(InputError, match="must be \\(N, 2\\)"):
        umap(p, basis="one")
    with pytest.raises(InputError, match="Particles"):
        umap(p.obs)
