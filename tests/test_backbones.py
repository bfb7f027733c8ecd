"""The backbone registry: the bundled EfficientNet, and the timm adapter for local checkpoints."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from sasha_env.features.backbones import available_backbones, build_backbone


def test_default_backbone_is_offline_imagenet_efficientnet():
    bb = build_backbone("efficientnet-lite0")
    assert bb.dim == 1280 and bb.input_px == 224 and len(bb.weights_sha256) == 64
    feats = bb(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (2, 1280) and feats.dtype == torch.float32
    assert not any(p.requires_grad for p in bb.parameters())
    assert "timm:<model_name>" in available_backbones()
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        build_backbone("nope")


class _TinyViT(nn.Module):
    """Stands in for a timm model: num_features, pretrained_cfg, pooled features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.num_features = 8
        self.pretrained_cfg = {
            "input_size": (3, 16, 16),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
        }

    def forward(self, x):
        return self.proj(x).mean(dim=(2, 3))


@pytest.fixture
def fake_timm(monkeypatch):
    module = types.ModuleType("timm")
    calls = {}

    def create_model(name, pretrained=False, num_classes=None):
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes)
        return _TinyViT()

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def test_timm_backbone_loads_a_local_checkpoint(fake_timm, tmp_path):
    reference = _TinyViT()
    ckpt = tmp_path / "uni.pt"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, ckpt)
    bb = build_backbone("timm:vit_small_patch16_224", checkpoint=ckpt)
    assert fake_timm == {"name": "vit_small_patch16_224", "pretrained": False, "num_classes": 0}
    assert bb.name == "timm:vit_small_patch16_224" and bb.dim == 8 and bb.input_px == 16
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    expected = reference((x.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(bb(x), expected)


def test_timm_backbone_without_weights_is_refused(fake_timm, tmp_path):
    with pytest.raises(ValueError, match="needs weights"):
        build_backbone("timm:vit_small_patch16_224")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone("timm:vit_small_patch16_224", checkpoint=tmp_path / "missing.pt")


def test_timm_checkpoint_of_another_model_is_refused(fake_timm, tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(3)}, ckpt)
    with pytest.raises(ValueError, match="does not fit timm model"):
        build_backbone("timm:vit_small_patch16_224", checkpoint=ckpt)
