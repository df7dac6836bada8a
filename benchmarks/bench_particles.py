"""Benchmark: particle identification (issue 7).

1. UMAP of N random 256-d points (full: 1,000,000; fit on a 200,000 seeded subsample,
   ``transform`` the rest in batches) — wall time and peak RSS of a fresh child process.
   Target: < 10 min and < 6 GiB on 2 cores.
2. Species identification on simulated particles (≥ 6 species, all size categories, noisy
   ``mode="fast"`` tomograms, strict-masked subtomograms): k-NN and MLP F1 per size category
   for (a) SimSiam embeddings, (b) SimSiam + contrastive refinement, (c) PCA of the raw masked
   voxels; adjusted Rand index of k-means and of k-means + spectral vs the true species.
   Parts whose modules are missing print "not available".

   The SimSiam model is the shipped ``tiny-subtomo`` (trained by the recipe on *other*
   simulated tomograms, no labels) when its box matches ``--box``; otherwise one is trained
   here on all the benchmark's subtomograms (no labels). (a) is ``analysis.embed(...,
   layer=--layer, rotations=--rotations)``: by default the encoder's pooled features averaged
   over the 12 rotations of the tetrahedral group of the box (a small network is far from
   rotation invariant; the particles lie in random orientations). Two control rows show what
   that choice buys: "(a) SSL projection, 1 orientation" (``model.embed`` of the box as is)
   and "(c) PCA of rotation-averaged voxels" (the same rotation averaging applied to the raw
   voxels before PCA). (b) refines on the classifiers' training split only and embeds with
   the projection (what the contrastive loss trains), same rotations. Classifiers are scored
   on the same seeded, stratified 30 % held-out split for every embedding.

    python benchmarks/bench_particles.py [--quick] [--skip-umap] [--skip-species]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, run_isolated  # noqa: E402

UMAP_CHILD = """
import os, time
import numpy as np
import pandas as pd
from cryosiam_nb.particles import Particles
from cryosiam_nb import analysis
n, dim = {n}, {dim}
t0 = time.perf_counter()
rng = np.random.default_rng(0)
x = np.empty((n, dim), dtype=np.float32)
for s in range(0, n, 100_000):
    x[s:s + 100_000] = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
obs = pd.DataFrame({{"tomogram": "rand", "z": 0.0, "y": 0.0, "x": 0.0, "voxel_size": 10.0}},
                   index=[f"rand:{{i}}" for i in range(n)])
p = Particles(obs, {{"embedding": x}})
del x
t1 = time.perf_counter()
c1 = time.process_time()
analysis.umap(p, n_neighbors=10, min_dist=0.0, seed=0, pca={pca}, max_fit={max_fit},
              progress=False)
u = p.obsm["umap"]
t2 = time.perf_counter()
assert u.shape == (n, 2) and np.isfinite(u).all()
print('GEN_SECONDS', t1 - t0)
print('SECONDS', t2 - t1)
print('CPU_SECONDS', time.process_time() - c1)
"""


def bench_umap(n: int, dim: int, max_fit: int, pca: int | None) -> dict:
    code = UMAP_CHILD.format(n=n, dim=dim, max_fit=max_fit, pca=pca)
    stdout, peak = run_isolated(code, timeout=4 * 3600)
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in stdout.splitlines() if ln.strip()}
    return {
        "points": n,
        "dim": dim,
        "max_fit": max_fit,
        "pca": pca or "-",
        "umap wall s": round(vals["SECONDS"], 1),
        "umap CPU s": round(vals["CPU_SECONDS"], 1),
        "data gen seconds": round(vals["GEN_SECONDS"], 1),
        "peak RSS GiB": round(peak, 2),
        "target": "< 600 s, < 6 GiB" if n >= 1_000_000 else "-",
    }


# ----------------------------------------------------------------------------- species
def _available(*modules: str) -> str | None:
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as err:  # noqa: BLE001
            return f"{m}: {err}"
    return None


def simulate_particles(n_tomo: int, shape: tuple[int, int, int], box: int, cap: int, min_n: int):
    """Simulated particles with strict-masked noisy subtomograms, balanced per species."""
    from cryosiam_nb import sim
    from cryosiam_nb.particles import Particles, concat
    from cryosiam_nb.segmentation import extract_subtomograms

    parts = []
    for seed in range(n_tomo):
        s = sim.simulate(shape, voxel_size=10.0, mode="fast", seed=seed, progress=False)
        table = s.particles
        p = Particles.from_table(table, tomogram=f"sim{seed}", voxel_size=10.0)
        boxes = extract_subtomograms(
            s.volumes["noisy"],
            table.rename(columns={"id": "particle_id"}),
            instances=s.volumes["instances"],
            box=box,
            masking="strict",
            progress=False,
        )
        p.obsm["subtomograms"] = boxes.astype(np.float32)
        parts.append(p)
    p = concat(parts)
    rng = np.random.default_rng(0)
    keep = []
    for _, ids in p.obs.groupby("species", observed=True).groups.items():
        ids = list(ids)
        if len(ids) >= min_n:
            keep.extend(rng.choice(ids, size=min(cap, len(ids)), replace=False).tolist())
    return p.subset(sorted(keep, key=p.obs.index.get_loc))


def bench_species(
    quick: bool,
    epochs: int,
    con_epochs: int,
    box: int,
    n_tomo: int,
    ssl_samples: int,
    model_path: str | None,
    layer: str = "encoder",
    rotations: int = 12,
    threads: int = 2,
) -> None:
    missing = _available(
        "cryosiam_nb.sim", "cryosiam_nb.segmentation", "cryosiam_nb.models", "cryosiam_nb.training"
    )
    if missing:
        print(f"species identification benchmark: not available ({missing})")
        return
    import torch

    from cryosiam_nb import analysis, models, training

    torch.set_num_threads(threads)
    model = None
    if model_path is not None:
        model = models.load(model_path)
        box = int(model.patch_size[0])
        print(f"using {model_path} (box {box})", flush=True)
    t0 = time.perf_counter()
    if quick:
        p = simulate_particles(n_tomo, (48, 128, 128), box, cap=20, min_n=6)
    else:
        p = simulate_particles(n_tomo, (64, 160, 160), box, cap=40, min_n=8)
    t_sim = time.perf_counter() - t0
    n_species = p.obs["species"].nunique()
    print(
        f"simulated {len(p)} particles, {n_species} species, size categories "
        f"{p.obs['size_category'].value_counts().to_dict()} in {t_sim:.0f} s",
        flush=True,
    )
    subs = p.obsm["subtomograms"]
    timings = {"simulate + extract": t_sim}

    # (a) SimSiam: the shipped model, or one trained on all particles' subtomograms (no labels)
    t = time.perf_counter()
    source = "given model" if model_path else ""
    try:
        if model is None:
            model, source = _pretrained_or_trained(subs, box, epochs, ssl_samples)
    except Exception as err:  # noqa: BLE001
        print(f"(a) SSL model: not available ({type(err).__name__}: {err})")
    timings["(a) SSL model (load or train)"] = time.perf_counter() - t
    t = time.perf_counter()
    if model is not None:
        analysis.embed(
            p,
            model,
            batch_size=64,
            progress=False,
            key_added="ssl_proj1",
            layer="projection",
            rotations=1,
        )
        timings["(a) embed, projection, 1 orientation"] = time.perf_counter() - t
        t = time.perf_counter()
        analysis.embed(
            p,
            model,
            batch_size=64,
            progress=False,
            key_added="ssl",
            layer=layer,
            rotations=rotations,
        )
        timings[f"(a) embed, {layer}, {rotations} rotations"] = time.perf_counter() - t
    print(
        f"(a) done in {sum(v for k, v in timings.items() if k.startswith('(a)')):.0f} s", flush=True
    )

    # (b) contrastive refinement on the classifier's training split only
    t = time.perf_counter()
    if model is not None:
        try:
            train_ids, _ = analysis.train_test_ids(p, labels_key="species", test_size=0.3, seed=0)
            pos = p.obs.index.get_indexer(train_ids)
            refined = copy.deepcopy(model)
            refined, _ = training.refine_contrastive(
                refined,
                subs[pos],
                p.obs["species"].to_numpy()[pos],
                p.obs["size_category"].to_numpy()[pos],
                epochs=con_epochs,
                pairs_per_epoch=ssl_samples,
                batch_size=16,
                seed=0,
                progress=False,
            )
            analysis.embed(
                p,
                refined,
                batch_size=64,
                progress=False,
                key_added="ssl_con",
                layer="projection",
                rotations=rotations,
            )
        except Exception as err:  # noqa: BLE001
            print(f"(b) SSL + contrastive: not available ({type(err).__name__}: {err})")
    timings["(b) contrastive + embed"] = time.perf_counter() - t
    print(f"(b) done in {timings['(b) contrastive + embed']:.0f} s", flush=True)

    # (c) PCA of the raw masked voxels; control: PCA of the rotation-averaged voxels
    t = time.perf_counter()
    analysis.embed_pca(p, n_components=64, seed=0, progress=False, key_added="pca")
    timings["(c) PCA"] = time.perf_counter() - t
    if rotations > 1:
        x = torch.from_numpy(np.ascontiguousarray(subs)[:, None])
        avg = sum(rot(x) for rot in analysis.cube_rotations(rotations)) / rotations
        analysis.embed_pca(
            p,
            subtomograms=avg[:, 0].numpy(),
            n_components=64,
            seed=0,
            progress=False,
            key_added="pca_rot",
        )

    emb = f"{layer}, {rotations} rotation{'s' if rotations > 1 else ''}"
    proj = f"projection, {rotations} rotation{'s' if rotations > 1 else ''}"
    reps = [
        (f"(a) SSL ({emb})", "ssl", "cosine"),
        ("(a) SSL projection, 1 orientation", "ssl_proj1", "cosine"),
        (f"(b) SSL+contrastive ({proj})", "ssl_con", "euclidean"),
        ("(c) PCA raw masked", "pca", "cosine"),
    ]
    if rotations > 1:
        reps.append((f"(c) PCA of rotation-averaged voxels ({rotations})", "pca_rot", "cosine"))
    rows, ari_rows = [], []
    sizes = ["tiny", "small", "medium", "big", "very big"]
    t = time.perf_counter()
    for name, key, metric in reps:
        if key not in p.obsm:
            rows.append({"embedding": name, "classifier": "-", "mean F1": "not available"})
            continue
        for clf, kwargs in (("kNN k=1 " + metric, {"metric": metric, "k": 1}), ("MLP", {})):
            method = "knn" if clf.startswith("kNN") else "mlp"
            res = analysis.evaluate_classifier(p, method=method, use_rep=key, seed=0, **kwargs)
            row = {"embedding": name, "classifier": clf, "mean F1": round(res["macro_f1"], 3)}
            per = res["per_size_category"].set_index("size_category")["f1"]
            for s in sizes:
                row[f"F1 {s}"] = round(float(per[s]), 3) if s in per.index else "-"
            rows.append(row)
        k1 = n_species
        analysis.cluster(p, k=k1, seed=0, key_added=f"km_{key}", use_rep=key)
        ari_km = analysis.adjusted_rand(p, labels_key=f"km_{key}")
        k0 = max(2, math.ceil(n_species / 2))
        analysis.cluster(p, k=k0, seed=0, key_added=f"ks_{key}", use_rep=key)
        big = [c for c, n in p.obs[f"ks_{key}"].value_counts().items() if n >= 3]
        analysis.subcluster(p, big, k=None, seed=0, key_added=f"ks_{key}", use_rep=key)
        ari_two = analysis.adjusted_rand(p, labels_key=f"ks_{key}")
        ari_rows.append(
            {
                "embedding": name,
                f"ARI k-means (k={k1})": round(ari_km, 3),
                f"ARI k-means (k={k0}) + spectral (eigengap)": round(ari_two, 3),
                "clusters after spectral": p.obs[f"ks_{key}"].nunique(),
            }
        )
    timings["classifiers + clustering"] = time.perf_counter() - t
    mode = "quick" if quick else "full"
    emit(
        pd.DataFrame(rows),
        f"particles_species_f1_{mode}",
        f"Species identification F1 ({len(p)} particles, {n_species} species, box {box}, "
        f"SSL {source}, contrastive {con_epochs} epochs x {ssl_samples} pairs)",
    )
    emit(pd.DataFrame(ari_rows), f"particles_species_ari_{mode}", "Clustering vs true species")
    emit(
        pd.DataFrame({"step": list(timings), "seconds": [round(v, 1) for v in timings.values()]}),
        f"particles_species_time_{mode}",
        "Species benchmark timings",
    )


def _pretrained_or_trained(subs: np.ndarray, box: int, epochs: int, samples: int):
    """The shipped tiny subtomogram model if present (and the box matches), else train one on
    ``subs`` (no labels) with the recipe's batch size and learning rate.
    Returns ``(model, description)``."""
    from cryosiam_nb import models, training

    try:
        m = models.load("tiny-subtomo")
        if tuple(m.patch_size) == (box, box, box):
            print("using shipped model tiny-subtomo")
            return m, "shipped tiny-subtomo"
        print(f"tiny-subtomo expects box {m.patch_size}, data box {box}: training instead")
    except Exception as err:  # noqa: BLE001
        print(f"tiny-subtomo not loadable ({type(err).__name__}); training SimSiam from scratch")
    model, _ = training.pretrain_subtomo(
        subs,
        preset="tiny",
        box=box,
        epochs=epochs,
        batch_size=32,
        samples_per_epoch=samples,
        lr=0.05,
        warmup_epochs=min(1, max(epochs - 1, 0)),
        seed=0,
        progress=False,
    )
    return model, f"trained here {epochs} epochs x {samples} samples"


def _recipe_box() -> int:
    """The recipe's subtomogram box (that of the shipped ``tiny-subtomo``), else 24."""
    try:
        from cryosiam_nb.training.recipe import RECIPE
    except Exception:  # noqa: BLE001
        return 24
    return int(RECIPE["subtomo"]["box"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    ap.add_argument("--skip-umap", action="store_true")
    ap.add_argument("--skip-species", action="store_true")
    ap.add_argument("--umap-n", type=int, default=None, help="points (default 1e6; quick 5e3)")
    ap.add_argument("--max-fit", type=int, default=None)
    ap.add_argument("--pca", type=int, default=None, help="PCA components before UMAP")
    ap.add_argument("--epochs", type=int, default=None, help="SimSiam epochs")
    ap.add_argument("--con-epochs", type=int, default=None, help="contrastive epochs")
    ap.add_argument(
        "--box", type=int, default=None, help="subtomogram box (voxels; default: the recipe's)"
    )
    ap.add_argument("--n-tomo", type=int, default=None, help="simulated tomograms")
    ap.add_argument("--ssl-samples", type=int, default=None, help="SSL samples/pairs per epoch")
    ap.add_argument("--model", default=None, help="trained subtomo_ssl checkpoint to use")
    ap.add_argument(
        "--layer", default="encoder", choices=("encoder", "projection"), help="(a) embedding"
    )
    ap.add_argument(
        "--rotations", type=int, default=12, choices=(1, 4, 12, 24), help="rotation averaging"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    if not args.skip_umap:
        n = args.umap_n or (5_000 if args.quick else 1_000_000)
        max_fit = args.max_fit or (2_000 if args.quick else 200_000)
        row = bench_umap(n, 256, max_fit, args.pca)
        emit(pd.DataFrame([row]), f"particles_umap_{n}", "UMAP (2-D, n_neighbors=10, min_dist=0)")
    if not args.skip_species:
        epochs = args.epochs or (1 if args.quick else 8)
        con = args.con_epochs or (1 if args.quick else 4)
        bench_species(
            args.quick,
            epochs,
            con,
            box=args.box or (16 if args.quick else _recipe_box()),
            n_tomo=args.n_tomo or (2 if args.quick else 8),
            ssl_samples=args.ssl_samples or (32 if args.quick else 256),
            model_path=args.model,
            layer=args.layer,
            rotations=args.rotations,
            threads=args.threads,
        )


if __name__ == "__main__":
    main()
