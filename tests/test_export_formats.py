"""Export formats as other tools read them: hostile names, cluster ids, RELION units, copick.

Second STAR parser: a strict CIF 1.1-style tokenizer below (and gemmi when installed).
copick itself pins zarr < 3 and cannot be installed beside our pins; the schema checked here
is the one of copick 1.31 (``copick.models``, ``copick.impl.filesystem``); scripts/check_copick.py
opens our output with the real library in a separate environment.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import starfile

from cryosiam_nb import export
from cryosiam_nb.io import InputError


# ----------------------------------------------------------------- a strict STAR reader
def _tokens(text: str) -> list[tuple[str, bool]]:
    """(token, quoted) pairs of a STAR file, CIF 1.1 rules; raises on what CIF forbids."""
    out: list[tuple[str, bool]] = []
    for line in text.splitlines():
        i, n = 0, len(line)
        if line.startswith(";"):
            raise ValueError(f"text field (;) not expected: {line!r}")
        while i < n:
            c = line[i]
            if c.isspace():
                i += 1
            elif c == "#":
                break  # comment to end of line
            elif c in "'\"":
                j = i + 1
                while j < n and not (line[j] == c and (j + 1 == n or line[j + 1].isspace())):
                    j += 1
                if j >= n:
                    raise ValueError(f"unterminated quote in {line!r}")
                out.append((line[i + 1 : j], True))
                i = j + 1
            else:
                j = i
                while j < n and not line[j].isspace():
                    j += 1
                tok = line[i:j]
                if tok[0] in "$[]":
                    raise ValueError(f"unquoted token {tok!r} starts with a reserved character")
                out.append((tok, False))
                i = j
    return out


def strict_star(text: str) -> dict[str, dict[str, list[str]]]:
    """{block: {tag: values}}; unquoted reserved words or tags in value positions are errors."""
    blocks: dict[str, dict[str, list[str]]] = {}
    toks = _tokens(text)
    k = 0
    block: dict[str, list[str]] | None = None
    while k < len(toks):
        tok, quoted = toks[k]
        low = tok.lower()
        if not quoted and low.startswith("data_"):
            block = blocks.setdefault(tok[5:], {})
            k += 1
        elif not quoted and low == "loop_":
            k += 1
            tags = []
            while k < len(toks) and not toks[k][1] and toks[k][0].startswith("_"):
                tags.append(toks[k][0][1:])
                k += 1
            values = []
            while k < len(toks):
                tok, quoted = toks[k]
                if not quoted and (
                    tok.startswith("_") or tok.lower().startswith(("data_", "loop_"))
                ):
                    break
                if not quoted and tok.lower().startswith(("save_", "global_", "stop_")):
                    raise ValueError(f"unquoted reserved word {tok!r} as a value")
                values.append(tok)
                k += 1
            if not tags or len(values) % len(tags):
                raise ValueError(f"loop with {len(tags)} tags and {len(values)} values")
            assert block is not None
            for t, tag in enumerate(tags):
                block[tag] = values[t :: len(tags)]
        elif not quoted and tok.startswith("_"):
            if k + 1 >= len(toks):
                raise ValueError(f"tag {tok} has no value")
            value, vq = toks[k + 1]
            if not vq and (value.startswith("_") or value.lower().startswith("data_")):
                raise ValueError(f"tag {tok} has no value")
            assert block is not None
            block[tok[1:]] = [value]
            k += 2
        else:
            raise ValueError(f"stray token {tok!r}")
    return blocks


def test_strict_reader_rejects_what_starfile_wrote_before():
    # What the writers produced before quoting: unquoted reserved words and comments.
    bad = "data_particles\nloop_\n_rlnTomoName #1\ndata_x\n#a\n_rlnFoo\n"
    with pytest.raises(ValueError):
        strict_star(bad)
    assert strict_star('data_p\nloop_\n_a #1\n"data_x"\n"#a"\n""\n')["p"]["a"] == [
        "data_x",
        "#a",
        "",
    ]


# ---------------------------------------------------------------------- STAR values
HOSTILE = [
    "data_x",
    "DATA_Y",
    "loop_",
    "stop_",
    "save_frame",
    "global_",
    "#comment",
    "x#y",
    "_rlnTomoName",
    "$ref",
    "[list]",
    ";semi",
    "two words",
    " padded ",
    "",
    "0.10",
    "1",
    "TS_01",
    "é-unicode",
]


def _hostile_table(column: str) -> pd.DataFrame:
    n = len(HOSTILE)
    df = pd.DataFrame(
        {
            "z": np.arange(n, dtype=float),
            "y": np.arange(n, dtype=float) * 2,
            "x": np.arange(n, dtype=float) * 3,
            "tomogram": ["t"] * n,
            "cluster": ["k"] * n,
            "species": ["s"] * n,
            "score": np.linspace(0, 1, n),
        }
    )
    df[column] = HOSTILE
    return df


@pytest.mark.parametrize("column", ["tomogram", "cluster", "species"])
@pytest.mark.parametrize("fmt", ["relion4", "warp", "relion5"])
def test_star_values_come_back_exactly(tmp_path, column, fmt):
    df = _hostile_table(column)
    p = export.write(df, tmp_path / "h.star", format=fmt, voxel_size=5.0, tomogram_shape=(9, 9, 9))
    label = {"tomogram": "rlnTomoName", "cluster": "cryosiamNbCluster"}.get(
        column, "cryosiamNbSpecies"
    )
    # cluster names carry the "c" prefix; a missing (empty) cluster stays empty
    want = [("c" + v if v else "") for v in HOSTILE] if column == "cluster" else HOSTILE
    # starfile (what RELION users script with) reads every row and the exact values
    parts = starfile.read(p, always_dict=True)["particles"]
    assert len(parts) == len(df)
    assert [str(v) for v in parts[label]] == want
    # a strict CIF-style tokenizer agrees
    strict = strict_star(p.read_text())["particles"]
    assert strict[label] == want
    if fmt == "warp":
        assert strict["rlnMicrographName"] == [t + ".tomostar" for t in df["tomogram"]]
    # and our reader gives the table's values back
    back = export.read_star(p)
    assert back[column].tolist() == HOSTILE


def test_star_values_with_gemmi(tmp_path):
    gemmi = pytest.importorskip("gemmi")
    ascii_only = [v for v in HOSTILE if v.isascii()]  # gemmi reads CIF 1.1, ASCII only
    df = _hostile_table("tomogram").iloc[: len(ascii_only)].assign(tomogram=ascii_only)
    p = export.write_star_relion4(df, tmp_path / "g.star", 5.0)
    block = gemmi.cif.read_file(str(p)).find_block("particles")
    got = [gemmi.cif.as_string(v) for v in block.find_loop("_rlnTomoName")]
    assert got == ascii_only


@pytest.mark.parametrize("bad", ['say "hi"', "it's", "tab\there", "new\nline", "nan", "<NA>"])
@pytest.mark.parametrize("column", ["tomogram", "cluster", "species"])
def test_star_refuses_values_no_reader_gets_back(tmp_path, bad, column):
    df = _hostile_table(column)
    df.loc[3, column] = bad
    if column == "cluster" and bad in ("nan", "<NA>"):  # written "cnan": no NaN token
        back = export.read_star(export.write_star_relion4(df, tmp_path / "ok.star", 5.0))
        assert back["cluster"][3] == bad
        return
    (tmp_path / "keep.star").write_text("old")
    label = {"tomogram": "rlnTomoName", "cluster": "cryosiamNbCluster"}.get(
        column, "cryosiamNbSpecies"
    )
    shown = re.escape(repr("c" + bad if column == "cluster" else bad))
    with pytest.raises(InputError, match=rf"{label} value {shown}"):
        export.write_star_relion4(df, tmp_path / "keep.star", 5.0)
    assert (tmp_path / "keep.star").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.star"]


# ---------------------------------------------------------------------- cluster ids
def test_cluster_ids_stay_text_in_star_and_csv(tmp_path):
    clusters = ["0", "0.1", "0.10", "1", "10", "1e3", "nan-like"]
    df = pd.DataFrame(
        {
            "z": np.ones(7),
            "y": np.ones(7),
            "x": np.arange(7.0),
            "tomogram": ["1"] * 7,
            "cluster": clusters,
            "particle_id": [str(i) for i in range(7)],
        }
    )
    star = export.write_star_relion4(df, tmp_path / "c.star", 5.0, extra=("cluster", "particle_id"))
    raw = starfile.read(star, always_dict=True)["particles"]
    # RELION's class number is an integer; the cluster column is text to any reader
    assert raw["rlnClassNumber"].tolist() == [sorted(clusters).index(c) + 1 for c in clusters]
    assert all(isinstance(v, str) and v.startswith("c") for v in raw["cryosiamNbCluster"])
    back = export.read_star(star)
    assert back["cluster"].tolist() == clusters
    assert back["particle_id"].tolist() == df["particle_id"].tolist()  # "0" stays "0"
    assert back["tomogram"].tolist() == ["1"] * 7
    csv, _ = export.read_csv(export.write_csv(df, tmp_path / "c.csv", 5.0))
    assert csv["cluster"].tolist() == clusters
    assert csv["tomogram"].tolist() == ["1"] * 7
    assert csv["particle_id"].tolist() == df["particle_id"].tolist()


# ---------------------------------------------------------------------- CSV rows
def test_csv_keeps_every_row_and_exact_names(tmp_path):
    names = ["#first", "", "# voxel_size_A: 3", "a,b", 'say "hi"', "nan", "NA", "None", "x\ny"]
    n = len(names)
    df = pd.DataFrame(
        {
            "z": np.arange(n, dtype=float),
            "y": np.zeros(n),
            "x": np.zeros(n),
            "tomogram": names,
            "cluster": names[::-1],
            "species": [None] + names[1:],
            "score": [np.nan] + [0.5] * (n - 1),
        }
    )
    back, vs = export.read_csv(export.write_csv(df, tmp_path / "n.csv", 7.0))
    assert vs == 7.0 and len(back) == n
    assert back["tomogram"].tolist() == names
    assert back["cluster"].tolist() == names[::-1]
    assert back["species"].tolist() == [""] + names[1:]  # missing → empty text, not NaN
    np.testing.assert_array_equal(back["z"], df["z"])
    assert np.isnan(back["score"][0]) and back["score"][1] == 0.5


# ---------------------------------------------------------------------- RELION units
VOXEL, TILT = 10.0, 2.5  # a bin-4 tomogram


@pytest.fixture
def binned(rng):
    n = 12
    return pd.DataFrame(
        {
            "z": rng.uniform(0, 51, n),
            "y": rng.uniform(0, 200, n),
            "x": rng.uniform(0, 301, n),
            "tomogram": ["A"] * 6 + ["B"] * 6,
        }
    )


SHAPES = {"A": (51, 200, 301), "B": (40, 128, 128)}  # binned voxels (z, y, x), odd sizes too


def test_relion5_lands_on_the_particle_with_relions_formula(tmp_path, binned):
    p = export.write(
        binned,
        tmp_path / "r5.star",
        format="relion5",
        voxel_size=VOXEL,
        tilt_series_pixel_size=TILT,
        tomogram_shape=SHAPES,
    )
    blocks = starfile.read(p, always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    px = float(optics["rlnTomoTiltSeriesPixelSize"].iloc[0])
    assert px == TILT and float(optics["rlnTomoTomogramBinning"].iloc[0]) == 4.0
    for i, ax in enumerate("ZYX"):
        # RELION 5 (ParticleSet::getPosition): unbinned px = Å / tilt-series pixel size +
        # rlnTomoSize / 2, with rlnTomoSize the unbinned tomogram size (binned size × 4).
        size_unbinned = np.array([SHAPES[t][i] for t in parts["rlnTomoName"]]) * VOXEL / TILT
        pos_px = parts[f"rlnCenteredCoordinate{ax}Angst"] / px + size_unbinned / 2.0
        np.testing.assert_allclose(pos_px * TILT, binned[ax.lower()] * VOXEL, atol=0.5)
    back = export.read_star(p, tomogram_shape=SHAPES)
    np.testing.assert_allclose(back[["z", "y", "x"]], binned[["z", "y", "x"]], atol=1e-4)
    assert back.attrs["voxel_size"] == VOXEL


def test_relion4_and_warp_use_unbinned_tilt_series_pixels(tmp_path, binned):
    r4 = export.write_star_relion4(binned, tmp_path / "r4.star", VOXEL, binning=4)
    warp = export.write(
        binned, tmp_path / "w.star", format="warp", voxel_size=VOXEL, tilt_series_pixel_size=TILT
    )
    for p in (r4, warp):
        parts = starfile.read(p, always_dict=True)["particles"]
        for ax in "XYZ":
            # RELION 4 import: coordinates are pixels of the unbinned tilt series
            np.testing.assert_allclose(
                parts[f"rlnCoordinate{ax}"] * TILT, binned[ax.lower()] * VOXEL, atol=0.5
            )
        back = export.read_star(p)
        np.testing.assert_allclose(back[["z", "y", "x"]], binned[["z", "y", "x"]], atol=1e-5)
    assert starfile.read(warp, always_dict=True)["particles"]["rlnMicrographName"].tolist() == [
        f"{t}.tomostar" for t in binned["tomogram"]
    ]
    # Unbinned by default: pixel size = voxel size.
    plain = starfile.read(export.write_star_relion4(binned, tmp_path / "u.star", VOXEL))[
        "particles"
    ]
    np.testing.assert_allclose(plain["rlnCoordinateX"], binned["x"], atol=1e-5)


def test_tilt_series_pixel_size_is_checked(tmp_path, binned):
    with pytest.raises(InputError, match="disagrees"):
        export.write_star_relion4(
            binned, tmp_path / "a.star", VOXEL, tilt_series_pixel_size=TILT, binning=2
        )
    with pytest.raises(InputError, match="binning must be"):
        export.write_star_relion4(binned, tmp_path / "a.star", VOXEL, tilt_series_pixel_size=20)
    with pytest.raises(InputError, match="tilt_series_pixel_size must be a positive"):
        export.write(binned, tmp_path / "a.star", voxel_size=VOXEL, tilt_series_pixel_size=0)
    assert list(tmp_path.iterdir()) == []


def test_particles_uns_gives_the_tilt_series_pixel_size(tmp_path, binned):
    from cryosiam_nb.particles import Particles

    parts = Particles.from_table(binned.assign(voxel_size=VOXEL))
    parts.uns["tilt_series_pixel_size"] = TILT
    raw = starfile.read(export.write(parts, tmp_path / "p.star"), always_dict=True)
    assert float(raw["optics"]["rlnTomoTiltSeriesPixelSize"].iloc[0]) == TILT
    np.testing.assert_allclose(
        raw["particles"]["rlnCoordinateX"], parts.obs["x"].to_numpy() * 4, atol=1e-5
    )


# ---------------------------------------------------------------------- copick names
@pytest.fixture
def picks(rng):
    n = 6
    return pd.DataFrame(
        {
            "z": rng.uniform(0, 20, n),
            "y": rng.uniform(0, 50, n),
            "x": rng.uniform(0, 50, n),
            "tomogram": ["TS_01"] * 3 + ["TS_02"] * 3,
            "cluster": ["0", "0.1", "0", "a b", "0.1", "0"],
            "score": rng.uniform(0, 1, n),
            "n_voxels": 300,
        }
    )


@pytest.mark.parametrize(
    ("field", "kw", "value"),
    [
        ("run name", "tomogram", "../../evil"),
        ("run name", "tomogram", "/abs/olute"),
        ("run name", "tomogram", "a/b"),
        ("run name", "tomogram", "a\\b"),
        ("run name", "tomogram", ".."),
        ("run name", "tomogram", ".hidden"),
        ("run name", "tomogram", ""),
        ("run name", "tomogram", "tab\tname"),
        ("object name", "object_name", "../x"),
        ("object name", "object_name", "ribo_some"),
        ("object name", "object_name", "two words"),
        ("object name", "object_name", "/etc/passwd"),
        ("user_id", "user_id", "cryosiam_nb"),
        ("user_id", "user_id", "../u"),
        ("user_id", "user_id", ""),
        ("session_id", "session_id", "1/2"),
        ("session_id", "session_id", "-0"),
    ],
)
def test_copick_refuses_unsafe_names(tmp_path, picks, field, kw, value):
    root = tmp_path / "proj" / "root"
    root.mkdir(parents=True)
    (root / "copick_config.json").write_text("{}")  # a pre-existing file stays untouched
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match=rf"{field}.* {re.escape(repr(value))}"):
        export.write_copick(picks, root, 5.0, **{kw: value})
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (root / "copick_config.json").read_text() == "{}"


def test_copick_cluster_objects_are_cleaned_and_must_stay_distinct(tmp_path, picks):
    paths = export.write_copick(picks, tmp_path / "cp", 5.0, object_name="cluster")
    assert sorted({p.name for p in paths}) == [
        "cryosiam-nb_0_cluster-0.1.json",
        "cryosiam-nb_0_cluster-0.json",
        "cryosiam-nb_0_cluster-a-b.json",
    ]
    got = pd.concat([export.read_copick(p) for p in paths])
    assert sorted(got["cluster"]) == sorted(picks["cluster"])  # names from the config
    clash = picks.assign(cluster=["a b", "a-b", "a b", "a b", "a b", "a b"])
    with pytest.raises(InputError, match="'a b' and 'a-b' both become"):
        export.write_copick(clash, tmp_path / "c2", 5.0, object_name="cluster")
    assert not (tmp_path / "c2").exists()


# ---------------------------------------------------------------------- copick schema
#: Field names of copick 1.31's models (copick.models.PickableObject, CopickPicksFile,
#: CopickPoint; copick.impl.filesystem.CopickConfigFSSpec), verified against the library.
PICKABLE_FIELDS = {"name", "is_particle", "label", "color", "radius"}
PICKS_FIELDS = {
    "pickable_object_name",
    "user_id",
    "session_id",
    "run_name",
    "voxel_spacing",
    "unit",
    "points",
    "trust_orientation",
}
POINT_FIELDS = {"location", "transformation_", "instance_id", "score"}
COPICK_NAME = re.compile(
    r'^[^<>:"/\\|?*\x00-\x1f\x7f\s_-](?:[^<>:"/\\|?*\x00-\x1f\x7f\s_]*[^<>:"/\\|?*\x00-\x1f\x7f\s_-])?$'
)


def test_copick_files_match_copicks_schema(tmp_path, picks):
    root = tmp_path / "cp"
    paths = export.write(
        picks,
        root,
        format="copick",
        voxel_size=5.0,
        object_name="cluster",
        colors={"0": "#ff0000"},
    )
    cfg = json.loads((root / "copick_config.json").read_text())
    assert cfg["config_type"] == "filesystem"
    assert cfg["overlay_root"] == f"local://{root.resolve()}"
    objs = cfg["pickable_objects"]
    assert [o["label"] for o in objs] == list(range(1, len(objs) + 1))  # unique, non-zero
    for o in objs:
        assert PICKABLE_FIELDS <= set(o) and COPICK_NAME.match(o["name"])
        assert o["is_particle"] is True
        assert len(o["color"]) == 4 and all(0 <= c <= 255 for c in o["color"])
        # radius in Å: equivalent sphere of 300 voxels at 5 Å
        assert o["radius"] == pytest.approx((3 * 300 / (4 * np.pi)) ** (1 / 3) * 5.0, abs=0.1)
    assert objs[0]["name"] == "cluster-0" and objs[0]["color"] == [255, 0, 0, 255]
    assert paths == root
    files = sorted((root / "ExperimentRuns").rglob("*.json"))
    assert len(files) == 5
    total = 0
    for f in files:
        doc = json.loads(f.read_text())
        assert set(doc) == PICKS_FIELDS
        # copick parses user, session and object from the file name split on "_"
        user, session, obj = f.stem.split("_")
        assert (user, session, obj) == (
            doc["user_id"],
            doc["session_id"],
            doc["pickable_object_name"],
        )
        assert user == export.DEFAULT_USER and obj in {o["name"] for o in objs}
        assert f.parts[-4:-2] == ("ExperimentRuns", doc["run_name"])
        assert doc["unit"] == "angstrom" and doc["voxel_spacing"] == 5.0
        for pt in doc["points"]:
            assert set(pt) == POINT_FIELDS and set(pt["location"]) == {"x", "y", "z"}
            t = np.array(pt["transformation_"])
            assert t.shape == (4, 4) and t[3].tolist() == [0, 0, 0, 1]
        total += len(doc["points"])
        back = export.read_copick(f)
        rows = picks[(picks.tomogram == doc["run_name"])]
        rows = rows[["cluster-" + c.replace(" ", "-") == obj for c in rows["cluster"]]]
        np.testing.assert_allclose(back[["z", "y", "x"]], rows[["z", "y", "x"]], atol=1e-9)
        np.testing.assert_allclose(back["x_A"], rows["x"] * 5.0)
    assert total == len(picks)


def test_copick_config_is_merged_and_owned_by_its_root(tmp_path, picks):
    root = tmp_path / "cp"
    export.write_copick(picks, root, 5.0, object_name="ribo")
    export.write_copick(picks, root, 5.0, object_name="cluster")
    names = [
        o["name"] for o in json.loads((root / "copick_config.json").read_text())["pickable_objects"]
    ]
    assert names[0] == "ribo" and len(names) == 4 and len(set(names)) == 4
    cfg = json.loads((root / "copick_config.json").read_text())
    cfg["overlay_root"] = "local:///somewhere/else"
    (root / "copick_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="overlay_root"):
        export.write_copick(picks, root, 5.0)
    first = export.write_copick(picks, tmp_path / "cp2", 5.0)
    stamp = [f.read_text() for f in first]
    with pytest.raises(FileExistsError):
        export.write_copick(picks.assign(x=0.0), tmp_path / "cp2", 5.0, overwrite=False)
    assert [f.read_text() for f in first] == stamp


def test_read_copick_needs_a_voxel_spacing(tmp_path, picks):
    (f,) = export.write_copick(picks.iloc[:2], tmp_path / "cp", 4.0)
    doc = json.loads(f.read_text())
    for spacing in (None, "drop"):
        d = dict(doc)
        if spacing == "drop":
            d.pop("voxel_spacing")
        else:
            d["voxel_spacing"] = None
        f.write_text(json.dumps(d))
        with pytest.raises(InputError, match="voxel_spacing is null or missing"):
            export.read_copick(f)
        back = export.read_copick(f, voxel_size=4.0)
        np.testing.assert_allclose(back["x"], picks["x"].iloc[:2])
    f.write_text(json.dumps({**doc, "unit": "nanometer"}))
    with pytest.raises(InputError, match="unit"):
        export.read_copick(f)
    f.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="disagrees"):
        export.read_copick(f, voxel_size=5.0)
