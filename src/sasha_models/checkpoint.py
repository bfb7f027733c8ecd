"""Exported models (``model.pt``): write, load, rebuild and check them — without Lightning.

An export is a plain dict ``{'state_dict', 'config', 'kind', 'meta'}`` of tensors and
builtins, read with ``torch.load(..., weights_only=True)``. Kept apart from
:mod:`sasha_models.lit` so that environments and inference import no training stack.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .baselines import MIL_MODELS, build_baseline
from .hafed import HAFED, HAFEDConfig
from .tsu import TSU, TSUConfig

__all__ = [
    "export_dict",
    "save_export",
    "load_checkpoint",
    "build_model",
    "load_export",
    "load_model",
    "check_feature_dim",
]


def export_dict(
    model: nn.Module,
    kind: str,
    config: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The export of ``model``: ``{'state_dict', 'config', 'kind', 'meta'}``, what
    :func:`load_export` rebuilds it from.

    Args:
        model: the model (its ``state_dict`` is copied to the CPU).
        kind: ``"hafed"``, ``"tsu"`` or ``"mil:<name>"`` (see :func:`build_model`).
        config: plain values that rebuild the untrained model with :func:`build_model`.
        meta: plain values about the run (class names, feature size, scores...); ``{}`` if
            ``None``.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"state_dict": state, "config": dict(config), "kind": kind, "meta": dict(meta or {})}


def save_export(path: str | os.PathLike, blob: Mapping[str, Any]) -> Path:
    """Write an export (:func:`export_dict`) to ``path``, whole or not at all (written under a
    temporary name, then renamed), and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(blob), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an exported ``model.pt`` (``weights_only=True``: tensors and plain containers)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"state_dict", "config", "kind"} <= set(blob):
        raise ValueError(f"{path} is not a sasha model export (need state_dict, config, kind)")
    return blob


def build_model(kind: str, config: Mapping[str, Any]) -> nn.Module:
    """An untrained model from an export's ``kind`` and ``config``."""
    if kind == "hafed":
        return HAFED(HAFEDConfig(**config))
    if kind == "tsu":
        return TSU(TSUConfig(**config))
    if kind.startswith("mil:") and kind[4:] in MIL_MODELS:
        cfg = dict(config)
        return build_baseline(kind[4:], cfg.pop("d_in"), cfg.pop("n_classes"), **cfg)
    raise ValueError(f"unknown model kind {kind!r}")


def load_export(
    path: str | os.PathLike, kinds: tuple[str, ...] | None = None, what: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model from ``model.pt``, in eval mode on the CPU, with its ``meta``.

    Args:
        path: the export.
        kinds: accepted model kinds (``"hafed"``, ``"tsu"``, ``"mil:attention_mil"``, or a
            prefix such as ``"mil:"``); ``None`` accepts any.
        what: how to name the expected model in the error (default: the kinds).

    Raises:
        ValueError: not an export, or a model of another kind.
    """
    blob = load_checkpoint(path)
    kind = blob["kind"]
    if kinds is not None and not any(kind.startswith(k) for k in kinds):
        raise ValueError(f"{path} holds a {kind!r} model, not a {what or ' or '.join(kinds)}")
    model = build_model(kind, blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), dict(blob.get("meta") or {})


def load_model(path: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> nn.Module:
    """Rebuild an exported model from ``model.pt``, in eval mode on the CPU (see :func:`load_export`)."""
    return load_export(path, kinds)[0]


def _expected_dim(obj: Any) -> int:
    if isinstance(obj, HAFEDConfig):
        return obj.d_in
    if isinstance(obj, TSUConfig):
        return obj.d
    if isinstance(obj, Mapping):
        for key in ("d_in", "d"):
            if key in obj:
                return int(obj[key])
    if isinstance(getattr(obj, "model", None), nn.Module):  # a LightningModule wrapping a model
        return _expected_dim(obj.model)
    d = getattr(obj, "d_in", None)
    if d is None:
        raise TypeError(f"cannot tell the feature size expected by {type(obj).__name__}")
    return int(d)


def check_feature_dim(
    model_or_cfg: nn.Module | HAFEDConfig | TSUConfig | Mapping[str, Any] | str | os.PathLike,
    d: int,
    name: str | None = None,
) -> None:
    """Raise ``ValueError`` when features of size ``d`` do not fit a model / checkpoint.

    Args:
        model_or_cfg: a model of the zoo, its config (dataclass or dict), or the path of an
            exported ``model.pt``.
        d: the feature size of the store.
        name: how to name the checkpoint in the message (default: the path or class name).
    """
    if isinstance(model_or_cfg, (str, os.PathLike)):
        name = name or str(model_or_cfg)
        model_or_cfg = load_checkpoint(model_or_cfg)["config"]
    expected = _expected_dim(model_or_cfg)
    if int(d) != expected:
        name = name or type(model_or_cfg).__name__
        raise ValueError(
            f"feature store has d={int(d)} but checkpoint {name} expects d={expected}; "
            "re-extract with the checkpoint's backbone or retrain"
        )
