"""What a configuration may hold: every section, every key, and the type of each value.

:func:`validate_config` checks a merged configuration (preset + YAML + overrides) before any
work starts, so that a typo or a wrong type is one clear line naming the key, its section and
the valid names, never a traceback from deep inside a stage or a silently ignored setting.
The keys come from the dataclasses and constructors that consume each section, so the schema
cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from ..agents.config import ALGORITHMS, KEEP_RULES, VEC_ENVS, WARM_STARTS, AgentConfig
from ..slides.slide import MPP_RANGE
from .stages import BASELINE_STAGES

__all__ = ["ConfigError", "SECTIONS", "validate_config"]


class ConfigError(ValueError):
    """A configuration names an unknown section or key, or gives a value of the wrong type."""


def _dataclass_keys(cls: type, drop: Iterable[str] = ()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.name not in drop}


def _signature_keys(fn: Callable, drop: Iterable[str] = ()) -> dict[str, Any]:
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: hints.get(p.name, Any)
        for p in params
        if p.name not in drop and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _synth() -> dict[str, Any]:
    from ..slides.synth import SynthConfig  # lazy: scipy, tifffile (the CLI loads this module)

    return _dataclass_keys(SynthConfig)


def _grid() -> dict[str, Any]:
    from ..slides.grid import GridConfig  # lazy: scipy, scikit-image (as above)

    return _dataclass_keys(GridConfig)


def _extract() -> dict[str, Any]:
    from ..features.extract_config import ExtractConfig

    return _dataclass_keys(ExtractConfig)


def _hafed() -> dict[str, Any]:
    from sasha_models.hafed import HAFEDConfig  # lazy: torch (as above)

    keys = _dataclass_keys(HAFEDConfig, drop=("d_in", "n_classes"))
    return {**keys, "select_ties": str, "patience": int | None, "temperature": float | str}


def _tsu() -> dict[str, Any]:
    from sasha_models.tsu import TSUConfig  # lazy: torch (as above)

    keys = _dataclass_keys(TSUConfig, drop=("d",))
    # tau may be "auto"; budgets: {f: {key: value}}, one TSU per zoom budget f
    return {**keys, "tau": float | str, "tau_quantile": float, "budgets": dict}


def _mil(name: str) -> dict[str, Any]:
    """Keys of one MIL model's section: training settings and the model's own arguments."""
    from sasha_models.baselines import MIL_MODELS  # lazy: torch (as above)

    return {
        "lr": float,
        "weight_decay": float,
        "max_epochs": int,
        "cpu_threads": int,
        "select_ties": str,
        "patience": int | None,
        **_signature_keys(MIL_MODELS[name], drop=("self", "d_in", "n_classes")),
    }


def _lowres() -> dict[str, Any]:
    return _mil("attention_mil")


def _baselines() -> dict[str, Any]:
    """Keys every baseline accepts (the section applies to all); others go under ``models``."""
    per_model = [_mil(name) for name in BASELINE_STAGES]
    shared = {k: v for k, v in per_model[0].items() if all(k in m for m in per_model[1:])}
    return {**shared, "models": dict}


def _agents() -> dict[str, Any]:
    return _dataclass_keys(AgentConfig)


def _adaptive() -> dict[str, Any]:
    from ..agents.adaptive import AdaptiveConfig  # lazy: torch (the CLI loads this module)

    return _dataclass_keys(AdaptiveConfig)


#: Section name → its keys and their types (``None``: a plain value, not a section).
SECTIONS: dict[str, Callable[[], dict[str, Any]] | None] = {
    "preset": None,
    "seed": None,
    "synth": _synth,
    "grid": _grid,
    "extract": _extract,
    "split": lambda: {"shares": tuple[float, float, float]},
    "train": lambda: {"cpu_threads": int | None, "wandb": dict | None, "resume_every_s": float},
    "hafed": _hafed,
    "tsu": _tsu,
    "lowres": _lowres,
    "baselines": _baselines,
    "agents": _agents,
    "adaptive": _adaptive,
}
_SCALARS = {"preset": str, "seed": int}


def _positive(v: Any) -> bool:
    return v is None or v > 0


def _plausible_mpp(v: Any) -> bool:
    return v is None or MPP_RANGE[0] <= v <= MPP_RANGE[1]


def _fraction(v: Any) -> bool:
    return 0 < v <= 1


#: Value ranges, by key (any section) or by ``section.key``: (test, what the value must be).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_positive, "> 0"),
    "learning_rate": (_positive, "> 0"),
    "max_epochs": (_positive, ">= 1"),
    "batch_size": (_positive, ">= 1"),
    "cpu_threads": (_positive, ">= 1 (or null)"),
    "train.resume_every_s": (lambda v: v >= 0, ">= 0 (seconds; 0: every epoch)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "select_ties": (lambda v: v in ("loss", "first"), "loss or first (the official rule)"),
    "hafed.temperature": (
        lambda v: v == "val" or (not isinstance(v, str) and 0 < v < float("inf")),
        "val (fitted on the val split) or a number > 0 (1: HAFED as trained)",
    ),
    "patience": (_positive, ">= 1 epochs without improvement (or null: every epoch)"),
    "agents.fracs": (lambda v: len(v) > 0 and all(_fraction(f) for f in v), "fractions in (0, 1]"),
    "agents.curve_fracs": (lambda v: all(_fraction(f) for f in v), "fractions in (0, 1]"),
    "agents.total_timesteps": (_positive, ">= 1"),
    "agents.n_envs": (_positive, ">= 1"),
    "agents.ensemble": (_positive, ">= 1 (agents per budget)"),
    "agents.val_every": (lambda v: v >= 0, ">= 0 (0: keep the last policy)"),
    "agents.val_start": (lambda v: 0 <= v < 1, "in [0, 1) (a share of training)"),
    "agents.keep": (lambda v: v in KEEP_RULES, "one of " + ", ".join(KEEP_RULES)),
    "agents.warm_start": (lambda v: v in WARM_STARTS, "one of " + ", ".join(WARM_STARTS)),
    "agents.warm_start_epochs": (_positive, ">= 1"),
    "agents.warm_start_lr": (_positive, "> 0"),
    "agents.n_steps": (_positive, ">= 1"),
    "agents.algo": (lambda v: v in ALGORITHMS, "one of " + ", ".join(ALGORITHMS)),
    "agents.vec_env": (
        lambda v: v in VEC_ENVS,
        "one of " + ", ".join(VEC_ENVS),
    ),
    "agents.protocol": (lambda v: v in ("sb3", "paper"), "sb3 or paper"),
    "agents.policy_arch": (lambda v: v in (None, "sasha", "official"), "sasha or official"),
    "agents.lr_schedule": (lambda v: v in (None, "constant", "cosine"), "constant or cosine"),
    "agents.epochs": (_positive, ">= 1"),
    "agents.episodes_per_slide": (_positive, ">= 1"),
    "agents.reward": (lambda v: v in ("ce", "delta"), "ce or delta"),
    "agents.stop": (lambda v: v in ("none", "learned"), "none or learned"),
    "agents.zoom_cost": (lambda v: 0 <= v < float("inf"), ">= 0 (reward per zoom, nats)"),
    "adaptive.margin": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adaptive.nll_margin": (lambda v: v is None or v >= 0, ">= 0, or null (off)"),
    "adaptive.mean_frac": (
        lambda v: v is None or 0 < v <= 1,
        "in (0, 1] (the most read on average), or null (each agent's budget)",
    ),
    "adaptive.stop_classes": (lambda v: len(v) > 0, "a list of class names (or null: every class)"),
    "adaptive.max_auto_error": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adaptive.calibration": (
        lambda v: v in ("temperature", "temperature+bias"),
        "temperature or temperature+bias",
    ),
    "split.shares": (lambda v: min(v) >= 0 and sum(v) > 0, "three non-negative shares"),
    "tsu.tau": (
        lambda v: v == "auto" or (not isinstance(v, str) and _fraction(v)),
        "in (0, 1] or auto",
    ),
    "tsu.tau_quantile": (lambda v: 0 < v < 1, "in (0, 1)"),
    "tsu.anchor": (lambda v: v in ("state", "lowres"), "state or lowres"),
    "tsu.validation": (lambda v: v in ("fixed", "official"), "fixed or official"),
    "tsu.n_val_anchors": (_positive, ">= 1"),
    "tsu.budgets": (
        lambda v: all(not isinstance(f, (str, bool)) and _fraction(f) for f in v),
        "a mapping from zoom budgets in (0, 1] to the TSU keys of that budget",
    ),
    "extract.num_workers": (lambda v: v >= 0, ">= 0"),
    "grid.patch_px": (_positive, ">= 1"),
    "grid.hi_mpp": (_positive, "> 0 (um/px; null: read by grid.hi_downsample)"),
    "grid.hi_downsample": (_positive, "> 0"),
    "extract.mpp": (_plausible_mpp, "a level-0 um/px in [0.05, 20] (or null)"),
    "grid.zoom": (_positive, ">= 1"),
    "grid.min_tissue": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a YAML value can stand for a field of this annotation (lists for tuples, ints
    for floats); annotations it does not understand accept anything."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple or annotation is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            return False
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value) if len(set(args) - {Ellipsis}) <= 1 else True
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return isinstance(value, list) and all(_fits(v, args[0] if args else Any) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_keys(section: str, values: Any, schema: dict[str, Any]) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys, got {values!r}")
    for key, value in values.items():
        if key not in schema:
            raise ConfigError(
                f"unknown key '{key}' in config section '{section}'; valid keys: "
                + ", ".join(sorted(schema))
            )
        if not _fits(value, schema[key]):
            raise ConfigError(
                f"config '{section}.{key}' = {value!r} is not of type {_type_name(schema[key])}"
            )
        rule = _RANGES.get(f"{section}.{key}") or _RANGES.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise ConfigError(f"config '{section}.{key}' = {value!r} must be {rule[1]}")


def validate_config(cfg: dict[str, Any], sections: Iterable[str] | None = None) -> dict[str, Any]:
    """Check ``cfg``'s section names always, and the keys and value types of ``sections``.

    Args:
        cfg: a merged configuration (:func:`sasha_env.config.load_config`).
        sections: the sections to check key by key (default: all; a command that reads only
            ``synth`` need not import what checks the others).

    Returns:
        ``cfg`` unchanged.

    Raises:
        ConfigError: naming the unknown section or key and the valid names, or the key whose
            value has the wrong type.
    """
    unknown = [name for name in cfg if name not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"unknown config section '{unknown[0]}'; valid sections: " + ", ".join(SECTIONS)
        )
    for name in SECTIONS if sections is None else sections:
        if name not in cfg:
            continue
        schema = SECTIONS[name]
        if schema is None:
            if not _fits(cfg[name], _SCALARS[name]):
                raise ConfigError(
                    f"config '{name}' = {cfg[name]!r} is not of type {_SCALARS[name].__name__}"
                )
            continue
        keys = schema()
        _check_keys(name, cfg[name], keys)
        if name == "baselines":  # per-model overrides: baselines.models.<model>.<key>
            models = (cfg[name] or {}).get("models") or {}
            for model, values in models.items():
                if model not in BASELINE_STAGES:
                    raise ConfigError(
                        f"unknown model '{model}' in config section 'baselines.models'; valid "
                        "models: " + ", ".join(BASELINE_STAGES)
                    )
                _check_keys(f"baselines.models.{model}", values, _mil(model))
        if name == "tsu":  # per-budget overrides: tsu.budgets.<f>.<key>
            per_budget = _tsu()
            for key in ("budgets", "tau", "tau_quantile"):
                per_budget.pop(key)
            for frac, values in ((cfg[name] or {}).get("budgets") or {}).items():
                _check_keys(f"tsu.budgets.{frac}", values, per_budget)
    return cfg
