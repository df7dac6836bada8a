"""Post-training calibration of the semantic head: undo the prior of class-weighted CE.

Training with class weights ``w_c`` (rare microtubules, actin, DNA up-weighted up to 10×,
:func:`~cryosiam_nb.training.multitask.class_weights_of`) makes the network predict those
classes as if they were ``w_c`` times commoner than they are: on tomograms with few of
them it paints false microtubules and DNA into particles and membranes. The standard
correction (logit adjustment) subtracts ``α · log w_c`` from each class' logit. α = 0
keeps the weighted training's bias, α = 1 removes it fully; the best α is chosen on
**validation** tomograms (:func:`calibrate_semantic_prior`) and folded into the bias of
the layer that outputs the logits (:func:`shift_logits`), so inference is unchanged in
cost and every user of the checkpoint gets it. A per-class offset on top of it
(:func:`calibrate_class_bias`, coordinate ascent on the same validation tomograms) then
corrects what one α cannot: a class the network over- or under-paints whatever its weight.
The same ascent can also choose, per class, the smallest connected component kept by
:func:`~cryosiam_nb.inference.postprocess_semantic` (``min_sizes``): a rare class (actin)
is mostly painted as specks on other structures, so dropping its small components raises
its Dice more than any offset; that setting is stored, not folded into the weights.
Both choices score the Dice of the classes present pooled by :func:`pooled_dice`; the
default weighs every class alike (``objective="class"``), so a class found in one
validation tomogram of several (microtubules) counts as much as one found in all.
The network's logits also drift with the voxel size the data was acquired at (rescaled to
the model's 10 Å it under-calls microtubules at 10 Å and over-calls them at 12–14 Å), so
:func:`calibrate_voxel_size_offsets` chooses further offsets per acquisition voxel size,
stored for ``tl.predict`` to add (:func:`cryosiam_nb.models.logits.at_voxel_size`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cryosiam_nb.io import InputError
from cryosiam_nb.models.logits import shift_logits

from .data import Tomogram

__all__ = [
    "shift_logits",
    "prior_shift",
    "calibrate_semantic_prior",
    "calibrate_lamella_threshold",
    "calibrate_class_bias",
    "calibrate_voxel_size_offsets",
    "class_bias_ascent",
    "pooled_dice",
    "OBJECTIVES",
    "PRIOR_ALPHAS",
    "CLASS_BIAS_STEPS",
    "SEMANTIC_MIN_SIZES",
    "LAMELLA_THRESHOLDS",
]

#: the α values :func:`calibrate_semantic_prior` tries
PRIOR_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: the moves (logit units) :func:`calibrate_class_bias` tries per class and round
CLASS_BIAS_STEPS: tuple[float, ...] = (-1.5, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5)
#: the per-class minimum component sizes (voxels, on the model's grid) the ascent tries
SEMANTIC_MIN_SIZES: tuple[int, ...] = (0, 50, 100, 150, 250, 400, 600)
#: the ``tl.lamella_mask`` thresholds :func:`calibrate_lamella_threshold` tries
LAMELLA_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def prior_shift(class_weights: Sequence[float], alpha: float) -> np.ndarray:
    """``-α · log w_c``: the logit shift that removes a fraction α of the CE class weights'
    prior (α in [0, 1])."""
    w = np.asarray(class_weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(w > 0):
        raise InputError(f"class_weights: expected positive weights, got {list(w)}")
    return (-float(alpha) * np.log(w)).astype(np.float32)


def _dice_per_class(pred: np.ndarray, gt: np.ndarray) -> dict[int, float]:
    """Dice of each class present in ``gt``."""
    out = {}
    for c in np.unique(gt):
        p, g = pred == c, gt == c
        out[int(c)] = 2.0 * np.sum(p & g) / max(int(p.sum() + g.sum()), 1)
    return out


#: how :func:`class_bias_ascent` averages Dice over tomograms and classes
OBJECTIVES: tuple[str, ...] = ("tomogram", "class")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")


def pooled_dice(per_tomogram: Sequence[dict[int, float]], objective: str = "class") -> float:
    """One score from per-tomogram, per-class Dice (:func:`_dice_per_class`).

    ``"tomogram"``: the mean over tomograms of each one's mean over its present classes (a
    class found in few tomograms weighs little). ``"class"``: the mean over classes of each
    class' mean Dice over the tomograms where it is present, so every class weighs the
    same however many tomograms hold it (the per-class targets are stated this way)."""
    _check_objective(objective)
    if objective == "tomogram":
        return float(np.mean([np.mean(list(d.values())) for d in per_tomogram]))
    by_class: dict[int, list[float]] = {}
    for d in per_tomogram:
        for c, v in d.items():
            by_class.setdefault(c, []).append(v)
    return float(np.mean([np.mean(v) for v in by_class.values()]))


def _part_outputs(
    model: Any,
    tomograms: Sequence[Tomogram],
    part: str,
    progress: bool,
    predictions: Sequence[Any] | None = None,
) -> list:
    """The ``part`` outputs (:func:`~cryosiam_nb.inference.outputs_of`) of each validation
    tomogram (which must carry a ``part`` label): from ``predictions`` (computed
    ``tl.predict`` Datasets of ``tomograms``, shared between calibrations; ``None`` entries
    are predicted) or one ``tl.predict`` pass each."""
    from tqdm.auto import tqdm

    from cryosiam_nb.inference import outputs_of, predict

    if not tomograms:
        raise InputError("tomograms: need at least one validation tomogram")
    if predictions is not None and len(predictions) != len(tomograms):
        raise InputError(f"predictions: {len(predictions)} for {len(tomograms)} tomograms")
    out = []
    for i, t in enumerate(tqdm(tomograms, desc=f"calibrate {part}", disable=not progress)):
        if part not in t.labels:
            raise InputError(f"{t.name}: has no {part} labels to calibrate on")
        ds = None if predictions is None else predictions[i]
        if ds is None:
            ds = predict(t.image, model).compute()
        out.append(outputs_of(ds, part))
    return out


def calibrate_semantic_prior(
    model: Any,
    tomograms: Sequence[Tomogram],
    alphas: Sequence[float] = PRIOR_ALPHAS,
    progress: bool = True,
    predictions: Sequence[Any] | None = None,
    objective: str = "class",
) -> tuple[float, pd.DataFrame]:
    """Choose α of the class-weight prior correction on **validation** tomograms.

    Needs ``model.metadata["training"]["class_weights"]["semantic"]`` (the weights the last
    training stage used). Each α is scored by the semantic Dice of the classes present,
    pooled over ``tomograms`` by ``objective`` (:func:`pooled_dice`; one ``tl.predict``
    pass each; the shift is applied to the predicted log-probabilities, which is exact for
    the argmax). Returns the best α and the
    table (one row per α, best first); on a tie the smaller α wins. Does not change
    ``model``: apply the result with ``shift_logits(model, prior_shift(w, alpha))``.
    ``predictions``: the computed ``tl.predict`` Datasets of ``tomograms``, if already made.
    """
    cw = (model.metadata.get("training", {}).get("class_weights") or {}).get("semantic")
    if not cw:
        raise InputError("model: trained without semantic class weights; nothing to calibrate")
    _check_objective(objective)  # before the prediction passes
    logp = _semantic_log_probabilities(model, tomograms, progress, predictions)
    rows = []
    for a in alphas:
        b = prior_shift(cw, a)[:, None, None, None]
        per = [
            _dice_per_class(np.argmax(lp + b, axis=0), np.asarray(t.labels["semantic"]))
            for lp, t in zip(logp, tomograms)
        ]
        rows.append({"alpha": float(a), "semantic_dice": pooled_dice(per, objective)})
    table = pd.DataFrame(rows).sort_values(
        ["semantic_dice", "alpha"], ascending=[False, True], kind="stable"
    )
    return float(table.iloc[0]["alpha"]), table.reset_index(drop=True)


def _semantic_log_probabilities(
    model: Any,
    tomograms: Sequence[Tomogram],
    progress: bool,
    predictions: Sequence[Any] | None,
    base_shift: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Per tomogram, the semantic log-probabilities ``(class, z, y, x)`` of ``model``, with
    ``base_shift`` (per class) added when given."""
    b = 0.0 if base_shift is None else np.asarray(base_shift, np.float32)[:, None, None, None]
    return [
        np.log(np.maximum(o["probabilities"].values.astype(np.float32), 1e-6)) + b
        for o in _part_outputs(model, tomograms, "semantic", progress, predictions)
    ]


def _drop_small(labels: np.ndarray, min_size: Sequence[int]) -> np.ndarray:
    """In-memory twin of :func:`~cryosiam_nb.inference.postprocess_semantic`: face-connected
    components of class ``c`` smaller than ``min_size[c]`` voxels become background."""
    from scipy import ndimage

    out = labels
    for c, size in enumerate(min_size):
        if c == 0 or size <= 1:
            continue
        comp, n = ndimage.label(labels == c)
        if n == 0:
            continue
        small = np.bincount(comp.ravel()) < size
        small[0] = False
        if out is labels:
            out = labels.copy()
        out[small[comp]] = 0
    return out


def _best_other(lp: np.ndarray, bias: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The largest of ``lp + bias`` over the classes other than ``c`` and its class (the
    lowest on ties, like ``np.argmax``)."""
    idx = np.array([k for k in range(len(bias)) if k != c])
    sub = lp[idx] + np.asarray(bias, np.float32)[idx][:, None, None, None]
    j = np.argmax(sub, axis=0)
    return np.take_along_axis(sub, j[None], axis=0)[0], idx[j]


def _argmax_with(value: np.ndarray, c: int, other: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``np.argmax`` over all classes, given class ``c``'s shifted logit ``value`` and
    :func:`_best_other` of the rest (a tie goes to the lower class)."""
    best, arg = other
    wins = (value > best) | ((value == best) & (c < arg))
    return np.where(wins, c, arg)


def class_bias_ascent(
    log_probabilities: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    steps: Sequence[float] = CLASS_BIAS_STEPS,
    rounds: int = 2,
    min_sizes: Sequence[int] = (),
    objective: str = "class",
    start_min_size: Sequence[int] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-class logit offsets that maximise the Dice of the classes present, pooled over
    tomograms by ``objective`` (:func:`pooled_dice`).

    Coordinate ascent: each round visits classes 1, 2, … in turn (class 0, background,
    stays at 0: only differences between logits matter) and keeps the move from ``steps``
    that raises the mean over tomograms most; a move must gain more than 1e-4. With
    ``min_sizes`` (voxels), each visit then also tries those minimum component sizes for
    the class (:func:`~cryosiam_nb.inference.postprocess_semantic`; only classes present in
    some ``labels`` volume: dropping a class no tomogram has always looks right). Returns
    the offsets and the table of accepted moves (the first row is the start); its
    ``min_size`` column holds the per-class sizes (index = class, 0 = off), the last row's
    being the result. ``start_min_size``: the per-class sizes to start from (default all
    0); without ``min_sizes`` they stay fixed, so the offsets are chosen for them.
    """
    if not log_probabilities or len(log_probabilities) != len(labels):
        raise InputError("class bias: need one label volume per prediction, at least one")
    labels = [np.asarray(g) for g in labels]
    present = set().union(*(np.unique(g).tolist() for g in labels))

    def argmaxes(b: np.ndarray) -> list[np.ndarray]:
        return [np.argmax(lp + b[:, None, None, None], axis=0) for lp in log_probabilities]

    _check_objective(objective)

    def score(pred: list[np.ndarray], sizes: list[int]) -> float:
        per = [_dice_per_class(_drop_small(p, sizes), g) for p, g in zip(pred, labels)]
        return pooled_dice(per, objective)

    bias = np.zeros(log_probabilities[0].shape[0], np.float32)
    sizes = [0] * len(bias) if start_min_size is None else [int(v) for v in start_min_size]
    if len(sizes) != len(bias) or min(sizes) < 0:
        raise InputError(
            f"start_min_size: expected {len(bias)} sizes ≥ 0 voxels, got {start_min_size}"
        )
    current = argmaxes(bias)  # the labels of the accepted offsets (sizes trials reuse them)
    best = score(current, sizes)
    rows = [
        {
            "round": 0,
            "class": None,
            "bias": bias.tolist(),
            "min_size": list(sizes),
            "semantic_dice": best,
        }
    ]
    for rnd in range(1, rounds + 1):
        for c in range(1, len(bias)):
            top: tuple | None = None  # the best trial (score, bias, sizes, labels) so far
            # only class c's offset moves: the other classes' best is computed once
            others = [_best_other(lp, bias, c) for lp in log_probabilities]
            for step in steps:
                b = bias.copy()
                b[c] += step
                pred = [
                    _argmax_with(lp[c] + b[c], c, o) for lp, o in zip(log_probabilities, others)
                ]
                t = score(pred, sizes)
                if top is None or t > top[0]:
                    top = (t, b, sizes, pred)
            if min_sizes and c in present:
                for size in min_sizes:
                    if size != sizes[c]:
                        sz = sizes[:c] + [int(size)] + sizes[c + 1 :]
                        t = score(current, sz)
                        if top is None or t > top[0]:
                            top = (t, bias, sz, current)
            s, b, sz, pred = top if top is not None else (best, bias, sizes, current)
            if s > best + 1e-4:
                best, bias, sizes, current = s, b, sz, pred
                rows.append(
                    {
                        "round": rnd,
                        "class": c,
                        "bias": bias.tolist(),
                        "min_size": list(sizes),
                        "semantic_dice": s,
                    }
                )
    return bias, pd.DataFrame(rows)


def calibrate_class_bias(
    model: Any,
    tomograms: Sequence[Tomogram],
    base_shift: Sequence[float] | None = None,
    steps: Sequence[float] = CLASS_BIAS_STEPS,
    rounds: int = 2,
    progress: bool = True,
    predictions: Sequence[Any] | None = None,
    min_sizes: Sequence[int] = (),
    objective: str = "class",
) -> tuple[np.ndarray, pd.DataFrame]:
    """Choose a per-class offset of the semantic logits on **validation** tomograms.

    Runs :func:`class_bias_ascent` on ``model``'s predictions with ``base_shift`` (e.g. the
    α prior correction, :func:`prior_shift`) added to their logits; the offsets come on top
    of it. ``predictions``: the computed ``tl.predict`` Datasets of ``tomograms``, if
    already made. ``min_sizes``: also choose each class' minimum component size (the
    table's last ``min_size``; see :func:`class_bias_ascent`). ``objective``: how Dice is
    pooled over tomograms (:func:`pooled_dice`). Does not change ``model``:
    apply the result with ``shift_logits(model, base_shift + bias)``.
    """
    _check_objective(objective)  # before the prediction passes
    logp = _semantic_log_probabilities(model, tomograms, progress, predictions, base_shift)
    truth = [t.labels["semantic"] for t in tomograms]
    return class_bias_ascent(logp, truth, steps, rounds, min_sizes, objective)


def calibrate_voxel_size_offsets(
    model: Any,
    by_voxel_size: Mapping[float, Sequence[Tomogram]],
    min_size: Sequence[int],
    base_shift: Sequence[float] | None = None,
    steps: Sequence[float] = CLASS_BIAS_STEPS,
    rounds: int = 2,
    progress: bool = True,
    predictions: Mapping[float, Sequence[Any]] | None = None,
    objective: str = "class",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per-class semantic offsets for each acquisition voxel size, on **validation**
    tomograms acquired at that size and rescaled to the model's.

    ``by_voxel_size``: voxel size (Å) → tomograms simulated at it and rescaled to the
    model's grid (labels on that grid). For each size, :func:`class_bias_ascent` starts
    from ``model``'s logits plus ``base_shift`` (the calibration about to be folded in;
    ``None``: the model as it is) with the per-class minimum component sizes ``min_size``
    (voxels) fixed. Returns the table ``tl.predict`` reads from
    ``metadata["semantic_prior"]["by_voxel_size"]`` — ``voxel_size`` (Å, increasing),
    ``offset`` (per size, per class), ``dice_before`` / ``dice`` (pooled Dice without /
    with the offsets) — and a summary DataFrame (one row per size). ``predictions``:
    voxel size → the computed ``tl.predict`` Datasets of its tomograms, if already made.
    Does not change ``model``.
    """
    _check_objective(objective)
    if not by_voxel_size:
        raise InputError("by_voxel_size: no voxel size to calibrate")
    rows = []
    for vs in sorted(by_voxel_size, key=float):
        tomos = list(by_voxel_size[vs])
        preds = None if predictions is None else predictions.get(vs)
        logp = _semantic_log_probabilities(model, tomos, progress, preds, base_shift)
        truth = [t.labels["semantic"] for t in tomos]
        off, table = class_bias_ascent(
            logp, truth, steps, rounds, (), objective, start_min_size=min_size
        )
        rows.append(
            {
                "voxel_size": float(vs),
                "offset": [float(x) for x in off],
                "dice_before": float(table.iloc[0]["semantic_dice"]),
                "dice": float(table.iloc[-1]["semantic_dice"]),
                "tomograms": len(tomos),
            }
        )
    summary = pd.DataFrame(rows)
    out = {k: summary[k].tolist() for k in ("voxel_size", "offset", "dice_before", "dice")}
    return out, summary


def calibrate_lamella_threshold(
    model: Any,
    tomograms: Sequence[Tomogram],
    thresholds: Sequence[float] = LAMELLA_THRESHOLDS,
    progress: bool = True,
    predictions: Sequence[Any] | None = None,
) -> tuple[float, pd.DataFrame]:
    """Choose ``tl.lamella_mask``'s threshold (on the smoothed sample probability) on
    **validation** tomograms with a ``lamella`` label.

    Each threshold is scored by the Dice of the mask against the true sample, averaged over
    ``tomograms`` (one ``tl.predict`` pass each). Returns the best threshold and the table
    (best first; on a tie the higher, SPEC-like threshold wins). Store it as
    ``model.metadata["lamella_defaults"] = {"threshold": t}``. ``predictions``: the
    computed ``tl.predict`` Datasets of ``tomograms``, if already made.
    """
    from cryosiam_nb.inference import lamella_mask

    probs = _part_outputs(model, tomograms, "lamella", progress, predictions)
    rows = []
    for thr in thresholds:
        scores = []
        for p, t in zip(probs, tomograms):
            m = np.asarray(lamella_mask(p, threshold=float(thr), progress=False).values) > 0
            g = np.asarray(t.labels["lamella"]) > 0
            scores.append(2.0 * np.sum(m & g) / max(int(m.sum() + g.sum()), 1))
        rows.append({"threshold": float(thr), "lamella_dice": float(np.mean(scores))})
    table = pd.DataFrame(rows).sort_values(
        ["lamella_dice", "threshold"], ascending=[False, False], kind="stable"
    )
    return float(table.iloc[0]["threshold"]), table.reset_index(drop=True)
