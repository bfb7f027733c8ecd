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


# ----------------------------------------------------------------------------- hf:DIR


def _save_hf(folder, kind="dinov2", preprocessor=True, safetensors=True):
    import json

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "dinov2":
        cfg = transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=56, patch_size=14,
        )  # fmt: skip
        model = transformers.Dinov2Model(cfg)
    else:
        cfg = transformers.ViTConfig(
            hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            image_size=32, patch_size=8,
        )  # fmt: skip
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    model.save_pretrained(folder)
    if not safetensors:  # an old-style pickled checkpoint only
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if preprocessor:  # as a DINOv2 (BitImageProcessor) repository writes it
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "do_center_crop": True, "crop_size": {"height": 56, "width": 56},
            "size": {"shortest_edge": 64}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2],
        }))  # fmt: skip
    return model.eval()


def test_hf_backbone_loads_a_local_folder_offline(tmp_path):
    model = _save_hf(tmp_path / "dino")
    bb = build_backbone(f"hf:{tmp_path / 'dino'}")
    assert bb.dim == 32 and bb.input_px == 56  # the processor's centre crop
    assert bb.name == f"hf:{(tmp_path / 'dino').resolve()}"
    torch.testing.assert_close(bb.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    x = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    normalised = (x.float() / 255 - bb.mean) / bb.std
    with torch.no_grad():
        tokens = model(pixel_values=normalised).last_hidden_state
    torch.testing.assert_close(bb(x), tokens[:, 0])  # the CLS token
    both = build_backbone(f"hf:{tmp_path / 'dino'}@cls+mean")
    assert both.dim == 64 and both.weights_sha256 == bb.weights_sha256
    torch.testing.assert_close(both(x), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1))


def test_hf_vit_without_preprocessor_uses_the_config_size(tmp_path):
    _save_hf(tmp_path / "vit", kind="vit", preprocessor=False)
    bb = build_backbone(f"hf:{tmp_path / 'vit'}")
    assert (bb.dim, bb.input_px) == (24, 32)
    assert bb(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 24)


def test_hf_backbone_refuses_what_it_cannot_load_safely(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        build_backbone(f"hf:{tmp_path / 'missing'}")
    _save_hf(tmp_path / "bin", safetensors=False)
    with pytest.raises(ValueError, match="no .safetensors weights"):
        build_backbone(f"hf:{tmp_path / 'bin'}")
    with pytest.raises(ValueError, match="pooling 'max'"):
        build_backbone(f"hf:{tmp_path / 'bin'}@max")


def test_extraction_with_an_hf_backbone(tiny_cohort, tmp_path):
    from sasha_env.config import load_config
    from sasha_env.features.extract import ExtractConfig, extract_cohort
    from sasha_env.features.store import FeatureStore
    from sasha_env.slides.grid import GridConfig

    _save_hf(tmp_path / "dino")
    cfg = load_config("tiny")
    extract = ExtractConfig.from_dict({**cfg["extract"], "backbone": f"hf:{tmp_path / 'dino'}"})
    report = extract_cohort(
        tiny_cohort, tmp_path / "f.zarr", GridConfig.from_dict(cfg["grid"]), extract, progress=False
    )
    assert report.ok, report.summary()
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.info.backbone.startswith("hf:") and store.feature_dim == 32


def test_hf_folder_names_may_hold_an_at_sign(tmp_path):
    _save_hf(tmp_path / "v@2" / "dino")
    assert build_backbone(f"hf:{tmp_path / 'v@2' / 'dino'}").dim == 32
    assert build_backbone(f"hf:{tmp_path / 'v@2' / 'dino'}@cls+mean").dim == 64
