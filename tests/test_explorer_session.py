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
