"""Particle export round trips: RELION 3/4 + Warp STAR, RELION 5 STAR, CSV (Å), copick JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryosiam_nb import export
from cryosiam_nb.io import InputError


@pytest.fixture
def table(rng):
    n = 7
    return pd.DataFrame(
        {
            "z": rng.uniform(0, 50, n),
            "y": rng.uniform(0, 200, n),
            "x": rng.uniform(0, 300, n),
            "tomogram": ["TS_01"] * 4 + ["TS_02"] * 3,
            "cluster": ["a", "b", "a", "c", "b", "b", "a"],
            "score": rng.uniform(0, 1, n),
        }
    )


def test_relion4_star_roundtrip_xyz_order(tmp_path, table):
    p = export.write_star_relion4(table, tmp_path / "p.star", voxel_size=6.8)
    back = export.read_star(p)
    np.testing.assert_allclose(back[["z", "y", "x"]].to_numpy(), table[["z", "y", "x"]])
    assert list(back["tomogram"]) == list(table["tomogram"])
    assert list(back["cluster"]) == list(table["cluster"])
    text = p.read_text()
    # STAR is written x, y, z: the X column precedes Y and Z
    assert (
        text.index("_rlnCoordinateX")
        < text.index("_rlnCoordinateY")
        < text.index("_rlnCoordinateZ")
    )
    # RELION 4 wants the tilt-series pixel size; binning 1 when not given
    assert "_rlnTomoTiltSeriesPixelSize" in text and "_rlnTomoTomogramBinning" in text
    assert "_rlnMicrographName" not in text  # Warp's .tomostar names: format "warp"


def test_relion5_star_centred_angstrom(tmp_path, table):
    shape = (50, 200, 300)
    p = export.write_star_relion5(table, tmp_path / "p5.star", voxel_size=10.0, shape=shape)
    back = export.read_star(p)
    np.testing.assert_allclose(back["x_A"], (table["x"] - 150) * 10.0)
    np.testing.assert_allclose(back["z_A"], (table["z"] - 25) * 10.0)
    # a particle at the exact centre sits at 0 Å
    centre = pd.DataFrame({"z": [25.0], "y": [100.0], "x": [150.0], "tomogram": ["t"]})
    p2 = export.write_star_relion5(centre, tmp_path / "c.star", voxel_size=7.0, shape=shape)
    np.testing.assert_allclose(export.read_star(p2)[["z_A", "y_A", "x_A"]].to_numpy(), 0.0)


def test_csv_in_angstrom_with_header(tmp_path, table):
    p = export.write_csv(table, tmp_path / "p.csv", voxel_size=6.8)
    head = p.read_text().splitlines()[:5]
    assert any("angstrom" in h for h in head) and any("(z, y, x)" in h for h in head)
    back, vs = export.read_csv(p)
    assert vs == 6.8
    np.testing.assert_allclose(back["x_A"], table["x"] * 6.8)
    np.testing.assert_allclose(back[["z", "y", "x"]].to_numpy(), table[["z", "y", "x"]])


def test_copick_json_per_run(tmp_path, table):
    paths = export.write_copick(table, tmp_path / "overlay", voxel_size=6.8, object_name="ribo")
    assert len(paths) == 2
    got = pd.concat([export.read_copick(p) for p in paths], ignore_index=True)
    np.testing.assert_allclose(
        got.sort_values(["tomogram", "x"])[["z", "y", "x"]].to_numpy(),
        table.sort_values(["tomogram", "x"])[["z", "y", "x"]].to_numpy(),
    )
    doc = json.loads(paths[0].read_text())
    assert doc["unit"] == "angstrom" and doc["pickable_object_name"] == "ribo"
    assert paths[0].parts[-4:-1] == ("ExperimentRuns", "TS_01", "Picks")
    loc = doc["points"][0]["location"]
    first = table[table.tomogram == "TS_01"].iloc[0]
    assert loc["x"] == pytest.approx(first["x"] * 6.8)


def test_copick_one_object_per_cluster(tmp_path, table):
    paths = export.write_copick(table, tmp_path / "o", voxel_size=5.0, object_name="cluster")
    names = sorted(p.name for p in paths)
    assert "cryosiam-nb_0_cluster-a.json" in names
    total = sum(len(json.loads(p.read_text())["points"]) for p in paths)
    assert total == len(table)


@pytest.mark.parametrize(
    "writer",
    [
        lambda df, p: export.write_star_relion4(df, p / "e.star", 5.0),
        lambda df, p: export.write_star_relion5(df, p / "e.star", 5.0, (10, 10, 10)),
        lambda df, p: export.write_csv(df, p / "e.csv", 5.0),
        lambda df, p: export.write_copick(df, p / "cp", 5.0),
    ],
)
def test_empty_selection_is_a_clear_error(tmp_path, table, writer):
    with pytest.raises(InputError, match="empty"):
        writer(table.iloc[:0], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_columns_and_bad_voxel_size(tmp_path, table):
    with pytest.raises(InputError, match=r"centre columns \['z'\]"):
        export.write_csv(table.drop(columns="z"), tmp_path / "x.csv", 5.0)
    with pytest.raises(InputError, match="voxel_size"):
        export.write_star_relion4(table, tmp_path / "x.star", 0.0)


# ---------------------------------------------------------------------- export.write
def _text(path):
    """File text without starfile's time-stamped comment line."""
    return "\n".join(
        ln for ln in path.read_text().splitlines() if not ln.startswith("# Created by")
    )


@pytest.mark.parametrize(
    ("fmt", "name", "writer"),
    [
        ("relion4", "a.star", lambda df, p: export.write_star_relion4(df, p, 6.8)),
        ("relion5", "a.star", lambda df, p: export.write_star_relion5(df, p, 6.8, (50, 200, 300))),
        ("csv", "a.csv", lambda df, p: export.write_csv(df, p, 6.8)),
    ],
)
def test_write_gives_the_writers_file(tmp_path, table, fmt, name, writer):
    want = writer(table, tmp_path / "want" / name)
    shape = (50, 200, 300) if fmt == "relion5" else None
    got = export.write(
        table, tmp_path / "got" / name, format=fmt, voxel_size=6.8, tomogram_shape=shape
    )
    assert got == tmp_path / "got" / name
    assert _text(got) == _text(want)


def test_write_copick_gives_the_writers_files(tmp_path, table):
    want = export.write_copick(table, tmp_path / "want", 6.8, object_name="cluster")
    root = export.write(
        table, tmp_path / "got", format="copick", voxel_size=6.8, object_name="cluster"
    )
    assert root == tmp_path / "got"
    got = sorted((root / "ExperimentRuns").rglob("*.json"))
    assert [p.relative_to(root) for p in got] == sorted(
        p.relative_to(tmp_path / "want") for p in want
    )
    for g in got:
        assert g.read_text() == (tmp_path / "want" / g.relative_to(root)).read_text()
    # The configs differ only in overlay_root (each names its own folder).
    cfg = {r: json.loads((r / "copick_config.json").read_text()) for r in (root, tmp_path / "want")}
    assert cfg[root].pop("overlay_root") == f"local://{root.resolve()}"
    cfg[tmp_path / "want"].pop("overlay_root")
    assert cfg[root] == cfg[tmp_path / "want"]


def test_write_particles_object_and_voxel_size_column(tmp_path, table):
    from cryosiam_nb.particles import Particles

    parts = Particles.from_table(table.assign(voxel_size=6.8))
    parts.uns["tomogram_shapes"] = {"TS_01": [50, 200, 300], "TS_02": [40, 100, 100]}
    # The voxel size comes from the table's column; the format from the suffix.
    star = export.write(parts, tmp_path / "p.star")
    want = export.write_star_relion4(parts.obs.reset_index(), tmp_path / "w.star", 6.8)
    assert _text(star) == _text(want)
    back = export.read_csv(export.write(parts, tmp_path / "p.csv"))[0]
    assert back["particle_id"].tolist() == parts.obs.index.tolist()
    # RELION 5 with tomograms of different shapes: the shapes come from uns, per tomogram.
    r5 = export.read_star(export.write(parts, tmp_path / "r5.star", format="relion5"))
    obs = parts.obs
    half = np.where(obs["tomogram"] == "TS_01", 150.0, 50.0)
    np.testing.assert_allclose(r5["x_A"], (obs["x"].to_numpy() - half) * 6.8)
    np.testing.assert_allclose(
        r5["z_A"], (obs["z"].to_numpy() - np.where(half == 150, 25, 20)) * 6.8
    )
    with pytest.raises(InputError, match="disagrees"):
        export.write(parts, tmp_path / "x.star", voxel_size=5.0)


def test_write_format_errors(tmp_path, table):
    assert export.format_of("a.star") == "relion4" and export.format_of("a.CSV") == "csv"
    assert export.format_of("x", "Warp") == "warp"
    assert export.format_of("x", "relion3") == "relion4"
    with pytest.raises(InputError, match="suffix"):
        export.write(table, tmp_path / "a.txt", voxel_size=5.0)
    with pytest.raises(InputError, match="unknown"):
        export.write(table, tmp_path / "a.star", format="pdf", voxel_size=5.0)
    with pytest.raises(InputError, match="voxel_size"):
        export.write(table, tmp_path / "a.star")
    with pytest.raises(InputError, match="several voxel sizes"):
        export.write(table.assign(voxel_size=[5.0] * 6 + [6.0]), tmp_path / "a.star")
    with pytest.raises(InputError, match="shape"):
        export.write(table, tmp_path / "a.star", format="relion5", voxel_size=5.0)
    with pytest.raises(InputError, match=r"no tomogram shape for \['TS_02'\]"):
        export.write(
            table,
            tmp_path / "a.star",
            format="relion5",
            voxel_size=5.0,
            tomogram_shape={"TS_01": (50, 200, 300)},
        )
    with pytest.raises(InputError, match="DataFrame"):
        export.write(table.to_numpy(), tmp_path / "a.star", voxel_size=5.0)
    assert list(tmp_path.iterdir()) == []
