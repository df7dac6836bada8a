"""Checkpoints: ours (save → load) and published CryoSiam v1.0 Lightning files (SPEC §11).

The published layout is rebuilt from ``shared/upstream_checkpoint_layout.tsv`` (names and
shapes of a release-like configuration) with random tensors, wrapped like a Lightning
checkpoint (``state_dict`` with ``_model_backbone.`` / ``_model.`` prefixes,
``hyper_parameters`` as Lightning's ``AttributeDict``), written with ``torch.save`` and read
back through ``cryosiam_nb.models.load``.
"""

from __future__ import annotations

import pathlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosiam_nb import models
from cryosiam_nb.models import checkpoints

torch.set_num_threads(2)

HERE = Path(__file__).resolve().parent
LAYOUT_CANDIDATES = [
    HERE.parent.parent / "shared" / "upstream_checkpoint_layout.tsv",
    Path("/work/shared/upstream_checkpoint_layout.tsv"),
    HERE / "data" / "upstream_checkpoint_layout.tsv",
]
LAYOUT = next((p for p in LAYOUT_CANDIDATES if p.is_file()), None)
pytestmark = pytest.mark.skipif(LAYOUT is None, reason="upstream_checkpoint_layout.tsv not found")

RELEASE_NET = {
    "block_type": "bottleneck",
    "spatial_dims": 3,
    "in_channels": 1,
    "num_layers": [1, 1, 1, 1],
    "num_filters": [64, 128, 256, 512],
    "fpn_channels": 128,
    "no_max_pool": True,
    "dim": 2048,
    "pred_dim": 512,
    "dense_dim": 64,
    "dense_pred_dim": 64,
    "include_levels_loss": True,
}


def _sections() -> dict[str, dict[str, tuple[int, ...]]]:
    """The tsv's sections: backbone, instance, semantic, denoise, simsiam → {key: shape}."""
    names = {
        "DenseSimSiam": "backbone",
        "InstanceHeads": "instance",
        "SemanticHeads": "semantic",
        "CNNHead": "denoise",
        "SimSiam": "simsiam",
    }
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    cur = None
    for line in LAYOUT.read_text().splitlines():
        if line.startswith("#"):
            word = line[1:].strip().split(" ")[0]
            if word in names:
                cur = names[word]
                out[cur] = {}
            continue
        if not line.strip():
            continue
        key, shape = line.split("\t")
        out[cur][key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7, dtype=torch.int64)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s, generator=g) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(s, generator=g) * 0.1
        else:
            sd[k] = torch.randn(s, generator=g) * 0.02
    return sd


@pytest.fixture(scope="module")
def layout():
    return _sections()


@pytest.fixture(scope="module")
def backbone_sd(layout):
    return _tensors(layout["backbone"], 0)


def _attribute_dict(d: dict):
    """A real pickled Lightning ``AttributeDict`` (module faked just while saving)."""
    mod = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = mod.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    mod.AttributeDict = AttributeDict
    return mod, AttributeDict(d)


def _write(path: Path, ckpt: dict, lightning_mod: types.ModuleType | None = None) -> Path:
    saved = {}
    if lightning_mod is not None:
        for name in ("pytorch_lightning", "pytorch_lightning.utilities", lightning_mod.__name__):
            saved[name] = sys.modules.get(name)
            sys.modules[name] = (
                lightning_mod if name == lightning_mod.__name__ else types.ModuleType(name)
            )
    try:
        torch.save(ckpt, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return path


def _task_ckpt(backbone_sd, head_sd, head_net: dict, patch=128) -> tuple[dict, types.ModuleType]:
    hp = {
        "backbone_config": {"parameters": {"network": dict(RELEASE_NET)}},
        "config": {
            "parameters": {
                "data": {
                    "patch_size": patch,
                    "min": 0.0,
                    "max": 1.0,
                    "mean": np.float64(0.41),
                    "std": np.float32(0.12),
                    "path": pathlib.PosixPath("/data/train"),
                },
                "network": {"dense_dim": 64, "kernel_size": 3, "padding": 1, **head_net},
            }
        },
    }
    mod, ad = _attribute_dict(hp)
    sd = {f"_model_backbone.{k}": v for k, v in backbone_sd.items()}
    sd.update({f"_model.{k}": v for k, v in head_sd.items()})
    ckpt = {
        "epoch": 199,
        "global_step": 12345,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": sd,
        "hyper_parameters": ad,
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
    }
    return ckpt, mod


X16 = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "task, section, head_net, keys, channels",
    [
        (
            "instance",
            "instance",
            {"filters": [32, 64], "n_output_channels": 1},
            ("foreground", "distance", "boundary"),
            1,
        ),
        (
            "semantic",
            "semantic",
            {"filters": [32, 64], "out_channels": 6},
            ("logits", "distance"),
            6,
        ),
        ("denoise", "denoise", {"filters": [32, 64], "out_channels": 1}, ("denoised",), 1),
    ],
)
def test_published_task_checkpoint_loads_every_key(
    tmp_path, layout, backbone_sd, task, section, head_net, keys, channels
):
    head_sd = _tensors(layout[section], 1)
    ckpt, mod = _task_ckpt(backbone_sd, head_sd, head_net)
    path = _write(tmp_path / f"{task}.ckpt", ckpt, mod)
    model = models.load(path)
    assert model.task == task
    assert model.patch_size == (128, 128, 128)
    assert model.metadata["data_summary"]["mean"] == pytest.approx(0.41)
    # every key of the file was consumed, value for value
    ours = model.state_dict()
    for k, v in head_sd.items():
        assert torch.equal(ours[f"heads.{k}"], v), k
    for k in ("encoder.layer4.0.conv3.weight", "level_projector_8.6.bias", "encoder.fc.weight"):
        assert torch.equal(ours[f"backbone.{k}"], backbone_sd[k]), k
    assert len(ours) == len(ckpt["state_dict"])
    with torch.no_grad():
        out = model(X16)
        emb = model.backbone(X16)
    assert set(out) == set(keys)
    for k in keys:
        assert out[k].shape == (1, channels, 8, 8, 8)
        assert torch.isfinite(out[k]).all()
    assert emb.shape == (1, 64, 8, 8, 8)
    if task == "semantic":
        assert model.class_names is not None and len(model.class_names) == 6


def test_published_heads_compute_like_upstream(tmp_path, layout, backbone_sd):
    """The head output equals conv3–BN–ReLU–conv3–BN–ReLU–conv3 applied to the projector
    output of the FPN decoder, computed here by hand from the raw state dict."""
    import torch.nn.functional as F

    head_sd = _tensors(layout["denoise"], 2)
    ckpt, mod = _task_ckpt(backbone_sd, head_sd, {"filters": [32, 64], "out_channels": 1})
    model = models.load(_write(tmp_path / "d.ckpt", ckpt, mod))
    with torch.no_grad():
        z = model.backbone(X16)

        def bn(x, p):
            return F.batch_norm(
                x,
                head_sd[f"{p}.running_mean"],
                head_sd[f"{p}.running_var"],
                head_sd[f"{p}.weight"],
                head_sd[f"{p}.bias"],
                False,
                0.0,
                1e-5,
            )

        h = F.conv3d(z, head_sd["cnn_head.0.weight"], head_sd["cnn_head.0.bias"], padding=1)
        h = F.relu(bn(h, "cnn_head.1"))
        h = F.conv3d(h, head_sd["cnn_head.3.weight"], head_sd["cnn_head.3.bias"], padding=1)
        h = F.relu(bn(h, "cnn_head.4"))
        h = F.conv3d(h, head_sd["cnn_head.6.weight"], head_sd["cnn_head.6.bias"], padding=1)
        out = model(X16)["denoised"]
    torch.testing.assert_close(out, h, rtol=1e-4, atol=1e-5)


def test_published_lamella_checkpoint(tmp_path, layout, backbone_sd):
    shapes = {
        k: ((2, *s[1:]) if k.endswith(".6.weight") else (2,) if k.endswith(".6.bias") else s)
        for k, s in layout["semantic"].items()
    }
    ckpt, mod = _task_ckpt(
        backbone_sd, _tensors(shapes, 4), {"filters": [32, 64], "out_channels": 2}
    )
    path = _write(tmp_path / "lamella.ckpt", ckpt, mod)
    model = models.load(path)
    assert model.task == "lamella"
    assert model.class_names == ("outside", "sample")
    with torch.no_grad():
        out = model(X16)
    assert out["logits"].shape == out["distance"].shape == (1, 2, 8, 8, 8)
    assert models.load(path, task="semantic").task == "semantic"


def test_published_pretraining_checkpoints(tmp_path, layout, backbone_sd):
    # DenseSimSiam pretraining: backbone keys carry '_model.'
    net = dict(RELEASE_NET)
    ckpt = {
        "state_dict": {f"_model.{k}": v for k, v in backbone_sd.items()},
        "hyper_parameters": {
            "config": {"parameters": {"network": net, "data": {"patch_size": [96, 96, 96]}}}
        },
    }
    model = models.load(_write(tmp_path / "dense.ckpt", ckpt))
    assert model.task == "dense_ssl" and model.patch_size == (96, 96, 96)
    assert model.backbone.levels == (2, 4, 8)
    with torch.no_grad():
        o = model.ssl_forward(X16)
    assert o["global_z"].shape == (1, 2048) and o["dense_z"].shape == (1, 64, 8, 8, 8)
    assert o["level4_z"].shape == (1, 64, 2, 2, 2)

    # subtomogram SimSiam
    sim_sd = _tensors(layout["simsiam"], 5)
    sim_net = {
        "block_type": "bottleneck",
        "spatial_dims": 3,
        "in_channels": 1,
        "num_layers": [1, 1, 1, 1],
        "num_filters": [64, 128, 256, 512],
        "no_max_pool": True,
        "dim": 1024,
        "pred_dim": 256,
    }
    ckpt = {
        "state_dict": {f"_model.{k}": v for k, v in sim_sd.items()},
        "hyper_parameters": {"config": {"parameters": {"network": sim_net}}},
    }
    model = models.load(_write(tmp_path / "simsiam.ckpt", ckpt))
    assert model.task == "subtomo_ssl"
    with torch.no_grad():
        e = model.embed(torch.rand(3, 1, 16, 16, 16))
    assert e.shape == (3, 1024)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


def test_missing_and_unexpected_keys_are_listed(tmp_path, layout, backbone_sd):
    head_sd = _tensors(layout["denoise"], 6)
    ckpt, mod = _task_ckpt(backbone_sd, head_sd, {"filters": [32, 64], "out_channels": 1})
    del ckpt["state_dict"]["_model.cnn_head.3.bias"]
    ckpt["state_dict"]["_model.cnn_head.9.weight"] = torch.zeros(1)
    path = _write(tmp_path / "broken.ckpt", ckpt, mod)
    with pytest.raises(ValueError) as err:
        models.load(path)
    msg = str(err.value)
    assert "broken.ckpt" in msg
    assert "missing keys: _model.cnn_head.3.bias" in msg
    assert "unexpected keys: _model.cnn_head.9.weight" in msg


def test_shape_mismatch_is_reported(tmp_path, layout, backbone_sd):
    head_sd = _tensors(layout["denoise"], 7)
    ckpt, mod = _task_ckpt(backbone_sd, head_sd, {"filters": [32, 64], "out_channels": 1})
    ckpt["state_dict"]["_model.cnn_head.6.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape mismatches: _model.cnn_head.6.bias \(3,\)"):
        models.load(_write(tmp_path / "shape.ckpt", ckpt, mod))


class Payload:
    """An arbitrary object: unpickling such things can run code."""

    def __init__(self) -> None:
        self.note = "not plain data"


def test_untrusted_pickle_refused_then_accepted_when_trusted(tmp_path):
    model = models.build("denoise", "tiny")
    path = tmp_path / "ours.pt"
    models.save(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as err:
        models.load(path)
    msg = str(err.value)
    assert "arbitrary code" in msg and "trusted=True" in msg and "Payload" in msg
    loaded = models.load(path, trusted=True)
    assert loaded.task == "denoise"


def test_save_load_identical_outputs_and_metadata(tmp_path):
    torch.manual_seed(0)
    for task in ("semantic", "instance", "subtomo_ssl"):
        model = models.build(task, "tiny", voxel_size=13.6)
        model.train()
        with torch.no_grad():  # move BN statistics away from their defaults
            model(torch.rand(2, 1, 16, 16, 16))
        model.eval()
        path = models.save(
            model,
            tmp_path / f"{task}.pt",
            patch_size=(24, 32, 32),
            data_summary={"p0.1": np.float32(0.02), "p99.9": 0.97},
            metrics={"val_loss": 0.5},
        )
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        back = models.load(path, device=None)
        assert next(back.parameters()).device.type == "cpu"  # auto-selected on this machine
        assert not back.training
        assert back.task == task and back.voxel_size == 13.6
        assert back.patch_size == (24, 32, 32)
        assert back.class_names == model.class_names
        assert back.metadata["data_summary"]["p0.1"] == pytest.approx(0.02)
        assert back.metadata["metrics"] == {"val_loss": 0.5}
        assert back.config == model.config
        x = torch.rand(2, 1, 16, 16, 16)
        with torch.no_grad():
            a, b = model(x), back(x)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (task, k)


def test_save_refuses_non_plain_metadata(tmp_path):
    model = models.build("denoise", "tiny")
    with pytest.raises(ValueError, match="not plain data"):
        models.save(model, tmp_path / "m.pt", notes=Payload())
    assert not (tmp_path / "m.pt").exists()


def test_shipped_names_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path / "weights")
    assert models.list_models() == []
    with pytest.raises(ValueError, match="no shipped model.*none shipped"):
        models.load("tiny-denoise")
    models.save(models.build("denoise", "tiny"), tmp_path / "weights" / "tiny-denoise.pt")
    assert models.list_models() == ["tiny-denoise"]
    assert models.load("tiny-denoise").task == "denoise"
    with pytest.raises(ValueError, match="available models: tiny-denoise"):
        models.load("tiny-semantic")
    with pytest.raises(ValueError, match="not found"):
        models.load(tmp_path / "nope.ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        models.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cryosiam_nb or CryoSiam checkpoint"):
        models.load(tmp_path / "other.pt")


@pytest.mark.parametrize("task", ["semantic", "instance", "denoise", "lamella"])
def test_export_lightning_roundtrip(tmp_path, task):
    """Our model written in the published layout loads back with identical outputs."""
    model = models.build(task, preset="tiny").eval()
    path = models.export_lightning(model, tmp_path / f"{task}.ckpt")
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert all(k.startswith(("_model_backbone.", "_model.")) for k in sd)
    again = models.load(path, task=task)
    assert again.task == task
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), again(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
