"""Presets and YAML configuration: one nested dict, a section per stage.

``load_config("demo", "my.yaml", {"extract": {"batch_size": 64}})`` starts from the packaged
preset ``presets/demo.yaml``, then deep-merges the user's YAML file and explicit overrides.
Each stage turns its own section into a typed dataclass with :func:`dataclass_from_dict`,
which rejects unknown keys by name so that a typo never passes silently.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["PRESETS", "load_config", "dataclass_from_dict", "deep_merge", "say", "quiet_lightning"]

PRESETS = ("tiny", "demo", "he-cpu", "paper", "large")
T = TypeVar("T")


def say(message: str) -> None:
    """Print a progress line at once (stdout may be a file or a pipe)."""
    print(message, flush=True)


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter (device summaries, tips); warnings still show."""
    # lazy: Lightning, only when a run starts (the CLI loads this module); it sets its
    # loggers' levels on import, so it is imported before they are changed
    import lightning  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in (nested dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    preset: str = "demo", path: str | Path | None = None, overrides: dict | None = None
) -> dict[str, Any]:
    """The configuration for a run: preset, then a YAML file, then explicit overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = _preset(preset)
    cfg["preset"] = preset
    if path is not None:
        cfg = deep_merge(cfg, read_config_file(path))
    if overrides:
        cfg = deep_merge(cfg, overrides)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file (a mapping; empty file: ``{}``); a missing,
    unreadable or malformed file raises an error naming it, on one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(user, dict):
        raise ValueError(
            f"{path}: a config file must hold a mapping of sections, got {type(user).__name__}"
        )
    return user


def _preset(name: str) -> dict[str, Any]:
    """A packaged preset; one that ``extends: OTHER`` is merged over that preset."""
    text = resources.files("sasha_env").joinpath("presets", f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text) or {}
    base = cfg.pop("extends", None)
    return deep_merge(_preset(base), cfg) if base else cfg


def dataclass_from_dict(cls: type[T], d: dict | None, section: str) -> T:
    """Build dataclass ``cls`` from config section ``d``; unknown keys raise ``ValueError``."""
    d = d or {}
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in config section '{section}'; "
            f"valid keys: {sorted(names)}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
