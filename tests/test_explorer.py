"""Python-level tests of the slice viewer and the curation explorer (no browser)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.curation import (
    EXCLUDED_LABEL,
    Explorer,
    explorer,
    main,
    points_in_box,
    points_in_lasso,
    render_umap,
)
from cryosiam_nb.pl.viewer import slice_viewer
from cryosiam_nb.segmentation.subtomograms import crop_box

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
TOMO_SHAPE = (32, 96, 96)


def make_particles(
    per_cluster: int = 10, box: int = 16, seed: int = 0, subtomograms: bool = True
) -> Particles:
    """4 well separated UMAP groups (clusters "0".."3"), 2 tomograms, blob subtomograms.

    Blob radius grows with the cluster number, so thumbnails differ between clusters; the
    embedding separates the clusters too (spectral split can recover them).
    """
    rng = np.random.default_rng(seed)
    n = per_cluster * len(CENTRES)
    lab = np.repeat(np.arange(len(CENTRES)), per_cluster)
    uv = CENTRES[lab] + rng.normal(scale=0.8, size=(n, 2))
    emb = np.eye(8)[lab * 2] + rng.normal(scale=0.05, size=(n, 8))
    z = rng.uniform(8, TOMO_SHAPE[0] - 8, n)
    y = rng.uniform(8, TOMO_SHAPE[1] - 8, n)
    x = rng.uniform(8, TOMO_SHAPE[2] - 8, n)
    obs = pd.DataFrame(
        {
            "tomogram": np.where(np.arange(n) % 2 == 0, "tomoA", "tomoB"),
            "z": z,
            "y": y,
            "x": x,
            "voxel_size": 10.0,
            "species": np.array(["ribo", "prot", "ribo", "fas"])[lab],
            "size_category": np.array(["large", "small", "large", "medium"])[lab],
            "cluster": lab.astype(str),
            "excluded": False,
            "score": rng.uniform(size=n),
        },
        index=[f"p{i:03d}" for i in range(n)],
    )
    obsm = {"umap": uv, "embedding": emb}
    if subtomograms:
        g = np.indices((box,) * 3) - box // 2
        r2 = (g**2).sum(0)
        subs = [
            np.exp(-r2 / (2 * (1.5 + c) ** 2)) + rng.normal(scale=0.05, size=r2.shape) for c in lab
        ]
        obsm["subtomograms"] = np.stack(subs).astype(np.float32)
    return Particles(obs, obsm=obsm)


def make_tomograms(particles: Particles, seed: int = 0) -> dict[str, np.ndarray]:
    """Noise tomograms with a bright ball (radius 3 voxels) at every particle centre."""
    rng = np.random.default_rng(seed)
    out = {}
    zz, yy, xx = np.indices(TOMO_SHAPE)
    for name in ("tomoA", "tomoB"):
        vol = rng.normal(scale=0.1, size=TOMO_SHAPE).astype(np.float32)
        sub = particles.obs[particles.obs["tomogram"] == name]
        for _, r in sub.iterrows():
            vol[(zz - r.z) ** 2 + (yy - r.y) ** 2 + (xx - r.x) ** 2 <= 9] += 2.0
        out[name] = vol
    return out


def cluster_ids(p: Particles, name: str) -> list[str]:
    return p.obs.index[p.obs["cluster"] == name].tolist()


def png_array(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


# ---------------------------------------------------------------------- selection geometry
def test_box_and_lasso_selection_match_brute_force():
    rng = np.random.default_rng(3)
    uv = rng.uniform(-5, 5, size=(20_000, 2))
    got = points_in_box(uv, (1.0, 2.0, -2.0, -1.0))  # corners in any order
    want = np.flatnonzero((uv[:, 0] >= -2) & (uv[:, 0] <= 1) & (uv[:, 1] >= -1) & (uv[:, 1] <= 2))
    np.testing.assert_array_equal(got, want)
    # Non-convex "L" shaped lasso: the notch (x > 0 and y > 0) must be left out.
    poly = np.array([[-4, -4], [4, -4], [4, 0], [0, 0], [0, 4], [-4, 4]], float)
    sel = points_in_lasso(uv, poly)
    u, v = uv[:, 0], uv[:, 1]
    inside_l = (u > -4) & (u < 4) & (v > -4) & (v < 4) & ~((u > 0) & (v > 0))
    np.testing.assert_array_equal(sel, np.flatnonzero(inside_l))
    assert points_in_lasso(uv, poly[:2]).size == 0  # degenerate polygon selects nothing


# ---------------------------------------------------------------------- explorer callbacks
def test_box_selection_gallery_pages_and_thumbnails():
    p = make_particles()
    ex = explorer(p, page_size=4, thumb_px=32)
    pos = ex.select_box(-3, -3, 3, 3)
    assert ex.selected_ids == cluster_ids(p, "0")
    assert len(pos) == 10 and ex.n_pages == 3
    pages = [ex.page_ids(i) for i in range(ex.n_pages)]
    assert [len(x) for x in pages] == [4, 4, 2]
    assert sorted(sum(pages, [])) == ex.selected_ids
    # Default order: nearest the selection's UMAP centroid first (a representative sample).
    uv = ex._uv[pos]
    d = np.hypot(*(uv - uv.mean(0)).T)
    assert pages[0] == [ex.selected_ids[i] for i in np.argsort(d)[:4]]
    ex.order = "table"
    assert sum([ex.page_ids(i) for i in range(ex.n_pages)], []) == ex.selected_ids
    ex.order = "random"
    rnd = sum([ex.page_ids(i) for i in range(ex.n_pages)], [])
    assert sorted(rnd) == ex.selected_ids and rnd != ex.selected_ids
    ex.seed = 1
    assert sum([ex.page_ids(i) for i in range(ex.n_pages)], []) != rnd  # the seed matters
    ex.order = "table"
    pages = [ex.page_ids(i) for i in range(ex.n_pages)]
    items = ex.gallery_items(page=0)
    assert [it["id"] for it in items] == pages[0]
    assert all(it["label"] == "0" for it in items)
    xy = png_array(items[0]["xy"])
    assert xy.shape == (32, 32)
    # Central slice of a centred blob: the middle is brighter than the corners.
    assert xy[12:20, 12:20].mean() > xy[:4, :4].mean() + 50
    with pytest.raises(InputError, match="page"):
        ex.page_ids(5)
    # A new selection resets the page and the lasso gives the same group.
    ex.page = 2
    ex.select_lasso([[-3, -3], [3, -3], [3, 3], [-3, 3]])
    assert ex.page == 0 and ex.selected_ids == cluster_ids(p, "0")


def test_thumbnails_cut_from_tomograms_when_no_subtomograms():
    p = make_particles(subtomograms=False)
    tomos = make_tomograms(p)
    ex = explorer(p, tomograms=tomos, box=12, thumb_px=24)
    ex.select_box(8, -3, 12, 3)  # cluster "1"
    assert ex.selected_ids == cluster_ids(p, "1")
    sub = ex.subtomogram(ex.selected_ids[0])
    assert sub.shape == (12, 12, 12)
    assert sub[5:8, 5:8, 5:8].mean() > 1.5  # the ball sits in the box centre
    # The thumbnail box is the one shared extractor's box (same rounding, zero padding).
    pid = ex.selected_ids[0]
    row = p.obs.loc[pid]
    want = crop_box(tomos[row["tomogram"]], (row.z, row.y, row.x), 12)
    np.testing.assert_array_equal(sub, want)
    img = png_array(ex.gallery_items()[0]["xz"])
    assert img[10:14, 10:14].mean() > img[:3, :3].mean() + 50
    p.obs.loc[pid, ["z", "y", "x"]] = (0.4, 95.6, 3.0)  # near the corner: padded with 0
    edge = ex.subtomogram(pid)
    np.testing.assert_array_equal(edge, crop_box(tomos[row["tomogram"]], (0.4, 95.6, 3.0), 12))
    assert (edge[:6] == 0).all()
    no_tomo = explorer(make_particles(subtomograms=False))
    no_tomo.select_box(-3, -3, 3, 3)
    with pytest.raises(InputError, match="tomogram"):
        no_tomo.subtomogram(no_tomo.selected_ids[0])


def test_stream_events_select_and_thumbnail_click_moves_viewer():
    p = make_particles()
    ex = explorer(p, tomograms=make_tomograms(p))
    ex.panel()
    ex._bounds.event(bounds=(7.0, -3.0, 13.0, 3.0))
    assert ex.selected_ids == cluster_ids(p, "1")
    gallery = ex._widgets["gallery"]
    assert sorted(it["id"] for it in gallery.items) == cluster_ids(p, "1")
    assert "10 selected" in ex._widgets["page_info"].object
    ex._lasso.event(geometry=np.array([[-3, 7], [3, 7], [3, 13], [-3, 13]], float))
    assert ex.selected_ids == cluster_ids(p, "2")
    pid = ex.selected_ids[3]
    row = p.obs.loc[pid]
    gallery._handle_msg({"id": pid})  # what a click on the tile sends
    assert ex._widgets["tomogram"].value == row["tomogram"]
    viewer = ex._viewers[row["tomogram"]]
    assert (viewer.z, viewer.y, viewer.x) == tuple(int(round(row[c])) for c in "zyx")
    # The selected particles of that tomogram are highlighted in the viewer.
    sel_here = [i for i in ex.selected_ids if p.obs.loc[i, "tomogram"] == row["tomogram"]]
    assert viewer.highlight == sel_here


def test_merge_rename_annotate_undo_through_widgets():
    p = make_particles()
    ex = explorer(p)
    ex.panel()
    w = ex._widgets
    w["clusters"].value = ["1", "2"]
    w["merge"].clicks += 1
    assert p.clusters() == ["0", "1", "3"]
    assert w["clusters"].options == ["0", "1", "3"]
    assert [it["name"] for it in w["legend"].items] == ["0", "1", "3"]
    assert "3 clusters" in w["header"].object
    w["undo"].clicks += 1
    assert p.clusters() == ["0", "1", "2", "3"]
    assert cluster_ids(p, "2") == [f"p{i:03d}" for i in range(20, 30)]
    w["clusters"].value = ["3"]
    w["name"].value = "ribosome"
    w["rename"].clicks += 1
    w["clusters"].value = ["ribosome"]
    w["note"].value = "80S?"
    w["annotate"].clicks += 1
    assert p.uns["cluster_annotations"] == {"ribosome": "80S?"}
    assert {it["name"]: it["note"] for it in w["legend"].items}["ribosome"] == "80S?"
    # A user error lands in the status line instead of raising.
    w["clusters"].value = ["0", "1"]
    w["rename"].clicks += 1
    assert "exactly one cluster" in ex.status
    ex.undo()
    ex.undo()
    assert p.clusters() == ["0", "1", "2", "3"] and "ribosome" not in p.uns.get(
        "cluster_annotations", {}
    )


def test_split_selection_recovers_groups_and_exclude_include():
    p = make_particles()
    ex = explorer(p)
    ex.merge(["0", "2"], into="big")
    ex.select_clusters(["big"])
    names = ex.split_selection(k=2)
    assert names == ["big.1", "big.2"]
    groups = {tuple(cluster_ids(p, n)) for n in names}
    assert groups == {
        tuple(f"p{i:03d}" for i in range(0, 10)),
        tuple(f"p{i:03d}" for i in range(20, 30)),
    }
    ex.undo()
    ex.undo()
    assert p.clusters() == ["0", "1", "2", "3"]
    ex.select_box(-3, -3, 3, 3)
    assert ex.exclude_selection() == 10
    assert p.obs.loc[cluster_ids(p, "0"), "excluded"].all()
    assert EXCLUDED_LABEL in ex.legend_html()
    assert ex.category_counts("cluster")[EXCLUDED_LABEL] == 10
    assert ex.include_selection() == 10
    assert not p.obs["excluded"].any()


def test_export_formats_hold_the_selection(tmp_path):
    from cryosiam_nb.export import read_copick, read_csv, read_star

    p = make_particles()
    ex = explorer(p)
    ex.select_box(7, 7, 13, 13)  # cluster "3"
    want = cluster_ids(p, "3")
    ex.particles.exclude(want[:2])  # excluded particles are not exported
    keep = want[2:]
    star = read_star(ex.export(tmp_path / "sel.star", "relion4"))
    assert sorted(star["particle_id"]) == keep
    got = star.set_index("particle_id").loc[keep, ["z", "y", "x"]].to_numpy()
    np.testing.assert_allclose(got, p.obs.loc[keep, ["z", "y", "x"]].to_numpy(), atol=1e-4)
    csv, vs = read_csv(ex.export(tmp_path / "sel.csv", "csv"))
    assert vs == 10.0 and sorted(csv["particle_id"]) == keep
    with pytest.raises(InputError, match="shape"):
        ex.export(tmp_path / "r5.star", "relion5")
    ex.shapes = {"tomoA": TOMO_SHAPE, "tomoB": TOMO_SHAPE}
    r5 = read_star(ex.export(tmp_path / "r5.star", "relion5"), voxel_size=10.0)
    r5 = r5.set_index("particle_id").loc[keep]
    np.testing.assert_allclose(
        r5["x_A"].to_numpy(), (p.obs.loc[keep, "x"].to_numpy() - 48) * 10.0, atol=1e-3
    )
    ex.export(tmp_path / "copick", "copick")
    picks = sorted((tmp_path / "copick" / "ExperimentRuns").rglob("*.json"))
    assert len(picks) == 2  # one per tomogram (run), one object: this selection's cluster
    got = pd.concat([read_copick(f) for f in picks])
    assert len(got) == len(keep) and set(got["object"]) == {"cluster-3"}
    assert (tmp_path / "copick" / "copick_config.json").is_file()
    # Chosen clusters scope and 'all' scope.
    both = read_star(
        ex.export(tmp_path / "c.star", "relion4", scope="clusters", clusters=["0", "1"])
    )
    assert sorted(both["particle_id"]) == cluster_ids(p, "0") + cluster_ids(p, "1")
    allp = read_star(ex.export(tmp_path / "a.star", "star", scope="all", include_excluded=True))
    assert len(allp) == len(p)
    with pytest.raises(InputError, match="format"):
        ex.export(tmp_path / "x.txt", "pdf")
    ex.clear_selection()
    with pytest.raises(InputError, match="no particles"):
        ex.export(tmp_path / "empty.star", "relion4")


def test_export_goes_through_export_write(tmp_path, monkeypatch):
    from cryosiam_nb import export

    calls = []
    real = export.write

    def spy(data, path, **kw):
        calls.append((data, path, kw))
        return real(data, path, **kw)

    monkeypatch.setattr(export, "write", spy)
    p = make_particles()
    ex = explorer(p, shapes={"tomoA": TOMO_SHAPE, "tomoB": (40, 64, 64)})
    ex.select_clusters(["1"])
    ex.export(tmp_path / "s.csv", "CSV (Å)")
    ex.export(tmp_path / "r5.star", "relion5")
    assert [c[2]["format"] for c in calls] == ["csv", "relion5"]
    assert sorted(calls[0][0]["particle_id"]) == cluster_ids(p, "1")
    # Tomograms of different shapes: one STAR, each row centred on its own tomogram.
    assert calls[1][2]["tomogram_shape"] == {"tomoA": TOMO_SHAPE, "tomoB": (40, 64, 64)}
    r5 = export.read_star(tmp_path / "r5.star").set_index("particle_id")
    obs = p.obs.loc[r5.index]
    half_x = np.where(obs["tomogram"] == "tomoA", 48.0, 32.0)
    np.testing.assert_allclose(r5["x_A"], (obs["x"].to_numpy() - half_x) * 10.0, atol=1e-3)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "r5.star", tmp_path / "s.csv"]  # no temp files


def test_export_and_save_buttons_write_files(tmp_path):
    from cryosiam_nb.export import read_star

    p = make_particles()
    ex = explorer(p, output_dir=tmp_path)
    ex.panel()
    w = ex._widgets
    ex.select_box(-3, 7, 3, 13)
    w["format"].value = "CSV (Å)"
    assert w["path"].value == "selection.csv"
    w["format"].value = "STAR (RELION 3/4 + Warp)"
    w["path"].value = "ui.star"
    w["export"].clicks += 1
    assert sorted(read_star(tmp_path / "ui.star")["particle_id"]) == cluster_ids(p, "2")
    data = w["download"].callback().getvalue()
    assert data.startswith(b"\n# version") or b"rlnCoordinateX" in data
    ex.merge(["0", "1"], into="m")
    w["save_path"].value = "curated.zarr"
    w["save"].clicks += 1
    back = Particles.load(tmp_path / "curated.zarr")
    assert back.clusters() == ["2", "3", "m"]
    assert back.history[-1]["action"] == "merge_clusters"


def test_render_umap_colours_points_by_category_and_score():
    p = make_particles()
    ex = explorer(p, width=200, height=200)
    rgb = ex._umap_frame()
    arr = rgb.data if isinstance(rgb.data, np.ndarray) else None
    assert arr is None or arr.shape[:2] == (200, 200)
    img = np.stack([rgb.dimension_values(d, flat=False) for d in ("R", "G", "B", "A")], -1)
    assert img.shape == (200, 200, 4)
    # The pixel under a particle of cluster "3" has cluster 3's colour.
    key = ex._color_keys["cluster"]
    i = p.obs.index.get_loc(cluster_ids(p, "3")[0])
    u, v = ex._uv[i]
    (x0, x1), (y0, y1) = ex._data_range(0), ex._data_range(1)
    col = int((u - x0) / (x1 - x0) * 200)
    row = int((v - y0) / (y1 - y0) * 200)  # dimension_values(flat=False): y ascending
    hexcol = key["3"].lstrip("#")
    want = [int(hexcol[k : k + 2], 16) for k in (0, 2, 4)]
    patch = img[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].reshape(-1, 4)
    assert any(np.abs(px[:3].astype(int) - want).max() <= 2 and px[3] > 0 for px in patch)
    assert (img[..., 3] > 0).sum() > len(p)  # sparse points were spread to be visible
    ex.color_by = "score"
    frame = render_umap(ex._frame, "score", width=50, height=40)
    assert frame.dimension_values("A", flat=False).shape == (40, 50)
    with pytest.raises(InputError, match="color_by"):
        explorer(p, color_by="nonexistent")


def test_bad_inputs_raise_clear_errors(tmp_path):
    p = make_particles()
    del p.obsm["umap"]
    with pytest.raises(InputError, match="umap"):
        Explorer(p)
    with pytest.raises(InputError, match="Particles"):
        Explorer(pd.DataFrame({"a": [1]}))
    with pytest.raises(InputError, match="no such"):
        main([str(tmp_path / "missing.zarr")])


# ---------------------------------------------------------------------- slice viewer
def test_slice_viewer_slices_overlays_markers():
    import dask.array as da
    import holoviews as hv

    rng = np.random.default_rng(0)
    tomo = rng.normal(size=(20, 30, 40)).astype(np.float32)
    sem = np.zeros(tomo.shape, np.uint8)
    sem[5:10, 10:20, 0:5] = 2
    inst = np.zeros(tomo.shape, np.uint32)
    inst[2:4, 2:4, 2:4] = 7
    parts = pd.DataFrame({"z": [3.0, 15.0], "y": [3.0, 20.0], "x": [3.0, 30.0]}, index=["a", "b"])
    v = slice_viewer(tomo, overlays={"semantic": sem, "instances": inst}, particles=parts)
    assert (v.z, v.y, v.x) == (10, 15, 20)
    lo, hi = v.contrast
    assert lo < 0 < hi
    v.goto(3, 3, 3)
    np.testing.assert_array_equal(v.slice_array("xy"), tomo[3])
    np.testing.assert_array_equal(v.slice_array("xz"), tomo[:, 3, :])
    np.testing.assert_array_equal(v.slice_array("yz"), tomo[:, :, 3].T)
    assert v.slice_array("xy", "instances")[3, 3] == 7
    assert v.overlays["instances"][1] == "instances" and v.overlays["semantic"][1] == "semantic"
    v.goto(100, -5, 7.4)  # clamped into the volume
    assert (v.z, v.y, v.x) == (19, 0, 7)
    v.goto(3, 3, 3)
    v.highlight = ["a"]
    markers = v._markers("xy", v.z, v.y, v.x, True, 1)
    base, sel, focus = markers.values()
    assert len(base) == 0 and len(sel) == 1 and len(focus) == 1  # "b" is 12 slices away
    plots = v.plots()
    assert set(plots) == {"xy", "xz", "yz"}
    hv.render(plots["xy"])
    assert v._frame_size("xz")[0] == v._frame_size("xy")[0]
    assert v._frame_size("yz")[1] == v._frame_size("xy")[1]
    # A lazy (dask-backed) xarray tomogram: voxel size from attrs, slices read on demand.
    from cryosiam_nb.io import as_dataarray

    lazy = as_dataarray(da.from_array(tomo, chunks=(5, 30, 40)), voxel_size=7.5)
    lv = slice_viewer(lazy, orthogonal=False)
    assert lv.voxel_size == 7.5 and set(lv.plots()) == {"xy"}
    lv.z = 4
    np.testing.assert_array_equal(lv.slice_array("xy"), tomo[4])
    with pytest.raises(InputError, match="shape"):
        slice_viewer(tomo, overlays={"bad": sem[:5]})
    with pytest.raises(InputError, match="3-D"):
        slice_viewer(tomo[0])
    with pytest.raises(InputError, match="missing"):
        v.set_particles(pd.DataFrame({"z": [1.0]}))
