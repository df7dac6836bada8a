"""Networks and presets: shapes, architecture facts of SPEC §2, fine-tuning helpers."""

from __future__ import annotations

import pytest
import torch

from cryosiam_nb import models
from cryosiam_nb.models import TASKS

torch.set_num_threads(2)

HEAD_KEYS = {
    "denoise": {"denoised": 1},
    "semantic": {"logits": 6, "distance": 6},
    "lamella": {"logits": 2, "distance": 2},
    "instance": {"foreground": 1, "distance": 1, "boundary": 1},
}


@pytest.mark.parametrize("preset, dense_dim, size", [("tiny", 16, 16), ("paper", 64, 8)])
@pytest.mark.parametrize("task", ["denoise", "semantic", "lamella", "instance"])
def test_head_forward_shapes(preset, dense_dim, size, task):
    torch.manual_seed(0)
    model = models.build(task, preset).eval()
    x = torch.rand(2, 1, size, size, size)
    with torch.no_grad():
        out = model(x)
        emb = model.backbone(x)
    assert set(out) == set(HEAD_KEYS[task])
    for key, ch in HEAD_KEYS[task].items():
        assert out[key].shape == (2, ch, size, size, size)
        assert out[key].dtype == torch.float32
    assert emb.shape == (2, dense_dim, size, size, size)
    assert model.embedding_dim == dense_dim
    assert model.task == task and model.config["preset"] == preset
    if task == "semantic":
        assert model.class_names[:2] == ("background", "membrane") and len(model.class_names) == 6


@pytest.mark.parametrize("preset, dims, s", [("tiny", (64, 16), 16), ("paper", (256, 64), 8)])
def test_dense_ssl_forward(preset, dims, s):
    model = models.build("dense_ssl", preset).eval()
    dim, dense = dims
    v1, v2 = torch.rand(2, 1, s, s, s), torch.rand(2, 1, s, s, s)
    with torch.no_grad():
        o1, o2 = model.ssl_forward(v1, v2)
        out = model(v1)
    assert set(o1) == set(o2) == {
        "global_z", "global_p", "dense_z", "dense_p", "level2_z", "level2_p"
    }  # fmt: skip
    assert o1["global_z"].shape == o1["global_p"].shape == (2, dim)
    assert o1["dense_z"].shape == o1["dense_p"].shape == (2, dense, s, s, s)
    h = s // 2
    assert o1["level2_z"].shape == o1["level2_p"].shape == (2, dense, h, h, h)
    assert out["embedding"].shape == (2, dense, s, s, s)
    torch.testing.assert_close(out["embedding"], o1["dense_z"])


@pytest.mark.parametrize("preset, dim, box", [("tiny", 64, 16), ("paper", 1024, 8)])
def test_subtomo_ssl(preset, dim, box):
    model = models.build("subtomo_ssl", preset).eval()
    assert model.patch_size == ((32, 32, 32) if preset == "tiny" else (64, 64, 64))
    x = torch.rand(3, 1, box, box, box)
    with torch.no_grad():
        e = model.embed(x)
        o = model.ssl_forward(x)
        out = model(x)
    assert e.shape == (3, dim)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert o["z"].shape == o["p"].shape == (3, dim)
    torch.testing.assert_close(out["embedding"], e)


def test_architecture_follows_spec():
    model = models.build("dense_ssl", "paper")
    enc = model.backbone.encoder
    # MONAI ResNet, 7³ stride-1 first conv, no max-pool, bottleneck layers (1, 1, 1, 1)
    assert type(enc).__module__.startswith("monai.")
    assert enc.conv1.kernel_size == (7, 7, 7) and enc.conv1.stride == (1, 1, 1)
    assert enc.no_max_pool
    assert [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert enc.layer4[0].conv3.out_channels == 2048
    sd = model.state_dict()
    # FPN laterals to 128 (layer1 on res5), dense projector 128→128→128→64 (last BN no affine)
    assert sd["backbone.decoder.layer1.weight"].shape == (128, 2048, 1, 1, 1)
    assert sd["backbone.decoder.layer4.weight"].shape == (128, 256, 1, 1, 1)
    assert sd["backbone.projector.6.weight"].shape == (64, 128, 1, 1, 1)
    assert "backbone.projector.7.weight" not in sd and "backbone.projector.7.running_mean" in sd
    assert sd["backbone.predictor.0.weight"].shape == (16, 64, 1, 1, 1)
    # global projector → 256, predictor 256 → 64 → 256
    assert sd["backbone.global_projector.6.weight"].shape == (256, 2048)
    assert sd["backbone.global_predictor.0.weight"].shape == (64, 256)
    assert sd["backbone.global_predictor.3.weight"].shape == (256, 64)
    heads = models.build("instance", "paper").state_dict()
    assert heads["heads.foreground_head.0.weight"].shape == (32, 64, 3, 3, 3)
    assert heads["heads.foreground_head.3.weight"].shape == (64, 32, 3, 3, 3)
    assert heads["heads.boundary_head.6.weight"].shape == (1, 64, 3, 3, 3)


def test_odd_sizes_keep_input_grid():
    model = models.build("semantic", "tiny").eval()
    x = torch.rand(1, 1, 20, 13, 27)
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (1, 6, 20, 13, 27)


def test_fpn_is_top_down():
    """The decoder output at full resolution carries the coarsest level (res5, through
    layer1 and the trilinear top-down path) and the finest one (res2, through layer4)."""
    torch.manual_seed(1)
    model = models.build("dense_ssl", "tiny").eval()
    with torch.no_grad():
        feats, pyramid = model.backbone.features(torch.rand(1, 1, 16, 16, 16))
        assert [p.shape[2] for p in pyramid] == [16, 8, 4, 2]
        for i in (0, 3):
            changed = list(feats)
            changed[i] = torch.zeros_like(feats[i])
            p2 = model.backbone.decoder(changed)[0]
            assert (p2 - pyramid[0]).abs().amin() > 0, i  # every voxel depends on it


def test_overrides_and_errors():
    m = models.build("semantic", "tiny", class_names=("bg", "membrane", "ribosome"))
    assert m.class_names == ("bg", "membrane", "ribosome")
    assert m.heads.semantic_head[6].out_channels == 3
    m = models.build("dense_ssl", "tiny", filters=(4, 8, 16, 32), dense_dim=8, levels=(2, 4))
    assert m.backbone.levels == (2, 4) and m.embedding_dim == 8
    m = models.build("denoise", "tiny", patch_size=40, voxel_size=10)
    assert m.patch_size == (40, 40, 40) and m.voxel_size == 10.0
    with pytest.raises(ValueError, match="unknown override.*head_filters"):
        models.build("dense_ssl", "tiny", head_filters=(8, 16))
    with pytest.raises(ValueError, match="task='segment'"):
        models.build("segment")
    with pytest.raises(ValueError, match="preset='huge'"):
        models.build("denoise", "huge")
    with pytest.raises(ValueError, match="3 names but n_classes=2"):
        models.build("semantic", "tiny", class_names=("a", "b", "c"), n_classes=2)
    assert set(TASKS) == {
        "dense_ssl",
        "denoise",
        "semantic",
        "lamella",
        "instance",
        "multitask",
        "subtomo_ssl",
    }
    assert set(models.PRESETS) == {"tiny", "paper"}


def test_freeze_modes():
    model = models.build("semantic", "tiny")
    model.freeze("encoder")
    enc = model.backbone.encoder
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in model.backbone.decoder.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    model.train()
    assert not enc.bn1.training and model.backbone.decoder.training  # frozen BN stats stay
    model.freeze("backbone")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    model.freeze("none")
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert enc.bn1.training
    with pytest.raises(ValueError, match="part='heads'"):
        model.freeze("heads")


def test_gradients_reach_trainable_parts_only():
    model = models.build("denoise", "tiny").freeze("encoder").train()
    before = model.backbone.encoder.bn1.running_mean.clone()
    out = model(torch.rand(2, 1, 16, 16, 16))["denoised"]
    out.mean().backward()
    assert model.backbone.encoder.conv1.weight.grad is None
    assert model.heads.cnn_head[0].weight.grad is not None
    assert model.backbone.projector[0].weight.grad is not None
    assert torch.equal(model.backbone.encoder.bn1.running_mean, before)
