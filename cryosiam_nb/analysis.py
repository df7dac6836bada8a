"""Particle identification on a :class:`~cryosiam_nb.particles.Particles` container.

- :func:`embed`: SimSiam embeddings of the particles' subtomograms (batched, CPU/GPU;
  projection or pooled encoder features, optionally averaged over exact box rotations).
- :func:`embed_pca`: PCA of the raw (masked) subtomogram voxels, a template-free baseline.
- :func:`knn_classifier`, :func:`mlp_classifier`: supervised read-outs trained on labelled
  particles; :func:`evaluate_classifier` gives per-class and per-size-category F1 on a seeded,
  stratified held-out split.
- :func:`cluster` (k-means) then :func:`subcluster` (spectral, inside chosen clusters only).
- :func:`umap`: 2-D UMAP; above ``max_fit`` particles it fits on a seeded subsample and
  ``transform``\\ s the rest in batches (bounded memory, CPU only).
- :func:`adjusted_rand`: agreement of a clustering with known labels.

Every function records its parameters in ``particles.uns``; clustering steps are also
recorded in ``particles.history`` so they can be undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles, _child_names, estimate_n_clusters, spectral_split

__all__ = [
    "embed",
    "cube_rotations",
    "ROTATION_GROUPS",
    "embed_pca",
    "knn_classifier",
    "mlp_classifier",
    "evaluate_classifier",
    "train_test_ids",
    "ParticleClassifier",
    "cluster",
    "subcluster",
    "umap",
    "adjusted_rand",
]


# --------------------------------------------------------------------------- helpers
def _check_particles(particles: Any, fn: str) -> Particles:
    if not isinstance(particles, Particles):
        raise InputError(f"{fn}: expected a Particles object, got {type(particles).__name__}")
    if len(particles) == 0:
        raise InputError(f"{fn}: no particles (empty selection)")
    return particles


def _features(particles: Particles, use: str, fn: str) -> np.ndarray:
    """obsm[use] as a float32 (N, D) array, with a clear error when it is missing."""
    if use not in particles.obsm:
        hint = "run tl.embed first" if use == "embedding" else f"set particles.obsm[{use!r}]"
        raise InputError(
            f"{fn}: particles have no obsm[{use!r}] ({hint}); available: {sorted(particles.obsm)}"
        )
    x = np.asarray(particles.obsm[use], dtype=np.float32)
    x = x.reshape(len(x), -1)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{fn}: obsm[{use!r}] contains NaN or infinite values")
    return x


def _subtomograms(particles: Particles, subtomograms: Any, fn: str) -> Any:
    """The subtomogram stack (N, B, B, B) (numpy or dask, not read yet)."""
    if subtomograms is None:
        if "subtomograms" not in particles.obsm:
            raise InputError(
                f"{fn}: no subtomograms: pass subtomograms=... (tl.extract_subtomograms) "
                "or set particles.obsm['subtomograms']"
            )
        subtomograms = particles.obsm.lazy("subtomograms")
    if not hasattr(subtomograms, "shape"):
        subtomograms = np.asarray(subtomograms)
    shape = tuple(int(s) for s in subtomograms.shape)
    if len(shape) == 5 and shape[1] == 1:
        subtomograms = subtomograms[:, 0]
        shape = shape[:1] + shape[2:]
    if len(shape) != 4:
        raise InputError(
            f"{fn}: subtomograms must be (N, B, B, B) (z, y, x) or (N, 1, B, B, B), got {shape}"
        )
    if shape[0] != len(particles):
        raise InputError(
            f"{fn}: {shape[0]} subtomograms for {len(particles)} particles; they must align"
        )
    return subtomograms


def _batch(stack: Any, start: int, stop: int) -> np.ndarray:
    part = stack[start:stop]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part, dtype=np.float32)


# --------------------------------------------------------------------------- embeddings
#: Sizes of the rotation groups of a cube that :func:`embed` can average over.
ROTATION_GROUPS = (1, 4, 12, 24)


def cube_rotations(n: int) -> list[Callable[[Any], Any]]:
    """The ``n`` rotations of a rotation group of the cube, as functions of a torch tensor
    ``(N, C, Z, Y, X)`` with a cubic box (exact voxel permutations, no interpolation).

    ``n`` = 1: identity; 4: identity and the 180° rotations about z, y and x (they keep a
    missing wedge where it is); 12: those combined with the cyclic permutations of the axes
    (the tetrahedral group); 24: all rotations of the cube (the 12 and the 12 composed with a
    90° rotation about z)."""
    import torch  # noqa: PLC0415

    if n not in ROTATION_GROUPS:
        raise InputError(f"rotations must be one of {ROTATION_GROUPS}, got {n!r}")
    z, y, x = 2, 3, 4
    d2 = [
        lambda t: t,
        lambda t: torch.rot90(t, 2, (y, x)),
        lambda t: torch.rot90(t, 2, (z, x)),
        lambda t: torch.rot90(t, 2, (z, y)),
    ]
    if n <= 4:
        return d2[:n]
    cyc = [lambda t: t, lambda t: t.permute(0, 1, 3, 4, 2), lambda t: t.permute(0, 1, 4, 2, 3)]
    t12 = [lambda t, a=a, b=b: a(b(t)) for b in cyc for a in d2]
    if n == 12:
        return t12
    return t12 + [lambda t, g=g: g(torch.rot90(t, 1, (y, x))) for g in t12]


def _projector_input(model: Any) -> Any:
    """The module whose input is the pooled encoder feature (a SimSiam's ``encoder.fc``)."""
    fc = getattr(getattr(getattr(model, "backbone", None), "encoder", None), "fc", None)
    if fc is None or not callable(getattr(fc, "register_forward_pre_hook", None)):
        raise InputError(
            f"embed: layer='encoder' needs a subtomo_ssl model (SimSiam with an encoder.fc "
            f"projector); {type(model).__name__} has none"
        )
    return fc


def embed(
    particles: Particles,
    model: Any,
    subtomograms: Any = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    key: str = "embedding",
    layer: str = "auto",
    rotations: int = 12,
) -> np.ndarray:
    """SimSiam embeddings of the particles' subtomograms → ``particles.obsm[key]`` (N, D).

    ``model`` is a subtomogram SSL model (``models.build("subtomo_ssl")`` or
    ``models.load(...)``) whose ``model.embed(x)`` maps float32 ``(n, 1, B, B, B)`` boxes
    (z, y, x; normalised to [0, 1], protein bright) to L2-normalised ``(n, D)`` vectors.
    ``subtomograms`` (N, B, B, B) defaults to ``particles.obsm["subtomograms"]`` (read lazily,
    batch by batch). Runs on ``device`` or the best available (cuda → mps → cpu), with AMP on
    CUDA. Returns the float32 embedding.

    ``layer``: ``"encoder"`` (the encoder's globally pooled features, the projector's
    input; SimSiam models only), ``"projection"`` (``model.embed``: the SimSiam projection)
    or ``"auto"`` (default: ``"encoder"`` when the model has one, else ``"projection"``).
    ``rotations`` (1, 4, 12 or 24, see :func:`cube_rotations`; default 12): average the
    L2-normalised embeddings of that many exact rotations of each box, then L2-normalise
    again — particles lie in random orientations and a small network is far from rotation
    invariant, so the average is a more orientation-independent descriptor (costs
    ``rotations`` × the time; pass ``rotations=1`` for speed). On the simulated species
    benchmark (``benchmarks/bench_particles.py``, shipped ``tiny-subtomo``) the defaults
    raise k-NN mean F1 from 0.70 (projection, 1 orientation) to 0.92.
    """
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from cryosiam_nb.device import autocast, pick_device  # noqa: PLC0415

    particles = _check_particles(particles, "embed")
    if not callable(getattr(model, "embed", None)):
        raise InputError(
            f"embed: model {type(model).__name__} has no embed() method; use a subtomo_ssl "
            "model (cryosiam_nb.models.build('subtomo_ssl') or models.load(...))"
        )
    if int(batch_size) < 1:
        raise InputError(f"embed: batch_size must be ≥ 1, got {batch_size}")
    if layer not in ("auto", "projection", "encoder"):
        raise InputError(f"embed: layer must be 'auto', 'projection' or 'encoder', got {layer!r}")
    fc = None
    if layer != "projection":
        try:
            fc = _projector_input(model)
        except InputError:
            if layer == "encoder":
                raise
        layer = "projection" if fc is None else "encoder"
    group = cube_rotations(rotations)  # checks rotations
    stack = _subtomograms(particles, subtomograms, "embed")
    n = int(stack.shape[0])
    if len(group) > 1 and len(set(map(int, stack.shape[1:]))) != 1:
        raise InputError(
            f"embed: rotations={rotations} needs cubic boxes, got {tuple(stack.shape[1:])}"
        )
    dev = pick_device(device)
    model = model.to(dev)
    captured: dict[str, Any] = {}
    hook = None
    if fc is not None:
        hook = fc.register_forward_pre_hook(lambda _mod, args: captured.__setitem__("x", args[0]))
    was_training = bool(getattr(model, "training", False))
    model.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, n, batch_size), desc="embed", disable=not progress, unit="batch"
            ):
                x = torch.from_numpy(_batch(stack, start, start + batch_size))[:, None].to(dev)
                total = None
                for rot in group:
                    with autocast(dev):
                        z = model.embed(rot(x).contiguous())
                    if layer == "encoder":
                        z = captured.pop("x").flatten(1)
                    z = torch.nn.functional.normalize(z.float(), dim=1)
                    total = z if total is None else total + z
                if len(group) > 1:
                    total = torch.nn.functional.normalize(total, dim=1)
                z = total.cpu().numpy()
                if z.ndim != 2 or z.shape[0] != x.shape[0]:
                    raise InputError(
                        f"embed: model.embed returned shape {tuple(z.shape)} for a batch of "
                        f"{x.shape[0]}; expected (n, D)"
                    )
                chunks.append(z.astype(np.float32))
    finally:
        if hook is not None:
            hook.remove()
        if was_training:
            model.train()
    emb = np.concatenate(chunks, axis=0)
    particles.obsm[key] = emb
    particles.uns.setdefault("embed", {})[key] = {
        "model_task": getattr(model, "task", None),
        "model_config": _jsonable(getattr(model, "config", None)),
        "dim": int(emb.shape[1]),
        "box": list(map(int, stack.shape[1:])),
        "batch_size": int(batch_size),
        "device": str(dev),
        "layer": layer,
        "rotations": int(rotations),
    }
    return emb


def _jsonable(obj: Any) -> Any:
    import json  # noqa: PLC0415

    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return repr(obj)


def embed_pca(
    particles: Particles,
    subtomograms: Any = None,
    n_components: int = 64,
    mask: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 512,
    key: str = "pca",
    progress: bool = True,
) -> np.ndarray:
    """PCA of raw subtomogram voxels (a template-free baseline) → ``particles.obsm[key]``.

    Voxels are flattened after an optional boolean ``mask`` (B, B, B) (e.g. a sphere), then
    reduced with ``sklearn.decomposition.IncrementalPCA`` fitted batch by batch (bounded
    memory). The output is L2-normalised like SimSiam embeddings.
    """
    from sklearn.decomposition import IncrementalPCA  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    particles = _check_particles(particles, "embed_pca")
    stack = _subtomograms(particles, subtomograms, "embed_pca")
    n = int(stack.shape[0])
    box = tuple(int(s) for s in stack.shape[1:])
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != box:
            raise InputError(f"embed_pca: mask shape {mask.shape} does not match box {box}")
    n_components = int(min(n_components, n, int(np.prod(box))))
    if n_components < 1:
        raise InputError("embed_pca: n_components must be ≥ 1")
    bs = max(int(batch_size), n_components)
    # Seeded shuffled order: IncrementalPCA's fit is order-dependent, the seed fixes it.
    order = np.random.default_rng(seed).permutation(n)

    def rows(idx: np.ndarray) -> np.ndarray:
        idx_sorted = np.sort(idx)
        block = np.asarray(
            stack[idx_sorted].compute() if hasattr(stack, "compute") else stack[idx_sorted],
            dtype=np.float32,
        )
        block = block.reshape(len(idx_sorted), -1) if mask is None else block[:, mask]
        back = np.argsort(np.argsort(idx))
        return block[back]

    ipca = IncrementalPCA(n_components=n_components)
    starts = list(range(0, n, bs))
    # merge a short tail into the previous batch (partial_fit needs ≥ n_components rows)
    if len(starts) > 1 and n - starts[-1] < n_components:
        starts.pop()
    bounds = [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]
    for s, e in tqdm(bounds, desc="pca fit", disable=not progress):
        ipca.partial_fit(rows(order[s:e]))
    out = np.empty((n, n_components), dtype=np.float32)
    for s in tqdm(range(0, n, bs), desc="pca transform", disable=not progress):
        idx = np.arange(s, min(s + bs, n))
        out[idx] = ipca.transform(rows(idx)).astype(np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    particles.obsm[key] = out
    particles.uns.setdefault("embed", {})[key] = {
        "method": "incremental_pca",
        "n_components": n_components,
        "masked": mask is not None,
        "seed": int(seed),
        "explained_variance_ratio": float(np.sum(ipca.explained_variance_ratio_)),
    }
    return out


# --------------------------------------------------------------------------- classifiers
@dataclass
class ParticleClassifier:
    """A fitted classifier on ``obsm[use]``; ``predict(particles)`` labels new particles."""

    estimator: Any
    use: str
    labels_key: str
    classes: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def predict(self, particles: Particles, key_added: str | None = None) -> np.ndarray:
        """Predicted labels (str) for every particle; also stored in ``obs[key_added]``."""
        particles = _check_particles(particles, "predict")
        x = _features(particles, self.use, "predict")
        pred = np.asarray(self.estimator.predict(x)).astype(str)
        if key_added is not None:
            particles.obs[key_added] = pd.Series(pred, index=particles.obs.index).astype("str")
            particles.uns.setdefault("classifiers", {})[key_added] = dict(self.params)
        return pred

    def predict_proba(self, particles: Particles) -> pd.DataFrame:
        """Class probabilities (rows: particle ids, columns: classes)."""
        x = _features(particles, self.use, "predict_proba")
        proba = self.estimator.predict_proba(x)
        return pd.DataFrame(proba, index=particles.obs.index, columns=self.classes)


def _labelled(
    particles: Particles, labels_key: str, use: str, fn: str, mask: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    particles = _check_particles(particles, fn)
    if labels_key not in particles.obs.columns:
        raise InputError(
            f"{fn}: obs has no label column {labels_key!r}; columns: {list(particles.obs.columns)}"
        )
    x = _features(particles, use, fn)
    labels = particles.obs[labels_key]
    keep = labels.notna().to_numpy().copy()
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    if keep.sum() == 0:
        raise InputError(f"{fn}: no labelled particles in obs[{labels_key!r}]")
    y = labels.to_numpy()[keep].astype(str)
    if len(np.unique(y)) < 2:
        raise InputError(f"{fn}: need at least 2 classes in obs[{labels_key!r}], got {set(y)}")
    return x[keep], y


def _fit_knn(x: np.ndarray, y: np.ndarray, metric: str, k: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier  # noqa: PLC0415

    if metric not in ("cosine", "euclidean"):
        raise InputError(f"knn_classifier: metric must be 'cosine' or 'euclidean', got {metric!r}")
    if int(k) < 1 or int(k) > len(x):
        raise InputError(f"knn_classifier: k must be in 1..{len(x)}, got {k}")
    algorithm = "brute" if metric == "cosine" else "auto"
    return KNeighborsClassifier(n_neighbors=int(k), metric=metric, algorithm=algorithm).fit(x, y)


def _fit_mlp(
    x: np.ndarray, y: np.ndarray, hidden: Sequence[int], seed: int, max_iter: int, alpha: float
) -> Any:
    import warnings  # noqa: PLC0415

    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    mlp = MLPClassifier(
        hidden_layer_sizes=tuple(int(h) for h in hidden),
        random_state=int(seed),
        max_iter=int(max_iter),
        alpha=float(alpha),
        early_stopping=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_pipeline(StandardScaler(), mlp).fit(x, y)


def knn_classifier(
    particles: Particles,
    labels_key: str = "species",
    metric: str = "cosine",
    k: int = 1,
    use: str = "embedding",
    mask: Any = None,
) -> ParticleClassifier:
    """k-nearest-neighbour classifier on ``obsm[use]`` trained from ``obs[labels_key]``.

    Defaults follow the paper: k = 1 with cosine distance for SimSiam embeddings
    (``metric="euclidean"`` after contrastive refinement). Particles with a missing label, or
    outside the optional boolean ``mask``, are not used for training.
    """
    x, y = _labelled(particles, labels_key, use, "knn_classifier", mask)
    est = _fit_knn(x, y, metric, k)
    params = {"method": "knn", "metric": metric, "k": int(k), "use": use, "n_train": len(y)}
    return ParticleClassifier(est, use, labels_key, [str(c) for c in est.classes_], params)


def mlp_classifier(
    particles: Particles,
    labels_key: str = "species",
    hidden: Sequence[int] = (256, 128),
    seed: int = 0,
    max_iter: int = 500,
    alpha: float = 1e-4,
    use: str = "embedding",
    mask: Any = None,
) -> ParticleClassifier:
    """MLP classifier (``hidden`` = 256 → 128 → n_classes, ReLU, Adam) on standardised ``obsm[use]``.

    ``sklearn.neural_network.MLPClassifier`` seeded with ``seed``; trained from particles with
    a label in ``obs[labels_key]`` (and inside the optional boolean ``mask``).
    """
    x, y = _labelled(particles, labels_key, use, "mlp_classifier", mask)
    est = _fit_mlp(x, y, hidden, seed, max_iter, alpha)
    params = {
        "method": "mlp",
        "hidden": [int(h) for h in hidden],
        "seed": int(seed),
        "max_iter": int(max_iter),
        "alpha": float(alpha),
        "use": use,
        "n_train": len(y),
    }
    return ParticleClassifier(est, use, labels_key, [str(c) for c in est.classes_], params)


def train_test_ids(
    particles: Particles, labels_key: str = "species", test_size: float = 0.3, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded, stratified split of the labelled particles into (train ids, held-out ids).

    Uses ``sklearn.model_selection.train_test_split(stratify=labels)``; the same arguments
    give the split :func:`evaluate_classifier` uses, e.g. to train contrastive refinement on
    the training part only.
    """
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    particles = _check_particles(particles, "train_test_ids")
    if labels_key not in particles.obs.columns:
        raise InputError(f"train_test_ids: obs has no label column {labels_key!r}")
    labelled = particles.obs[labels_key].notna().to_numpy()
    pos = np.flatnonzero(labelled)
    y_all = particles.obs[labels_key].to_numpy()[pos].astype(str)
    counts = pd.Series(y_all).value_counts()
    if len(counts) < 2:
        raise InputError(f"train_test_ids: need ≥ 2 classes in obs[{labels_key!r}]")
    if counts.min() < 2:
        raise InputError(
            f"train_test_ids: classes with a single particle cannot be split: "
            f"{counts[counts < 2].index.tolist()}"
        )
    train_pos, test_pos = train_test_split(
        pos, test_size=test_size, random_state=int(seed), stratify=y_all
    )
    ids = particles.obs.index
    return ids[np.sort(train_pos)].tolist(), ids[np.sort(test_pos)].tolist()


def evaluate_classifier(
    particles: Particles,
    method: str = "knn",
    labels_key: str = "species",
    use: str = "embedding",
    size_key: str | None = "size_category",
    test_size: float = 0.3,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train on a seeded, stratified split of the labelled particles and score the held-out part.

    ``method`` is ``"knn"`` (kwargs ``metric``, ``k``) or ``"mlp"`` (kwargs ``hidden``,
    ``max_iter``, ``alpha``; seeded by ``seed``). Returns a dict with ``macro_f1``,
    ``accuracy``, ``per_class`` (DataFrame: class, f1, precision, recall, support) and
    ``per_size_category`` (DataFrame: size category, macro F1 over the classes present in it,
    accuracy, support), plus ``test_ids`` and ``predictions``.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support  # noqa: PLC0415

    particles = _check_particles(particles, "evaluate_classifier")
    if method not in ("knn", "mlp"):
        raise InputError(f"evaluate_classifier: method must be 'knn' or 'mlp', got {method!r}")
    if labels_key not in particles.obs.columns:
        raise InputError(f"evaluate_classifier: obs has no label column {labels_key!r}")
    train_ids, test_ids = train_test_ids(particles, labels_key, test_size, seed)
    train_pos = particles.obs.index.get_indexer(train_ids)
    test_pos = particles.obs.index.get_indexer(test_ids)
    train_mask = np.zeros(len(particles), dtype=bool)
    train_mask[train_pos] = True
    if method == "knn":
        clf = knn_classifier(particles, labels_key, use=use, mask=train_mask, **kwargs)
    else:
        clf = mlp_classifier(particles, labels_key, use=use, seed=seed, mask=train_mask, **kwargs)
    test = particles.subset(np.sort(test_pos))
    y_true = test.obs[labels_key].to_numpy().astype(str)
    y_pred = clf.predict(test)
    classes = sorted(np.unique(np.concatenate([y_true, y_pred])))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "f1": f, "precision": p, "recall": r, "support": s})
    per_class = per_class[per_class["support"] > 0].reset_index(drop=True)
    rows = []
    if size_key is not None and size_key in test.obs.columns:
        cats = test.obs[size_key].astype(object).to_numpy()
        for cat in pd.unique(cats):
            m = cats == cat
            present = sorted(np.unique(y_true[m]))
            rows.append(
                {
                    size_key: str(cat),
                    "f1": float(
                        f1_score(
                            y_true[m], y_pred[m], labels=present, average="macro", zero_division=0
                        )
                    ),
                    "accuracy": float(accuracy_score(y_true[m], y_pred[m])),
                    "n_classes": len(present),
                    "support": int(m.sum()),
                }
            )
    per_size = pd.DataFrame(rows)
    present = sorted(np.unique(y_true))
    return {
        "method": method,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": per_class,
        "per_size_category": per_size,
        "test_ids": test.obs.index.tolist(),
        "predictions": y_pred,
        "classifier": clf,
    }


# --------------------------------------------------------------------------- clustering
def _ordered_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..k-1 by decreasing size (ties by first occurrence)."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    for new, i in enumerate(order):
        remap[uniq[i]] = new
    return remap[labels]


def cluster(
    particles: Particles,
    method: str = "kmeans",
    k: int = 40,
    seed: int = 0,
    key: str = "cluster",
    use: str = "embedding",
    n_init: int = 10,
) -> pd.Series:
    """First-stage clustering of ``obsm[use]`` with ``sklearn.cluster.KMeans`` → ``obs[key]``.

    Cluster names are strings ``"0"`` … ``"k-1"``, numbered by decreasing size. ``n_init`` is
    fixed and ``seed`` seeds KMeans, so results repeat exactly. Parameters go to
    ``uns[key]``; the action is recorded in ``history`` (undo restores the previous labels).
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415

    particles = _check_particles(particles, "cluster")
    if method != "kmeans":
        raise InputError(f"cluster: method must be 'kmeans', got {method!r}")
    x = _features(particles, use, "cluster")
    k = int(k)
    if k < 1 or k > len(x):
        raise InputError(f"cluster: k must be in 1..{len(x)} (number of particles), got {k}")
    km = KMeans(n_clusters=k, n_init=int(n_init), random_state=int(seed)).fit(x)
    labels = _ordered_labels(km.labels_)
    params = {
        "method": method,
        "k": k,
        "seed": int(seed),
        "n_init": int(n_init),
        "use": use,
        "inertia": float(km.inertia_),
    }
    particles._record("cluster", {**params, "key": key}, np.arange(len(particles)), [key])
    particles.obs[key] = pd.Series(labels.astype(str), index=particles.obs.index).astype("str")
    particles.uns[key] = params
    return particles.obs[key]


def subcluster(
    particles: Particles,
    clusters: Sequence[str] | str,
    method: str = "spectral",
    k: int | None | dict[str, int | None] = None,
    n_neighbors: int = 10,
    seed: int = 0,
    key: str = "cluster",
    use: str = "embedding",
) -> dict[str, list[str]]:
    """Second-stage clustering inside the chosen clusters only; other clusters are untouched.

    Each chosen cluster ``c`` is split with ``SpectralClustering(affinity="nearest_neighbors",
    n_neighbors=n_neighbors)`` (or ``"kmeans"``) into ``k`` groups named ``"c.1"``, ``"c.2"``, …
    (largest first). ``k=None`` estimates k per cluster from the eigengap of the normalised
    Laplacian of the kNN graph; ``k`` may also be a dict ``{cluster: k}``. Returns
    ``{cluster: [new names]}``; parameters go to ``uns[key + "_subcluster"]``; undoable.
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415

    particles = _check_particles(particles, "subcluster")
    if method not in ("spectral", "kmeans"):
        raise InputError(f"subcluster: method must be 'spectral' or 'kmeans', got {method!r}")
    if key not in particles.obs.columns:
        raise InputError(f"subcluster: obs has no {key!r} column: run tl.cluster first")
    if isinstance(clusters, str):
        clusters = [clusters]
    clusters = [str(c) for c in clusters]
    if not clusters:
        raise InputError("subcluster: no clusters chosen (empty selection)")
    labels = particles.obs[key]
    existing = set(labels.dropna().astype(str).unique())
    unknown = [c for c in clusters if c not in existing]
    if unknown:
        raise InputError(f"subcluster: unknown cluster(s) {unknown} in obs[{key!r}]")
    x = _features(particles, use, "subcluster")
    new_labels = labels.to_numpy(dtype=object, copy=True)
    changed: list[np.ndarray] = []
    result: dict[str, list[str]] = {}
    record: dict[str, Any] = {}
    taken = set(existing)
    for c in clusters:
        pos = np.flatnonzero((labels == c).to_numpy(dtype=bool, na_value=False))
        kc = k.get(c) if isinstance(k, dict) else k
        if len(pos) < 3:
            raise InputError(f"subcluster: cluster {c!r} has {len(pos)} particle(s); need ≥ 3")
        estimated = kc is None
        if method == "spectral":
            sub = spectral_split(x[pos], k=kc, n_neighbors=n_neighbors, seed=seed)
        else:
            if kc is None:
                kc = estimate_n_clusters(x[pos], n_neighbors=n_neighbors, seed=seed)
            if int(kc) < 2 or int(kc) > len(pos):
                raise InputError(f"subcluster: k for cluster {c!r} must be in 2..{len(pos)}")
            km = KMeans(n_clusters=int(kc), n_init=10, random_state=int(seed)).fit(x[pos])
            sub = _ordered_labels(km.labels_)
        n_sub = int(sub.max()) + 1
        names = _child_names(c, n_sub, taken - {c})
        taken.update(names)
        new_labels[pos] = np.asarray(names, dtype=object)[sub]
        changed.append(pos)
        result[c] = names
        record[c] = {"k": n_sub, "estimated": estimated, "names": names}
    params = {
        "method": method,
        "clusters": clusters,
        "k": k if not isinstance(k, dict) else {str(a): b for a, b in k.items()},
        "n_neighbors": int(n_neighbors),
        "seed": int(seed),
        "use": use,
    }
    pos_all = np.sort(np.concatenate(changed))
    particles._record("subcluster", {**params, "key": key}, pos_all, [key])
    particles.obs[key] = pd.Series(new_labels, index=particles.obs.index).astype("str")
    particles.uns.setdefault(f"{key}_subcluster", {}).update(
        {
            c: {**record[c], **{p: params[p] for p in ("method", "n_neighbors", "seed")}}
            for c in clusters
        }
    )
    return result


def adjusted_rand(particles: Particles, key: str = "cluster", truth: str = "species") -> float:
    """Adjusted Rand index between ``obs[key]`` and ``obs[truth]`` (rows with both set)."""
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415

    particles = _check_particles(particles, "adjusted_rand")
    for col in (key, truth):
        if col not in particles.obs.columns:
            raise InputError(f"adjusted_rand: obs has no column {col!r}")
    both = particles.obs[[key, truth]].dropna()
    if len(both) == 0:
        raise InputError(f"adjusted_rand: no particles with both {key!r} and {truth!r} set")
    return float(adjusted_rand_score(both[truth].astype(str), both[key].astype(str)))


# --------------------------------------------------------------------------- UMAP
def umap(
    particles: Particles,
    n_neighbors: int = 10,
    min_dist: float = 0.0,
    seed: int = 0,
    pca: int | None = None,
    max_fit: int = 200_000,
    use: str = "embedding",
    key: str = "umap",
    metric: str = "euclidean",
    batch_size: int = 50_000,
    progress: bool = True,
) -> np.ndarray:
    """2-D UMAP of ``obsm[use]`` → ``obsm[key]`` (N, 2) float32, on CPU.

    ``umap.UMAP(n_neighbors, min_dist, random_state=seed)``; optional ``pca`` components first
    (``sklearn`` PCA fitted on the same points as UMAP). With more than ``max_fit`` particles
    UMAP is fitted on a seeded random subsample of ``max_fit`` and the rest is embedded with
    ``transform`` in batches of ``batch_size`` (bounded memory). Seeded runs repeat exactly.
    """
    import warnings  # noqa: PLC0415

    import umap as umap_lib  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    particles = _check_particles(particles, "umap")
    if use not in particles.obsm:
        raise InputError(
            f"umap: particles have no obsm[{use!r}] (run tl.embed first); "
            f"available: {sorted(particles.obsm)}"
        )
    n = len(particles)
    if n < 3:
        raise InputError(f"umap: need at least 3 particles, got {n}")
    if int(max_fit) < 3:
        raise InputError(f"umap: max_fit must be ≥ 3, got {max_fit}")
    src = particles.obsm.raw(use)
    lazy = particles.obsm.is_lazy(use)

    def rows(start: int, stop: int) -> np.ndarray:
        block = particles.obsm.lazy(use)[start:stop].compute() if lazy else src[start:stop]
        block = np.asarray(block, dtype=np.float32).reshape(stop - start, -1)
        if not np.all(np.isfinite(block)):
            raise InputError(f"umap: obsm[{use!r}] contains NaN or infinite values")
        return block

    rng = np.random.default_rng(seed)
    subsample = n > max_fit
    fit_idx = np.sort(rng.choice(n, size=int(max_fit), replace=False)) if subsample else None
    if subsample:
        fit_x = (
            np.asarray(particles.obsm.lazy(use)[fit_idx].compute(), dtype=np.float32)
            if lazy
            else np.asarray(src[fit_idx], dtype=np.float32)
        ).reshape(len(fit_idx), -1)
    else:
        fit_x = rows(0, n)
    reducer_pca = None
    if pca is not None:
        from sklearn.decomposition import PCA  # noqa: PLC0415

        n_comp = int(min(pca, fit_x.shape[0], fit_x.shape[1]))
        reducer_pca = PCA(n_components=n_comp, random_state=int(seed)).fit(fit_x)
        fit_x = reducer_pca.transform(fit_x).astype(np.float32)
    nn = int(min(n_neighbors, len(fit_x) - 1))
    model = umap_lib.UMAP(
        n_neighbors=nn,
        min_dist=float(min_dist),
        n_components=2,
        metric=metric,
        random_state=int(seed),
        low_memory=True,
        transform_seed=int(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        fitted = model.fit_transform(fit_x).astype(np.float32)
        if subsample:
            out = np.empty((n, 2), dtype=np.float32)
            out[fit_idx] = fitted
            rest = np.ones(n, dtype=bool)
            rest[fit_idx] = False
            rest_idx = np.flatnonzero(rest)
            del fit_x
            for s in tqdm(
                range(0, len(rest_idx), batch_size), desc="umap transform", disable=not progress
            ):
                idx = rest_idx[s : s + batch_size]
                block = particles.obsm.lazy(use)[idx].compute() if lazy else np.asarray(src[idx])
                block = np.asarray(block, dtype=np.float32).reshape(len(idx), -1)
                if reducer_pca is not None:
                    block = reducer_pca.transform(block).astype(np.float32)
                out[idx] = model.transform(block)
        else:
            out = fitted
    particles.obsm[key] = out
    particles.uns[key] = {
        "n_neighbors": nn,
        "min_dist": float(min_dist),
        "seed": int(seed),
        "pca": None if pca is None else int(pca),
        "metric": metric,
        "use": use,
        "max_fit": int(max_fit),
        "n_fit": int(len(fit_idx)) if subsample else n,
    }
    return out
