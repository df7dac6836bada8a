"""Networks of the CryoSiam method (SPEC §2), built from MONAI components.

* :class:`DenseSimSiam` — MONAI ``ResNet`` encoder (no max-pool, 7³ stride-1 first conv),
  FPN decoder, dense / global / level projectors and predictors. ``forward(x)`` gives the
  dense voxel embedding ``(N, D, Z, Y, X)`` at the input's resolution.
* :class:`SimSiam` — subtomogram-level SimSiam: the same encoder with an MLP projector in
  place of the ResNet's ``fc`` and an MLP predictor. ``forward(x)`` gives ``(N, D)``.
* :class:`TaskHeads` — the fine-tuning heads (three 3×3×3 convs each) that read the dense
  embedding: denoising (``cnn_head``), semantic / lamella (``semantic_head`` +
  ``distance_head``), instance (``foreground_head``, ``distance_head``, ``boundary_head``).
* :class:`CryoSiamModel` — what :func:`cryosiam_nb.models.build` and ``load`` return.

Module and parameter names follow the published CryoSiam v1.0 checkpoints
(``shared/upstream_checkpoint_layout.tsv``) so their state dicts map one-to-one.
All tensors are ordered ``(N, C, Z, Y, X)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from cryosiam_nb.constants import HEAD_TASKS, TASKS

__all__ = [
    "DenseSimSiam",
    "SimSiam",
    "FPNDecoder",
    "TaskHeads",
    "FusedTaskHeads",
    "MultiTaskHeads",
    "CryoSiamModel",
    "SemanticRefiner",
    "conv_head",
    "HEAD_LAYOUTS",
]

# task → ((output key, module name, channels: "n" = number of classes or an int), ...)
HEAD_LAYOUTS: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "denoise": (("denoised", "cnn_head", 1),),
    "semantic": (("logits", "semantic_head", "n"), ("distance", "distance_head", "n")),
    "lamella": (("logits", "semantic_head", "n"), ("distance", "distance_head", "n")),
    "instance": (
        ("foreground", "foreground_head", 1),
        ("distance", "distance_head", 1),
        ("boundary", "boundary_head", 1),
    ),
}

_BLOCK_EXPANSION = {"bottleneck": 4, "basic": 1}


def _mlp(
    in_dim: int, hidden: int, out_dim: int, n_hidden: int, last_bn: bool, conv: bool
) -> nn.Sequential:
    """SimSiam-style MLP: ``n_hidden`` × (linear, BN, ReLU), then linear (+ BN without affine).

    With ``conv=True`` the linears are 1×1×1 3-D convolutions (per-voxel MLP).
    Hidden linears have no bias (BN follows); the last one has a bias.
    """
    lin = (lambda i, o, b: nn.Conv3d(i, o, 1, bias=b)) if conv else nn.Linear
    norm = nn.BatchNorm3d if conv else nn.BatchNorm1d
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(n_hidden):
        layers += [lin(d, hidden, False), norm(hidden), nn.ReLU(inplace=True)]
        d = hidden
    layers.append(lin(d, out_dim, True))
    if last_bn:
        layers.append(norm(out_dim, affine=False))
    return nn.Sequential(*layers)


def _resnet(
    block: str,
    layers: Sequence[int],
    filters: Sequence[int],
    in_channels: int,
    conv1_kernel: int,
    num_classes: int,
    feed_forward: bool,
    no_max_pool: bool = True,
) -> ResNet:
    if block not in _BLOCK_EXPANSION:
        raise ValueError(f"block={block!r}: expected 'bottleneck' or 'basic'")
    if len(layers) != 4 or len(filters) != 4:
        raise ValueError(f"layers={layers!r}, filters={filters!r}: need 4 values each")
    return ResNet(
        block=block,
        layers=list(layers),
        block_inplanes=list(filters),
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=conv1_kernel,
        conv1_t_stride=1,
        no_max_pool=no_max_pool,
        shortcut_type="B",
        num_classes=num_classes,
        feed_forward=feed_forward,
        bias_downsample=True,
    )


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """On CPU, channels-last 3-D tensors use oneDNN kernels (conv3d backward is ~4× faster)."""
    if x.device.type == "cpu" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _encoder_features(encoder: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """ResNet feature levels [res2, res3, res4, res5] at 1, 1/2, 1/4, 1/8 of the input size."""
    x = _fast_layout(x)
    x = encoder.act(encoder.bn1(encoder.conv1(x)))
    if not encoder.no_max_pool:
        x = encoder.maxpool(x)
    r2 = encoder.layer1(x)
    r3 = encoder.layer2(r2)
    r4 = encoder.layer3(r3)
    r5 = encoder.layer4(r4)
    return [r2, r3, r4, r5]


class FPNDecoder(nn.Module):
    """Feature pyramid: 1×1 lateral convs to ``channels``, trilinear top-down upsample + add.

    ``layer1`` reads res5, ``layer2`` res4, ``layer3`` res3, ``layer4`` res2 (release naming).
    ``forward`` returns the merged maps ``[p2, p3, p4, p5]`` (finest first); ``p2`` is the
    decoder output at res2 resolution.
    """

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.layer1 = nn.Conv3d(c5, channels, 1)
        self.layer2 = nn.Conv3d(c4, channels, 1)
        self.layer3 = nn.Conv3d(c3, channels, 1)
        self.layer4 = nn.Conv3d(c2, channels, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        r2, r3, r4, r5 = feats
        p5 = self.layer1(r5)
        p4 = self._merge(p5, self.layer2(r4))
        p3 = self._merge(p4, self.layer3(r3))
        p2 = self._merge(p3, self.layer4(r2))
        return [p2, p3, p4, p5]

    @staticmethod
    def _merge(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(top, size=lateral.shape[2:], mode="trilinear", align_corners=False)
        return up + lateral


class DenseSimSiam(nn.Module):
    """Voxel-level SimSiam network (encoder + FPN + projectors/predictors), SPEC §2.

    Parameters (channel counts, not voxels): ``filters`` the ResNet block widths (the
    bottleneck output is 4× that), ``fpn_channels`` the decoder width, ``dense_dim`` the
    voxel embedding size D, ``dense_pred_dim`` the dense predictor bottleneck, ``dim`` /
    ``pred_dim`` the global embedding and its predictor bottleneck, ``levels`` the coarser
    FPN levels (2 = half resolution, 4, 8) that get their own projector/predictor.
    ``encoder_fc`` keeps MONAI's (unused) ``encoder.fc`` linear, present in release files.
    """

    def __init__(
        self,
        in_channels: int = 1,
        block: str = "bottleneck",
        layers: Sequence[int] = (1, 1, 1, 1),
        filters: Sequence[int] = (64, 128, 256, 512),
        conv1_kernel: int = 7,
        fpn_channels: int = 128,
        dim: int = 256,
        pred_dim: int = 64,
        dense_dim: int = 64,
        dense_pred_dim: int = 16,
        levels: Sequence[int] = (2,),
        encoder_fc: bool = False,
        global_hidden: int | None = None,
        no_max_pool: bool = True,
    ) -> None:
        super().__init__()
        exp = _BLOCK_EXPANSION.get(block, 0)
        self.encoder = _resnet(
            block, layers, filters, in_channels, conv1_kernel, dim, encoder_fc, no_max_pool
        )
        chans = [f * exp for f in filters]
        self.decoder = FPNDecoder(chans, fpn_channels)
        hidden = global_hidden or chans[3]
        self.global_projector = _mlp(chans[3], hidden, dim, 2, True, conv=False)
        self.global_predictor = _mlp(dim, pred_dim, dim, 1, False, conv=False)
        self.projector = _mlp(fpn_channels, fpn_channels, dense_dim, 2, True, conv=True)
        self.predictor = _mlp(dense_dim, dense_pred_dim, dense_dim, 1, False, conv=True)
        self.levels = tuple(int(v) for v in levels)
        for lv in self.levels:
            if lv not in (2, 4, 8):
                raise ValueError(f"levels={levels!r}: each level must be 2, 4 or 8")
            proj = _mlp(fpn_channels, fpn_channels, dense_dim, 2, True, conv=True)
            self.add_module(f"level_projector_{lv}", proj)
            pred = _mlp(dense_dim, dense_pred_dim, dense_dim, 1, False, conv=True)
            self.add_module(f"level_predictor_{lv}", pred)
        self.embedding_dim = dense_dim

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder levels ``[res2..res5]`` and FPN maps ``[p2..p5]`` for input ``x``."""
        feats = _encoder_features(self.encoder, x)
        return feats, self.decoder(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense embedding ``z = projector(decoder(encoder(x)))``: ``(N, dense_dim, Z, Y, X)``."""
        _, pyramid = self.features(x)
        return self.projector(pyramid[0])

    def pooled(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Global vector: ``avgpool(res5)`` flattened, ``(N, C5)``."""
        return torch.flatten(self.encoder.avgpool(feats[3]), 1)

    def ssl_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the DenseSimSiam loss needs for one view.

        Returns ``global_z``/``global_p`` ``(N, dim)``, ``dense_z``/``dense_p``
        ``(N, dense_dim, Z, Y, X)`` and, per level ``f`` in ``levels``, ``level{f}_z`` /
        ``level{f}_p`` at ``1/f`` resolution.
        """
        feats, pyramid = self.features(x)
        gz = self.global_projector(self.pooled(feats))
        dz = self.projector(pyramid[0])
        out = {
            "global_z": gz,
            "global_p": self.global_predictor(gz),
            "dense_z": dz,
            "dense_p": self.predictor(dz),
        }
        for lv in self.levels:
            lz = getattr(self, f"level_projector_{lv}")(pyramid[int(math.log2(lv))])
            out[f"level{lv}_z"] = lz
            out[f"level{lv}_p"] = getattr(self, f"level_predictor_{lv}")(lz)
        return out

    def embed_global(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised global embedding ``(N, dim)``."""
        feats = _encoder_features(self.encoder, x)
        return F.normalize(self.global_projector(self.pooled(feats)), dim=1)


class SimSiam(nn.Module):
    """Subtomogram SimSiam: ResNet encoder whose ``fc`` is the MLP projector, plus predictor.

    ``forward(x)`` with ``x`` ``(N, 1, B, B, B)`` returns the projection ``(N, dim)``
    (not normalised); ``ssl_forward`` returns ``{"z", "p"}``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        block: str = "bottleneck",
        layers: Sequence[int] = (1, 1, 1, 1),
        filters: Sequence[int] = (64, 128, 256, 512),
        conv1_kernel: int = 7,
        dim: int = 1024,
        pred_dim: int = 256,
        hidden_dim: int | None = None,
        no_max_pool: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = _resnet(
            block, layers, filters, in_channels, conv1_kernel, dim, True, no_max_pool
        )
        c5 = filters[3] * _BLOCK_EXPANSION[block]
        self.encoder.fc = _mlp(c5, hidden_dim or c5, dim, 2, True, conv=False)
        self.predictor = _mlp(dim, pred_dim, dim, 1, False, conv=False)
        self.embedding_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(_fast_layout(x))

    def ssl_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(_fast_layout(x))
        return {"z": z, "p": self.predictor(z)}


def conv_head(
    in_channels: int, filters: Sequence[int], out_channels: int, kernel_size: int = 3
) -> nn.Sequential:
    """Three 3-D convs ``in → f0 → f1 → out`` with BN + ReLU between (same padding)."""
    pad = kernel_size // 2
    f0, f1 = filters
    return nn.Sequential(
        nn.Conv3d(in_channels, f0, kernel_size, padding=pad),
        nn.BatchNorm3d(f0),
        nn.ReLU(inplace=True),
        nn.Conv3d(f0, f1, kernel_size, padding=pad),
        nn.BatchNorm3d(f1),
        nn.ReLU(inplace=True),
        nn.Conv3d(f1, out_channels, kernel_size, padding=pad),
    )


def _head_channels(task: str, n_classes: int | None) -> list[tuple[str, str, int]]:
    """``[(output key, module name, channels)]`` of ``task`` (:data:`HEAD_LAYOUTS`)."""
    if task not in HEAD_LAYOUTS:
        raise ValueError(f"task={task!r} has no heads; expected one of {list(HEAD_LAYOUTS)}")
    out = []
    for key, name, ch in HEAD_LAYOUTS[task]:
        if ch == "n":
            if not n_classes or n_classes < 2:
                raise ValueError(f"task={task!r} needs n_classes >= 2, got {n_classes!r}")
            ch = n_classes
        out.append((key, name, int(ch)))
    return out


class TaskHeads(nn.Module):
    """The heads of one task (``HEAD_LAYOUTS``); ``forward(z)`` → dict of un-activated maps."""

    def __init__(
        self,
        task: str,
        in_channels: int,
        filters: Sequence[int] = (32, 64),
        n_classes: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.outputs: list[tuple[str, str]] = []
        for key, name, ch in _head_channels(task, n_classes):
            self.add_module(name, conv_head(in_channels, filters, ch, kernel_size))
            self.outputs.append((key, name))

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: getattr(self, name)(z) for key, name in self.outputs}


class FusedTaskHeads(nn.Module):
    """All outputs of one task from a single :func:`conv_head` (``trunk``) whose output
    channels are split into the task's maps — a third to an eighth of the separate heads'
    cost at full resolution. Same ``forward`` contract as :class:`TaskHeads`."""

    def __init__(
        self,
        task: str,
        in_channels: int,
        filters: Sequence[int] = (32, 64),
        n_classes: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        layout = _head_channels(task, n_classes)
        self.keys = [key for key, _, _ in layout]
        self.sizes = [ch for _, _, ch in layout]
        self.trunk = conv_head(in_channels, filters, sum(self.sizes), kernel_size)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, torch.split(self.trunk(z), self.sizes, dim=1)))


class MultiTaskHeads(nn.Module):
    """The heads of several tasks reading one dense embedding (the thesis' multi-task shape).

    One :class:`FusedTaskHeads` (``fused=True``, the shipped multi-task model) or
    :class:`TaskHeads` per task, registered under the task's name (state-dict keys
    ``heads.<task>.trunk.*`` / ``heads.<task>.<head>.*``). ``forward(z)`` returns ``{"<task>/<output>": map}``, e.g.
    ``"semantic/logits"``, ``"instance/foreground"``; ``n_classes`` maps ``"semantic"`` and
    ``"lamella"`` to their class counts. ``task_filters`` gives some tasks other hidden
    widths than ``filters`` (e.g. ``{"semantic": (32, 32)}``: a wider semantic head).
    """

    def __init__(
        self,
        in_channels: int,
        filters: Sequence[int],
        n_classes: dict[str, int],
        kernel_size: int = 3,
        tasks: Sequence[str] = HEAD_TASKS,
        fused: bool = True,
        task_filters: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        task_filters = dict(task_filters or {})
        unknown = sorted(set(task_filters) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_filters: {unknown} are not among the tasks {self.tasks}")
        cls = FusedTaskHeads if fused else TaskHeads
        for t in self.tasks:
            f = tuple(task_filters.get(t, filters))
            self.add_module(t, cls(t, in_channels, f, n_classes.get(t), kernel_size))

    @classmethod
    def from_parts(cls, parts: dict[str, nn.Module]) -> MultiTaskHeads:
        """Wrap existing task heads (shared, not copied) as one multi-task head module."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.tasks = tuple(parts)
        for t, h in parts.items():
            self.add_module(t, h)
        return self

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            for key, val in getattr(self, t)(z).items():
                out[f"{t}/{key}"] = val
        return out


class SemanticRefiner(nn.Module):
    """A small 3D U-Net (MONAI ``UNet``) that corrects a multi-task network's semantic logits.

    It reads the input tomogram, the denoise head's output and the semantic head's
    log-probabilities (clipped at ``log(min_probability)``), and adds a correction to
    those log-probabilities: ``refined = log p + head(unet(...))``. The 1×1 ``head`` starts
    at zero, so an untrained refiner returns the heads' own decision. It sees more context
    than the heads (three stride-2 levels: its receptive field spans tens of voxels), which
    is what separates actin from microtubule walls and particle specks. ``forward`` pads
    windows whose sizes are not multiples of 2^levels (replicate) and crops back.
    ``model(x)`` applies it to the heads' outputs on ``x`` itself; ``tl.predict`` runs it as
    a second sliding-window pass over the heads' stitched outputs, which is what it is
    trained on (:mod:`cryosiam_nb.inference._refine`).
    """

    def __init__(
        self,
        n_classes: int,
        channels: Sequence[int] = (16, 32, 48, 64),
        width: int = 16,
        norm: str = "instance",
        min_probability: float = 1e-4,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.n_classes = int(n_classes)
        self.levels = len(channels) - 1
        self.log_floor = math.log(float(min_probability))
        self.unet = UNet(
            spatial_dims=3,
            in_channels=2 + self.n_classes,
            out_channels=int(width),
            channels=tuple(int(c) for c in channels),
            strides=(2,) * self.levels,
            num_res_units=1,
            norm=norm,
        )
        self.head = nn.Conv3d(int(width), self.n_classes, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, x: torch.Tensor, denoised: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Refined logits ``(N, n_classes, Z, Y, X)`` from the input ``x`` ``(N, 1, …)``,
        the denoised map ``(N, 1, …)`` and the semantic logits (all on one grid)."""
        lp = F.log_softmax(logits.float(), dim=1).clamp(min=self.log_floor).to(logits.dtype)
        inp = torch.cat([x.to(lp.dtype), denoised.to(lp.dtype), lp / 4.0], dim=1)
        size = inp.shape[2:]
        m = 2**self.levels
        pad = [(-s) % m for s in size]
        if any(pad):
            inp = F.pad(inp, [v for p in reversed(pad) for v in (0, p)], mode="replicate")
        corr = self.head(F.relu(self.unet(inp)))
        if any(pad):
            corr = corr[..., : size[0], : size[1], : size[2]]
        return lp + corr


class CryoSiamModel(nn.Module):
    """A CryoSiam network for one task, with the metadata needed to use it.

    Attributes: ``task``; ``patch_size`` (z, y, x) voxels used in training and the default
    inference patch; ``voxel_size`` training voxel size in Å (None if unknown);
    ``class_names``; ``config`` (JSON-serialisable, enough to rebuild the model);
    ``metadata`` (training data summary, metrics, provenance).

    ``model.backbone(x)`` gives the dense embedding ``(N, D, Z, Y, X)`` (for
    ``subtomo_ssl`` the un-normalised projection ``(N, D)``). ``model(x)`` returns a dict of
    un-activated outputs, each ``(N, C, Z, Y, X)``: denoise ``denoised``; semantic/lamella
    ``logits``, ``distance`` (tanh not applied); instance ``foreground``, ``distance``,
    ``boundary``; multitask every head task's outputs as ``"<task>/<output>"`` (one backbone
    pass; class names of each part in ``part_classes``); dense_ssl ``embedding``;
    subtomo_ssl ``embedding`` ``(N, D)`` (normalised).
    Input: float32 ``(N, 1, Z, Y, X)`` normalised to [0, 1], protein bright.
    """

    def __init__(
        self,
        task: str,
        backbone: nn.Module,
        heads: TaskHeads | MultiTaskHeads | None,
        config: dict[str, Any],
        patch_size: Sequence[int],
        voxel_size: float | None = None,
        class_names: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}: expected one of {TASKS}")
        self.task = task
        self.backbone = backbone
        self.heads = heads
        self.config = config
        self.patch_size = tuple(int(v) for v in patch_size)
        self.voxel_size = None if voxel_size is None else float(voxel_size)
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        #: class names of every classifying head (``{"semantic": (...), "lamella": (...)}``)
        self.part_classes: dict[str, tuple[str, ...]] = {
            str(k): tuple(str(c) for c in v) for k, v in config.get("part_classes", {}).items()
        }
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._frozen = "none"
        #: optional :class:`SemanticRefiner` of a multi-task model (``config["refiner"]``)
        self.refiner: SemanticRefiner | None = None
        if config.get("refiner") is not None:
            self.refiner = SemanticRefiner(**config["refiner"])

    # -- inference ----------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Size D of ``backbone(x)`` / ``embed(x)``."""
        return int(self.backbone.embedding_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.task == "subtomo_ssl":
            return {"embedding": self.embed(x)}
        z = self.backbone(x)
        if self.heads is None:
            return {"embedding": z}
        out = self.heads(z)
        if self.refiner is not None:
            out["semantic/logits"] = self.refiner(
                x, out["denoise/denoised"], out["semantic/logits"]
            )
        return out

    def add_refiner(self, **kwargs: Any) -> SemanticRefiner:
        """Give a multi-task model a fresh :class:`SemanticRefiner` (``kwargs`` go to it;
        ``n_classes`` is the semantic head's), recorded in ``config["refiner"]`` so that
        checkpoints rebuild it. Replaces an existing refiner."""
        if self.task != "multitask" or "semantic" not in self.part_classes:
            raise ValueError("add_refiner: only a multi-task model with a semantic head")
        if "denoise" not in getattr(self.heads, "tasks", ()):
            raise ValueError("add_refiner: the refiner reads the denoise head; it has none")
        defaults = {
            k: p.default
            for k, p in inspect.signature(SemanticRefiner).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        # every setting recorded, so that a later change of a default cannot change the
        # network a checkpoint rebuilds
        kw = {**defaults, "n_classes": len(self.part_classes["semantic"]), **kwargs}
        kw["channels"] = [int(c) for c in kw["channels"]]
        self.refiner = SemanticRefiner(**kw).train(self.training)
        self.config["refiner"] = kw
        return self.refiner

    def remove_refiner(self) -> bool:
        """Drop the :class:`SemanticRefiner` (and its metadata); True if there was one.
        Whatever changes the heads' semantic output (a training stage, a new calibration)
        invalidates the refiner trained on it. The minimum component sizes chosen with the
        heads alone (``semantic_refiner["heads_min_size"]``) return to
        ``metadata["semantic_defaults"]``."""
        had = self.refiner is not None
        self.refiner = None
        self.config.pop("refiner", None)
        rec = self.metadata.pop("semantic_refiner", None) or {}
        if rec.get("heads_min_size") is not None:
            self.metadata["semantic_defaults"] = {"min_size": list(rec["heads_min_size"])}
        return had

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(N, D)`` embedding of subtomograms ``x`` ``(N, 1, B, B, B)``.

        For ``subtomo_ssl`` the SimSiam projection; for the dense models the global one.
        """
        if isinstance(self.backbone, SimSiam):
            return F.normalize(self.backbone(x), dim=1)
        return self.backbone.embed_global(x)

    # -- self-supervision -----------------------------------------------------------------
    def ssl_forward(
        self, view1: torch.Tensor, view2: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Projections and predictions for SimSiam losses (see ``cryosiam_nb.models.losses``).

        One view → one dict; two views → a pair of dicts (``dense_simsiam_loss(*pair, ...)``
        for dense_ssl, ``simsiam_loss(*pair)`` for subtomo_ssl). Dense dict keys:
        ``global_z/p``, ``dense_z/p``, ``level{f}_z/p``; subtomogram dict keys ``z``, ``p``.
        """
        out1 = self.backbone.ssl_forward(view1)
        if view2 is None:
            return out1
        return out1, self.backbone.ssl_forward(view2)

    # -- fine-tuning ----------------------------------------------------------------------
    def freeze(self, part: str = "encoder", heads: Sequence[str] = ()) -> CryoSiamModel:
        """Freeze ``"encoder"`` (decoder, projector and heads train), ``"backbone"`` (only the
        heads train) or ``"none"``, plus the multi-task heads named in ``heads`` (e.g.
        the tasks a training stage gives loss weight 0). Frozen parts also keep BatchNorm
        statistics fixed (they stay in eval mode through ``model.train()``)."""
        if part not in ("none", "encoder", "backbone"):
            raise ValueError(f"part={part!r}: expected 'none', 'encoder' or 'backbone'")
        unknown = [t for t in heads if not isinstance(getattr(self.heads, t, None), nn.Module)]
        if unknown:
            raise ValueError(f"heads={list(heads)}: the model has no head {unknown}")
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = part
        self._frozen_heads = tuple(heads)
        for m in self._frozen_modules(part):
            for p in m.parameters():
                p.requires_grad_(False)
        return self.train(self.training)

    def _frozen_modules(self, part: str) -> list[nn.Module]:
        heads = [getattr(self.heads, t) for t in getattr(self, "_frozen_heads", ())]
        if part == "backbone":
            return [self.backbone, *heads]
        if part == "encoder":
            return [self.backbone.encoder, *heads]
        return heads

    def train(self, mode: bool = True) -> CryoSiamModel:
        super().train(mode)
        for m in self._frozen_modules(getattr(self, "_frozen", "none")):
            m.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"task={self.task!r}, patch_size={self.patch_size}, voxel_size={self.voxel_size}, "
            f"class_names={self.class_names}"
        )
