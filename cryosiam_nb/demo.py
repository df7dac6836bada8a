"""The end-to-end demo: simulate (or read) a tomogram and run the whole CryoSiam path.

simulate → write/read MRC → normalise → one multi-task pass (denoise, lamella, semantic,
instance heads) → lamella mask → semantic labels → instances →
particle table → subtomograms → SimSiam embeddings → k-means (+ spectral) → UMAP →
exports (RELION 4/5 STAR, CSV, copick) → static HTML report, with metrics against the
simulator's ground truth. Uses the tiny models shipped in ``cryosiam_nb/weights``.
"""

from __future__ import annotations

import base64
import io as _io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["run_demo"]

#: fewer particles than this from the instance model → density picking (announced).
MIN_PARTICLES = 5


def _fig_to_html(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _step(name: str, t0: float, timings: dict[str, float]) -> float:
    now = time.perf_counter()
    timings[name] = now - t0
    print(f"  {name:<34s} {now - t0:6.1f} s", flush=True)
    return now


def run_demo(
    out: str | Path = "demo_output",
    mrc: str | Path | None = None,
    voxel_size: float | None = None,
    invert: bool = True,
    fast: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline; write outputs + ``report.html`` into ``out``.

    With ``mrc=None`` a tomogram is simulated (``fast``: a smaller one) and metrics are
    computed against its ground truth; with ``mrc`` your tomogram is processed (voxel
    size in Å from the header or ``voxel_size``; ``invert`` for raw dark-protein data).
    ``progress`` shows progress bars of the long steps. Returns a dict with the metrics
    table, timings and output paths.
    """
    from cryosiam_nb import export, io, metrics, models, pp, sim, tl
    from cryosiam_nb.particles import Particles

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    print(f"cryosiam_nb demo → {out.resolve()}", flush=True)

    # ---------------------------------------------------------------- the tomogram
    truth = None
    if mrc is None:
        shape = (64, 128, 128) if fast else (96, 192, 192)
        simulation = sim.simulate(shape, voxel_size=10.0, sample="general", seed=seed, mode="tilt")
        truth = simulation.volumes
        raw = simulation.raw_noisy.assign_attrs(voxel_size=float(truth.attrs["voxel_size"]))
        io.write(raw, out / "tomogram.mrc", overwrite=True)
        simulation.particles.to_csv(out / "ground_truth_particles.csv", index=False)
        mrc, invert, name = out / "tomogram.mrc", True, "simulated"
        t0 = _step("simulate (tilt series + WBP)", t0, timings)
    else:
        name = Path(mrc).stem
    tomo = io.read(mrc, voxel_size=voxel_size)
    data = pp.normalize(tomo, invert=invert)
    model = models.load("tiny-multitask")
    if model.voxel_size and abs(model.voxel_size - data.attrs["voxel_size"]) > 0.5:
        data = pp.rescale(data, float(model.voxel_size))
    data = data.persist()
    vs = float(data.attrs["voxel_size"])
    t0 = _step("read + normalise", t0, timings)

    # ---------------------------------------------------------------- dense predictions
    # one multi-task pass: denoise, lamella, semantic and instance heads share the backbone
    pred = tl.predict(data, model).compute()
    den = pred["denoised"]
    io.write(den, out / "denoised.zarr", overwrite=True)
    t0 = _step("dense predictions (one pass, 4 heads)", t0, timings)

    lam_kw = dict(getattr(model, "metadata", {}).get("lamella_defaults", {}))
    lamella = tl.lamella_mask(pred, progress=progress, **lam_kw).compute()
    if int(lamella.sum()) == 0:
        lamella = lamella.copy(data=np.ones(lamella.shape, dtype=lamella.dtype))
    t0 = _step("lamella mask", t0, timings)

    sem = tl.outputs_of(pred, "semantic")
    sem["labels"] = sem["labels"].where(lamella > 0, 0).astype(np.uint8)
    # per-class minimum component sizes chosen on validation tomograms (model card)
    sem_kw = dict(model.metadata.get("semantic_defaults", {}))
    if sem_kw:
        sem["labels"] = tl.postprocess_semantic(sem["labels"], progress=False, **sem_kw)
    io.write(sem["labels"], out / "semantic.zarr", overwrite=True)
    t0 = _step("semantic segmentation", t0, timings)

    # post-processing settings chosen on the recipe's validation tomograms (model card)
    tuned = dict(model.metadata.get("instance_defaults", {}))
    labels = tl.instances(pred, min_size=10, roi=lamella, progress=progress, **tuned)
    picker = "tiny-multitask instance head"
    n_model = int(len(np.unique(labels.values)) - 1)
    if n_model < MIN_PARTICLES:
        # Said out loud, recorded in the metrics and the report: if the instance head finds
        # (almost) nothing, particles are picked by density from the denoised tomogram.
        print(
            f"  ! the instance head found {n_model} particles (< {MIN_PARTICLES}); "
            "picking by density on the denoised tomogram instead (segmentation."
            "maps_from_density)",
            flush=True,
        )
        picker = "density threshold of the denoised tomogram"
        dmaps = tl.maps_from_density(den, roi=lamella)
        labels = tl.instances(dmaps, min_size=10, progress=progress)
    io.write(labels.astype(np.uint32), out / "instances.zarr", overwrite=True)
    table = tl.particles(labels, tomogram=data, semantic=sem["labels"], name=name)
    t0 = _step(f"instances ({len(table)} particles)", t0, timings)

    # ---------------------------------------------------------------- particles
    if len(table) == 0:
        raise RuntimeError("the instance model found no particles; nothing to embed")
    sub_model = models.load("tiny-subtomo")
    box = int(sub_model.patch_size[0])
    subs = tl.extract_subtomograms(data, table, instances=labels, box=box, masking="strict")
    parts = Particles.from_table(table, tomogram=name, voxel_size=vs)
    parts.obsm["subtomograms"] = subs
    tl.embed(parts, sub_model, subtomograms=subs)
    k = int(min(8, max(2, len(parts) // 10)))
    tl.cluster(parts, k=k, seed=seed)
    biggest = parts.obs["cluster"].value_counts().index[0]
    if (parts.obs["cluster"] == biggest).sum() >= 12:
        tl.subcluster(parts, clusters=[biggest], k=2, seed=seed)
    tl.umap(parts, seed=seed)
    t0 = _step("embed + cluster + UMAP", t0, timings)

    # ---------------------------------------------------------------- exports
    # The voxel size comes from the particles' voxel_size column (Å).
    paths = {
        "relion4": export.write(parts, out / "particles_relion4.star", format="relion4"),
        "relion5": export.write(
            parts, out / "particles_relion5.star", format="relion5", tomogram_shape=data.shape
        ),
        "csv": export.write(parts, out / "particles.csv"),
        "copick": export.write(parts, out / "copick", format="copick", object_name="cluster"),
    }
    parts.save(out / "particles.zarr")
    paths["particles"] = out / "particles.zarr"

    # ---------------------------------------------------------------- metrics
    rows: list[dict[str, Any]] = []
    if truth is not None:
        clean = truth["clean"].values
        noisy01 = data.values
        rows.append({"metric": "PSNR noisy vs clean (dB)", "value": metrics.psnr(noisy01, clean)})
        rows.append(
            {"metric": "PSNR denoised vs clean (dB)", "value": metrics.psnr(den.values, clean)}
        )
        rows.append({"metric": "SSIM denoised vs clean", "value": metrics.ssim(den.values, clean)})
        names = dict(enumerate(sim.SEMANTIC_CLASSES))
        names.pop(0)
        dice = metrics.dice(sem["labels"].values, truth["semantic"].values, classes=names)
        for cls, v in dice.items():
            rows.append({"metric": f"Dice {cls}", "value": v})
        ap = metrics.average_precision(labels.values, truth["instances"].values)
        for t in (0.5, 0.6, 0.7, 0.8):
            rows.append({"metric": f"instance AP-{int(t * 100)}", "value": ap[f"AP{int(t * 100)}"]})
        gt = pd.read_csv(out / "ground_truth_particles.csv")
        pick = metrics.picking_scores(
            table[["z", "y", "x"]].to_numpy(), gt[["z", "y", "x"]].to_numpy(), radius=4.0
        )
        rows.append({"metric": "picking F1 (r = 4 voxels)", "value": pick["f1"]})
        if "species" in gt.columns:
            from scipy.spatial import cKDTree

            d, j = cKDTree(gt[["z", "y", "x"]].to_numpy()).query(table[["z", "y", "x"]])
            ok = d <= 4.0
            if ok.sum() >= 4:
                from sklearn.metrics import adjusted_rand_score

                ari = adjusted_rand_score(
                    gt["species"].to_numpy()[j[ok]], parts.obs["cluster"].to_numpy()[ok]
                )
                rows.append({"metric": "ARI clusters vs species (matched)", "value": ari})
    rows.append({"metric": "particles found", "value": float(len(parts))})
    rows.append({"metric": f"particles picked by: {picker}", "value": float(len(parts))})
    table_df = pd.DataFrame(rows)
    table_df["value"] = table_df["value"].astype(float).round(3)
    table_df.to_csv(out / "metrics.csv", index=False)

    # ---------------------------------------------------------------- report
    report = _write_report(out, data, den, sem, labels, lamella, parts, table_df, truth, timings)
    timings["total"] = time.perf_counter() - t_start
    print("\nMetrics" + (" (vs simulator ground truth)" if truth is not None else ""))
    print(table_df.to_string(index=False))
    print(f"\nTotal {timings['total']:.0f} s. Outputs in {out.resolve()}:")
    for key, p in {**paths, "report": report}.items():
        print(f"  {key:<10s} {p}")
    return {"metrics": table_df, "timings": timings, "paths": paths, "report": report}


def _write_report(
    out: Path,
    data: Any,
    den: Any,
    sem: Any,
    labels: Any,
    lamella: Any,
    parts: Any,
    metrics_df: pd.DataFrame,
    truth: Any,
    timings: dict[str, float],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryosiam_nb import pl
    from cryosiam_nb.io import atomic_path

    z = data.shape[0] // 2
    panels = [
        ("input (normalised)", data.values[z], "gray", None),
        ("denoised", den.values[z], "gray", None),
        ("semantic", sem["labels"].values[z], "tab10", (0, 9)),
        ("instances", np.where(labels.values[z] > 0, labels.values[z] % 20 + 1, 0), "tab20", None),
        ("lamella", lamella.values[z], "gray", (0, 1)),
    ]
    if truth is not None:
        panels.insert(1, ("clean (ground truth)", truth["clean"].values[z], "gray", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, img, cmap, lim) in zip(axes, panels):
        kw = {"vmin": lim[0], "vmax": lim[1]} if lim else {}
        ax.imshow(img, cmap=cmap, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"central xy slice z = {z} (voxel size {data.attrs['voxel_size']:.1f} Å)")
    slices_html = _fig_to_html(fig)

    clusters = parts.obs["cluster"].astype(str).to_numpy()
    fig = pl.umap(parts, color="cluster", size=12, title="particle UMAP coloured by cluster")
    umap_html = _fig_to_html(fig)

    timing_df = pd.DataFrame(
        {"step": list(timings), "seconds": np.round(list(timings.values()), 1)}
    )
    html = f"""<!doctype html><html><head><meta charset="utf-8">
<title>cryosiam_nb demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>cryosiam_nb demo report</h1>
<p>{len(parts)} particles, {len(set(clusters))} clusters. Axis order (z, y, x); voxel size
{data.attrs["voxel_size"]:.2f} Å.</p>
<h2>Slices</h2>{slices_html}
<h2>Particle embedding</h2>{umap_html}
<h2>Metrics</h2>{metrics_df.to_html(index=False)}
<h2>Timings</h2>{timing_df.to_html(index=False)}
</body></html>"""
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(html)
    return path
