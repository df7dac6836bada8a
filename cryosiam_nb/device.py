"""Compute-device selection: CUDA, then Apple MPS, then CPU; mixed precision on GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` if given, else the best available: cuda → mps → cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool | None = None) -> Iterator[None]:
    """Mixed precision (float16 autocast) on CUDA by default; a no-op on CPU/MPS."""
    use = device.type == "cuda" if enabled is None else enabled
    if use and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield
