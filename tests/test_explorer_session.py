"""Explorer sessions (undo floor, working copies, autosave), stable colours, exports, writes
confined to the output folder, the token, and the average preview (Python level)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_explorer import cluster_ids, make_particles, make_tomograms  # noqa: E402

from cryosiam_nb import analysis  # noqa: E402
from cryosiam_nb.io import InputError  # noqa: E402
from cryosiam_nb.particles import Particles  # noqa: E402
from cryosiam_nb.pl.curation import Explorer, explorer  # noqa: E402
from cryosiam_nb.pl.curation.session import safe_name  # noqa: E402
from cryosiam_nb.segmentation.subtomograms import crop_box  # noqa: E402


def test_undo_stops_at_the_session_start_never_the_pipeline():
    p = make_particles()
    analysis.cluster(p, k=4, seed=0)  # a pipeline step in the history
    before = p.obs["cluster"].copy()
    ex = explorer(p)
    with pytest.raises(InputError, match="nothing to undo in this session"):
        ex.undo()
    assert "cluster" in p.obs.columns and p.obs["cluster"].equals(before)
    ex.merge(["0", "1"])
    ex.undo()
    assert p.obs["cluster"].equals(before)
    with pytest.raises(InputError, match="pipeline"):
        ex.undo()
    p.undo()  # the Python API can still undo the pipeline step itself
    assert p.history == []


def test_two_sessions_have_their_own_working_copies(tmp_path):
    base = make_particles()
    a = Explorer(base, working_copy=True, output_dir=tmp_path)
    b = Explorer(base, working_copy=True, output_dir=tmp_path)
    a.merge(["1", "2"], into="12")
    assert a.clusters() == ["0", "3", "12"]
    assert b.clusters() == base.clusters() == ["0", "1", "2", "3"]
    with pytest.raises(InputError, match="nothing to undo"):
        b.undo()  # B's undo cannot reach A's merge
    assert a.clusters() == ["0", "3", "12"]
    a.save(tmp_path / "a.zarr")  # explicit save writes A's state, not B's
    assert Particles.load(tmp_path / "a.zarr").clusters() == ["0", "3", "12"]
    assert base.history == []


def test_autosave_restore_discard_and_save(tmp_path):
    base = make_particles()
    a = Explorer(base, working_copy=True, output_dir=tmp_path, autosave=True)
    a.merge(["1", "2"], into="12")
    a.select_clusters(["0"])
    a.exclude_selection()
    files = sorted((tmp_path / ".autosave").glob("session-*.parquet"))
    assert len(files) == 1
    b = Explorer(base, working_copy=True, output_dir=tmp_path, autosave=True)
    b.panel()
    assert b._widgets["prompt"].visible and "2 edit(s)" in b._widgets["prompt_text"].object
    (cand,) = b.autosave_candidates()
    assert cand["n_edits"] == 2
    b._widgets["restore"].clicks += 1
    assert b.clusters() == a.clusters() and b.n_session_edits == 2
    assert b.particles.obs["excluded"].equals(a.particles.obs["excluded"])
    assert not files[0].exists() and not b._widgets["prompt"].visible  # taken over
    b.undo()  # restored edits stay undoable
    assert not b.particles.obs["excluded"].any() and b.clusters() == ["0", "3", "12"]
    b.save(tmp_path / "b.zarr")
    assert list((tmp_path / ".autosave").glob("*.parquet")) == []  # saved: nothing pending
    a.undo()  # rewrites A's autosave
    c = Explorer(base, working_copy=True, output_dir=tmp_path, autosave=True)
    c.panel()
    c._widgets["discard"].clicks += 1
    assert list((tmp_path / ".autosave").glob("*.parquet")) == []
    assert c.clusters() == ["0", "1", "2", "3"]


def test_colours_follow_cluster_identity():
    p = make_particles(per_cluster=12)
    ex = explorer(p)
    key0 = dict(ex._color_keys["cluster"])
    ex.merge(["0", "1"], into="01")
    assert ex._color_keys["cluster"]["01"] == key0["0"]
    assert {c: ex._color_keys["cluster"][c] for c in ("2", "3")} == {c: key0[c] for c in "23"}
    ex.select_clusters(["2"])
    names = ex.split_selection(k=2)
    keys = ex._color_keys["cluster"]
    assert keys["3"] == key0["3"] and keys["01"] == key0["0"]
    assert len({keys[n] for n in names} | {key0[c] for c in "0123"}) == 6  # new, distinct
    ex.select_clusters(["01"])
    ex.exclude_selection()
    assert ex._color_keys["cluster"]["3"] == key0["3"]
    ex.rename("3", "ribosome")
    assert ex._color_keys["cluster"]["ribosome"] == key0["3"]
    for _ in range(4):
        ex.undo()
    assert ex._color_keys["cluster"] == key0
    # Split names stay strings (never floats), in obs and through a CSV export.
    assert all(isinstance(n, str) for n in names) and names[0] == "2.1"


def test_header_legend_gallery_agree_after_exclude_and_status_counts(tmp_path):
    p = make_particles()
    ex = explorer(p, output_dir=tmp_path)
    ex.panel()
    w = ex._widgets
    assert "data-clusters='4'" in w["header"].object
    ex.select_clusters(["1"])
    ex.exclude_selection()
    legend = {it["name"]: it["count"] for it in w["legend"].items}
    assert legend["(excluded)"] == 10 and "1" not in legend
    assert all(it["excluded"] for it in w["gallery"].items)
    assert "data-excluded='10'" in w["header"].object and "data-clusters='4'" in w["header"].object
    ex.merge(["2", "3"])
    assert "data-clusters='3'" in w["header"].object
    # Export says how many excluded particles it skipped.
    ex.select_ids(cluster_ids(p, "0") + cluster_ids(p, "1"))
    ex.export(tmp_path / "s.star", "relion4")
    assert "exported 10 particle(s)" in ex.status and "skipped 10 excluded" in ex.status


def test_format_switch_and_overwrite_never_clobber_silently(tmp_path):
    from cryosiam_nb.export import read_csv

    p = make_particles()
    ex = explorer(p, output_dir=tmp_path)
    ex.panel()
    w = ex._widgets
    names = set()
    for label in ["STAR (RELION 3/4 + Warp)", "STAR (RELION 5)", "CSV (Å)", "copick JSON"]:
        w["format"].value = label
        names.add(w["path"].value)
    assert len(names) == 4  # one default name per format
    w["format"].value = "CSV (Å)"
    ex.select_clusters(["1"])
    ex.select_box(-3, -3, 3, 3, add=True)
    names_split = ex.split_selection(k=2)
    w["export"].clicks += 1
    assert (tmp_path / "selection.csv").is_file()
    df, _ = read_csv(tmp_path / "selection.csv")
    assert set(df["cluster"]) == set(names_split) and df["cluster"].map(type).eq(str).all()
    before = (tmp_path / "selection.csv").read_bytes()
    ex.select_clusters(["0.1"]) if "0.1" in ex.clusters() else ex.select_clusters(names_split[:1])
    w["export"].clicks += 1
    assert "exists" in ex.status and (tmp_path / "selection.csv").read_bytes() == before
    w["overwrite"].value = True
    w["export"].clicks += 1
    assert (tmp_path / "selection.csv").read_bytes() != before


@pytest.mark.parametrize(
    "name", ["../x.star", "/etc/passwd", "sub/x.star", "..", ".hidden", "a\\b", "", "x y"]
)
def test_client_names_are_confined_to_the_output_folder(tmp_path, name):
    with pytest.raises(InputError):
        safe_name(name)
    ex = explorer(make_particles(), output_dir=tmp_path / "out")
    ex.panel()
    ex.select_clusters(["0"])
    ex._widgets["path"].value = name
    ex._widgets["export"].clicks += 1
    assert ex.status.startswith("⚠")
    ex._widgets["save_path"].value = name
    ex._widgets["save"].clicks += 1
    assert ex.status.startswith("⚠")
    assert not any(tmp_path.rglob("*.star")) and not (tmp_path / "x.star").exists()
    assert safe_name("sel_1.star") == "sel_1.star"
    assert ex.out_path("ok.star") == (tmp_path / "out" / "ok.star").resolve()


def test_average_preview_matches_numpy_out_of_core():
    p = make_particles()
    ex = explorer(p, max_average=1000)
    ex.select_clusters(["2"])
    mean, n, total = ex.average()
    subs = np.asarray(p.obsm["subtomograms"])
    rows = p.obs.index.get_indexer(cluster_ids(p, "2"))
    np.testing.assert_allclose(mean, subs[rows].mean(0), rtol=1e-5, atol=1e-6)
    assert n == total == 10
    ex.particles.exclude(cluster_ids(p, "2")[:3])
    _, n, total = ex.average()
    assert n == total == 7  # excluded particles are left out
    _, n, total = ex.average(cluster_ids(p, "1"), max_particles=4)
    assert (n, total) == (4, 10)  # a seeded random sample
    v = ex.average_views(cluster_ids(p, "1"))
    assert {"xy", "xz", "yz"} <= set(v) and v["n_used"] == 10
    # From the tomograms (no stored boxes): the mean of the shared crop_box boxes.
    q = make_particles(subtomograms=False)
    tomos = make_tomograms(q)
    ex2 = explorer(q, tomograms=tomos, box=12)
    ids = cluster_ids(q, "3")
    want = np.mean(
        [crop_box(tomos[q.obs.loc[i, "tomogram"]], q.obs.loc[i, ["z", "y", "x"]], 12) for i in ids],
        axis=0,
    )
    got, n, _ = ex2.average(ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert n == 10 and got[5:8, 5:8, 5:8].mean() > 1.0
    ex2.panel()
    ex2._widgets["clusters"].value = ["3"]
    ex2._widgets["average_clusters"].clicks += 1
    assert "10 particle(s)" in ex2._widgets["average_view"].object


def test_colour_by_any_column_find_legend_click_keys_and_shift_add():
    p = make_particles()
    p.obs["defocus"] = np.linspace(1.0, 3.0, len(p))
    ex = explorer(p, tomograms=make_tomograms(p))
    ex.panel()
    assert {"tomogram", "defocus"} <= set(ex.param.color_by.objects)
    ex.color_by = "tomogram"
    assert [it["name"] for it in ex._widgets["legend"].items] == ["tomoA", "tomoB"]
    ex.color_by = "defocus"
    assert ex._widgets["legend"].items == [] and "1 … 3" in ex._widgets["legend"].note
    ex.color_by = "cluster"
    ex._widgets["legend"]._handle_msg({"select": "2", "add": False})
    assert ex.selected_ids == cluster_ids(p, "2")
    ex._widgets["legend"]._handle_msg({"select": "3", "add": True})
    assert ex.selected_ids == cluster_ids(p, "2") + cluster_ids(p, "3")
    ex._widgets["legend"]._handle_msg({"hide": "3"})
    assert ex._widgets["legend"].items[3]["hidden"]
    frame = ex._umap_frame(width=60, height=60)
    assert frame.dimension_values("A").max() > 0
    # Shift held during a drag: the box adds to the selection.
    ex._widgets["keys"]._handle_msg({"shift": True})
    ex._bounds.event(bounds=(-3.0, -3.0, 3.0, 3.0))
    assert set(ex.selected_ids) == set(
        cluster_ids(p, "0") + cluster_ids(p, "2") + cluster_ids(p, "3")
    )
    ex._widgets["keys"]._handle_msg({"shift": False})
    ex._bounds.event(bounds=(-3.0, -3.0, 3.0, 3.0))
    assert ex.selected_ids == cluster_ids(p, "0")
    ex._widgets["keys"]._handle_msg({"key": "e"})
    assert p.obs.loc[cluster_ids(p, "0"), "excluded"].all()
    ex._widgets["keys"]._handle_msg({"key": "u"})
    assert not p.obs["excluded"].any()
    ex._widgets["find"].value = "p017"
    assert ex.selected_ids == ["p017"] and ex.active == "p017"
    pts = ex._active_point()
    np.testing.assert_allclose(pts.array()[0], ex._uv[17])


def test_served_app_refuses_requests_without_the_token(tmp_path):
    from cryosiam_nb.pl.curation.server import serve

    server, url = serve(
        make_particles(), port=0, output_dir=tmp_path, threaded=True, token="s3cret-token"
    )
    try:
        import time

        base = url.split("?")[0]
        for _ in range(100):
            try:
                urllib.request.urlopen(base, timeout=5)
            except urllib.error.HTTPError as err:
                code = err.code
                break
            except OSError:
                time.sleep(0.1)
        assert code == 403
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "?token=wrong", timeout=5)
        assert err.value.code == 403
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"bokeh" in r.read().lower()
    finally:
        server.stop()


# ---------------------------------------------------------------------- re-embed a subset
@pytest.mark.slow  # UMAP's numba kernels compile on first use (~20 s on a busy CPU)
def test_recluster_reembeds_only_the_selection_seeded_and_undoable(tmp_path):
    p = make_particles(per_cluster=30)
    ex = explorer(p, working_copy=True, output_dir=tmp_path)
    ex.merge(["0", "1"], into="mix")  # a mixed cluster: two species, one name
    mix = cluster_ids(ex.particles, "mix")
    ex.select_clusters(["mix"])
    obs0, uv0, n_hist = ex.particles.obs.copy(), p.obsm["umap"].copy(), len(ex.particles.history)
    names = ex.recluster_selection(2, seed=0)
    obs = ex.particles.obs
    assert names == ["mix.1", "mix.2"] and ex.particles.history[-1]["action"] == "recluster"
    # k-means on the subset's embeddings separates the two species again.
    groups = obs.loc[mix].groupby("cluster")["species"].agg(lambda s: sorted(set(s)))
    assert sorted(map(tuple, groups)) == [("prot",), ("ribo",)]
    # Nothing outside the selection changed; obsm['umap'] is never rewritten.
    outside = ~obs.index.isin(mix)
    assert obs.loc[outside].equals(obs0.loc[outside])
    np.testing.assert_array_equal(ex.particles.obsm["umap"], uv0)
    # The UMAP shows the subset only, in its own coordinates: a box over everything
    # selects exactly the subset.
    assert ex.subset_view and sorted(ex.subset_ids) == sorted(mix)
    sub_uv = ex.subset_umap.copy()
    assert sub_uv.shape == (60, 2) and np.isnan(ex._uv[outside.nonzero()[0]]).all()
    ex.select_box(-1e9, -1e9, 1e9, 1e9)
    assert sorted(ex.selected_ids) == sorted(mix)
    # Undo: labels back, full UMAP back; a rerun with the same seed repeats exactly.
    ex.undo()
    assert not ex.subset_view and len(ex.particles.history) == n_hist
    assert ex.particles.obs.equals(obs0)
    ex.select_clusters(["mix"])
    assert ex.recluster_selection(2, seed=0) == names
    np.testing.assert_array_equal(ex.subset_umap, sub_uv)
    ex.show_full_umap()
    assert not ex.subset_view and np.array_equal(ex._uv, uv0)
    # Too small a selection, or no embeddings: clear errors.
    ex.select_ids(mix[:3])
    with pytest.raises(InputError, match="at least 5"):
        ex.recluster_selection(2)
    del ex.particles.obsm["embedding"]
    ex.select_ids(mix)
    with pytest.raises(InputError, match="embedding"):
        ex.recluster_selection(2)


def test_fit_into_keeps_aspect_and_fills_the_view():
    from cryosiam_nb.pl.curation.recluster import fit_into

    uv = np.array([[0.0, 0.0], [4.0, 1.0], [2.0, 0.5]])
    out = fit_into(uv, (10.0, 20.0), (0.0, 10.0), margin=0.1)
    np.testing.assert_allclose(out.min(0), [11.0, 4.0])  # 8 wide, centred
    np.testing.assert_allclose(out.max(0), [19.0, 6.0])
    np.testing.assert_allclose(out[2], [15.0, 5.0])


# ---------------------------------------------------------------------- histograms
def test_histograms_of_selection_and_active_cluster_match_numpy():
    import holoviews as hv
    import panel as pn
    from bokeh.document import Document
    from bokeh.models import Plot

    p = make_particles()
    p.obs["n_voxels"] = np.arange(len(p)) * 10 + 100  # voxels
    ex = explorer(p)
    assert ex.histogram_fields() == ["n_voxels", "score"]
    with pytest.raises(InputError, match="nothing selected"):
        ex.histograms("selection")
    ex.select_clusters(["2"])
    d = ex.histogram_data("n_voxels", bins=8)
    edges = np.histogram_bin_edges(p.obs["n_voxels"], bins=8)
    np.testing.assert_allclose(d["edges"], edges)
    sel = p.obs.loc[cluster_ids(p, "2"), "n_voxels"]
    np.testing.assert_array_equal(d["counts"], np.histogram(sel, bins=edges)[0])
    np.testing.assert_array_equal(d["all"], np.histogram(p.obs["n_voxels"], bins=edges)[0])
    # The active particle's cluster (a thumbnail click), whatever the selection.
    ex.show_particle(cluster_ids(p, "3")[0])
    rows, what = ex.histogram_rows("cluster")
    assert sorted(p.obs.index[rows]) == sorted(cluster_ids(p, "3")) and what.startswith("cluster 3")
    layout = ex.histograms("cluster", bins=8)
    assert isinstance(layout, hv.Layout) and len(layout) == 2
    bars = layout[0].get(1)  # n_voxels: the cluster's own bars over the whole set's (grey)
    mine = p.obs.loc[cluster_ids(p, "3"), "n_voxels"]
    np.testing.assert_array_equal(bars.dimension_values(1), np.histogram(mine, bars.edges)[0])
    root = pn.pane.HoloViews(layout).get_root(Document())
    names = {m.name for m in root.select({"type": Plot})}
    assert names == {"cs-hist-n_voxels", "cs-hist-score"}
    # Through the buttons.
    ex.panel()
    ex._widgets["hist_selection"].clicks += 1
    assert len(ex._widgets["hist_view"].objects) == 1 and "histograms" in ex.status


# ---------------------------------------------------------------------- per-tomogram export
def test_export_restricted_to_the_viewer_tomogram_reports_counts_per_tomogram(tmp_path):
    from cryosiam_nb.export import read_csv

    p = make_particles()
    ex = explorer(p, tomograms=make_tomograms(p), output_dir=tmp_path)
    ex.select_clusters(["0", "1"])
    ex.export(tmp_path / "all.csv", "csv")
    assert "exported 20 particle(s) (tomoA: 10, tomoB: 10)" in ex.status
    ex.export(tmp_path / "b.csv", "csv", tomogram="tomoB")
    got = read_csv(tmp_path / "b.csv")[0]
    want = [i for i in ex.selected_ids if p.obs.at[i, "tomogram"] == "tomoB"]
    assert sorted(got["particle_id"]) == sorted(want) and "(tomoB: 10)" in ex.status
    # Through the widgets: the tomogram shown in the viewer, ticked.
    ex.panel()
    w = ex._widgets
    w["tomogram"].value = "tomoA"
    w["export_tomo"].value = True
    w["path"].value = "a.csv"
    w["format"].value = "CSV (Å)"
    w["path"].value = "a.csv"
    w["export"].clicks += 1
    got = read_csv(tmp_path / "a.csv")[0]
    assert set(p.obs.loc[got["particle_id"], "tomogram"]) == {"tomoA"} and len(got) == 10
    assert "(tomoA: 10)" in ex.status
    with pytest.raises(InputError, match="tomogram 'nowhere'"):
        ex.export(tmp_path / "n.csv", "csv", tomogram="nowhere")


def test_capped_viewer_markers_match_a_scan_and_keep_the_highlighted():
    import pandas as pd

    from cryosiam_nb.pl.curation.markers import CappedViewer

    rng = np.random.default_rng(0)
    n = 20_000
    df = pd.DataFrame(
        rng.uniform(0, [32, 96, 96], size=(n, 3)),
        columns=["z", "y", "x"],
        index=[f"q{i}" for i in range(n)],
    )
    v = CappedViewer(np.zeros((32, 96, 96), np.float32), max_markers=500)
    v.set_particles(df)
    for view, axis, pos in [("xy", "z", 16), ("xz", "y", 40), ("yz", "x", 0)]:
        scan = np.flatnonzero((df[axis] - pos).abs().to_numpy() <= 3)
        np.testing.assert_array_equal(v.rows_near(view, pos, 3), scan)
    hl = df.index[np.flatnonzero((df["z"] - 16).abs().to_numpy() <= 3)[:50]].tolist()
    v.highlight = hl
    overlay = v._markers("xy", 16, 40, 40, True, 3)
    base, sel = overlay.get(0), overlay.get(1)
    assert len(sel) == 50 and len(base) + len(sel) == 500


def test_drag_before_the_page_has_loaded_is_applied_once_it_has():
    """Panel drops document changes made in a hold before the session counts as connected,
    so a drag in the first second of a served page froze the gallery: it is deferred."""
    import weakref

    import panel as pn
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    p = make_particles()
    ex = explorer(p, tomograms=make_tomograms(p))
    ex.panel()
    assert ex._widgets["viewer_holder"].objects  # the slice viewer is in the first document

    class _Session:  # a served document: it has a session context until it is loaded
        id = "not-yet-loaded"

    session = _Session()
    doc = Document()
    doc._session_context = weakref.ref(session)
    with set_curdoc(doc):
        assert not pn.state.loaded
        ex._bounds.event(bounds=(-3.0, -3.0, 3.0, 3.0))
        ex._widgets["exclude"].clicks += 1  # a button click waits the same way
        assert len(ex.selection) == 0 and ex._widgets["gallery"].items == []
        pn.state._on_load(doc)  # what Panel runs on the browser's DocumentReady
    assert ex.selected_ids == cluster_ids(p, "0")
    assert sorted(it["id"] for it in ex._widgets["gallery"].items) == cluster_ids(p, "0")
    assert p.obs.loc[cluster_ids(p, "0"), "excluded"].all()
