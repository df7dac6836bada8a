"""Tests for the Particles container: construction, save/load, concat, curation + undo."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles, concat


def _table(n: int = 60, tomogram: str = "tomo1", seed: int = 0) -> pd.DataFrame:
    """A particle table shaped like the segmentation module's output."""
    rng = np.random.default_rng(seed)
    z, y, x = (rng.uniform(0, 64, n) for _ in range(3))
    return pd.DataFrame(
        {
            "particle_id": np.arange(1, n + 1),
            "tomogram": tomogram,
            "z": z,
            "y": y,
            "x": x,
            "z_A": z * 10,
            "y_A": y * 10,
            "x_A": x * 10,
            "n_voxels": rng.integers(10, 500, n),
            "size_category": pd.Categorical(rng.choice(["small", "medium", "large"], n)),
            "semantic_class": "particle",
        }
    )


def _particles(n_per: int = 20, seed: int = 0) -> Particles:
    """Three well-separated groups in an 8-d embedding; clusters '0' (group 0) and '1' (1+2)."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per
    p = Particles.from_table(_table(n, seed=seed), voxel_size=10.0)
    centers = rng.normal(0, 5, (3, 8))
    group = np.repeat([0, 1, 2], n_per)
    p.obsm["embedding"] = (centers[group] + rng.normal(0, 0.2, (n, 8))).astype(np.float32)
    p.obsm["umap"] = rng.normal(size=(n, 2)).astype(np.float32)
    p.obs["species"] = np.array(["a", "b", "c"])[group]
    p.obs["score"] = rng.uniform(size=n)
    p.obs["cluster"] = np.where(group == 0, "0", "1")
    p = Particles(p.obs, p.obsm, {"clustering": {"k": 2}})
    return p


def test_from_table_builds_unique_string_ids_and_required_columns():
    p = Particles.from_table(_table(5), voxel_size=7.5)
    assert list(p.ids) == [f"tomo1:{i}" for i in range(1, 6)]
    assert p.obs.index.name == "particle_id"
    assert (p.obs["voxel_size"] == 7.5).all()
    assert p.obs["instance_id"].tolist() == [1, 2, 3, 4, 5]
    assert not p.obs["excluded"].any()
    assert len(p) == 5


def test_from_table_errors_name_the_problem():
    with pytest.raises(InputError, match="voxel_size"):
        Particles.from_table(_table(5))
    with pytest.raises(ValueError, match="tomogram"):
        Particles.from_table(_table(5).drop(columns="tomogram"), voxel_size=10)
    with pytest.raises(ValueError, match="'z'"):
        Particles.from_table(_table(5).drop(columns="z"), voxel_size=10)
    with pytest.raises(ValueError, match="rows"):
        Particles.from_table(_table(5), voxel_size=10, obsm={"embedding": np.zeros((4, 3))})


def test_save_load_round_trip_is_exact(tmp_path):
    p = _particles()
    p.obs.loc[p.ids[0], "note"] = "odd one"
    p.rename_cluster("0", "ribosome")
    p.annotate_cluster("ribosome", "80S?")
    p.exclude(p.ids[:3])
    p.obsm["subtomograms"] = np.random.default_rng(1).normal(size=(len(p), 4, 4, 4))
    path = p.save(tmp_path / "parts.zarr")

    q = Particles.load(path, lazy=True)
    assert all(q.obsm.is_lazy(k) for k in q.obsm)  # nothing read yet
    assert q.obsm.shape("subtomograms") == (len(p), 4, 4, 4)
    assert_frame_equal(q.obs, p.obs, check_exact=True)
    assert q.obs["cluster"].dtype == p.obs["cluster"].dtype
    assert q.obs["size_category"].dtype == p.obs["size_category"].dtype
    assert q.uns == p.uns
    assert q.history == p.history
    for key in p.obsm:
        got = q.obsm[key]
        assert isinstance(got, np.ndarray) and got.dtype == p.obsm[key].dtype
        np.testing.assert_array_equal(got, p.obsm[key])
    eager = Particles.load(path, lazy=False)
    assert not any(eager.obsm.is_lazy(k) for k in eager.obsm)
    # undo still works after the round trip and gives the pre-exclude state
    q.undo()
    assert not q.obs["excluded"].any()


def test_save_overwrites_atomically_and_keeps_lazy_arrays_valid(tmp_path):
    p = _particles()
    path = tmp_path / "p.zarr"
    p.save(path)
    q = Particles.load(path)
    q.rename_cluster("1", "big")
    q.save(path)  # overwrite the store q's lazy arrays come from
    np.testing.assert_array_equal(q.obsm["embedding"], p.obsm["embedding"])
    r = Particles.load(path)
    assert "big" in r.clusters()
    assert [x.name for x in tmp_path.iterdir()] == ["p.zarr"]  # no temp leftovers
    (tmp_path / "not_zarr").write_text("x")
    with pytest.raises(ValueError, match="not a zarr store"):
        p.save(tmp_path / "not_zarr")
    with pytest.raises(ValueError, match="no such"):
        Particles.load(tmp_path / "missing.zarr")


def test_uns_must_be_json_serialisable(tmp_path):
    p = _particles()
    p.uns["bad"] = object()
    with pytest.raises(ValueError, match="JSON"):
        p.save(tmp_path / "x.zarr")


def test_concat_keeps_ids_unique_and_arrays_aligned(tmp_path):
    a = Particles.from_table(_table(10, "t1"), voxel_size=10, obsm={"embedding": np.ones((10, 3))})
    b = Particles.from_table(_table(7, "t2"), voxel_size=5, obsm={"embedding": np.zeros((7, 3))})
    c = concat([a, b])
    assert len(c) == 17 and c.obs.index.is_unique
    assert c.obs["tomogram"].value_counts().to_dict() == {"t1": 10, "t2": 7}
    assert c.obsm["embedding"][:10].sum() == 30 and c.obsm["embedding"][10:].sum() == 0
    assert c.obs.loc["t2:1", "voxel_size"] == 5
    with pytest.raises(ValueError, match="collide"):
        concat([a, a])
    d = Particles.concat([a, a], keys=["run1", "run2"])
    assert d.obs.index.is_unique and d.ids[0] == "run1/t1:1"
    # lazily loaded inputs stay lazy
    a.save(tmp_path / "a.zarr")
    b.save(tmp_path / "b.zarr")
    e = concat([Particles.load(tmp_path / "a.zarr"), Particles.load(tmp_path / "b.zarr")])
    assert e.obsm.is_lazy("embedding")
    np.testing.assert_array_equal(e.obsm["embedding"], c.obsm["embedding"])


def test_subset_by_mask_ids_and_positions():
    p = _particles()
    mask = (p.obs["species"] == "b").to_numpy()
    s = p.subset(mask)
    assert len(s) == 20 and (s.obs["species"] == "b").all()
    np.testing.assert_array_equal(s.obsm["embedding"], p.obsm["embedding"][mask])
    ids = list(p.ids[[5, 2]])
    s2 = p.subset(ids)
    assert list(s2.ids) == ids
    np.testing.assert_array_equal(s2.obsm["umap"], p.obsm["umap"][[5, 2]])
    assert list(p.subset(np.array([1, 0])).ids) == list(p.ids[[1, 0]])
    with pytest.raises(ValueError, match="unknown particle id"):
        p.subset(["nope"])
    with pytest.raises(ValueError, match="length"):
        p.subset(np.ones(3, dtype=bool))


def test_selection_to_table_for_export():
    p = _particles()
    t = p.selection_to_table(p.ids[:4])
    assert t["particle_id"].tolist() == list(p.ids[:4])
    assert {"tomogram", "z", "y", "x", "voxel_size"} <= set(t.columns)
    with pytest.raises(ValueError, match="empty"):
        p.selection_to_table([])


def test_curation_actions_and_undo_restore_state_exactly():
    p = _particles()
    group = np.repeat([0, 1, 2], 20)
    obs0, uns0 = p.obs.copy(), dict(p.uns)
    states = []
    actions = [
        lambda: p.rename_cluster("0", "ribo"),
        lambda: p.annotate_cluster("ribo", "large, round"),
        lambda: p.apply_split(p.ids[p.obs["cluster"] == "1"], group[group > 0] - 1),
        lambda: p.merge_clusters(["1.1", "ribo"], into="merged"),
        lambda: p.exclude(p.ids[:5]),
        lambda: p.include(p.ids[:2]),
    ]
    for act in actions:
        states.append((p.obs.copy(), copy.deepcopy(p.uns)))
        act()
    assert len(p.history) == len(actions)
    assert [h["action"] for h in p.history] == [
        "rename_cluster",
        "annotate_cluster",
        "split",
        "merge_clusters",
        "exclude",
        "include",
    ]
    assert p.obs["excluded"].sum() == 3
    assert p.uns["cluster_annotations"] == {"merged": "large, round"}
    for obs, uns in reversed(states):
        p.undo()
        assert_frame_equal(p.obs, obs, check_exact=True)
        assert p.uns == uns
    assert_frame_equal(p.obs, obs0, check_exact=True)
    assert p.uns == uns0
    with pytest.raises(ValueError, match="nothing to undo"):
        p.undo()


def test_apply_split_names_groups_and_records_params():
    p = _particles()
    ids = p.ids[p.obs["cluster"] == "1"]
    labels = (p.obs.loc[ids, "species"] == "c").to_numpy().astype(int)
    names = p.apply_split(ids, labels, params={"method": "test", "k": 2})
    assert names == ["1.1", "1.2"]
    assert set(p.obs.loc[p.obs["species"] == "b", "cluster"]) == {"1.1"}
    assert set(p.obs.loc[p.obs["species"] == "c", "cluster"]) == {"1.2"}
    assert set(p.obs.loc[p.obs["species"] == "a", "cluster"]) == {"0"}  # others untouched
    entry = p.history[-1]
    assert entry["action"] == "split" and entry["params"]["method"] == "test"
    assert entry["params"]["names"] == names and entry["params"]["ids"] == list(ids)
    # names never collide with existing clusters; a selection across clusters gets "split.i"
    sub = p.ids[p.obs["cluster"] == "1.1"]
    assert p.apply_split(sub, np.arange(len(sub)) % 2) == ["1.1.1", "1.1.2"]
    both = p.ids[:2].tolist() + p.ids[-2:].tolist()
    assert p.apply_split(both, [0, 0, 1, 1]) == ["split.1", "split.2"]
    assert p.apply_split(both, [0, 1, 0, 1], prefix="x") == ["x.1", "x.2"]
    p.undo()
    assert p.obs.loc[both, "cluster"].tolist() == ["split.1", "split.1", "split.2", "split.2"]


def test_curation_bad_input_errors():
    p = _particles()
    with pytest.raises(ValueError, match="unknown cluster"):
        p.rename_cluster("zzz", "x")
    with pytest.raises(ValueError, match="already exists"):
        p.rename_cluster("0", "1")
    with pytest.raises(ValueError, match="at least two"):
        p.merge_clusters(["0"])
    with pytest.raises(ValueError, match="empty selection"):
        p.exclude([])
    with pytest.raises(ValueError, match="at least 2"):
        p.apply_split(p.ids[:1], [0])
    with pytest.raises(InputError, match="one per selected particle"):
        p.apply_split(p.ids[:3], [0, 1])
    with pytest.raises(InputError, match="integers"):
        p.apply_split(p.ids[:2], [0.5, 1.0])
    assert p.history == []  # failed actions are not recorded
    no_clusters = Particles.from_table(_table(5), voxel_size=10)
    with pytest.raises(ValueError, match="run tl.cluster"):
        no_clusters.rename_cluster("0", "x")
