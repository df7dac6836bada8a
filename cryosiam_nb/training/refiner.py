"""Train and calibrate the semantic refiner of a multi-task model
(:class:`~cryosiam_nb.models.networks.SemanticRefiner`).

The refiner is a second, small network that reads what the multi-task heads made of a
tomogram (the input, the denoised map and the semantic log-probabilities) and corrects the
semantic logits with more context than the heads see. It is trained on the whole-tomogram
predictions of the frozen, calibrated multi-task model (``tl.predict``), one random patch
at a time, then its own per-class offsets and minimum component sizes are chosen on
calibration tomograms and folded into its last layer.

Measured on validation tomograms 7201–7216 (2026-12-07; ``tl.predict`` + the model's
``semantic_defaults``): the recipe's refiner (instance norm) raised semantic Dice 0.561 →
0.578, actin 0.152 → 0.204 and microtubule 0.559 → 0.611 (DNA 0.174 → 0.155); the same
recipe with BatchNorm reached only 0.565 / actin 0.162. A first experiment trained on
general samples alone reached actin 0.267 (stitched inputs, no DNA in its data, so DNA
fell to 0). The refiner costs about 35 % more inference time (2.1 vs 1.56 µs/voxel).

It is trained on stitched whole-tomogram outputs, and ``tl.predict`` runs it that way: a
second sliding-window pass over the stitched (input, denoised, probabilities) volume
(:mod:`cryosiam_nb.inference._refine`). Until 2026-12-07 it ran inside every heads window,
on the heads' in-window outputs; run instead over the stitched outputs (measured offline
then with MONAI ``sliding_window_inference``, 64³, overlap 0.125), the shipped refiner
scored higher on validation tomograms 7201–7216 with the same offsets: Dice over present
classes 0.673 vs 0.666, actin 0.224 vs 0.190, microtubule 0.622 vs 0.612, membrane and
particle equal. :func:`calibrate_refiner` calibrates on the second-pass path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from cryosiam_nb.io import InputError

from .data import Tomogram

__all__ = [
    "refiner_inputs",
    "train_refiner",
    "calibrate_refiner",
    "refine_shipped_multitask",
    "REFINER_DEFAULTS",
    "refiner_recipe",
    "QUICK_REFINER",
]

#: training settings of :func:`train_refiner` (the recipe's ``multitask["refiner"]``
#: overrides them): patch side (voxels), patches per step, steps, peak learning rate
#: (one-cycle), the share of patches centred on a voxel of ``focus`` classes, the classes
#: whose soft Dice is added to the CE loss (weight ``dice_weight``), and the cap of the
#: CE class weights (square root of inverse frequency, the most common class 1)
REFINER_DEFAULTS: dict[str, Any] = {
    "patch_size": 48,
    "batch_size": 4,
    "steps": 3000,
    "lr": 2e-3,
    "focus": ("microtubule", "actin"),
    "focus_fraction": 0.6,
    "dice_classes": ("actin",),
    "dice_weight": 0.5,
    "max_class_weight": 10.0,
    "seed": 0,
}


def refiner_recipe(rich: dict[str, Any], calibration: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The recipe's refiner (``RECIPE["multitask"]["refiner"]``): its tomograms (``sets``
    of :func:`~cryosiam_nb.training.multitask.varied_training_set`, 96×160×160 voxels
    simulated at 8–12 Å and rescaled to 10 Å), training settings overriding
    :data:`REFINER_DEFAULTS` and the ``calibration`` tomograms (specs of
    :func:`~cryosiam_nb.training.multitask_recipe.default_imaging_set`, at 10 Å).
    ``rich``: the per-sample structure counts of the actin- and microtubule-rich general
    scenes (the recipe passes stage 3's); 40 of them with the default dose, 20 at
    projection SNR 0.02–0.4, and 20 of the sample mix (half at low SNR).

    Against the first recipe (60 tomograms, 48³ patches × 4, 3000 steps, calibration on
    the four ``calibration_set`` tomograms), on validation tomograms 7201–7216
    (2026-12-07, ``tl.predict`` + ``semantic_defaults``, means over tomograms): membrane
    Dice 0.779 vs 0.758 (higher on all 14 with membrane), Dice over present classes
    0.666 vs 0.666 (0.569 vs 0.568 without background), particle 0.770 vs 0.776, actin
    0.190 vs 0.204, DNA 0.135 vs 0.155. Calibrated on the four tomograms alone, the new
    refiner reached actin 0.211 but particle 0.744 (0.663); the first refiner calibrated
    on the eight, 0.662.

    Membrane's soft Dice added to actin's (``dice_classes``; the same tomograms, seeds and
    steps, 2026-12-07), against actin's alone, each calibrated on the eight scenes and run
    as the second pass, on the same validation tomograms and host: Dice over present
    classes 0.681 vs 0.674, membrane 0.784 vs 0.779, actin 0.255 vs 0.225, DNA 0.160 vs
    0.150, microtubule 0.615 vs 0.620, particle 0.774 vs 0.775."""
    low = {"snr_range": (0.02, 0.4)}
    mix = ("general", "transcription", "chromatin", "general")
    general = {"samples": ("general",), "structures": rich}
    return {
        "sets": (
            {"n": 20, "seed": 8000, **general},
            {"n": 20, "seed": 8020, **general, **low},
            {"n": 10, "seed": 8100, "samples": mix},
            {"n": 10, "seed": 8110, "samples": mix, **low},
            {"n": 20, "seed": 8040, **general},
        ),
        "shape": (96, 160, 160),
        "voxel_range": (8.0, 12.0),
        "patch_size": 64,
        "batch_size": 2,
        "steps": 5000,
        "dice_classes": ("actin", "membrane"),
        "calibration": tuple(calibration),
    }


#: the QUICK recipe's refiner (a smoke run of the same code on two tiny tomograms)
QUICK_REFINER: dict[str, Any] = {
    "sets": ({"n": 2, "seed": 8000, "samples": ("general",)},),
    "mode": "fast",
    "shape": (32, 48, 48),
    "voxel_range": (9, 11),
    "patch_size": 24,
    "steps": 3,
}


def _without_refiner(model: Any) -> Any:
    import copy

    if getattr(model, "refiner", None) is None:
        return model
    base = copy.deepcopy(model)
    base.remove_refiner()
    return base


def _as_input(t: Tomogram, model: Any) -> xr.DataArray:
    """``t``'s image as ``tl.predict`` input, (z, y, x) with its voxel size (Å)."""
    vs = float(t.voxel_size or model.voxel_size or 10.0)
    return xr.DataArray(
        np.asarray(t.image, np.float32), dims=("z", "y", "x"), attrs={"voxel_size": vs}
    )


def refiner_inputs(
    model: Any, tomograms: Sequence[Tomogram], progress: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(inputs, labels)]`` per tomogram: ``inputs`` float16 ``(2 + C, Z, Y, X)`` (the
    normalised tomogram, ``model``'s denoised map, its semantic probabilities from
    ``tl.predict`` without any refiner), ``labels`` the semantic label volume (uint8)."""
    from tqdm.auto import tqdm

    from cryosiam_nb.inference import predict

    base = _without_refiner(model)
    out = []
    for t in tqdm(tomograms, desc="refiner inputs", disable=not progress):
        if "semantic" not in t.labels:
            raise InputError(f"{t.name}: no semantic labels to train the refiner on")
        img = _as_input(t, base)
        ds = predict(img, base).compute()
        x = np.concatenate(
            [
                img.values[None],
                ds["denoised"].values[None],
                ds["semantic_probabilities"].values,
            ]
        ).astype(np.float16)
        out.append((x, np.asarray(t.labels["semantic"], np.uint8)))
    return out


def _class_indices(setting: str, wanted: Sequence[str], names: Sequence[str]) -> list[int]:
    """Indices of the semantic classes ``wanted`` (a refiner setting) among the model's
    ``names``; a name the model does not have is an error (a misspelt class would
    otherwise drop out of the loss silently)."""
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise InputError(
            f"refiner setting {setting!r}: no semantic class {unknown} in this model; "
            f"its classes are {list(names)}"
        )
    return [list(names).index(c) for c in wanted]


def _class_weights(labels: Sequence[np.ndarray], n: int, cap: float) -> np.ndarray:
    counts = np.zeros(n)
    for y in labels:
        counts += np.bincount(y.ravel(), minlength=n)[:n]
    w = np.sqrt(counts.sum() / np.maximum(counts, 1) / n)
    w = np.clip(w / w[counts > 0].min(), 1.0, cap)
    return w.astype(np.float32)


def _patch(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    centres: np.ndarray,
    p: int,
    focus: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One patch (side ``p``), centred near a focus voxel with probability ``focus``,
    randomly flipped on each axis and turned by k·90° in the (y, x) plane."""
    shape = np.array(y.shape)
    if rng.random() < focus and len(centres):
        c = centres[rng.integers(len(centres))]
        lo = np.clip(c - p // 2 + rng.integers(-8, 9, 3), 0, shape - p)
    else:
        lo = np.array([rng.integers(0, n - p + 1) for n in shape])
    sl = tuple(slice(int(a), int(a) + p) for a in lo)
    xp, yp = x[(slice(None), *sl)].astype(np.float32), y[sl].astype(np.int64)
    for ax in range(3):
        if rng.random() < 0.5:
            xp, yp = np.flip(xp, ax + 1), np.flip(yp, ax)
    k = int(rng.integers(4))
    xp, yp = np.rot90(xp, k, (2, 3)), np.rot90(yp, k, (1, 2))
    return np.ascontiguousarray(xp), np.ascontiguousarray(yp)


def train_refiner(
    model: Any,
    data: Sequence[tuple[np.ndarray, np.ndarray]],
    out: str | Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Give ``model`` (multi-task, calibrated) a fresh refiner and train it on ``data``
    (:func:`refiner_inputs`); the rest of the model is not touched.

    Loss: CE with class weights (square root of inverse frequency over ``data``, capped)
    plus ``dice_weight`` × the soft Dice of ``dice_classes``. ``settings`` override
    :data:`REFINER_DEFAULTS`. With ``out`` (a file), the optimiser state is saved there every
    250 steps and an interrupted run resumes from it; the file is removed at the end.
    Returns the training record stored in ``model.metadata["semantic_refiner"]``.
    """
    from tqdm.auto import tqdm

    st = {**REFINER_DEFAULTS, **settings}
    unknown = sorted(set(settings) - set(REFINER_DEFAULTS))
    if unknown:
        raise InputError(f"refiner settings: unknown {unknown}; known {sorted(REFINER_DEFAULTS)}")
    if not data:
        raise InputError("refiner: no training tomograms")
    names = list(model.part_classes.get("semantic", ()))
    n = len(names)
    p = int(st["patch_size"])
    small = [i for i, (_, y) in enumerate(data) if min(y.shape) < p]
    if small:
        raise InputError(f"refiner: tomograms {small} are smaller than the {p}-voxel patch")
    focus = _class_indices("focus", st["focus"], names)
    dice = _class_indices("dice_classes", st["dice_classes"], names)
    refiner = model.add_refiner()
    dev = next(model.parameters()).device
    refiner.to(dev)
    w = _class_weights([y for _, y in data], n, float(st["max_class_weight"]))
    centres = [np.argwhere(np.isin(y[::2, ::2, ::2], focus)) * 2 for _, y in data]
    steps = int(st["steps"])
    opt = torch.optim.AdamW(refiner.parameters(), lr=float(st["lr"]), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, float(st["lr"]), total_steps=steps, pct_start=0.05
    )
    start = 0
    state = Path(out) if out else None
    if state is not None and state.exists():
        ck = torch.load(state, map_location=dev, weights_only=True)
        refiner.load_state_dict(ck["refiner"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = int(ck["step"])
    torch.manual_seed(int(st["seed"]) + start)
    rng = np.random.default_rng([int(st["seed"]), start])
    wt = torch.as_tensor(w, device=dev)
    refiner.train()
    t0, run = time.perf_counter(), None
    bar = tqdm(range(start, steps), desc="refiner", disable=not progress)
    for step in bar:
        xb, yb = [], []
        for _ in range(int(st["batch_size"])):
            i = int(rng.integers(len(data)))
            xp, yp = _patch(rng, *data[i], centres[i], p, float(st["focus_fraction"]))
            xb.append(xp)
            yb.append(yp)
        x = torch.from_numpy(np.stack(xb)).to(dev)
        y = torch.from_numpy(np.stack(yb)).to(dev)
        logits = torch.log(x[:, 2:].clamp(min=1e-6))
        pred = refiner(x[:, :1], x[:, 1:2], logits)
        loss = F.cross_entropy(pred, y, weight=wt)
        prob = pred.softmax(1)
        for c in dice:
            pc, gc = prob[:, c], (y == c).float()
            loss = loss + float(st["dice_weight"]) * (
                1 - (2 * (pc * gc).sum() + 1) / (pc.sum() + gc.sum() + 1)
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run:.3f}")
        if state is not None and ((step + 1) % 250 == 0 or step + 1 == steps):
            tmp = state.with_name(state.name + ".tmp")
            torch.save(
                {
                    "refiner": refiner.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                },
                tmp,
            )
            tmp.replace(state)
    refiner.eval()
    if state is not None and state.exists():
        state.unlink()
    record = {
        "training": {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()},
        "class_weights": [float(v) for v in w],
        "tomograms": len(data),
        "final_loss": float(run) if run is not None else None,
        "train_seconds": time.perf_counter() - t0,
    }
    model.metadata["semantic_refiner"] = record
    return record


def calibrate_refiner(
    model: Any,
    tomograms: Sequence[Tomogram],
    progress: bool = True,
) -> tuple[np.ndarray, list[int], Any]:
    """Per-class offsets of the refined logits and the per-class minimum component sizes,
    chosen together by :func:`~cryosiam_nb.training.calibration.class_bias_ascent` (each
    class weighed alike) on ``tomograms`` (the simulator's default imaging), starting from
    the model's current ``semantic_defaults``. The offsets are folded into the refiner's
    last layer, the sizes stored in ``metadata["semantic_defaults"]``; returns
    ``(offsets, sizes, table of accepted moves)``."""
    from tqdm.auto import tqdm

    from cryosiam_nb.inference import predict

    from .calibration import SEMANTIC_MIN_SIZES, class_bias_ascent

    if getattr(model, "refiner", None) is None:
        raise InputError("calibrate_refiner: the model has no refiner")
    if not tomograms:
        raise InputError("calibrate_refiner: no calibration tomograms")
    lps, gts = [], []
    for t in tqdm(tomograms, desc="calibrate refiner", disable=not progress):
        img = _as_input(t, model)
        prob = predict(img, model)["semantic_probabilities"].values
        lps.append(np.log(np.clip(prob, 1e-6, None)).astype(np.float32))
        gts.append(np.asarray(t.labels["semantic"]))
    start = (model.metadata.get("semantic_defaults") or {}).get("min_size")
    bias, table = class_bias_ascent(lps, gts, min_sizes=SEMANTIC_MIN_SIZES, start_min_size=start)
    sizes = [int(v) for v in table.iloc[-1]["min_size"]]
    with torch.no_grad():
        b = model.refiner.head.bias
        b += torch.as_tensor(bias, dtype=b.dtype, device=b.device)
    rec = model.metadata.setdefault("semantic_refiner", {})
    if start is not None:  # the heads' own sizes, restored by ``remove_refiner``
        rec.setdefault("heads_min_size", [int(v) for v in start])
    model.metadata["semantic_defaults"] = {"min_size": sizes}
    rec["class_bias"] = [float(v) for v in bias]
    rec["calibrated_semantic_dice"] = float(table.iloc[-1]["semantic_dice"])
    return bias, sizes, table


def uncalibrate_refiner(model: Any) -> None:
    """Undo :func:`calibrate_refiner`: subtract its offsets from the refiner's last layer
    and restore the heads' minimum component sizes (before calibrating it again, e.g.
    after the way inference runs it changed)."""
    rec = model.metadata.get("semantic_refiner") or {}
    if getattr(model, "refiner", None) is None or rec.get("class_bias") is None:
        raise InputError("uncalibrate_refiner: the model has no calibrated refiner")
    with torch.no_grad():
        b = model.refiner.head.bias
        b -= torch.as_tensor(rec.pop("class_bias"), dtype=b.dtype, device=b.device)
    if rec.get("heads_min_size") is not None:
        model.metadata["semantic_defaults"] = {"min_size": list(rec["heads_min_size"])}


def refine_shipped_multitask(
    cfg: dict[str, Any],
    out: Path,
    command: str,
    progress: bool = True,
    resume: bool = False,
    chained: bool = False,
    train: bool = True,
) -> dict[str, float]:
    """Train the semantic refiner of ``out/tiny-multitask.pt`` (replacing any) on
    ``cfg["multitask"]["refiner"]``'s tomograms, calibrate it (:func:`calibrate_refiner`)
    on its ``calibration`` tomograms (default: the multi-task recipe's
    ``calibration_val``) and rewrite the card. ``train=False`` keeps the trained refiner
    and only calibrates it again (:func:`uncalibrate_refiner` first).
    Without a ``refiner`` entry nothing is done (``{}``). ``resume`` continues an
    interrupted training from its state file beside the checkpoint. ``chained``: run as
    the last step of a command already recorded in the checkpoint's command history."""
    from cryosiam_nb import models

    from .multitask_card import _card
    from .multitask_recipe import STRUCTURES, _save_with_metadata, default_imaging_set

    mc = dict(cfg["multitask"])
    rc = mc.get("refiner")
    if not rc:
        return {}
    path = out / "tiny-multitask.pt"
    if not path.exists():
        raise InputError(f"{path}: no checkpoint to refine; train the multi-task model first")
    model = models.load(path)
    if train:
        record = _train_recipe_refiner(model, rc, path, progress, resume)
    else:
        uncalibrate_refiner(model)
        record = model.metadata["semantic_refiner"]
    specs = rc.get("calibration") or (mc.get("calibration_val"),)
    cal = [t for spec in specs for t in default_imaging_set(spec, progress)]
    _, sizes, table = calibrate_refiner(model, cal, progress)
    record["calibration"] = [dict(spec) for spec in specs]
    print("semantic refiner: per-class offsets and minimum sizes (accepted moves):")
    print(table.to_string(index=False))
    metrics = dict(model.metadata.get("metrics", {}))
    metrics["refined_semantic_dice"] = float(table.iloc[-1]["semantic_dice"])
    metrics["refined_semantic_dice_before_offsets"] = float(table.iloc[0]["semantic_dice"])
    model.metadata["metrics"] = metrics
    if not chained:
        stamp = time.strftime("%Y-%m-%d", time.gmtime())
        model.metadata["commands"] = [*model.metadata.get("commands", []), f"{stamp} `{command}`"]
    _save_with_metadata(model, path)
    _card(path.with_suffix(".md"), model, mc, command, metrics, STRUCTURES)
    return {k: v for k, v in metrics.items() if k.startswith("refined_")}


def _train_recipe_refiner(
    model: Any, rc: dict[str, Any], path: Path, progress: bool, resume: bool
) -> dict[str, Any]:
    """Simulate the refiner recipe ``rc``'s tomograms and train a new refiner of ``model``
    on them (optimiser state beside ``path``); returns its record."""
    from .multitask import varied_training_set

    model.remove_refiner()
    tomos: list = []
    for spec in rc["sets"]:
        tomos += varied_training_set(
            spec["n"],
            rc["shape"],
            spec["seed"],
            voxel_range=tuple(rc["voxel_range"]),
            samples=tuple(spec["samples"]),
            structures=spec.get("structures"),
            mode=rc.get("mode", "tilt"),
            snr_range=tuple(spec["snr_range"]) if spec.get("snr_range") else None,
            progress=progress,
        )
    data = refiner_inputs(model, tomos, progress)
    del tomos
    state = path.with_name(path.stem + ".refiner.state")
    if not resume and state.exists():
        state.unlink()
    settings = {k: rc[k] for k in REFINER_DEFAULTS if k in rc}
    record = train_refiner(model, data, out=state, progress=progress, **settings)
    record["sets"] = [dict(s) for s in rc["sets"]]
    record["shape"] = list(rc["shape"])
    record["voxel_range"] = list(rc["voxel_range"])
    return record
