"""Logit offsets of a classification head: folded into its bias, or chosen per voxel size.

A calibrated model carries its semantic offsets in two places. The offset chosen on every
calibration tomogram together is folded into the bias of the layer that writes the logits
(:func:`shift_logits`), so every user of the checkpoint gets it. On top of it,
``metadata["semantic_prior"]["by_voxel_size"]`` may hold offsets chosen for tomograms
*acquired* at given voxel sizes (Å) and rescaled to the model's: the network's logits
drift with the input's sampling (at 10 Å it under-calls microtubules, at 12–14 Å rescaled
it over-calls them), and one offset cannot fit every size. :func:`at_voxel_size` returns
the model with the offsets for one acquisition voxel size added (linear interpolation
between the calibrated sizes, the nearest end outside them); ``tl.predict`` applies it from
the input's ``attrs["rescaled_from"]`` (set by ``pp.rescale``) or ``attrs["voxel_size"]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cryosiam_nb.io import InputError

__all__ = ["logit_layer", "shift_logits", "voxel_size_offsets", "at_voxel_size"]


def logit_layer(model: Any, task: str) -> tuple[torch.nn.Conv3d, int]:
    """(last conv writing ``task``'s logits, channel offset of the logits in its output)."""
    heads = getattr(model, "heads", None)
    head = getattr(heads, task, None) if getattr(model, "task", None) == "multitask" else heads
    if head is None:
        raise InputError(f"model: has no {task!r} heads to shift")
    if hasattr(head, "trunk"):  # fused: one conv, outputs split by ``sizes``
        offset = 0
        for key, size in zip(head.keys, head.sizes):
            if key == "logits":
                break
            offset += size
        else:
            raise InputError(f"model: the {task!r} heads have no logits")
        conv = head.trunk[-1]
    else:
        names = dict(getattr(head, "outputs", []))
        if "logits" not in names:
            raise InputError(f"model: the {task!r} heads have no logits")
        conv, offset = getattr(head, names["logits"])[-1], 0
    if not isinstance(conv, torch.nn.Conv3d) or conv.bias is None:
        raise InputError(f"model: the {task!r} logits do not come from a Conv3d with a bias")
    return conv, offset


def shift_logits(model: Any, shift: Sequence[float], task: str = "semantic") -> None:
    """Add ``shift[c]`` to ``task``'s logit of class ``c`` everywhere, in place.

    Folded into the bias of the convolution that outputs the logits, so the model's
    forward (and every checkpoint saved from it) includes the shift.
    """
    conv, offset = logit_layer(model, task)
    s = torch.as_tensor(np.asarray(shift, dtype=np.float32))
    n = int(s.numel())
    if offset + n > conv.out_channels:
        raise InputError(f"shift: {n} values, the {task!r} logits have fewer channels")
    with torch.no_grad():
        conv.bias[offset : offset + n] += s.to(conv.bias.device, conv.bias.dtype)


def voxel_size_offsets(table: Mapping[str, Any], voxel_size: float) -> np.ndarray:
    """The per-class logit offsets of ``table`` for tomograms acquired at ``voxel_size`` Å.

    ``table``: ``{"voxel_size": [Å, ...] (increasing), "offset": [[per class], ...]}`` (the
    form of ``metadata["semantic_prior"]["by_voxel_size"]``). Linear interpolation between
    the listed voxel sizes; outside them, the nearest end's offsets.
    """
    sizes = np.asarray(table.get("voxel_size", ()), dtype=np.float64)
    offs = np.asarray(table.get("offset", ()), dtype=np.float64)
    if sizes.ndim != 1 or not len(sizes) or offs.ndim != 2 or len(offs) != len(sizes):
        raise InputError(
            "by_voxel_size: expected 'voxel_size' (n Å values) and 'offset' (n rows of "
            f"per-class offsets), got {dict(table)}"
        )
    if np.any(np.diff(sizes) <= 0):
        raise InputError(f"by_voxel_size: voxel sizes must increase, got {sizes.tolist()}")
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise InputError(f"voxel_size: must be positive Å, got {voxel_size!r}")
    out = [np.interp(float(voxel_size), sizes, offs[:, c]) for c in range(offs.shape[1])]
    return np.asarray(out, dtype=np.float32)


def at_voxel_size(
    model: Any, voxel_size: float, task: str = "semantic"
) -> tuple[Any, np.ndarray | None]:
    """``model`` with its per-voxel-size ``task`` offsets for ``voxel_size`` Å folded in.

    Returns ``(model, offsets)``: a shifted copy and the offsets added, or ``model``
    itself and ``None`` when its ``metadata[f"{task}_prior"]`` has no ``by_voxel_size``
    table (all-zero offsets also return ``model`` itself). The caller's model is never
    changed.
    """
    md = getattr(model, "metadata", None) or {}
    table = (md.get(f"{task}_prior") or {}).get("by_voxel_size")
    if not table:
        return model, None
    off = voxel_size_offsets(table, voxel_size)
    if not np.any(off):
        return model, off
    shifted = copy.deepcopy(model)
    shift_logits(shifted, off, task)
    return shifted, off
