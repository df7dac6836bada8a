"""Inference-only preparation of a model: BatchNorm folding, memory layout, precision.

:func:`inference_copy` gives the copy of a model that :func:`~cryosiam_nb.inference.predict`
runs: evaluation mode, every ``BatchNorm3d`` that directly follows a ``Conv3d`` folded into
that convolution (``torch.nn.utils.fusion.fuse_conv_bn_weights``; checked numerically on a
small input, and not used when the check fails), channels-last 3-D weights on CPU (oneDNN's
fast layout). :func:`resolve_precision` decides the autocast dtype: float16 on CUDA,
bfloat16 on CPUs with native bf16 instructions (AMX or AVX512-BF16), float32 otherwise.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["inference_copy", "resolve_precision", "cpu_has_native_bf16", "PRECISIONS"]

#: accepted ``precision`` values of :func:`~cryosiam_nb.inference.predict`
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bfloat16 convolutions natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)
    avx = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(torch.backends.mkldnn.is_available() and (amx() or avx()))


def resolve_precision(precision: str | None, amp: bool | None, dev: torch.device) -> torch.dtype:
    """The compute dtype of a forward pass on ``dev``.

    ``precision="auto"`` (or None): float16 on CUDA, bfloat16 on a CPU with native bf16,
    float32 elsewhere (MPS, older CPUs). The older ``amp`` flag still works: ``amp=False``
    means float32, ``amp=True`` the device's reduced precision.
    """
    p = "auto" if precision is None else str(precision)
    if p not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if amp is False:
        return torch.float32
    if p == "auto":
        if dev.type == "cuda":
            return torch.float16
        if dev.type == "cpu" and (amp or cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[p]


def _fused_conv(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    out = copy.deepcopy(conv)
    w, b = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    out.weight, out.bias = w, b
    return out


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv3d)
        and isinstance(bn, nn.BatchNorm3d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, each BatchNorm3d that directly follows a Conv3d into that conv.

    Three patterns: consecutive ``Conv3d``, ``BatchNorm3d`` in an ``nn.Sequential`` (or a
    ``Conv3d`` followed by a Sequential that starts with the ``BatchNorm3d``: MONAI's
    ``Convolution`` block, as in the semantic refiner's U-Net), and
    sibling children ``conv<k>`` / ``bn<k>`` (MONAI's ResNet and its blocks apply
    ``bn<k>(conv<k>(x))``). The BatchNorm is replaced by ``nn.Identity``. Returns the
    number folded. Only valid in eval mode; callers check the result numerically.
    """
    n = 0
    for mod in list(model.modules()):
        if isinstance(mod, nn.Sequential):
            kids = list(mod._modules.items())
            for (ka, a), (kb, b) in zip(kids, kids[1:]):
                if _foldable(a, b):
                    mod._modules[ka] = _fused_conv(a, b)
                    mod._modules[kb] = nn.Identity()
                    n += 1
                elif isinstance(b, nn.Sequential) and len(b) and _foldable(a, b[0]):
                    # MONAI's Convolution block: conv, then ADN whose norm comes first
                    mod._modules[ka] = _fused_conv(a, b[0])
                    b._modules[next(iter(b._modules))] = nn.Identity()
                    n += 1
            continue
        for name, conv in list(mod._modules.items()):
            if not name.startswith("conv"):
                continue
            bn_name = "bn" + name[len("conv") :]
            bn = mod._modules.get(bn_name)
            if bn is not None and _foldable(conv, bn):
                mod._modules[name] = _fused_conv(conv, bn)
                mod._modules[bn_name] = nn.Identity()
                n += 1
    return n


def _outputs(model: nn.Module, x: torch.Tensor, task: str) -> Mapping[str, torch.Tensor]:
    if task == "dense_ssl":
        return {"embedding": model.backbone(x)}
    return model(x)


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], tol: float) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        ref, got = a[k].float(), b[k].float()
        if ref.shape != got.shape:
            return False
        if float((ref - got).abs().max()) > tol * (1.0 + float(ref.abs().max())):
            return False
    return True


def _checked(plain: nn.Module, fast: nn.Module, task: str, probe: tuple[int, int, int]) -> bool:
    """``fast`` gives ``plain``'s outputs (1e-4 relative) on one random float32 ``probe``
    (``plain.in_channels`` channels, 1 for a model without that attribute)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, int(getattr(plain, "in_channels", 1)), *probe), generator=g)
    try:
        with torch.inference_mode():
            return _same(_outputs(plain, x, task), _outputs(fast, x, task), 1e-4)
    except Exception:  # noqa: BLE001 - any failure means: keep the plain model
        return False


def inference_copy(
    model: nn.Module, dev: torch.device, task: str, probe: tuple[int, int, int] = (16, 16, 16)
) -> nn.Module:
    """An eval-mode copy of ``model`` on ``dev``, BatchNorm folded, channels-last on CPU.

    On CPU the folded copy is also fused for oneDNN
    (:func:`~cryosiam_nb.inference._fusion.fuse_for_cpu`: convolution + residual add + ReLU
    in one call). Each step is compared with the plain copy on one random ``probe`` input
    (z, y, x voxels, float32); a step whose outputs differ by more than 1e-4 (relative) is
    not used. The caller's model is never changed.
    Set the environment variable ``CRYOSIAM_NB_CPU_FUSION=0`` to skip the fusion (for
    comparisons, or on a CPU where oneDNN misbehaves).
    """
    from ._fusion import fuse_for_cpu

    plain = copy.deepcopy(model).float().eval()
    fast = copy.deepcopy(plain)
    if fold_batchnorm(fast) and not _checked(plain, fast, task, probe):
        fast = copy.deepcopy(plain)
    if dev.type == "cpu" and os.environ.get("CRYOSIAM_NB_CPU_FUSION", "1") != "0":
        fused = copy.deepcopy(fast)
        if fuse_for_cpu(fused) and _checked(plain, fused, task, probe):
            fast = fused
    fast = fast.to(dev)
    if dev.type == "cpu":
        fast = fast.to(memory_format=torch.channels_last_3d)
    return fast
