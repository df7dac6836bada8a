"""The model card of the recipe's ``tiny-multitask.pt`` (``tiny-multitask.md``): how it
was made (every stage and calibration, from the checkpoint's metadata), its validation
metrics, and the hand-written selection section kept verbatim across rewrites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cryosiam_nb.io import atomic_path

from .multitask import SMALL_F1_FLOOR

__all__ = ["STAGE_NOTES", "HAND_SECTION"]

#: what each continuation stage does, in words, for the model card
STAGE_NOTES = {
    "stage2": "the same generator with the noise set by a projection SNR drawn "
    "log-uniformly in `snr_range`",
    "stage3": "more microtubules and actin per tomogram (`structures`), class-weighted CE "
    "(`training.multitask.class_weights_of`) and more class-balanced patches",
    "stage4": "as stage 3, with the instance loss's foreground and distance terms weighted "
    "`small_weight`× on particles under 150 voxels (`models.targets.small_instance_weights`)",
    "stage5": "as stage 3 on fresh seeds, with twice the default DNA in the transcription sample",
    "stage6": "the instance head alone (backbone frozen, the other heads' loss weight 0, so "
    "they are frozen too) on stage 5's kind of data, with particles under 150 voxels "
    "weighted `small_weight`× in the instance loss",
    "stage7": "stage 6 again on fresh seeds (24 epochs at lr 5e-4)",
    "stage8": "the semantic head alone (backbone frozen, the other heads kept) on stage 5's "
    "kind of data",
    "stage9": "stage 5's kind of data with the projection SNR drawn down to 0.02 "
    "(`snr_range`), small particles weighted `small_weight`× in the instance loss",
    "stage10": "stage 6 again (the same data and seed) on the stage-9 backbone",
    "stage11": "stage 9's kind of data on fresh seeds with 64³ training patches (the "
    "inference window), one patch per step",
}


def _trained_part(stage: dict[str, Any]) -> str:
    """What a continuation stage trains, in words, for the model card."""
    idle = [t for t, w in (stage.get("loss_weights") or {}).items() if not w]
    frozen = stage.get("freeze", "none")
    if not idle and frozen == "none":
        return "all weights continue"
    parts = [f"{frozen} frozen"] if frozen != "none" else []
    if idle:
        parts.append(f"the {', '.join(idle)} heads kept as they were")
    return "; ".join(parts)


def _stage_patch(stage: dict[str, Any], model: Any) -> tuple[int, ...]:
    """The training patch (voxels, z y x) of a stage: recorded since stages could set their
    own; older stages trained on the preset's patch."""
    if stage.get("patch_size"):
        return tuple(int(v) for v in stage["patch_size"])
    from cryosiam_nb.models import PRESETS

    return tuple(PRESETS[model.config.get("preset", "tiny")]["patch_size"])


def _stages_of(md: dict[str, Any]) -> dict[str, dict]:
    """Training settings of every stage a checkpoint went through (oldest first)."""
    if md.get("stages"):
        return dict(md["stages"])
    if md.get("stage1"):
        return {"stage1": md["stage1"], "stage2": md.get("training", {})}
    return {"stage1": md.get("training", {})}


#: a card section written by hand (model selection, held-out numbers): kept verbatim when
#: the recipe rewrites the card, since the recipe cannot measure it itself
HAND_SECTION = "## Selection and held-out quality"


def _hand_section(path: Path) -> list[str]:
    """The :data:`HAND_SECTION` of the card at ``path`` (up to the next ``## `` heading),
    or nothing."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    if HAND_SECTION not in lines:
        return []
    start = lines.index(HAND_SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():  # no trailing blank lines
        end -= 1
    return lines[start:end]


def _card(
    path: Path,
    model: Any,
    mc: dict[str, Any],
    command: str,
    metrics: dict,
    structures: dict[str, dict[str, float]],
) -> None:
    """Write the model card of ``model`` (recipe settings ``mc``, stage 1's extra
    ``structures`` per sample) to ``path``."""
    md = model.metadata
    tr = md.get("training", {})
    runs = md.get("commands") or []
    lines = [
        f"# {path.stem}",
        "",
        "Task: `multitask` (one backbone; denoise, lamella, semantic + distance and instance "
        "heads) · preset `tiny` · trained by cryosiam_nb's own recipe (no external weights).",
        "",
        "## How it was made",
        f"- Command: `{command}`",
        *(
            ["- Runs that made these weights (UTC date, command, notes), in order:"]
            + [f"  {i}. {r}" for i, r in enumerate(runs, 1)]
            if len(runs) > 1
            else []
        ),
        f"- Data: {mc['n']} training tomograms from `training.multitask.varied_training_set("
        f"n={mc['n']}, shape={tuple(mc['shape'])}, seed={mc['seed']}, voxel_range="
        f"{tuple(mc['voxel_range'])})` — samples general/general/transcription/chromatin, "
        f"voxel size drawn in {tuple(mc['voxel_range'])} Å and rescaled to 10 Å, thickness "
        "45–90 % of the volume, defocus 2–5 µm, dose 60–140 e⁻/Å², crowding 0.15–0.35, "
        f"tilt-series imaging; extra structures {structures}",
        f"- Validation: {mc['val_n']} tomograms, shape {tuple(mc['val_shape'])}, seeds "
        f"{mc['val_seed']}+i (never trained on)",
        f"- Backbone initialised from `{mc.get('backbone')}`; whole network trained",
        *[
            f"- {name.capitalize()} ({_trained_part(mc[name])}): "
            f"`{json.dumps(mc[name], default=str)}`"
            f" — {STAGE_NOTES[name]}; validation adds its own held-out seeds"
            for name in _stages_of(md)
            if name in STAGE_NOTES and mc.get(name)
        ],
        *[
            f"- {name.capitalize()} steps: {t.get('steps')} × batch {t.get('batch_size')} "
            f"patches of {_stage_patch(t, model)} voxels ({t.get('epochs')} epochs), AdamW "
            f"one-cycle, lr {t.get('lr')}, class-balanced patches "
            f"({t.get('foreground_fraction')}), CE class weights {t.get('class_weights')}, "
            f"small-particle instance weight {t.get('small_weight', 1.0)}"
            for name, t in _stages_of(md).items()
            if t
        ],
        f"- Loss weights: {tr.get('loss_weights')}",
        f"- Training time: {md.get('train_seconds', 0) / 60:.0f} min on "
        f"{md.get('train_threads', '?')} CPU thread(s)",
        f"- Training settings: `{json.dumps(tr, default=str)}`",
        *(
            [
                "- Semantic prior correction (`training.calibration`): the logits' bias is "
                f"shifted by −α·log(class weight), α = {md['semantic_prior']['alpha']} chosen "
                "on the calibration tomograms listed below (each class' Dice averaged over "
                "the tomograms that hold it, then over classes): "
                + ", ".join(
                    f"α {r['alpha']}: {r['semantic_dice']:.3f}"
                    for r in sorted(md["semantic_prior"]["table"], key=lambda r: r["alpha"])
                )
                + (
                    "; then per-class offsets (`training.calibration.calibrate_class_bias`, "
                    "coordinate ascent on the same tomograms) "
                    f"{[round(b, 2) for b in md['semantic_prior']['class_bias']]} for "
                    f"{list(model.part_classes.get('semantic', ()))}: mean Dice "
                    f"{md['semantic_prior']['class_bias_dice']:.3f}"
                    if "class_bias" in md["semantic_prior"]
                    else ""
                )
            ]
            if md.get("semantic_prior")
            else []
        ),
        *(
            [
                "- Per-acquisition-voxel-size semantic offsets on top "
                "(`training.calibration.calibrate_voxel_size_offsets`: the same ascent, "
                "minimum sizes fixed, on the simulator's default imaging at each voxel size, "
                "rescaled to 10 Å: `voxel_calibration` "
                f"`{json.dumps(mc.get('voxel_calibration'))}`; `tl.predict` adds the offsets "
                "for the input's `attrs['rescaled_from']`, interpolated between sizes): "
                + "; ".join(
                    f"{v:g} Å {[round(o, 2) for o in off]} (Dice {d0:.3f} → {d1:.3f})"
                    for v, off, d0, d1 in zip(
                        md["semantic_prior"]["by_voxel_size"]["voxel_size"],
                        md["semantic_prior"]["by_voxel_size"]["offset"],
                        md["semantic_prior"]["by_voxel_size"]["dice_before"],
                        md["semantic_prior"]["by_voxel_size"]["dice"],
                    )
                )
            ]
            if (md.get("semantic_prior") or {}).get("by_voxel_size")
            else []
        ),
        *(
            [
                "- Semantic post-processing chosen in the same ascent (smallest connected "
                "component kept per class, voxels at the model's voxel size; 0 = off): "
                f"`{json.dumps(md['semantic_defaults'])}` — pass it to "
                "`tl.postprocess_semantic` as `**model.metadata['semantic_defaults']` (the "
                "demo and workflow do)"
            ]
            if md.get("semantic_defaults")
            else []
        ),
        *(
            [
                "- Semantic refiner (`models.networks.SemanticRefiner`, "
                f"`{json.dumps(model.config.get('refiner'))}`): a small U-Net trained last "
                "(`training.refiner.train_refiner`; backbone and heads untouched) on the "
                "calibrated model's own `tl.predict` output for "
                f"{md['semantic_refiner'].get('tomograms')} tomograms "
                f"(`{json.dumps(md['semantic_refiner'].get('sets'))}`, shape "
                f"{md['semantic_refiner'].get('shape')}, voxel size "
                f"{md['semantic_refiner'].get('voxel_range')} Å rescaled to 10 Å), settings "
                f"`{json.dumps(md['semantic_refiner'].get('training'))}`, CE class weights "
                f"{[round(w, 2) for w in md['semantic_refiner'].get('class_weights', [])]}, "
                f"{md['semantic_refiner'].get('train_seconds', 0) / 60:.0f} min; then its "
                "per-class offsets "
                f"{[round(b, 2) for b in md['semantic_refiner'].get('class_bias', [])]} and "
                "the minimum sizes above chosen on the calibration tomograms "
                f"{_seeds(md['semantic_refiner'].get('calibration')) or '(`calibration_set`)'} "
                "(`training.refiner.calibrate_refiner`; mean Dice "
                f"{md['semantic_refiner'].get('calibrated_semantic_dice', float('nan')):.3f}). "
                "`tl.predict` runs it as a second sliding-window pass over the heads' "
                "stitched outputs"
            ]
            if md.get("semantic_refiner")
            else []
        ),
        "- Calibration tomograms: the validation tomograms above (stage 1's and every "
        "chained stage's) plus "
        f"{len((mc.get('calibration_val') or {}).get('seeds', ()))} with the simulator's "
        f"default imaging (`calibration_set`: `{json.dumps(mc.get('calibration_val'))}`)",
        "- Lamella mask threshold chosen on the calibration tomograms (Dice of "
        "`tl.lamella_mask` against the true sample): "
        f"`{json.dumps(md.get('lamella_defaults', {}))}` — pass it to `tl.lamella_mask` as "
        "`**model.metadata['lamella_defaults']` (the demo and workflow do)",
        "- Instance post-processing chosen on the `calibration_set` tomograms alone "
        "(`training.multitask.tune_instance_defaults`, mean of AP-50 and small-particle F1, "
        f"settings with small-particle F1 below {SMALL_F1_FLOOR} ranked last): "
        f"`{json.dumps(md.get('instance_defaults', {}))}` — pass them to `tl.instances` as "
        "`**model.metadata['instance_defaults']` (the demo does)",
        "",
        "## Validation metrics (held-out simulated tomograms, one `tl.predict` pass)",
        "",
        "Measured when training ended; the `tuned_*` and `calibrated_*` rows after "
        "calibration (on the calibration tomograms).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if np.isfinite(v)]
    hand = _hand_section(path)
    lines += ["", *hand] if hand else []
    lines += [
        "",
        "## Limits",
        f"A tiny CPU model trained for {md.get('train_seconds', 0) / 60:.0f} min on simulated "
        "data; `benchmarks/bench_multitask.py` measures its held-out quality against the "
        "thesis (README).",
        "",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def _seeds(specs: list[dict[str, Any]] | None) -> str:
    """``"(seeds 7101, 7102, …; 10 Å)"`` of calibration specs, or "" without any."""
    seeds = [int(v) for spec in specs or () for v in spec.get("seeds", ())]
    return f"(seeds {', '.join(map(str, seeds))}; 10 Å)" if seeds else ""
