"""Supervised read-outs on particle embeddings: k-NN and MLP classifiers and their evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.analysis._common import check_particles, features
from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles

__all__ = [
    "ParticleClassifier",
    "knn_classifier",
    "mlp_classifier",
    "train_test_ids",
    "evaluate_classifier",
]


@dataclass
class ParticleClassifier:
    """A classifier fitted on ``obsm[use_rep]``; :meth:`predict` labels new particles.

    Attributes
    ----------
    estimator : sklearn estimator
        The fitted scikit-learn classifier (or pipeline).
    use_rep : str
        The ``obsm`` key of the features it reads, (N, D).
    labels_key : str
        The ``obs`` column it was trained on.
    classes : list of str
        Class names, in the column order of :meth:`predict_proba`.
    params : dict
        Training parameters (JSON-serialisable).
    """

    estimator: Any
    use_rep: str
    labels_key: str
    classes: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def predict(self, particles: Particles, *, key_added: str | None = None) -> np.ndarray:
        """Predicted label of every particle.

        Parameters
        ----------
        particles : Particles
            Particles with ``obsm[use_rep]`` of the training dimension D.
        key_added : str, optional
            Also store the labels in ``obs[key_added]`` (and the parameters in
            ``uns["classifiers"][key_added]``).

        Returns
        -------
        numpy.ndarray of str, shape (N,)
        """
        particles = check_particles(particles, "predict")
        x = features(particles, self.use_rep, "predict")
        pred = np.asarray(self.estimator.predict(x)).astype(str)
        if key_added is not None:
            particles.obs[key_added] = pd.Series(pred, index=particles.obs.index).astype("str")
            particles.uns.setdefault("classifiers", {})[key_added] = dict(self.params)
        return pred

    def predict_proba(self, particles: Particles) -> pd.DataFrame:
        """Class probabilities.

        Parameters
        ----------
        particles : Particles
            Particles with ``obsm[use_rep]``.

        Returns
        -------
        pandas.DataFrame, shape (N, n_classes)
            Rows: particle ids; columns: :attr:`classes`; rows sum to 1.
        """
        x = features(check_particles(particles, "predict_proba"), self.use_rep, "predict_proba")
        proba = self.estimator.predict_proba(x)
        return pd.DataFrame(proba, index=particles.obs.index, columns=self.classes)


def _labelled(
    particles: Particles, labels_key: str, use_rep: str, fn: str, rows: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) and str labels (n,) of the labelled particles inside ``rows``."""
    particles = check_particles(particles, fn)
    if labels_key not in particles.obs.columns:
        raise InputError(
            f"{fn}: obs has no label column {labels_key!r}; columns: {list(particles.obs.columns)}"
        )
    x = features(particles, use_rep, fn)
    labels = particles.obs[labels_key]
    keep = labels.notna().to_numpy().copy()
    if rows is not None:
        inside = np.zeros(len(particles), dtype=bool)
        inside[particles._positions(rows, f"{fn} rows")] = True
        keep &= inside
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
    *,
    labels_key: str = "species",
    metric: str = "cosine",
    k: int = 1,
    use_rep: str = "embedding",
    rows: Any = None,
) -> ParticleClassifier:
    """k-nearest-neighbour classifier on ``obsm[use_rep]`` trained from ``obs[labels_key]``.

    Defaults follow the paper: k = 1 with cosine distance for SimSiam embeddings
    (``metric="euclidean"`` after contrastive refinement).

    Parameters
    ----------
    particles : Particles
        Training particles; those with a missing label are not used.
    labels_key : str
        ``obs`` column holding the labels.
    metric : {"cosine", "euclidean"}
        Distance between embeddings.
    k : int
        Number of neighbours.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    rows : boolean mask (N,), particle ids or integer positions, optional
        Train on these particles only (e.g. a training split); default all labelled ones.

    Returns
    -------
    ParticleClassifier
        The fitted classifier; ``params["n_train"]`` is the number of training particles.
    """
    x, y = _labelled(particles, labels_key, use_rep, "knn_classifier", rows)
    est = _fit_knn(x, y, metric, k)
    params = {"method": "knn", "metric": metric, "k": int(k), "use_rep": use_rep, "n_train": len(y)}
    return ParticleClassifier(est, use_rep, labels_key, [str(c) for c in est.classes_], params)


def mlp_classifier(
    particles: Particles,
    *,
    labels_key: str = "species",
    hidden: Sequence[int] = (256, 128),
    seed: int = 0,
    max_iter: int = 500,
    alpha: float = 1e-4,
    use_rep: str = "embedding",
    rows: Any = None,
) -> ParticleClassifier:
    """MLP classifier (ReLU, Adam) on standardised ``obsm[use_rep]``.

    ``StandardScaler`` then ``sklearn.neural_network.MLPClassifier`` seeded with ``seed``.

    Parameters
    ----------
    particles : Particles
        Training particles; those with a missing label are not used.
    labels_key : str
        ``obs`` column holding the labels.
    hidden : sequence of int
        Hidden layer widths (default 256 → 128 → n_classes).
    seed : int
        Seeds the weight initialisation and batch order.
    max_iter : int
        Maximum number of epochs.
    alpha : float
        L2 penalty.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    rows : boolean mask (N,), particle ids or integer positions, optional
        Train on these particles only; default all labelled ones.

    Returns
    -------
    ParticleClassifier
        The fitted classifier.
    """
    x, y = _labelled(particles, labels_key, use_rep, "mlp_classifier", rows)
    est = _fit_mlp(x, y, hidden, seed, max_iter, alpha)
    params = {
        "method": "mlp",
        "hidden": [int(h) for h in hidden],
        "seed": int(seed),
        "max_iter": int(max_iter),
        "alpha": float(alpha),
        "use_rep": use_rep,
        "n_train": len(y),
    }
    return ParticleClassifier(est, use_rep, labels_key, [str(c) for c in est.classes_], params)


def train_test_ids(
    particles: Particles, *, labels_key: str = "species", test_size: float = 0.3, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded, stratified split of the labelled particles into (train ids, held-out ids).

    Uses ``sklearn.model_selection.train_test_split(stratify=labels)``; the same arguments
    give the split :func:`evaluate_classifier` uses, e.g. to train contrastive refinement on
    the training part only.

    Parameters
    ----------
    particles : Particles
        Particles with labels in ``obs[labels_key]`` (missing labels are left out).
    labels_key : str
        ``obs`` column holding the labels; every class needs ≥ 2 particles.
    test_size : float
        Fraction of the labelled particles held out.
    seed : int
        Seeds the split.

    Returns
    -------
    (list of str, list of str)
        Training ids and held-out ids, each in ``obs`` order.
    """
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    particles = check_particles(particles, "train_test_ids")
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


def _per_size(y_true: np.ndarray, y_pred: np.ndarray, cats: np.ndarray, size_key: str) -> list:
    from sklearn.metrics import accuracy_score, f1_score  # noqa: PLC0415

    out = []
    for cat in pd.unique(cats):
        m = cats == cat
        present = sorted(np.unique(y_true[m]))
        f1 = f1_score(y_true[m], y_pred[m], labels=present, average="macro", zero_division=0)
        out.append(
            {
                size_key: str(cat),
                "f1": float(f1),
                "accuracy": float(accuracy_score(y_true[m], y_pred[m])),
                "n_classes": len(present),
                "support": int(m.sum()),
            }
        )
    return out


def evaluate_classifier(
    particles: Particles,
    *,
    method: str = "knn",
    labels_key: str = "species",
    use_rep: str = "embedding",
    size_key: str | None = "size_category",
    test_size: float = 0.3,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train on a seeded, stratified split of the labelled particles; score the held-out part.

    Parameters
    ----------
    particles : Particles
        Labelled particles with ``obsm[use_rep]``.
    method : {"knn", "mlp"}
        :func:`knn_classifier` (kwargs ``metric``, ``k``) or :func:`mlp_classifier` (kwargs
        ``hidden``, ``max_iter``, ``alpha``; seeded by ``seed``).
    labels_key : str
        ``obs`` column holding the labels.
    use_rep : str
        ``obsm`` key of the features, (N, D).
    size_key : str or None
        ``obs`` column of size categories for the per-category scores (skipped if None or
        absent).
    test_size : float
        Held-out fraction (:func:`train_test_ids`).
    seed : int
        Seeds the split (and the MLP).
    **kwargs
        Passed to the classifier.

    Returns
    -------
    dict
        ``macro_f1`` and ``accuracy`` (float), ``per_class`` (DataFrame: class, f1,
        precision, recall, support), ``per_size_category`` (DataFrame: size category, macro
        F1 over the classes present in it, accuracy, n_classes, support), ``test_ids``
        (list of str), ``predictions`` (str array aligned with ``test_ids``), ``method`` and
        the fitted ``classifier``.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support  # noqa: PLC0415

    particles = check_particles(particles, "evaluate_classifier")
    if method not in ("knn", "mlp"):
        raise InputError(f"evaluate_classifier: method must be 'knn' or 'mlp', got {method!r}")
    if labels_key not in particles.obs.columns:
        raise InputError(f"evaluate_classifier: obs has no label column {labels_key!r}")
    train_ids, test_ids = train_test_ids(
        particles, labels_key=labels_key, test_size=test_size, seed=seed
    )
    common = {"labels_key": labels_key, "use_rep": use_rep, "rows": train_ids}
    if method == "knn":
        clf = knn_classifier(particles, **common, **kwargs)
    else:
        clf = mlp_classifier(particles, **common, seed=seed, **kwargs)
    test = particles.subset(np.sort(particles.obs.index.get_indexer(test_ids)))
    y_true = test.obs[labels_key].to_numpy().astype(str)
    y_pred = clf.predict(test)
    classes = sorted(np.unique(np.concatenate([y_true, y_pred])))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "f1": f, "precision": p, "recall": r, "support": s})
    per_class = per_class[per_class["support"] > 0].reset_index(drop=True)
    per_size = []
    if size_key is not None and size_key in test.obs.columns:
        cats = test.obs[size_key].astype(object).to_numpy()
        per_size = _per_size(y_true, y_pred, cats, size_key)
    present = sorted(np.unique(y_true))
    return {
        "method": method,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": per_class,
        "per_size_category": pd.DataFrame(per_size),
        "test_ids": test.obs.index.tolist(),
        "predictions": y_pred,
        "classifier": clf,
    }
