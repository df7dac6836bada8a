"""Tests for particle identification: embed, classifiers, two-stage clustering, UMAP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

from cryosiam_nb import analysis as A
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles

SPECIES = ("ribosome", "proteasome", "polymerase", "chaperonin", "nucleosome", "apoferritin")
SIZES = ("very big", "big", "medium", "small", "tiny", "big")


def _blobs(n: int = 360, dim: int = 32, spread: float = 0.25, seed: int = 0) -> Particles:
    """Well-separated Gaussian blobs (one per species) as L2-normalised embeddings."""
    rng = np.random.default_rng(seed)
    k = len(SPECIES)
    centers = rng.normal(size=(k, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    species = np.arange(n) % k
    emb = centers[species] + rng.normal(0, spread / np.sqrt(dim), (n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pd.DataFrame(
        {
            "particle_id": np.arange(1, n + 1),
            "z": rng.uniform(0, 100, n),
            "y": rng.uniform(0, 100, n),
            "x": rng.uniform(0, 100, n),
            "species": np.array(SPECIES)[species],
            "size_category": np.array(SIZES)[species],
        }
    )
    return Particles.from_table(
        table, tomogram="sim0", voxel_size=10.0, obsm={"embedding": emb.astype(np.float32)}
    )


class TinyEmbedder(torch.nn.Module):
    """Conforms to the subtomo_ssl contract: embed((n,1,B,B,B)) -> (n, D) L2-normalised."""

    task = "subtomo_ssl"

    def __init__(self, box: int = 8, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.box = box
        self.proj = torch.nn.Linear(box**3, dim)
        self.calls: list[tuple[int, ...]] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.nn.functional.normalize(self.proj(x.flatten(1)), dim=1)


def test_embed_batches_and_stores_normalised_embeddings():
    p = _blobs(n=50)
    rng = np.random.default_rng(1)
    boxes = rng.uniform(size=(50, 8, 8, 8)).astype(np.float32)
    model = TinyEmbedder()
    out = A.embed(
        p, model, subtomograms=boxes, batch_size=16, progress=False, key_added="ssl", rotations=1
    )
    assert out is None  # in place
    emb = p.obsm["ssl"]
    assert emb.shape == (50, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model.calls == [(16, 1, 8, 8, 8)] * 3 + [(2, 1, 8, 8, 8)]
    with torch.no_grad():
        direct = model.embed(torch.from_numpy(boxes[:, None])).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    assert p.uns["embed"]["ssl"]["dim"] == 16 and p.uns["embed"]["ssl"]["box"] == [8, 8, 8]


def test_embed_reads_lazy_subtomograms_from_store(tmp_path):
    p = _blobs(n=20)
    boxes = np.random.default_rng(2).uniform(size=(20, 8, 8, 8)).astype(np.float32)
    p.obsm["subtomograms"] = boxes
    p.save(tmp_path / "p.zarr")
    q = Particles.load(tmp_path / "p.zarr")
    A.embed(q, TinyEmbedder(), batch_size=7, progress=False)
    assert q.obsm.is_lazy("subtomograms")  # streamed batch by batch, not loaded whole
    r = A.embed(p, TinyEmbedder(), subtomograms=boxes[:, None], progress=False, copy=True)
    assert "embedding" in r.obsm and p.uns.get("embed") is None  # copy=True leaves p alone
    np.testing.assert_array_equal(p.obsm["embedding"], _blobs(n=20).obsm["embedding"])
    np.testing.assert_allclose(q.obsm["embedding"], r.obsm["embedding"], atol=1e-6)


def test_embed_bad_input():
    p = _blobs(n=10)
    with pytest.raises(InputError, match="no subtomograms"):
        A.embed(p, TinyEmbedder(), progress=False)
    with pytest.raises(InputError, match="embed\\(\\) method"):
        A.embed(p, torch.nn.Linear(2, 2), subtomograms=np.zeros((10, 8, 8, 8)))
    with pytest.raises(InputError, match="align"):
        A.embed(p, TinyEmbedder(), subtomograms=np.zeros((9, 8, 8, 8)), progress=False)
    with pytest.raises(InputError, match="empty selection"):
        A.embed(p.subset([]), TinyEmbedder(), subtomograms=np.zeros((0, 8, 8, 8)))


@pytest.mark.parametrize("n", [1, 4, 12, 24])
def test_cube_rotations_form_a_group_of_distinct_rotations(n):
    cube = torch.randn(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    group = A.cube_rotations(n)
    images = {g(cube).numpy().tobytes() for g in group}
    assert len(group) == n and len(images) == n
    # closed under composition, so the average over the group is invariant to its elements
    assert {g(h(cube)).numpy().tobytes() for g in group for h in group} == images
    # proper rotations only: no element equals a mirror image of the box
    mirrored = {g(torch.flip(cube, (4,))).numpy().tobytes() for g in A.cube_rotations(24)}
    assert not images & mirrored
    with pytest.raises(InputError, match="rotations"):
        A.cube_rotations(6)


def test_embed_rotation_average_is_invariant_to_the_group():
    p = _blobs(n=6)
    boxes = np.random.default_rng(4).uniform(size=(6, 8, 8, 8)).astype(np.float32)
    model = TinyEmbedder()
    A.embed(p, model, subtomograms=boxes, progress=False, key_added="one", rotations=1)
    A.embed(p, model, subtomograms=boxes, progress=False, key_added="avg", rotations=12)
    one, avg = p.obsm["one"], p.obsm["avg"]
    assert avg.shape == one.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(one, avg, atol=1e-3)
    assert (
        p.uns["embed"]["avg"]["rotations"] == 12 and p.uns["embed"]["avg"]["layer"] == "projection"
    )
    for g in A.cube_rotations(12):
        turned = g(torch.from_numpy(boxes[:, None]))[:, 0].numpy()
        A.embed(p, model, subtomograms=turned, progress=False, key_added="turned", rotations=12)
        np.testing.assert_allclose(p.obsm["turned"], avg, atol=1e-5)
    with pytest.raises(InputError, match="rotations"):
        A.embed(p, model, subtomograms=boxes, progress=False, rotations=3)
    with pytest.raises(InputError, match="cubic"):
        A.embed(p, model, subtomograms=np.zeros((6, 8, 8, 6), np.float32), rotations=4)


def test_embed_encoder_layer_gives_pooled_features_of_a_simsiam():
    from cryosiam_nb import models

    torch.manual_seed(0)
    model = models.build("subtomo_ssl", "tiny", patch_size=(8, 8, 8))
    p = _blobs(n=6)
    boxes = np.random.default_rng(5).uniform(size=(6, 8, 8, 8)).astype(np.float32)
    A.embed(p, model, subtomograms=boxes, progress=False, layer="encoder", rotations=1)
    A.embed(p, model, subtomograms=boxes, progress=False, key_added="auto", rotations=1)
    emb, auto = p.obsm["embedding"], p.obsm["auto"]
    np.testing.assert_array_equal(auto, emb)  # "auto" picks the encoder of a SimSiam
    enc = model.backbone.encoder
    fc, enc.fc = enc.fc, torch.nn.Identity()
    model.eval()  # embed() runs the model in eval mode (BatchNorm running statistics)
    try:
        with torch.no_grad():
            direct = model.backbone(torch.from_numpy(boxes[:, None]))
    finally:
        enc.fc = fc
    direct = torch.nn.functional.normalize(direct, dim=1).numpy()
    assert emb.shape == direct.shape and emb.shape[1] != model.embedding_dim
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    assert not enc.fc._forward_pre_hooks  # the capture hook is removed again
    A.embed(p, model, subtomograms=boxes, progress=False, key_added="proj", layer="projection")
    assert p.obsm["proj"].shape == (6, model.embedding_dim)
    with pytest.raises(InputError, match="layer='encoder'"):
        A.embed(p, TinyEmbedder(), subtomograms=boxes, progress=False, layer="encoder")
    with pytest.raises(InputError, match="layer must be"):
        A.embed(p, model, subtomograms=boxes, progress=False, layer="pooled")


def test_embed_pca_baseline_separates_distinct_templates():
    p = _blobs(n=60)
    rng = np.random.default_rng(3)
    templates = rng.uniform(size=(6, 6, 6, 6)).astype(np.float32)
    species = pd.Categorical(p.obs["species"], categories=SPECIES).codes
    boxes = templates[species] + rng.normal(0, 0.05, (60, 6, 6, 6)).astype(np.float32)
    mask = np.zeros((6, 6, 6), bool)
    mask[1:5, 1:5, 1:5] = True
    kw = {"subtomograms": boxes, "n_components": 8, "voxel_mask": mask, "batch_size": 16}
    A.embed_pca(p, **kw, progress=False)
    out = p.obsm["pca"]
    assert out.shape == (60, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert A.evaluate_classifier(p, method="knn", use_rep="pca")["macro_f1"] >= 0.9
    again = A.embed_pca(p, **kw, progress=False, copy=True)
    np.testing.assert_array_equal(out, again.obsm["pca"])
    with pytest.raises(InputError, match="voxel_mask shape"):
        A.embed_pca(p, **{**kw, "voxel_mask": mask[1:]}, progress=False)


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("knn", {"metric": "cosine", "k": 1}),
        ("knn", {"metric": "euclidean"}),
        ("mlp", {"max_iter": 200}),
    ],
)
def test_classifiers_reach_high_f1_on_separated_species(method, kwargs):
    p = _blobs()
    res = A.evaluate_classifier(p, method=method, seed=0, **kwargs)
    assert res["macro_f1"] >= 0.9
    assert set(res["per_class"]["class"]) == set(SPECIES)
    assert (res["per_class"]["f1"] >= 0.9).all()
    per_size = res["per_size_category"].set_index("size_category")
    assert set(per_size.index) == set(SIZES)
    assert (per_size["f1"] >= 0.9).all()
    assert per_size["support"].sum() == len(res["test_ids"]) == round(0.3 * len(p))
    # stratified: every species is in the held-out split in proportion
    held = p.obs.loc[res["test_ids"], "species"].value_counts()
    assert held.min() == held.max() == 18
    # seeded: identical split and predictions on a repeat
    again = A.evaluate_classifier(p, method=method, seed=0, **kwargs)
    assert again["test_ids"] == res["test_ids"]
    np.testing.assert_array_equal(again["predictions"], res["predictions"])


def test_classifier_scores_drop_on_random_labels():
    """The F1 check can fail: shuffled labels give chance-level scores."""
    p = _blobs()
    p.obs["species"] = np.random.default_rng(0).permutation(p.obs["species"].to_numpy())
    assert A.evaluate_classifier(p, method="knn")["macro_f1"] < 0.5


def test_classifier_predicts_unlabelled_particles():
    p = _blobs()
    truth = p.obs["species"].copy()
    p.obs.loc[p.ids[::4], "species"] = None  # unlabelled particles are not trained on
    clf = A.knn_classifier(p, labels_key="species")
    assert clf.params["n_train"] == len(p) - len(p.ids[::4])
    # rows= restricts training to a selection (mask or ids)
    first = np.zeros(len(p), bool)
    first[: len(p) // 2] = True
    n_first = int(p.obs["species"].notna().to_numpy()[first].sum())
    assert A.knn_classifier(p, rows=first).params["n_train"] == n_first
    assert A.knn_classifier(p, rows=p.ids[first]).params["n_train"] == n_first
    pred = clf.predict(p, key_added="predicted")
    assert (pred[::4] == truth.to_numpy()[::4]).mean() >= 0.9
    assert p.obs["predicted"].tolist() == pred.tolist()
    proba = A.mlp_classifier(p, max_iter=200).predict_proba(p)
    assert list(proba.columns) == sorted(SPECIES)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


def test_classifier_bad_input():
    p = _blobs(n=30)
    with pytest.raises(InputError, match="no label column 'kind'"):
        A.knn_classifier(p, labels_key="kind")
    with pytest.raises(InputError, match="metric"):
        A.knn_classifier(p, metric="manhattan")
    del p.obsm["embedding"]
    with pytest.raises(InputError, match="run tl.embed"):
        A.mlp_classifier(p)


def test_cluster_is_seeded_and_named_by_size():
    p = _blobs()
    assert A.cluster(p, k=6, seed=3) is None
    labels = p.obs["cluster"]
    assert set(labels) == {str(i) for i in range(6)}
    assert A.adjusted_rand(p) > 0.95
    sizes = p.obs["cluster"].value_counts()
    assert sizes.loc["0"] == sizes.max()
    q = _blobs()
    A.cluster(q, k=6, seed=3)
    assert q.obs["cluster"].tolist() == p.obs["cluster"].tolist()
    assert p.uns["cluster"]["k"] == 6 and p.uns["cluster"]["seed"] == 3
    with pytest.raises(InputError, match="k must be"):
        A.cluster(p, k=10_000)
    r = A.cluster(q, k=2, seed=0, key_added="km2", copy=True)
    assert "km2" in r.obs.columns and "km2" not in q.obs.columns and q.history == r.history[:1]


def test_subcluster_only_touches_chosen_clusters_and_recovers_species():
    p = _blobs()
    A.cluster(p, k=3, seed=0)  # 3 clusters for 6 species: each holds ~2 species
    before = p.obs["cluster"].copy()
    assert A.adjusted_rand(p) < 0.7
    chosen = ["0", "1"]
    assert A.subcluster(p, chosen, k=None, seed=0) is None
    untouched = ~before.isin(chosen)
    assert p.obs.loc[untouched, "cluster"].equals(before[untouched])
    for c in chosen:
        names = p.uns["cluster_subcluster"][c]["names"]
        assert names == [f"{c}.{i + 1}" for i in range(len(names))]
        inside = before == c
        assert set(p.obs.loc[inside, "cluster"]) == set(names)
        # eigengap estimate finds one sub-cluster per species in the chosen cluster
        assert len(names) == p.obs.loc[inside, "species"].nunique()
        assert p.uns["cluster_subcluster"][c]["estimated"] is True
    # purity inside the subclustered part
    part = p.obs[~untouched]
    assert part.groupby("cluster")["species"].nunique().max() == 1
    # seeded: identical result on a repeat
    q = _blobs()
    A.cluster(q, k=3, seed=0)
    A.subcluster(q, chosen, k=None, seed=0)
    assert q.obs["cluster"].tolist() == p.obs["cluster"].tolist()
    # undo restores the first-stage labels exactly; a second undo removes the column
    p.undo()
    assert p.obs["cluster"].equals(before)
    p.undo()
    assert "cluster" not in p.obs.columns


def test_subcluster_fixed_k_and_kmeans_method():
    p = _blobs()
    A.cluster(p, k=2, seed=0)
    A.subcluster(p, "0", k={"0": 4}, seed=1)
    assert p.uns["cluster_subcluster"]["0"]["names"] == ["0.1", "0.2", "0.3", "0.4"]
    q = A.subcluster(p, "1", method="kmeans", k=3, seed=1, copy=True)
    assert q.uns["cluster_subcluster"]["1"]["names"] == ["1.1", "1.2", "1.3"]
    assert "1" in p.clusters() and "1" not in q.clusters()  # copy=True leaves p alone
    assert set(q.clusters()) == {"0.1", "0.2", "0.3", "0.4", "1.1", "1.2", "1.3"}


def test_subcluster_bad_input():
    p = _blobs(n=60)
    with pytest.raises(InputError, match="run tl.cluster"):
        A.subcluster(p, ["0"])
    A.cluster(p, k=2)
    with pytest.raises(InputError, match="unknown cluster"):
        A.subcluster(p, ["7"])
    with pytest.raises(InputError, match="empty selection"):
        A.subcluster(p, [])
    with pytest.raises(InputError, match="method"):
        A.subcluster(p, ["0"], method="dbscan")
    with pytest.raises(InputError, match="adjusted_rand: obs has no column 'truth'"):
        A.adjusted_rand(p, truth_key="truth")


def _three_groups(n_per: int = 20, seed: int = 0) -> Particles:
    """Three well-separated groups in 8-d; cluster '0' is group a, cluster '1' groups b + c."""
    rng = np.random.default_rng(seed)
    group = np.repeat([0, 1, 2], n_per)
    emb = rng.normal(0, 5, (3, 8))[group] + rng.normal(0, 0.2, (3 * n_per, 8))
    table = pd.DataFrame({c: rng.uniform(0, 64, 3 * n_per) for c in ("z", "y", "x")})
    table["species"] = np.array(["a", "b", "c"])[group]
    table["cluster"] = np.where(group == 0, "0", "1")
    obsm = {"embedding": emb.astype(np.float32)}
    return Particles.from_table(table, tomogram="t", voxel_size=10.0, obsm=obsm)


def test_split_finds_hidden_groups_with_stable_names():
    p = _three_groups()
    ids = p.ids[p.obs["cluster"] == "1"]
    names = A.split(p, ids, k=None, seed=0)
    assert names == ["1.1", "1.2"]  # eigengap finds the two hidden groups
    assert p.obs.loc[ids].groupby("cluster")["species"].nunique().max() == 1
    assert set(p.obs.loc[p.obs["species"] == "a", "cluster"]) == {"0"}  # others untouched
    assert p.history[-1]["action"] == "split"
    assert p.history[-1]["params"]["use_rep"] == "embedding"
    q = _three_groups()
    A.split(q, ids, k=None, seed=0)
    assert q.obs["cluster"].tolist() == p.obs["cluster"].tolist()  # seeded repeat
    assert A.split(p, p.ids[p.obs["cluster"] == "1.1"], k=2, seed=0) == ["1.1.1", "1.1.2"]
    p.undo()
    p.undo()
    assert p.obs["cluster"].tolist() == _three_groups().obs["cluster"].tolist()
    with pytest.raises(InputError, match="at least 2"):
        A.split(p, p.ids[:1])
    del p.obsm["embedding"]
    with pytest.raises(InputError, match="run tl.embed"):
        A.split(p, p.ids[:10])


def test_spectral_helpers_validate_and_estimate():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(c, 0.1, (30, 4)) for c in (0, 5, 10, 15)])
    assert A.estimate_n_clusters(x, n_neighbors=10) == 4
    labels = A.spectral_split(x, k=4, seed=1)
    assert np.array_equal(labels, A.spectral_split(x, k=4, seed=1))
    assert len(np.unique(labels)) == 4
    assert np.bincount(labels).tolist() == sorted(np.bincount(labels), reverse=True)
    with pytest.raises(InputError, match="k must be"):
        A.spectral_split(x, k=1000)
    with pytest.raises(InputError, match="NaN"):
        A.spectral_split(np.full((5, 2), np.nan), k=2)


def test_particles_container_does_not_import_analysis():
    import ast
    from pathlib import Path

    import cryosiam_nb.particles as P

    for path in Path(P.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("cryosiam_nb.analysis"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("cryosiam_nb.analysis") for a in node.names)


def test_round_trip_after_analysis(tmp_path):
    p = _blobs(n=120)
    A.cluster(p, k=3)
    A.subcluster(p, ["0"], k=2)
    p.save(tmp_path / "p.zarr")
    q = Particles.load(tmp_path / "p.zarr")
    assert_frame_equal(q.obs, p.obs, check_exact=True)
    assert q.uns == p.uns and q.history == p.history
    q.undo()
    p.undo()
    assert_frame_equal(q.obs, p.obs, check_exact=True)


@pytest.mark.slow
def test_umap_seeded_repeat_and_subsample_transform():
    """One test so numba compiles UMAP once (fit + transform ≈ 20-100 s on 2 busy cores)."""
    p = _blobs(n=600, dim=16)
    assert A.umap(p, seed=0, progress=False) is None
    u1 = p.obsm["umap"].copy()
    assert u1.shape == (600, 2) and u1.dtype == np.float32 and np.isfinite(u1).all()
    assert p.uns["umap"]["n_fit"] == 600 and p.uns["umap"]["min_dist"] == 0.0
    u2 = A.umap(p, seed=0, progress=False, copy=True).obsm["umap"]
    np.testing.assert_array_equal(u1, u2)
    # species stay separated in 2-D: nearest neighbour in UMAP space is the same species
    d = ((u1[:, None] - u1[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    sp = p.obs["species"].to_numpy()
    assert (sp[d.argmin(1)] == sp).mean() > 0.9
    # above max_fit: fit on a seeded subsample, transform the rest in batches
    kw = {"seed": 1, "pca": 8, "max_fit": 300, "batch_size": 128, "progress": False}
    A.umap(p, **kw, key_added="u_sub")
    s1 = p.obsm["u_sub"]
    assert p.uns["u_sub"]["n_fit"] == 300 and np.isfinite(s1).all()
    A.umap(p, **kw, key_added="u_sub2")
    np.testing.assert_array_equal(s1, p.obsm["u_sub2"])
    d = ((s1[:, None] - s1[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (sp[d.argmin(1)] == sp).mean() > 0.9
    with pytest.raises(InputError, match="obsm\\['nothing'\\]"):
        A.umap(p, use_rep="nothing")
