"""The semantic refiner's second pass of :func:`~cryosiam_nb.inference.predict`.

A multi-task model's :class:`~cryosiam_nb.models.networks.SemanticRefiner` is trained on the
heads' *stitched* whole-tomogram outputs (``training.refiner.refiner_inputs``). ``predict``
therefore runs the heads first (the model without its refiner), then the refiner as a
second sliding-window pass over the stitched ``(input, denoised, semantic probabilities)``
volume — same windows, chunks, Gaussian blending, roi and test-time flips, and the same
out-of-core graph (:func:`~cryosiam_nb.inference._graph.build_graph`). The probabilities
are rounded to float16 first, as in training. :func:`write_predictions` writes the first
pass to zarr (the refiner's inputs to scratch arrays of the temporary store), then streams
the second pass from there (each windows task reads its own region:
:class:`ScratchReader`), so neither pass holds more than its chunks in flight.

Measured on validation tomograms 7201–7216 with the shipped model (2026-12-07): running
the refiner inside each heads window instead (before) scored Dice over present classes
0.666 vs 0.673, actin 0.190 vs 0.224 (``training.refiner``'s docstring). The second pass
costs about 15 % more time than refining inside each window (64×256×256 block, same host:
``write_predictions`` 9.1–10.8 s vs 7.9–9.0 s): more channels are blended and the refiner's
inputs go through zarr.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import torch
from torch import nn

from cryosiam_nb.inference._windows import Runner

#: names of the scratch arrays holding the refiner's inputs during ``write_predictions``
SCRATCH = ("_refiner_denoised", "_refiner_probabilities")
#: the variables the second pass replaces
REFINED = ("semantic_probabilities", "semantic_labels")


class RefinerPass(nn.Module):
    """The refiner as a sliding-window model: input ``(N, 2 + C, z, y, x)`` (the normalised
    tomogram, the denoised map, the C semantic probabilities), output
    ``{"semantic/logits": (N, C, z, y, x)}`` (refined, un-activated)."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = refiner
        self.n_classes = int(refiner.n_classes)
        self.in_channels = 2 + self.n_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.log(x[:, 2:].float().clamp(min=1e-6))
        return {"semantic/logits": self.refiner(x[:, :1], x[:, 1:2], logits)}


def split_refiner(model: Any) -> tuple[Any, nn.Module | None]:
    """``(model without its refiner, the refiner)``; ``(model, None)`` when it has none.
    The caller's model is not changed."""
    ref = getattr(model, "refiner", None)
    if ref is None or getattr(model, "task", None) != "multitask":
        return model, None
    heads = copy.deepcopy(model)
    heads.refiner = None
    return heads, ref


@dataclass
class RefinePlan:
    """Where the second pass reads the first: the first pass's activated channels of the
    denoised map (``den``) and of the ``n`` semantic probabilities (from ``prob``)."""

    runner: Runner
    den: int
    prob: int
    n: int

    @property
    def n_out(self) -> int:
        return self.n + 1


def refine_plan(refiner: nn.Module, first: Runner, layout: list[tuple]) -> RefinePlan:
    """The second pass's runner (the first pass's windows, batch, device, precision and
    flips) and its input channels, found in the first pass's output ``layout``."""
    rows = {name: (c0, n) for name, c0, n, _ in layout}
    heads = (("semantic/logits", int(refiner.n_classes)),)
    runner = first.like(RefinerPass(refiner), "refine", heads)
    c_prob, n = rows["semantic_probabilities"]
    return RefinePlan(runner, rows["denoised"][0], c_prob, int(n))


def refiner_input(image: da.Array, denoised: da.Array, probabilities: da.Array) -> da.Array:
    """The second pass's input ``(2 + C, z, y, x)`` float32 (probabilities via float16)."""
    prob = probabilities.astype(np.float16).astype(np.float32)
    return da.concatenate([image[None], denoised[None].astype(np.float32), prob], axis=0)


def scratch_rows(plan: RefinePlan) -> list[tuple[str, int, int | None, str]]:
    """First-pass layout rows that store the refiner's inputs in the scratch arrays."""
    return [(SCRATCH[0], plan.den, None, "float32"), (SCRATCH[1], plan.prob, plan.n, "float16")]


def make_scratch(path: str, shape: tuple[int, ...], chunk: tuple[int, ...], n: int) -> None:
    """Create the scratch arrays in the zarr store at ``path``, chunked like the output."""
    import zarr

    g = zarr.open_group(path, mode="r+")
    g.create_array(SCRATCH[0], shape=shape, chunks=chunk, dtype="float32", fill_value=0)
    g.create_array(SCRATCH[1], shape=(n, *shape), chunks=(n, *chunk), dtype="float16")


class ScratchReader:
    """Reads a region's refiner inputs from the scratch arrays of the store at ``path``:
    ``region (z, y, x slices) → (1 + C, *region)`` float32 (denoised, probabilities). The
    second pass of ``write_predictions`` calls it inside each windows task, so the
    8-channel input of a chunk exists only while the chunk runs."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def __call__(self, region: tuple[slice, ...]) -> np.ndarray:
        import zarr

        g = zarr.open_group(self.path, mode="r")
        den = np.asarray(g[SCRATCH[0]][region], np.float32)
        prob = np.asarray(g[SCRATCH[1]][(slice(None), *region)], np.float32)
        return np.concatenate([den[None], prob])


def drop_scratch(path: str) -> None:
    """Remove the scratch arrays from the store at ``path``."""
    import zarr

    g = zarr.open_group(path, mode="r+")
    for name in SCRATCH:
        if name in g:
            del g[name]
