"""The dataset runner (``cryosiam_nb.workflow``): a 2-worker LocalCluster gives the same
particles as running the tomograms one by one; a run killed midway resumes with only what
was missing; bad input fails per tomogram, naming the file. The default multi-task model
runs one ``tl.predict`` pass per tomogram; a dict of per-task models still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cryosiam_nb import io, models, sim, tl, workflow
from cryosiam_nb.io import InputError

SHAPE = (32, 64, 64)
N_TOMOS = 4
#: Fast simulations give a weak lamella probability: the tuned threshold of notebook 08.
OPTIONS = {"lamella_params": {"threshold": 0.5}, "rotations": 1}
COLUMNS = ["tomogram", "z", "y", "x", "n_voxels", "semantic_class", "cluster"]
#: The former defaults: one model per dense step.
PER_TASK = {step: f"tiny-{step}" for step in workflow.DENSE_STEPS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tomograms")
    for i in range(N_TOMOS):
        s = sim.simulate(SHAPE, voxel_size=10.0, seed=10 + i, mode="fast", progress=False)
        io.write(s.raw_noisy.assign_attrs(voxel_size=10.0), folder / f"tomo{i}.mrc")
    return folder


@pytest.fixture(scope="module")
def one_by_one(dataset, tmp_path_factory):
    """The reference: each tomogram on its own (``process_tomogram``), then combined."""
    out = tmp_path_factory.mktemp("one_by_one")
    with pytest.MonkeyPatch.context() as mp:
        passes = _count_passes(mp)
        infos = [
            workflow.process_tomogram(p, out, **OPTIONS) for p in sorted(dataset.glob("*.mrc"))
        ]
    assert [i["status"] for i in infos] == ["computed"] * N_TOMOS
    # the default multi-task model: one pass per tomogram for every dense output
    assert passes == [("multitask", False)] * N_TOMOS
    return out, workflow.combine(out)


def _count_passes(mp: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record ``(model.task, roi given)`` of every ``tl.predict`` call."""
    passes, predict = [], tl.predict

    def counted(data, model, **kwargs):
        passes.append((model.task, kwargs.get("roi") is not None))
        return predict(data, model, **kwargs)

    mp.setattr(tl, "predict", counted)
    return passes


def _same_particles(a, b) -> None:
    assert list(a.obs.index) == list(b.obs.index)
    pd.testing.assert_frame_equal(a.obs[COLUMNS], b.obs[COLUMNS])
    np.testing.assert_allclose(a.obsm["embedding"], b.obsm["embedding"], atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(a.obsm["subtomograms"]), np.asarray(b.obsm["subtomograms"])
    )


@pytest.mark.slow  # the one-by-one reference runs 4 tomograms (~40 s)
def test_one_by_one_finds_particles_in_every_tomogram(one_by_one):
    out, parts = one_by_one
    counts = parts.obs["tomogram"].value_counts()
    assert sorted(counts.index) == [f"tomo{i}" for i in range(N_TOMOS)]
    assert (counts >= 3).all(), counts
    assert parts.obs["cluster"].nunique() >= 2
    assert parts.obsm["umap"].shape == (len(parts), 2)
    for i in range(N_TOMOS):
        marker = json.loads((out / f"tomo{i}" / workflow.MARKER).read_text())
        assert marker["n_particles"] == counts[f"tomo{i}"]
        table = pd.read_csv(out / f"tomo{i}" / "particles.csv")
        assert len(table) == marker["n_particles"]
        labels = io.read(out / f"tomo{i}" / "instances.zarr", dtype=None)
        assert labels.shape == SHAPE and int(labels.max()) == len(table)
        settings = marker["settings"]
        assert set(settings["models"].values()) == {"tiny-multitask", "tiny-subtomo"}
        tuned = models.load("tiny-multitask").metadata["instance_defaults"]
        assert settings["instance_defaults"] == tuned
        # the model's tuned minimum component sizes are recorded and applied
        sem_defaults = models.load("tiny-multitask").metadata["semantic_defaults"]
        assert settings["semantic_defaults"] == sem_defaults
        sem = io.read(out / f"tomo{i}" / "semantic.zarr", dtype=None).values
        for c, size in enumerate(sem_defaults["min_size"]):
            comp, n = ndimage.label(sem == c)
            if c and n and size > 1:
                assert np.bincount(comp.ravel())[1:].min() >= size, (c, size)


@pytest.mark.slow
def test_killed_run_resumes_on_a_local_cluster_with_the_same_particles(
    dataset, one_by_one, tmp_path, monkeypatch
):
    """Killed in the 3rd tomogram; the rerun on a 2-worker LocalCluster computes only the
    missing ones and gives the particles of the one-by-one run."""
    from distributed import Client, LocalCluster

    pipeline, calls = workflow._pipeline, []

    def killed_in_the_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill: not caught per tomogram, stops the run
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(workflow, "_pipeline", killed_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        workflow.run_dataset(dataset, tmp_path, n_workers=1, progress=False, **OPTIONS)
    monkeypatch.undo()
    done = {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob(f"*/{workflow.MARKER}")}
    assert sorted(done) == sorted(calls[:2])
    # only complete folders are visible; what a hard kill leaves is a hidden temporary
    # sibling, removed by the next write of that tomogram (its writer's pid is gone)
    assert {p.name for p in tmp_path.iterdir()} == set(done)
    stale = tmp_path / f".{calls[2]}.tmp-999999999-deadbeef"
    (stale / "denoised.zarr").mkdir(parents=True)

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        parts = workflow.run_dataset(dataset, tmp_path, client=client, progress=False, **OPTIONS)
        assert len(client.scheduler_info()["workers"]) == 2
    everything = {f"tomo{i}" for i in range(N_TOMOS)}
    assert parts.uns["workflow"]["skipped"] == sorted(done)
    assert parts.uns["workflow"]["computed"] == sorted(everything - set(done))
    for name, mtime in done.items():  # the finished ones were not recomputed
        assert (tmp_path / name / workflow.MARKER).stat().st_mtime_ns == mtime
    assert not stale.exists()
    _same_particles(parts, one_by_one[1])
    saved = type(parts).load(tmp_path / "particles.zarr")
    assert list(saved.obs["cluster"]) == list(one_by_one[1].obs["cluster"])

    again = workflow.run_dataset(dataset, tmp_path, progress=False, **OPTIONS)  # all skipped
    assert again.uns["workflow"]["skipped"] == sorted(everything)
    _same_particles(again, one_by_one[1])


@pytest.mark.slow  # the one-by-one reference runs 4 tomograms (~40 s)
def test_a_bad_tomogram_fails_alone_naming_the_file(dataset, one_by_one, tmp_path):
    out, _ = one_by_one
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"not an MRC file at all" * 10)
    inputs = [*sorted(dataset.glob("*.mrc")), bad]
    with pytest.raises(RuntimeError, match=r"1 of 5 tomograms failed[\s\S]*broken"):
        workflow.run_dataset(inputs, out, progress=False, **OPTIONS)
    assert not (out / "broken").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".broken")]


@pytest.mark.slow  # the one-by-one reference runs 4 tomograms (~40 s)
def test_other_settings_on_a_finished_folder_are_refused(dataset, one_by_one):
    out, _ = one_by_one
    path = dataset / "tomo0.mrc"
    before = (out / "tomo0" / workflow.MARKER).stat().st_mtime_ns
    with pytest.raises(InputError, match="lamella_params"):
        workflow.process_tomogram(path, out, lamella_params={"threshold": 0.7}, rotations=1)
    with pytest.raises(InputError, match="instance_params"):
        workflow.run_dataset(dataset, out, instance_params={"min_size": 50}, **OPTIONS)
    with pytest.raises(InputError, match="instance_defaults, models, semantic_defaults differ"):
        workflow.process_tomogram(path, out, models=PER_TASK, **OPTIONS)
    again = workflow.process_tomogram(path, out, **OPTIONS)
    assert again["status"] == "skipped"
    # one model for the four dense steps, named as such: the default, so nothing to do
    dense = workflow.process_tomogram(path, out, models={"dense": "tiny-multitask"}, **OPTIONS)
    assert dense["status"] == "skipped"
    assert (out / "tomo0" / workflow.MARKER).stat().st_mtime_ns == before
    vols = workflow.tomograms(out)
    assert sorted(vols) == [f"tomo{i}" for i in range(N_TOMOS)]
    assert io.read(vols["tomo0"]).shape == SHAPE


def test_a_dict_of_per_task_models_runs_each_once(dataset, tmp_path, monkeypatch):
    """The former default, one model per dense step: four passes, the semantic and instance
    models inside the lamella; resumable like the default."""
    path = dataset / "tomo0.mrc"
    passes = _count_passes(monkeypatch)
    info = workflow.process_tomogram(path, tmp_path, models=PER_TASK, **OPTIONS)
    assert info["status"] == "computed"
    tasks = ["denoise", "lamella", "semantic", "instance"]
    assert passes == list(zip(tasks, [False, False, True, True]))
    assert info["settings"]["models"] == {**PER_TASK, "subtomo": "tiny-subtomo"}
    assert info["settings"]["instance_defaults"] == {}  # the per-task models have none
    table = pd.read_csv(tmp_path / "tomo0" / "particles.csv")
    assert len(table) == info["n_particles"] >= 3
    semantic = io.read(tmp_path / "tomo0" / "semantic.zarr", dtype=None).values
    lamella = io.read(tmp_path / "tomo0" / "lamella.zarr", dtype=None).values
    assert semantic.shape == SHAPE and not semantic[lamella == 0].any()
    again = workflow.process_tomogram(path, tmp_path, models=PER_TASK, **OPTIONS)
    assert again["status"] == "skipped" and len(passes) == 4


def test_test_time_augmentation_reaches_the_pass_and_the_marker(dataset, tmp_path, monkeypatch):
    """``tta=N`` runs the dense pass over N flips, is recorded in the marker, and a
    finished folder made with it is not silently reused without it."""
    path = dataset / "tomo0.mrc"
    seen, predict = [], tl.predict

    def recorded(data, model, **kwargs):
        seen.append(kwargs.get("tta"))
        ds = predict(data, model, **kwargs)
        seen.append(ds.attrs.get("tta_flips"))
        return ds

    monkeypatch.setattr(tl, "predict", recorded)
    info = workflow.process_tomogram(path, tmp_path, tta=2, **OPTIONS)
    assert info["status"] == "computed" and info["settings"]["tta"] == 2
    assert seen == [2, 2]  # one multi-task pass, over 2 flips
    with pytest.raises(InputError, match="tta differ"):
        workflow.process_tomogram(path, tmp_path, **OPTIONS)
    for bad in (9, -1, "8", 2.5):
        with pytest.raises(InputError, match="tta: True, False or a number of flips"):
            workflow.process_tomogram(path, tmp_path / "other", tta=bad, **OPTIONS)
    assert workflow.process_tomogram(path, tmp_path, tta=2, **OPTIONS)["status"] == "skipped"
    # off (the default) leaves the marker as before the option existed
    assert "tta" not in workflow._settings(
        workflow._resolve_models(None), None, True, None, None, "auto", 1
    )


def test_inputs_are_checked(dataset, tmp_path):
    assert list(workflow.list_inputs(dataset)) == [f"tomo{i}" for i in range(N_TOMOS)]
    assert list(workflow.list_inputs({"a": dataset / "tomo1.mrc"})) == ["a"]
    with pytest.raises(InputError, match="no such file"):
        workflow.list_inputs(tmp_path / "missing")
    with pytest.raises(InputError, match="no tomograms here"):
        workflow.list_inputs(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tomo1.mrc").write_bytes((dataset / "tomo1.mrc").read_bytes())
    with pytest.raises(InputError, match="also used by"):
        workflow.list_inputs([dataset / "tomo1.mrc", tmp_path / "b" / "tomo1.mrc"])
    with pytest.raises(InputError, match="unknown step"):
        workflow.run_dataset(dataset, tmp_path / "o", models={"denoiser": "tiny-denoise"})
    with pytest.raises(InputError, match="picker"):
        workflow.process_tomogram(dataset / "tomo0.mrc", tmp_path / "o", picker="magic")
    with pytest.raises(InputError, match="not finished"):
        workflow.combine(tmp_path / "o", names=["tomo0"])
