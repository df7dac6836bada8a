"""oneDNN operator fusion for CPU inference: conv + residual add + ReLU as one call.

The tiny networks are memory-bound on a CPU: a separate ReLU or residual add re-reads and
re-writes a whole full-resolution activation map, which costs as much as the convolution
before it. :func:`fuse_for_cpu` rewrites an (eval-mode, BatchNorm-folded) model in place so
that each ``Conv3d`` followed by a ``ReLU``, each residual add + ReLU of a bottleneck block
and each FPN top-down add run inside the convolution as oneDNN post-ops (PyTorch's own
``torch.ops.mkldnn._convolution_pointwise``, the kernels ``torch.compile`` uses on CPU, with
no compile step). It also runs a convolution with one input channel (the stem) in
float32: oneDNN's bfloat16 kernel for it is about 2× slower than float32 on AVX-512 CPUs.
Merging the heads' first convolutions into one wider one was measured too and not kept: no
gain, because each head must then copy its channel slice into a dense tensor.

The arithmetic is the same as the unfused model; in float32 outputs agree to rounding
(callers check on a probe input), in bfloat16 a fused add is rounded once instead of twice.
Under ``torch.autocast`` a fused convolution computes in the autocast dtype like ``Conv3d``.
Off the CPU (or without oneDNN) the fused modules fall back to plain PyTorch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fuse_for_cpu", "FusedConv3d", "fusion_available"]

_CL = torch.channels_last_3d


def _pointwise():
    ops = getattr(torch.ops, "mkldnn", None)
    return getattr(ops, "_convolution_pointwise", None) if ops is not None else None


def fusion_available() -> bool:
    """True when this PyTorch build has oneDNN's fused convolution op."""
    return torch.backends.mkldnn.is_available() and _pointwise() is not None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class FusedConv3d(nn.Module):
    """``relu?(conv3d(x) + residual?)`` in one oneDNN call on CPU (inference only).

    Holds the weights of the ``Conv3d`` it replaces (same state-dict names). ``forward(x,
    residual=None)``; ``residual`` has the output's shape. A one-input-channel convolution
    computes in float32 and returns the autocast dtype.
    """

    def __init__(self, conv: nn.Conv3d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv3d: only explicit zero padding")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        b = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = int(conv.groups)
        self.relu = bool(relu)
        self.stem = conv.in_channels == 1
        self._cast: dict = {}

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (dtype, self.weight.data_ptr(), self.weight.device)
        hit = self._cast.get(key)
        if hit is None:
            w = self.weight.detach().to(dtype).contiguous(memory_format=_CL)
            b = None if self.bias is None else self.bias.detach().to(dtype)
            self._cast = {key: (w, b)}  # only the latest dtype/device is kept
            hit = (w, b)
        return hit

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = _compute_dtype(x)
        dtype = torch.float32 if self.stem else out_dtype
        op = _pointwise()
        if x.device.type != "cpu" or op is None or not torch.backends.mkldnn.is_available():
            w, b = self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
            y = F.conv3d(x.to(dtype), w, b, self.stride, self.padding, self.dilation, self.groups)
            if residual is not None:
                y = y + residual.to(y.dtype)
            return (torch.relu(y) if self.relu else y).to(out_dtype)
        w, b = self._weights(dtype)
        x = x.to(dtype).contiguous(memory_format=_CL)
        args = (self.padding, self.stride, self.dilation, self.groups)
        with torch.autocast("cpu", enabled=False):
            if residual is None:
                unary = ("relu", [None], "") if self.relu else ("none", [], "")
                y = op(x, w, b, *args, *unary)
            else:
                other = residual.to(dtype).contiguous(memory_format=_CL)
                y = op.binary(
                    x, other, w, b, *args, "add", None, "relu" if self.relu else None, [None], ""
                )
        return y.to(out_dtype)


def _is_relu(m: nn.Module) -> bool:
    return isinstance(m, nn.ReLU)


def _fusable(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _fuse_sequential(seq: nn.Sequential) -> int:
    """Conv3d, Identity*, ReLU → FusedConv3d(relu), Identity*, Identity."""
    kids = list(seq._modules.items())
    n = 0
    for i, (name, conv) in enumerate(kids):
        if not _fusable(conv):
            continue
        j = i + 1
        while j < len(kids) and isinstance(kids[j][1], nn.Identity):
            j += 1
        if j < len(kids) and _is_relu(kids[j][1]):
            seq._modules[name] = FusedConv3d(conv, relu=True)
            seq._modules[kids[j][0]] = nn.Identity()
            n += 1
    return n


class _FusedBottleneck(nn.Module):
    """A BatchNorm-folded MONAI ``ResNetBottleneck``: conv1+ReLU, conv2+ReLU, then conv3 +
    residual + ReLU in one call; the downsample branch runs as before."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1 = FusedConv3d(block.conv1, relu=True)
        self.conv2 = FusedConv3d(block.conv2, relu=True)
        self.conv3 = FusedConv3d(block.conv3, relu=True)
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=residual)


def _bottleneck_fusable(m: nn.Module) -> bool:
    from monai.networks.nets.resnet import ResNetBottleneck

    if type(m) is not ResNetBottleneck:
        return False
    convs = [m.conv1, m.conv2, m.conv3]
    bns = [m.bn1, m.bn2, m.bn3]
    return (
        all(_fusable(c) for c in convs)
        and all(isinstance(b, nn.Identity) for b in bns)
        and _is_relu(m.act)
    )


class _FusedFPN(nn.Module):
    """An ``FPNDecoder`` whose top-down adds run inside the lateral 1×1 convolutions."""

    def __init__(self, dec: nn.Module) -> None:
        super().__init__()
        self.layer1 = dec.layer1
        for k in (2, 3, 4):
            setattr(self, f"layer{k}", FusedConv3d(getattr(dec, f"layer{k}"), relu=False))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        r2, r3, r4, r5 = feats
        p5 = self.layer1(r5)
        p4 = self.layer2(r4, residual=self._up(p5, r4))
        p3 = self.layer3(r3, residual=self._up(p4, r3))
        p2 = self.layer4(r2, residual=self._up(p3, r2))
        return [p2, p3, p4, p5]

    @staticmethod
    def _up(top: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(top, size=like.shape[2:], mode="trilinear", align_corners=False)


def fuse_for_cpu(model: nn.Module) -> int:
    """Rewrite ``model`` (eval mode, BatchNorm already folded) in place for fused CPU
    inference; returns the number of rewrites (0 when oneDNN's fused op is missing)."""
    if not fusion_available():
        return 0
    from monai.networks.nets.resnet import ResNet

    from cryosiam_nb.models.networks import FPNDecoder

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if _bottleneck_fusable(child):
                parent._modules[name] = _FusedBottleneck(child)
                n += 1
            elif type(child) is FPNDecoder and all(
                _fusable(getattr(child, f"layer{k}")) for k in (2, 3, 4)
            ):
                parent._modules[name] = _FusedFPN(child)
                n += 1
    for mod in list(model.modules()):
        if isinstance(mod, ResNet) and _fusable(mod.conv1) and _is_relu(mod.act):
            if isinstance(mod.bn1, nn.Identity):  # the stem: act(bn1(conv1(x)))
                mod.conv1 = FusedConv3d(mod.conv1, relu=True)
                mod.act = nn.Identity()
                n += 1
        elif isinstance(mod, nn.Sequential):
            n += _fuse_sequential(mod)
    return n
