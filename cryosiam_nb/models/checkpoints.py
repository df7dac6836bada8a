"""Saving and loading models: our checkpoints, published CryoSiam v1.0 Lightning checkpoints
(SPEC §11) and the tiny models shipped in ``cryosiam_nb/weights/``.

Checkpoints are pickles. Everything here is read with ``torch.load(weights_only=True)``,
which can only rebuild tensors and plain containers; the few extra plain types that the
published files contain (Lightning's ``AttributeDict`` — read back as a ``dict`` —,
``pathlib`` paths, numpy scalars/arrays) are allow-listed. A file that needs any other
object is refused unless the caller passes ``trusted=True``, because unpickling arbitrary
objects can run arbitrary code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosiam_nb.io import InputError, atomic_path

from ._safeload import load_checkpoint_dict
from .networks import HEAD_LAYOUTS, CryoSiamModel
from .presets import build_from_config, default_class_names

__all__ = [
    "save",
    "load",
    "list_models",
    "export_lightning",
    "WEIGHTS_DIR",
    "FORMAT",
    "load_checkpoint_dict",
]

FORMAT = "cryosiam_nb"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


# --------------------------------------------------------------------------- shipped models
def list_models() -> list[str]:
    """Names of the models shipped in ``cryosiam_nb/weights/`` (usable as ``load(name)``)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(f.stem for f in WEIGHTS_DIR.glob("*.pt"))


def _resolve(path_or_name: str | os.PathLike[str]) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    name = str(path_or_name)
    is_name = os.sep not in name and "/" not in name and p.suffix not in (".pt", ".ckpt", ".pth")
    if is_name:
        shipped = WEIGHTS_DIR / f"{name}.pt"
        if shipped.is_file():
            return shipped
        avail = list_models()
        raise InputError(
            f"{name!r}: no such file and no shipped model of that name; available models: "
            f"{', '.join(avail) if avail else '(none shipped in ' + str(WEIGHTS_DIR) + ')'}"
        )
    raise InputError(f"{p}: checkpoint file not found")


# --------------------------------------------------------------------------- our format
def save(model: CryoSiamModel, path: str | os.PathLike[str], **metadata: Any) -> Path:
    """Write ``model`` to ``path`` (atomically) in cryosiam_nb's checkpoint format.

    Stored: ``config`` (architecture + preset + task), ``state_dict`` and ``metadata``.
    Recognised metadata keywords (they also update the model's attributes):
    ``voxel_size`` (training voxel size, Å), ``patch_size`` (z, y, x voxels),
    ``class_names``; others are kept as given, e.g. ``data_summary`` (normalisation:
    percentiles / min / max / mean / std of the training data), ``metrics`` (validation
    results), ``epochs``, ``notes``. Values must be plain data (numbers, strings, lists,
    dicts); numpy scalars/arrays are converted to Python numbers/lists.
    """
    if not isinstance(model, CryoSiamModel):
        raise InputError(f"save(): expected a CryoSiamModel, got {type(model).__name__}")
    meta = _plain(dict(model.metadata), "metadata")
    meta.update(_plain(metadata, "metadata"))
    if "voxel_size" in meta:
        model.voxel_size = None if meta["voxel_size"] is None else float(meta["voxel_size"])
    if "patch_size" in meta:
        model.patch_size = tuple(int(v) for v in meta["patch_size"])
    if "class_names" in meta and meta["class_names"] is not None:
        model.class_names = tuple(str(c) for c in meta["class_names"])
    model.metadata = meta
    config = dict(model.config)
    config.update(
        patch_size=list(model.patch_size),
        voxel_size=model.voxel_size,
        class_names=None if model.class_names is None else list(model.class_names),
    )
    model.config = config
    from cryosiam_nb import __version__

    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cryosiam_nb_version": __version__,
        "task": model.task,
        "preset": config.get("preset"),
        "config": _plain(config, "config"),
        "metadata": meta,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(ckpt, tmp)
    return target


def _plain(obj: Any, what: str) -> Any:
    """Convert to plain Python data (weights-only loadable); refuse anything else."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist() if obj.numel() > 1 else obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, what) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v, what) for v in obj]
    raise InputError(f"save(): {what} value {obj!r} of type {type(obj).__name__} is not plain data")


def _build_empty(config: dict[str, Any], metadata: dict[str, Any] | None) -> CryoSiamModel:
    """Build the network without allocating or initialising weights (they are loaded next)."""
    with torch.device("meta"):
        return build_from_config(config, metadata=metadata)


def _from_ours(ckpt: dict[str, Any], source: Path) -> CryoSiamModel:
    version = ckpt.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(
            f"{source}: invalid checkpoint format_version {version!r} (expected an integer "
            f"from 1 to {FORMAT_VERSION})"
        )
    if version > FORMAT_VERSION:
        raise InputError(
            f"{source}: checkpoint format version {version} is newer than this "
            f"cryosiam_nb understands ({FORMAT_VERSION}); upgrade cryosiam_nb"
        )
    if version < 1:
        raise InputError(f"{source}: invalid checkpoint format_version {version!r}")
    config = ckpt.get("config")
    if not isinstance(config, Mapping):
        raise InputError(
            f"{source}: invalid model config in checkpoint (expected a dict, found "
            f"{type(config).__name__})"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        what = "missing" if state is None else f"a {type(state).__name__}, not a dict"
        raise InputError(f"{source}: the checkpoint's state_dict is {what}")
    metadata = ckpt.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InputError(f"{source}: checkpoint metadata must be a dict, found {metadata!r}")
    try:
        model = _build_empty(dict(config), None if metadata is None else dict(metadata))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{source}: invalid model config in checkpoint ({err})") from None
    _load_state(model, state, source, {"": ""})
    return model


# --------------------------------------------------------------------------- published v1.0
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _backbone_hparams(hp: Mapping[str, Any], source: Path) -> dict[str, Any] | None:
    net = _get(hp, "backbone_config", "parameters", "network")
    if net is None:
        net = _get(hp, "config", "parameters", "network")
    return None if net is None else dict(net)


def _as_list(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v]
    return [int(x) for x in v]


def _dense_config(net: Mapping[str, Any], sd: Mapping[str, Any], source: Path) -> dict[str, Any]:
    if int(net.get("spatial_dims", 3)) != 3:
        raise InputError(f"{source}: spatial_dims={net['spatial_dims']} (only 3-D is supported)")
    if not net.get("no_max_pool", True):
        raise InputError(
            f"{source}: no_max_pool=False networks are not supported (their dense embedding "
            "would be at half the input resolution)"
        )
    if net.get("add_fpn_later_conv"):
        raise InputError(f"{source}: add_fpn_later_conv=True decoders are not supported")
    dec = net.get("decoder_type")
    if dec not in (None, "fpn", "FPN"):
        raise InputError(f"{source}: decoder_type={dec!r} is not supported (only 'fpn')")
    return {
        **_encoder_config(net, source, ("fpn_channels", "dense_dim")),
        "fpn_channels": int(net["fpn_channels"]),
        "dense_dim": int(net["dense_dim"]),
        "dense_pred_dim": int(net.get("dense_pred_dim", net["dense_dim"])),
        "levels": [2, 4, 8] if net.get("include_levels_loss") else [],
        "encoder_fc": "encoder.fc.weight" in sd,
    }


def _encoder_config(
    net: Mapping[str, Any], source: Path, extra_required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Encoder + global projector fields shared by DenseSimSiam and SimSiam configs."""
    required = ("num_layers", "num_filters", "dim", "pred_dim", *extra_required)
    missing = [k for k in required if k not in net]
    if missing:
        raise InputError(f"{source}: hyper_parameters network lacks {missing}")
    return {
        "in_channels": int(net.get("in_channels", 1)),
        "block": str(net.get("block_type", "bottleneck")),
        "layers": _as_list(net["num_layers"]),
        "filters": _as_list(net["num_filters"]),
        "conv1_kernel": 7,
        "dim": int(net["dim"]),
        "pred_dim": int(net["pred_dim"]),
        "no_max_pool": bool(net.get("no_max_pool", True)),
    }


def _head_task(heads_sd: Mapping[str, Any], source: Path, task: str | None) -> tuple[str, int]:
    names = {k.split(".", 1)[0] for k in heads_sd}
    if "foreground_head" in names:
        found = "instance"
    elif "semantic_head" in names:
        found = "semantic"
    elif "cnn_head" in names:
        found = "denoise"
    else:
        raise InputError(
            f"{source}: cannot tell the task — no known head among '_model.' keys {sorted(names)}"
        )
    first = {"instance": "foreground_head", "semantic": "semantic_head", "denoise": "cnn_head"}
    w = heads_sd.get(f"{first[found]}.6.weight")
    n_out = int(w.shape[0]) if w is not None else 0
    if found == "semantic":
        if task not in (None, "semantic", "lamella"):
            raise InputError(
                f"{source}: task={task!r} requested but the checkpoint has semantic heads"
            )
        if task in ("semantic", "lamella"):
            found = task
        elif n_out == 2:
            found = "lamella"
    elif task is not None and task != found:
        raise InputError(f"{source}: task={task!r} requested but the checkpoint holds {found!r}")
    return found, n_out


def _heads_config(
    hp: Mapping[str, Any], heads_sd: Mapping[str, Any], task: str, dense_dim: int, source: Path
) -> dict[str, Any]:
    net = _get(hp, "config", "parameters", "network") or {}
    first = HEAD_LAYOUTS[task][0][1]
    filters = net.get("filters")
    if filters is None or len(_as_list(filters)) != 2:
        # Not in the hyper-parameters: read the widths from the stored weights.
        w0, w3 = heads_sd.get(f"{first}.0.weight"), heads_sd.get(f"{first}.3.weight")
        if w0 is None or w3 is None:
            raise InputError(f"{source}: head widths are neither in hyper_parameters nor weights")
        filters = [int(w0.shape[0]), int(w3.shape[0])]
    kernel = net.get("kernel_size", 3)
    kernel = int(kernel[0] if isinstance(kernel, list | tuple) else kernel)
    pad = net.get("padding")
    if pad is not None:
        pad = int(pad[0] if isinstance(pad, list | tuple) else pad)
        if pad != kernel // 2:
            raise InputError(f"{source}: head padding {pad} with kernel {kernel} is not 'same'")
    if net.get("dense_dim") is not None and int(net["dense_dim"]) != dense_dim:
        raise InputError(
            f"{source}: heads read dense_dim={net['dense_dim']} but the backbone gives {dense_dim}"
        )
    out = net.get("out_channels", net.get("n_output_channels"))
    cfg: dict[str, Any] = {"filters": _as_list(filters), "kernel_size": kernel}
    if task in ("semantic", "lamella"):
        if out is None:
            out = int(heads_sd[f"{first}.6.weight"].shape[0])
        cfg["out_channels"] = int(out)
    return cfg


def _patch_from_hp(hp: Mapping[str, Any], default: int) -> list[int]:
    ps = _get(hp, "config", "parameters", "data", "patch_size")
    if ps is None:
        return [default] * 3
    ps = _as_list(ps)
    return ps * 3 if len(ps) == 1 else ps[-3:]


def _data_summary(hp: Mapping[str, Any]) -> dict[str, Any]:
    data = _get(hp, "config", "parameters", "data") or {}
    out = {k: data[k] for k in ("min", "max", "mean", "std") if k in data}
    return _plain(out, "data summary")


def _from_lightning(ckpt: dict[str, Any], source: Path, task: str | None) -> CryoSiamModel:
    sd = ckpt["state_dict"]
    hp = ckpt.get("hyper_parameters") or {}
    bb = {
        k[len("_model_backbone.") :]: v for k, v in sd.items() if k.startswith("_model_backbone.")
    }
    mm = {k[len("_model.") :]: v for k, v in sd.items() if k.startswith("_model.")}
    net = _backbone_hparams(hp, source)
    if net is None:
        raise InputError(
            f"{source}: published checkpoint lacks hyper_parameters "
            "['backbone_config']['parameters']['network'] / ['config']['parameters']['network']"
        )
    prefixes: dict[str, str]
    if bb:  # fine-tuned task model: backbone + heads
        found, _ = _head_task(mm, source, task)
        dense = _dense_config(net, bb, source)
        config: dict[str, Any] = {"task": found, "preset": None, "backbone": dense}
        config["heads"] = _heads_config(hp, mm, found, dense["dense_dim"], source)
        prefixes = {"backbone.": "_model_backbone.", "heads.": "_model."}
        n = config["heads"].get("out_channels")
        config["class_names"] = (
            list(default_class_names(found, n) or []) if found in ("semantic", "lamella") else None
        )
    elif "encoder.fc.0.weight" in mm:  # subtomogram SimSiam
        found = "subtomo_ssl"
        if task not in (None, found):
            raise InputError(
                f"{source}: task={task!r} requested but the checkpoint holds {found!r}"
            )
        config = {"task": found, "preset": None, "subtomo": _encoder_config(net, source)}
        config["class_names"] = None
        prefixes = {"backbone.": "_model."}
    elif "decoder.layer1.weight" in mm:  # DenseSimSiam pretraining
        found = "dense_ssl"
        if task not in (None, found):
            raise InputError(
                f"{source}: task={task!r} requested but the checkpoint holds {found!r}"
            )
        config = {"task": found, "preset": None, "backbone": _dense_config(net, mm, source)}
        config["class_names"] = None
        prefixes = {"backbone.": "_model."}
    else:
        raise InputError(f"{source}: state_dict has no recognisable CryoSiam network keys")
    config["patch_size"] = _patch_from_hp(hp, 64 if found == "subtomo_ssl" else 128)
    config["voxel_size"] = None
    config["upstream_hyper_parameters"] = {"network": _plain_or_repr(net)}
    meta = {"source": "CryoSiam v1.0 checkpoint", "file": str(source)}
    summary = _data_summary(hp)
    if summary:
        meta["data_summary"] = summary
    try:
        model = _build_empty(config, meta)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"{source}: cannot build the network from hyper_parameters ({err})"
        ) from None
    _load_state(model, sd, source, prefixes)
    return model


def _plain_or_repr(obj: Any) -> Any:
    try:
        return _plain(obj, "hyper_parameters")
    except InputError:
        return repr(obj)


def _load_state(
    model: CryoSiamModel, sd: Mapping[str, Any], source: Path, prefixes: Mapping[str, str]
) -> None:
    """Map checkpoint keys onto the model (``prefixes``: ours → theirs); all must match."""
    expected = model.state_dict()
    mapped: dict[str, Any] = {}
    for ours in expected:
        theirs = ours
        for a, b in prefixes.items():
            if ours.startswith(a):
                theirs = b + ours[len(a) :]
                break
        mapped[theirs] = ours
    missing = sorted(k for k in mapped if k not in sd)
    unexpected = sorted(k for k in sd if k not in mapped)
    bad_shape = sorted(
        f"{k} {tuple(sd[k].shape)} != {tuple(expected[mapped[k]].shape)}"
        for k in mapped
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and tuple(sd[k].shape) != tuple(expected[mapped[k]].shape)
    )
    not_tensor = sorted(k for k in mapped if k in sd and not isinstance(sd[k], torch.Tensor))
    bad_dtype = sorted(
        f"{k} {sd[k].dtype} != {expected[mapped[k]].dtype}"
        for k in mapped
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].dtype != expected[mapped[k]].dtype
    )
    not_finite = sorted(
        k
        for k in mapped
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and sd[k].is_floating_point()
        and not bool(torch.isfinite(sd[k]).all())
    )
    if missing or unexpected or bad_shape or not_tensor or bad_dtype or not_finite:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", bad_shape),
            ("values that are not tensors", not_tensor),
            ("dtype mismatches (weights must be float32)", bad_dtype),
            ("tensors with NaN or Inf weights", not_finite),
        ):
            if keys:
                shown = ", ".join(keys[:25]) + (
                    f", … (+{len(keys) - 25} more)" if len(keys) > 25 else ""
                )
                parts.append(f"{len(keys)} {label}: {shown}")
        raise InputError(
            f"{source}: checkpoint does not match the {model.task!r} network built from its "
            f"config — " + "; ".join(parts)
        )
    state = {ours: sd[theirs] for theirs, ours in mapped.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.to(memory_format=torch.channels_last_3d)


def export_lightning(model: CryoSiamModel, path: str | os.PathLike[str]) -> Path:
    """Write a task model in the published CryoSiam v1.0 Lightning layout (SPEC §11).

    Backbone keys get the ``_model_backbone.`` prefix and head keys ``_model.``;
    ``hyper_parameters`` carry the backbone network and the head config. The level
    (L2/L4/L8) projectors are training-only and are not written
    (``include_levels_loss=False``). Useful to hand a cryosiam_nb model to tools that read
    the release format, and to exercise :func:`load` on that format without the release
    files. Only fine-tuned task models (denoise, semantic, lamella, instance) are supported.
    """
    if model.task not in ("denoise", "semantic", "lamella", "instance"):
        raise InputError(f"export_lightning: task {model.task!r} is not a fine-tuned task model")
    bb = model.config["backbone"]
    heads = model.config["heads"]
    net = {
        "block_type": bb["block"],
        "spatial_dims": 3,
        "in_channels": bb["in_channels"],
        "num_layers": list(bb["layers"]),
        "num_filters": list(bb["filters"]),
        "fpn_channels": bb["fpn_channels"],
        "no_max_pool": True,
        "dim": bb["dim"],
        "pred_dim": bb["pred_dim"],
        "dense_dim": bb["dense_dim"],
        "dense_pred_dim": bb["dense_pred_dim"],
        "include_levels_loss": False,
    }
    head_net: dict[str, Any] = {
        "dense_dim": bb["dense_dim"],
        "filters": list(heads["filters"]),
        "kernel_size": heads["kernel_size"],
        "padding": heads["kernel_size"] // 2,
    }
    if "out_channels" in heads:
        head_net["out_channels"] = heads["out_channels"]
    else:
        head_net["n_output_channels"] = 1
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.level_"):
            continue
        if k.startswith("backbone."):
            sd["_model_backbone." + k[len("backbone.") :]] = v.detach().cpu().contiguous()
        elif k.startswith("heads."):
            sd["_model." + k[len("heads.") :]] = v.detach().cpu().contiguous()
    hp = {
        "backbone_config": {"parameters": {"network": net}},
        "config": {
            "parameters": {
                "data": {"patch_size": int(model.patch_size[0])},
                "network": head_net,
            }
        },
    }
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save({"state_dict": sd, "hyper_parameters": hp}, tmp)
    return target


# --------------------------------------------------------------------------- entry point
def load(
    path_or_name: str | os.PathLike[str],
    trusted: bool = False,
    device: str | torch.device | None = None,
    task: str | None = None,
) -> CryoSiamModel:
    """Load a model: our checkpoint, a published CryoSiam v1.0 ``.ckpt``, or a shipped name.

    ``path_or_name``: a file path, or a name from :func:`list_models` (e.g. ``"tiny-denoise"``).
    ``trusted``: allow arbitrary pickled objects (only for files you trust; see module doc).
    ``device``: where to put the model; default cuda → mps → cpu. ``task``: for a published
    semantic-head checkpoint, ``"semantic"`` or ``"lamella"`` (default: lamella when it has
    2 classes). The model is returned in eval mode.
    """
    from cryosiam_nb.device import pick_device

    source = _resolve(path_or_name)
    ckpt = load_checkpoint_dict(source, trusted=trusted)
    if ckpt.get("format") == FORMAT:
        model = _from_ours(ckpt, source)
        if task is not None and task != model.task:
            raise InputError(
                f"{source}: task={task!r} requested but the checkpoint holds {model.task!r}"
            )
    elif isinstance(ckpt.get("state_dict"), Mapping) and any(
        k.startswith("_model") for k in ckpt["state_dict"]
    ):
        model = _from_lightning(ckpt, source, task)
    else:
        raise InputError(
            f"{source}: not a cryosiam_nb or CryoSiam checkpoint (top-level keys: "
            f"{sorted(map(str, ckpt))[:10]})"
        )
    return model.to(pick_device(device)).eval()
