"""Write the ordered notebooks in notebooks/ from the cell sources below (outputs stripped).

    python scripts/make_notebooks.py

Each notebook starts with a parameters cell (tagged ``parameters``, papermill style) that
defines ``FAST = False``; tests run every notebook with ``FAST = True``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]


MY_TOMOGRAM = "MY_TOMOGRAM = None   # your tomogram (.mrc / .rec / .zarr); None: a simulated one\n"
MY_VOXEL_SIZE = "MY_VOXEL_SIZE = None  # Å per voxel when the header is wrong; None: the header's\n"


def params(extra: str = MY_TOMOGRAM + MY_VOXEL_SIZE) -> nbformat.NotebookNode:
    src = (
        "# Parameters (papermill style). FAST = True runs a small version (used by the tests).\n"
        "FAST = False\n"
        "SEED = 0\n"
        'OUT = "nb_outputs"\n' + extra
    )
    return new_code_cell(src, metadata={"tags": ["parameters"]})


def own(step: str, simulated: str = "simulation", read: bool = True) -> list[nbformat.NotebookNode]:
    """The "use your own tomogram" cells: read ``MY_TOMOGRAM`` (else write the simulated
    raw tomogram as MRC and read it back, exactly as a file of yours), normalise (``read``),
    then ``step``."""
    return [
        new_markdown_cell(
            "## Use your own tomogram\n"
            "Set `MY_TOMOGRAM` (and `MY_VOXEL_SIZE` if the header is wrong) in the parameters "
            "cell and rerun. Without one, the simulated raw tomogram is written as MRC and read "
            "back, as a file of yours would be. Raw cryo-ET has dark protein: `invert=True` "
            "makes it bright for the models."
        ),
        new_code_cell(
            "path = Path(MY_TOMOGRAM) if MY_TOMOGRAM else io.write(\n"
            f'    {simulated}.raw_noisy, out / "my_tomogram.mrc", overwrite=True)\n'
            + (
                "mine = pp.normalize(io.read(path, voxel_size=MY_VOXEL_SIZE), invert=True)"
                ".persist()\n"
                if read
                else ""
            )
            + step
        ),
    ]


#: the "use your own tomogram" prediction: one multi-task pass streamed to zarr (chunk by
#: chunk, for tomograms larger than RAM); every later step reads the store
OWN_PREDICTION = (
    "import xarray as xr\n\n"
    "# one pass of every head, streamed to zarr; the steps below read the store\n"
    'store = tl.write_predictions(tl.predict(mine, model), out / f"{path.stem}_predictions.zarr")\n'
    "own_pred = xr.open_zarr(store, consolidated=False)\n"
)

SETUP = """\
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import cryosiam_nb as cs
from cryosiam_nb import io, metrics, models, pl, pp, sim, tl

out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)
SHAPE = (48, 96, 96) if FAST else (96, 192, 192)
"""

NB: dict[str, list[nbformat.NotebookNode]] = {}

NB["01_data_and_simulation"] = [
    new_markdown_cell(
        "# 1 · Data and simulation\n\n"
        "Open a tomogram with the right voxel size and axis order, normalise it out of core, "
        "and simulate tomograms with complete ground truth — the training data and the test "
        "oracle of everything that follows.\n\n"
        "Conventions: arrays are **(z, y, x)**; voxel sizes and coordinates are in **Å**; "
        "particle centres are in voxels."
    ),
    params(),
    new_code_cell(SETUP),
    new_markdown_cell(
        "## Simulate a tomogram\n"
        "A lamella with membranes, microtubules, actin, DNA and particles of many species, "
        "imaged as a ±60° tilt series with CTF and noise and reconstructed by weighted "
        "back-projection, so the missing wedge appears naturally."
    ),
    new_code_cell(
        'simulation = sim.simulate(SHAPE, voxel_size=10.0, sample="general", seed=SEED,\n'
        '                          mode="fast" if FAST else "tilt")\n'
        "simulation.volumes"
    ),
    new_code_cell("pl.slices(simulation)"),
    new_code_cell(
        'parts = simulation.particles\nprint(parts["size_category"].value_counts())\nparts.head()'
    ),
    new_markdown_cell(
        "## Use your own tomogram: read, check voxel size, normalise\n"
        "Set `MY_TOMOGRAM` in the parameters cell to open your file; without one the "
        "simulated raw-contrast volume is written as MRC and read back, exactly as your file "
        "would be. Raw cryo-ET has dark protein on bright ice; `invert=True` makes protein "
        "bright for the models. A header voxel size of 0 or 1 Å triggers a warning: then set "
        "`MY_VOXEL_SIZE` (it becomes `voxel_size=`). Nothing is read until needed (dask)."
    ),
    new_code_cell(
        "mrc = Path(MY_TOMOGRAM) if MY_TOMOGRAM else io.write(\n"
        '    simulation.raw_noisy, out / "tomogram.mrc", overwrite=True)\n'
        "tomo = io.read(mrc, voxel_size=MY_VOXEL_SIZE)\n"
        'print(tomo.dims, tomo.shape, tomo.attrs["voxel_size"], "Å")\n'
        "norm = pp.normalize(tomo, invert=True)\n"
        "norm"
    ),
    new_code_cell(
        'display(pl.orthoslices(norm, title=f"{mrc.name}, normalised, protein bright"))\n'
        "assert float(norm.min()) >= 0 and float(norm.max()) <= 1\n"
        'assert MY_TOMOGRAM or tomo.attrs["voxel_size"] == 10.0'
    ),
    new_markdown_cell(
        "## A training set\n`write_dataset` writes N tomograms + tables + a manifest; the "
        "same seed gives identical files."
    ),
    new_code_cell(
        'sim.write_dataset(out / "sim_dataset", n=2 if FAST else 4, shape=SHAPE, seed=SEED,\n'
        '                  mode="fast", overwrite=True)\n'
        'sim.dataset_table(out / "sim_dataset")'
    ),
]

NB["02_denoising"] = [
    new_markdown_cell(
        "# 2 · Denoising\n\nThe tiny denoiser shipped with the package (trained on the "
        "simulator by `python -m cryosiam_nb.training.recipe`) runs chunk by chunk with "
        "Gaussian-blended sliding windows, on CPU or GPU."
    ),
    params(),
    new_code_cell(SETUP),
    new_code_cell(
        "simulation = sim.simulate(SHAPE, voxel_size=10.0, seed=SEED + 100,\n"
        '                          mode="tilt")\n'
        'noisy = simulation.volumes["noisy"]          # already protein bright, in [0, 1]\n'
        'clean = simulation.volumes["clean"].values\n'
        'denoiser = models.load("tiny-denoise")\n'
        "denoiser"
    ),
    new_code_cell(
        'denoised = tl.predict(noisy, denoiser)["denoised"].compute()\n'
        "from scipy import ndimage\n"
        "gauss = ndimage.gaussian_filter(noisy.values, 1.0)\n"
        "table = pd.DataFrame({\n"
        '    "input": ["noisy", "Gaussian σ=1", "tiny denoiser"],\n'
        '    "PSNR (dB)": [metrics.psnr(v, clean) for v in (noisy.values, gauss, denoised.values)],\n'
        '    "SSIM": [metrics.ssim(v, clean) for v in (noisy.values, gauss, denoised.values)],\n'
        "}).round(3)\n"
        "table"
    ),
    new_code_cell(
        "z = SHAPE[0] // 2\n"
        "fig, axes = plt.subplots(1, 3, figsize=(12, 4))\n"
        'for ax, (title, img) in zip(axes, [("noisy", noisy.values), ("denoised", denoised.values), ("clean", clean)]):\n'
        '    ax.imshow(img[z], cmap="gray"); ax.set_title(title); ax.axis("off")\n'
        "plt.show()\n"
        'assert table.loc[2, "PSNR (dB)"] > table.loc[0, "PSNR (dB)"], "denoiser must beat the input"'
    ),
    new_markdown_cell(
        "## Big tomograms\nResults stream to zarr chunk by chunk: nothing tomogram-sized is "
        "held in memory."
    ),
    new_code_cell(
        'tl.write_predictions(tl.predict(noisy, denoiser), out / "denoised.zarr")\n'
        'io.read(out / "denoised.zarr/denoised")'
    ),
    *own(
        'tl.write_predictions(tl.predict(mine, denoiser), out / f"{path.stem}_denoised.zarr")\n'
        'pl.orthoslices(io.read(out / f"{path.stem}_denoised.zarr/denoised"),\n'
        '               title=f"{path.name}, denoised")'
    ),
]

NB["03_semantic_segmentation_and_lamella"] = [
    new_markdown_cell(
        "# 3 · Semantic segmentation and the lamella\n\nClasses: background, membrane, "
        "microtubule, particle, actin, DNA/RNA. One multi-task network, `tiny-multitask`, "
        "gives every dense output from a **single** backbone pass: the denoised tomogram, "
        "the lamella (sample) probabilities, the semantic probabilities, labels and distance, "
        "and the instance maps of notebook 4. The lamella mask then restricts every later "
        "step: here nothing outside the sample is labelled."
    ),
    params(),
    new_code_cell(SETUP),
    new_code_cell(
        "# extra membranes / filaments so that every class occurs in a small volume\n"
        'extra = {"vesicles": 12.0, "sheets": 3.0, "microtubules": 8.0, "actin": 20.0}\n'
        "simulation = sim.simulate(SHAPE, voxel_size=10.0, seed=SEED + 200, structures=extra,\n"
        '                          mode="tilt")\n'
        'noisy, truth = simulation.volumes["noisy"], simulation.volumes\n'
        'model = models.load("tiny-multitask")   # one backbone; denoise, lamella, semantic, instance heads\n'
        "pred = tl.predict(noisy, model).compute()  # one pass gives every head's outputs\n"
        "print(sorted(pred.data_vars))\n"
        "# the lamella head's probabilities, with the threshold calibrated on validation tomograms\n"
        'lamella = tl.lamella_mask(pred, **model.metadata["lamella_defaults"]).compute()\n'
        'print("lamella Dice:", metrics.dice(lamella.values, truth["lamella"].values)["mean"])'
    ),
    new_markdown_cell(
        "## Tune the lamella mask with sliders\n"
        "`tune_lamella` smooths and thresholds the lamella probabilities (the lamella head "
        "of `pred`) on a crop (every z, "
        "the central 128 × 128 in y, x) and shows xy and xz slices of the mask as you drag. "
        "Too high a threshold cuts the sample's edges; too low lets ice in. `apply()` runs "
        "the chosen values on the whole tomogram and returns them, ready for "
        "`tl.lamella_mask(..., **params)` or `workflow.run_dataset(lamella_params=...)`."
    ),
    new_code_cell(
        "from cryosiam_nb.pl.widgets import tune_lamella\n\n"
        'lamella_tuner = tune_lamella(pred, tomogram=noisy, instances=truth["instances"],\n'
        '                             **model.metadata["lamella_defaults"])\n'
        "lamella_tuner"
    ),
    new_code_cell(
        "# Setting a slider from code does what dragging it does:\n"
        'lamella_tuner.sliders["threshold"].value = 0.8\n'
        "print(lamella_tuner.status.value)\n"
        "lamella_params = lamella_tuner.apply()\n"
        "lamella = lamella_tuner.result.compute()\n"
        'print(lamella_params, "Dice:", metrics.dice(lamella.values, truth["lamella"].values)["mean"])'
    ),
    new_markdown_cell(
        "## Semantic classes\n"
        '`tl.outputs_of(pred, "semantic")` is the semantic head under the names a '
        "single-task model gives (`probabilities`, `labels`, `distance`). Labels outside "
        "the lamella are set to background, and `postprocess_semantic` drops specks: "
        "the model card's per-class minimum component sizes (`model.metadata"
        "['semantic_defaults']`, chosen on validation tomograms) remove the small bits of "
        "actin the network paints onto particles. `tl.predict` has already added the "
        "model's semantic offsets for the voxel size the data was acquired at (the "
        "network calls microtubules differently at 8, 10, 12 and 14 Å); "
        "`pred.attrs['semantic_offsets']` shows which."
    ),
    new_code_cell(
        'seg = tl.outputs_of(pred, "semantic")\n'
        'inside = seg["labels"].where(lamella > 0, 0).astype(np.uint8)  # nothing outside the sample\n'
        'print("offsets for data acquired at", pred.attrs.get("semantic_offsets_voxel_size"), "Å:",\n'
        '      pred.attrs.get("semantic_offsets"))\n'
        'print(model.metadata["semantic_defaults"])  # voxels per class, 0 = keep all\n'
        'labels = tl.postprocess_semantic(inside, **model.metadata["semantic_defaults"]).compute()\n'
        "names = {i: n for i, n in enumerate(sim.SEMANTIC_CLASSES) if i}\n"
        'dice = metrics.dice(labels.values, truth["semantic"].values, classes=names)\n'
        'pd.Series(dice, name="Dice").round(3)'
    ),
    new_code_cell(
        'display(pl.slices(truth.assign(predicted=labels), variables=["noisy", "semantic", "predicted"]))\n'
        "# the tiny model finds membranes and particles best; thin filaments (microtubules,\n"
        "# actin) are the hardest classes (per-class Dice: cryosiam_nb/weights/tiny-multitask.md)\n"
        'assert dice["membrane"] > 0.2, dice'
    ),
    *own(
        OWN_PREDICTION + "own_lamella = tl.lamella_mask(own_pred, **lamella_params)\n"
        'own_labels = tl.outputs_of(own_pred, "semantic")["labels"].where(own_lamella > 0, 0)\n'
        'pl.slices(mine, overlays={"semantic": own_labels, "lamella": own_lamella},\n'
        "          title=path.name)"
    ),
]

NB["04_instances_and_particles"] = [
    new_markdown_cell(
        "# 4 · Instances and particles\n\nThe instance head of the multi-task network "
        "(`tiny-multitask`, one `tl.predict` pass as in notebook 3) predicts foreground, "
        "boundary and distance maps. Seeded watershed on the predicted distance, "
        "refined by multicut (Kernighan–Lin) on the boundary map, then a particle table with "
        "centroids in voxels and Å, sizes and size categories, and subtomograms centred on "
        "each particle."
    ),
    params(),
    new_code_cell(SETUP),
    new_code_cell(
        "simulation = sim.simulate(SHAPE, voxel_size=10.0, seed=SEED + 300,\n"
        '                          mode="tilt")\n'
        'noisy, truth = simulation.volumes["noisy"], simulation.volumes\n'
        'model = models.load("tiny-multitask")\n'
        "pred = tl.predict(noisy, model).compute()  # one pass: every head's outputs\n"
        'lamella = tl.lamella_mask(pred, **model.metadata["lamella_defaults"]).compute()\n'
        "# post-processing settings chosen on the recipe's validation tomograms (model card)\n"
        'tuned = model.metadata["instance_defaults"]\n'
        "print(tuned)\n"
        "labels = tl.instances(pred, roi=lamella, min_size=10, **tuned)  # the instance head's maps\n"
        'ap = metrics.average_precision(labels.values, truth["instances"].values)\n'
        'pd.Series({k: ap[k] for k in ("AP50", "AP60", "AP70", "AP80", "mean")}).round(3)'
    ),
    new_markdown_cell(
        "What a perfect network would give: the same post-processing on maps derived from the "
        "ground-truth instances (this is the upper bound of the post-processing itself)."
    ),
    new_code_cell(
        'perfect = tl.instances(tl.maps_from_labels(truth["instances"]), min_size=5)\n'
        'ap_gt = metrics.average_precision(perfect.values, truth["instances"].values)\n'
        'print("AP-50 from ground-truth maps:", round(ap_gt["AP50"], 3))\n'
        'assert ap_gt["AP50"] >= 0.9'
    ),
    new_markdown_cell(
        "The shipped *tiny* multi-task model was trained on simulated tilt-series tomograms "
        "at 8–14 Å/voxel, rescaled to 10 Å (its model card, "
        "`cryosiam_nb/weights/tiny-multitask.md`, gives the held-out metrics and the "
        'post-processing defaults in `model.metadata["instance_defaults"]`): it finds the '
        "larger particles and misses many of the smallest (< 150 voxels). When it finds too "
        "few particles (e.g. on data unlike its training set), pick by density instead: "
        "`maps_from_density` thresholds the denoised tomogram (the same pass's `denoised` "
        "output; Otsu) and the same watershed + multicut splits it — a model-free baseline."
    ),
    new_code_cell(
        'maps = tl.outputs_of(pred, "instance")   # foreground, boundary, distance\n'
        "if len(np.unique(labels.values)) - 1 < 5:   # too few: pick by density instead\n"
        '    maps = tl.maps_from_density(pred["denoised"], roi=lamella)\n'
        "maps"
    ),
    new_markdown_cell(
        "## Tune the post-processing with sliders\n"
        "`tune_instances` reruns the watershed + multicut on a crop (at most 64 × 128 × 128 "
        "voxels) whenever a slider is released and shows the particle count and a slice of "
        "the labels; the sliders start at the model's tuned defaults. Foreground "
        "threshold: what counts as particle; seed distances (voxels): "
        "how far inside a particle its seed must be — larger splits fewer touching "
        "particles; boundary bias β: larger splits more; minimum size drops specks. "
        "`apply()` runs the whole tomogram and returns the parameters for `tl.instances` or "
        "`workflow.run_dataset(instance_params=...)`."
    ),
    new_code_cell(
        "from cryosiam_nb.pl.widgets import tune_instances\n\n"
        "tuner = tune_instances(maps, tomogram=noisy, roi=lamella, min_size=10, **tuned)\n"
        "tuner"
    ),
    new_code_cell(
        "# Setting a slider from code does what dragging it does:\n"
        'tuner.sliders["min_size"].value = 20\n'
        'print(tuner.n_particles, "particles in the crop")\n'
        "instance_params = tuner.apply()\n"
        "labels = tuner.result\n"
        'table = tl.particles(labels, tomogram=noisy, name="sim")\n'
        'pick = metrics.picking_scores(table[["z", "y", "x"]].to_numpy(),\n'
        '                              simulation.particles[["z", "y", "x"]].to_numpy(), radius=4)\n'
        "print(instance_params)\n"
        'print(len(table), "particles; picking F1 vs ground truth:", round(pick["f1"], 3))\n'
        "assert len(table) > 0\n"
        "table.head()"
    ),
    new_code_cell(
        'subs = tl.extract_subtomograms(noisy, table, instances=labels, box=32, masking="strict")\n'
        "fig, axes = plt.subplots(2, 8, figsize=(14, 4))\n"
        "for ax, s in zip(axes.ravel(), subs):\n"
        '    ax.imshow(s[16], cmap="gray"); ax.axis("off")\n'
        'plt.suptitle("central xy slices of subtomograms (strict mask)"); plt.show()'
    ),
    new_code_cell(
        "from cryosiam_nb import export\n"
        'export.write(table, out / "particles.star", format="relion4", voxel_size=10.0)\n'
        'export.read_star(out / "particles.star").head()'
    ),
    *own(
        OWN_PREDICTION + "own_lamella = tl.lamella_mask(own_pred)\n"
        "own_labels = tl.instances(own_pred, roi=own_lamella, **instance_params)\n"
        "own_table = tl.particles(own_labels, tomogram=mine, name=path.stem)\n"
        'print(len(own_table), "particles in", path.name)\n'
        'pl.slices(mine, overlays={"instances": own_labels}, title=path.name)'
    ),
]

NB["05_embeddings_and_cluster_curation"] = [
    new_markdown_cell(
        "# 5 · Embeddings and cluster curation\n\nEmbed every particle with the subtomogram "
        "SimSiam, cluster with K-means, split chosen clusters with spectral clustering, look "
        "at the UMAP, and curate in the explorer: select, inspect the gallery, merge, split, "
        "exclude, undo, export."
    ),
    params(),
    new_code_cell(SETUP),
    new_code_cell(
        "simulation = sim.simulate(SHAPE, voxel_size=10.0, seed=SEED + 400,\n"
        '                          mode="tilt")\n'
        'noisy, truth = simulation.volumes["noisy"], simulation.volumes\n'
        'model = models.load("tiny-subtomo")\n'
        "box = int(model.patch_size[0])\n"
        'gt = simulation.particles.rename(columns={"id": "particle_id"})   # ground-truth particles\n'
        'subs = tl.extract_subtomograms(noisy, gt, instances=truth["instances"], box=box, masking="strict")\n'
        'parts = cs.Particles.from_table(gt, tomogram="sim", voxel_size=10.0)\n'
        'parts.obsm["subtomograms"] = subs\n'
        "tl.embed(parts, model, subtomograms=subs)\n"
        "len(parts)"
    ),
    new_code_cell(
        "tl.cluster(parts, k=min(6, len(parts) // 4), seed=SEED)\n"
        'largest = parts.obs["cluster"].value_counts().index[0]\n'
        "tl.subcluster(parts, clusters=[largest], k=2, seed=SEED)\n"
        "tl.umap(parts, seed=SEED)\n"
        'pd.crosstab(parts.obs["species"], parts.obs["cluster"])'
    ),
    new_code_cell('pl.umap(parts, color="cluster")'),
    new_code_cell('pl.umap(parts, color="species")   # the ground truth, for comparison'),
    new_markdown_cell(
        "## The explorer\nBox- or lasso-select points on the UMAP to see a gallery of those "
        "particles and where they are in the tomogram; name, merge, split or exclude "
        "clusters; export the selection to STAR / CSV / copick. In JupyterLab the app shows "
        "inline below (Panel's Jupyter support, the `[jupyter]` extra); "
        "`cryosiam-nb explore particles.zarr` serves the same app in a browser tab."
    ),
    new_code_cell(
        "import panel as pn\n\n"
        "pn.extension(inline=True)  # BokehJS/Panel from the package, not a CDN: works offline\n"
        'app = pl.explorer(parts, tomograms={"sim": noisy})\n'
        "app"
    ),
    new_code_cell(
        "# Every button has a Python method; a selection made here shows in the app's gallery.\n"
        "app.select_clusters([app.clusters()[0]])\n"
        'print(len(app.selected_ids), "particles selected:", app.selected_ids[:4], "...")\n'
        "assert len(app.selected_ids) > 0"
    ),
    new_code_cell(
        "# The same curation from Python, e.g. in a script:\n"
        "a, b = sorted(parts.obs['cluster'].unique())[:2]\n"
        "merged = parts.merge_clusters([a, b])\n"
        'print("after merge:", sorted(parts.obs["cluster"].unique()))\n'
        "parts.undo()\n"
        'print("after undo:", sorted(parts.obs["cluster"].unique()))\n'
        'assert a in set(parts.obs["cluster"]) and b in set(parts.obs["cluster"])\n'
        'parts.save(out / "particles.zarr")\n'
        'cs.Particles.load(out / "particles.zarr")'
    ),
    *own(
        "# the whole per-tomogram pipeline in one call (notebook 8 runs it over a dataset)\n"
        "from cryosiam_nb import workflow\n\n"
        'workflow.process_tomogram(path, out / "mine", voxel_size=MY_VOXEL_SIZE, overwrite=True)\n'
        'own_parts = workflow.combine(out / "mine")\n'
        'pl.explorer(own_parts, tomograms=workflow.tomograms(out / "mine"))',
        read=False,
    ),
]

NB["06_train_on_your_data"] = [
    new_markdown_cell(
        "# 6 · Train on your data\n\nSimulate tomograms that look like yours (voxel size, "
        "defocus, thickness), pretrain the dense self-supervised backbone (DenseSimSiam), "
        "then fine-tune task heads — all on a CPU with the `tiny` preset. On a GPU, use "
        '`preset="paper"` and the thesis budgets (SPEC §2).'
    ),
    params(
        MY_TOMOGRAM + "MY_VOXEL_SIZE = 10.0   # Å/voxel of your tomograms\nMY_DEFOCUS_UM = 3.0\n"
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "from cryosiam_nb.training import finetune, pretrain_dense\n"
        "sims = [sim.simulate(SHAPE, voxel_size=MY_VOXEL_SIZE, defocus_um=MY_DEFOCUS_UM,\n"
        '                     seed=SEED + i, mode="fast") for i in range(2 if FAST else 4)]\n'
        'backbone, hist_ssl = pretrain_dense(sims, preset="tiny", epochs=1 if FAST else 10,\n'
        "                                    samples_per_epoch=4 if FAST else 64,\n"
        '                                    seed=SEED, out=out / "ssl")\n'
        "hist_ssl.tail()"
    ),
    new_code_cell(
        'seg_model, hist = finetune("semantic", sims, backbone=backbone, freeze="encoder",\n'
        "                           epochs=1 if FAST else 10, samples_per_epoch=4 if FAST else 32,\n"
        '                           seed=SEED, out=out / "semantic")\n'
        "pl.loss_curves(hist)"
    ),
    new_code_cell(
        'ckpt = models.save(seg_model, out / "my-semantic.pt")\n'
        "again = models.load(ckpt)\n"
        "print(again.task, again.voxel_size, again.patch_size)\n"
        'assert again.task == "semantic"'
    ),
    *own(
        "pred = tl.predict(mine, again)\n"
        'pl.slices(mine, overlays={"semantic": pred["labels"]}, title=f"{path.name}: your model")',
        simulated="sims[0]",
    ),
]

NB["07_published_cryosiam_checkpoints"] = [
    new_markdown_cell(
        "# 7 · Published CryoSiam v1.0 checkpoints\n\nIf you have the published CryoSiam "
        "v1.0 checkpoints (Lightning `.ckpt` files), put them in a folder and set "
        "`CKPT_DIR` below. `models.load` reads them safely (`weights_only=True`; a file "
        "that needs arbitrary pickled objects is refused unless you pass `trusted=True`) "
        "and checks that every key is used. Nothing is downloaded.\n\n"
        "Without checkpoints the notebook still shows the API on a checkpoint with the "
        "published layout and **random** weights (its predictions are meaningless)."
    ),
    params(MY_TOMOGRAM + MY_VOXEL_SIZE + 'CKPT_DIR = "~/cryosiam_checkpoints"\n'),
    new_code_cell(SETUP),
    new_code_cell(
        'ckpts = sorted(Path(CKPT_DIR).expanduser().glob("*.ckpt"))\n'
        "if ckpts:\n"
        '    print("found:", *[c.name for c in ckpts], sep="\\n  ")\n'
        "else:\n"
        '    print(f"No .ckpt files in {CKPT_DIR}; using a random checkpoint with the published layout.")\n'
        "    # a tiny semantic network with random weights, written in the published layout\n"
        '    random_net = models.build("semantic", preset="tiny")\n'
        '    ckpts = [models.export_lightning(random_net, out / "random_semantic_layout.ckpt")]'
    ),
    new_code_cell(
        "model = models.load(ckpts[0])\n"
        "print(model.task, model.patch_size, model.class_names)\n"
        'simulation = sim.simulate(SHAPE, voxel_size=10.0, seed=SEED, mode="fast")'
    ),
    *own("pred = tl.predict(mine, model, patch_size=(32, 32, 32) if FAST else None)\npred"),
]


NB["08_a_whole_dataset"] = [
    new_markdown_cell(
        "# 8 · A whole dataset\n\n`workflow.run_dataset` runs the dense pipeline of "
        "notebooks 2–5 (normalise → one `tiny-multitask` pass for the denoised, lamella, "
        "semantic and instance maps → lamella mask → semantic labels → instances with the "
        "model's tuned settings → particle table → subtomograms → embedding) on every "
        "tomogram of a folder, one dask task per tomogram on a `dask.distributed` cluster, "
        "then clusters all particles together.\n\n"
        "- Each tomogram's outputs land in `<out>/<tomogram>/` only once complete (written "
        "to a temporary folder, then renamed) with a completion marker `_complete.json`.\n"
        "- **Resumable**: a rerun skips finished tomograms, so after a crash, a kill or a "
        "new tomogram only what is missing is computed.\n"
        "- The result is one `Particles` object for the whole dataset, ready for the "
        "explorer and export.\n"
        '- Your own models: `models={"dense": "my_multitask.pt"}`, or one per step '
        "(`denoise`, `lamella`, `semantic`, `instance`, `subtomo`); a model named by "
        "several steps runs once per tomogram."
    ),
    params(
        "N_TOMOGRAMS = 4\n"
        "MY_TOMOGRAMS = None  # a folder of .mrc/.rec/.zarr, a copick project or a Data Portal "
        "download\n"
        "N_WORKERS = 2       # dask workers (processes); each loads the models once\n"
        + MY_VOXEL_SIZE
    ),
    new_code_cell(SETUP),
    new_markdown_cell(
        "## A small simulated dataset\nA few tomograms written as MRC files with their "
        "ground-truth particle tables, as a microscope session would give you a folder of "
        "reconstructions."
    ),
    new_code_cell(
        'folder = out / "tomograms"\n'
        "folder.mkdir(exist_ok=True)\n"
        "SIM_SHAPE = (32, 64, 64) if FAST else (64, 128, 128)\n"
        "truth = {}\n"
        "for i in range(N_TOMOGRAMS):\n"
        '    s = sim.simulate(SIM_SHAPE, voxel_size=10.0, seed=SEED + i, mode="fast" if FAST else "tilt",\n'
        "                     progress=False)\n"
        '    io.write(s.raw_noisy, folder / f"tomo{i}.mrc", overwrite=True)\n'
        '    truth[f"tomo{i}"] = s.particles\n'
        "sorted(p.name for p in folder.iterdir())"
    ),
    new_markdown_cell(
        "## Choose the settings on one tomogram\n"
        "Tune the lamella threshold with the slider on the first tomogram (notebook 3 "
        "explains the tuner), on the lamella head of the same multi-task model the run "
        "uses; the chosen values go to every tomogram. The fast simulations have a weak "
        "lamella signal, so a lower threshold is needed there."
    ),
    new_code_cell(
        "from cryosiam_nb.pl.widgets import tune_lamella\n\n"
        'first = pp.normalize(io.read(folder / "tomo0.mrc"), invert=True).persist()\n'
        'pred = tl.predict(first, models.load("tiny-multitask"))  # every head; the tuner reads the lamella one\n'
        "lamella_tuner = tune_lamella(pred, tomogram=first)\n"
        "lamella_tuner"
    ),
    new_code_cell(
        "# Setting a slider from code does what dragging it does:\n"
        'lamella_tuner.sliders["threshold"].value = 0.5 if FAST else 0.7\n'
        "print(lamella_tuner.status.value)\n"
        "lamella_params = lamella_tuner.params\n"
        "lamella_params"
    ),
    new_markdown_cell(
        "## Run the dataset on a local dask cluster\n"
        "`LocalCluster` starts worker processes on this machine; on an HPC system use a "
        "`dask_jobqueue` cluster (SLURM, PBS) or any `Client` instead — the call is the "
        "same. The progress bar counts finished tomograms."
    ),
    new_code_cell(
        "from distributed import Client, LocalCluster\n\n"
        "from cryosiam_nb import workflow\n\n"
        "cluster = LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, dashboard_address=None)\n"
        "client = Client(cluster)\n"
        "client"
    ),
    new_code_cell(
        "# Your own dataset: set MY_TOMOGRAMS in the parameters cell (a folder of tomograms, a\n"
        "# copick project or a CryoET Data Portal download); MY_VOXEL_SIZE if the headers are wrong.\n"
        "inputs = Path(MY_TOMOGRAMS) if MY_TOMOGRAMS else folder\n"
        "print(workflow.list_inputs(inputs))\n"
        "settings = dict(lamella_params=lamella_params, rotations=1 if FAST else 12, voxel_size=MY_VOXEL_SIZE)\n"
        'parts = workflow.run_dataset(inputs, out / "dataset", client=client, seed=SEED, **settings)\n'
        "parts"
    ),
    new_code_cell(
        "# Run it again: every tomogram is finished, nothing is recomputed.\n"
        'again = workflow.run_dataset(inputs, out / "dataset", client=client, seed=SEED, **settings)\n'
        'print("computed:", again.uns["workflow"]["computed"], " skipped:", again.uns["workflow"]["skipped"])\n'
        'assert again.uns["workflow"]["computed"] == []\n'
        'pd.DataFrame([workflow.finished(out / "dataset" / n) for n in workflow.list_inputs(inputs)])'
        '[["name", "n_particles", "picker", "seconds"]]'
    ),
    new_markdown_cell(
        "## All particles together\nOne k-means over every tomogram's embeddings: the same "
        "kind of particle gets the same cluster wherever it was picked."
    ),
    new_code_cell('pl.umap(parts, color="cluster")'),
    new_code_cell('pl.umap(parts, color="tomogram")'),
    new_code_cell(
        "# Simulated data only: match each pick to the nearest true particle (≤ 4 voxels)\n"
        "from scipy.spatial import cKDTree\n\n"
        'species = pd.Series("unmatched", index=parts.obs.index)\n'
        'for name, rows in parts.obs.groupby("tomogram"):\n'
        "    if name in truth:\n"
        '        d, j = cKDTree(truth[name][["z", "y", "x"]]).query(rows[["z", "y", "x"]])\n'
        '        species[rows.index] = np.where(d <= 4, truth[name]["species"].to_numpy()[j], "unmatched")\n'
        'parts.obs["species"] = species\n'
        'pd.crosstab(parts.obs["species"], parts.obs["cluster"])'
    ),
    new_markdown_cell(
        "## Curate the whole dataset\nThe explorer shows every tomogram; the slice viewer "
        "switches to the tomogram of the particle you click (the denoised volumes written "
        "by the run)."
    ),
    new_code_cell(
        "import panel as pn\n\n"
        "pn.extension(inline=True)  # BokehJS/Panel from the package, not a CDN: works offline\n"
        'app = pl.explorer(parts, tomograms=workflow.tomograms(out / "dataset"))\n'
        "app"
    ),
    new_code_cell(
        "# The same curation from Python: merge the two smallest clusters, exclude the\n"
        "# unmatched picks, export the rest for subtomogram averaging.\n"
        "from cryosiam_nb import export\n\n"
        'smallest = parts.obs["cluster"].value_counts().index[-2:].tolist()\n'
        "app.merge(smallest)\n"
        'app.select_ids(parts.obs.index[parts.obs["species"] == "unmatched"])\n'
        'print("excluded", app.exclude_selection(), "unmatched picks")\n'
        'star = export.write(parts.subset(~parts.obs["excluded"].to_numpy()), out / "dataset.star")\n'
        'parts.save(out / "dataset" / "curated.zarr")\n'
        'print(len(export.read_star(star)), "particles in", star.name)\n'
        "assert len(export.read_star(star)) == int((~parts.obs['excluded']).sum())"
    ),
    new_code_cell("client.close()\ncluster.close()"),
]


def main() -> None:
    folder = ROOT / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, cells in NB.items():
        nb = new_notebook(cells=cells)
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
            cell["id"] = f"{name[:2]}-{i:02d}"
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
        print("wrote", folder / f"{name}.ipynb")


if __name__ == "__main__":
    main()
