"""sasha_env: slides, features, the Sasha-WSI-v0 environment, agents, the pipeline and the CLI.

``import sasha_env`` registers ``Sasha-WSI-v0`` with Gymnasium and loads nothing heavy; the
main objects are importable from here and load their module on first use::

    from sasha_env import SashaWSIEnv, SashaVecEnv, FeatureStore, Pipeline, Predictor

The package's rooms follow the data flow (a wing imports only itself and the wings before it):

- :mod:`sasha_env.slides` — reading slides, tissue and patch grid, patch pixels, the cohort
  manifest, tumour masks, the synthetic cohort;
- :mod:`sasha_env.features` — backbones, embedding, extraction, the zarr feature store, bags;
- :mod:`sasha_env.envs` — ``Sasha-WSI-v0``, its batched vector env (``SashaVecEnv``), what it
  reads, rendering;
- :mod:`sasha_env.agents` — training SB3 agents, zoom policies, running episodes;
- :mod:`sasha_env.pipeline` — the stage registry, the cached runner, evaluation, figures;
- :mod:`sasha_env.predict` and :mod:`sasha_env.cli` — new slides, and the ``sasha`` command;
- :mod:`sasha_env.testing` — small complete workdirs in seconds and the env checkers, for
  tests (``make_workdir``, ``check_env``; import it explicitly);
- at the root, helpers every wing may use: :mod:`~sasha_env.config`,
  :mod:`~sasha_env.workdir`, :mod:`~sasha_env.atomic`, :mod:`~sasha_env.distributed`,
  :mod:`~sasha_env.lru`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import gymnasium

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers see; at run time the names load lazily (below)
    from .agents.config import AgentConfig as AgentConfig
    from .agents.episodes import run_episodes as run_episodes
    from .agents.train import train_agent as train_agent
    from .config import load_config as load_config
    from .envs.gym_vector import SashaVectorEnv as SashaVectorEnv
    from .envs.vector import SashaVecEnv as SashaVecEnv
    from .envs.wsi import SashaWSIEnv as SashaWSIEnv
    from .features.store import FeatureStore as FeatureStore
    from .pipeline.runner import Pipeline as Pipeline
    from .pipeline.study import Study as Study
    from .predict import Prediction as Prediction
    from .predict import Predictor as Predictor
    from .slides.manifest import Manifest as Manifest
    from .slides.manifest import read_manifest as read_manifest
    from .slides.slide import Slide as Slide
    from .workdir import Workdir as Workdir

#: Public name → the module that defines it (imported on first access).
_API = {
    "SashaWSIEnv": "sasha_env.envs.wsi",
    "SashaVecEnv": "sasha_env.envs.vector",
    "SashaVectorEnv": "sasha_env.envs.gym_vector",
    "FeatureStore": "sasha_env.features.store",
    "Manifest": "sasha_env.slides.manifest",
    "read_manifest": "sasha_env.slides.manifest",
    "Slide": "sasha_env.slides.slide",
    "Workdir": "sasha_env.workdir",
    "load_config": "sasha_env.config",
    "AgentConfig": "sasha_env.agents.config",
    "train_agent": "sasha_env.agents.train",
    "run_episodes": "sasha_env.agents.episodes",
    "Pipeline": "sasha_env.pipeline.runner",
    "Study": "sasha_env.pipeline.study",
    "Predictor": "sasha_env.predict",
    "Prediction": "sasha_env.predict",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sasha_env' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


def _register() -> None:
    """Register ``Sasha-WSI-v0`` with Gymnasium (once; ``gymnasium.make`` imports the env lazily).

    ``gymnasium.make_vec`` builds the batched :class:`~sasha_env.envs.gym_vector.SashaVectorEnv`
    (the vector entry point) unless ``vectorization_mode="sync"`` or ``"async"`` is asked.
    """
    if "Sasha-WSI-v0" not in gymnasium.registry:
        gymnasium.register(
            id="Sasha-WSI-v0",
            entry_point="sasha_env.envs.wsi:SashaWSIEnv",
            vector_entry_point="sasha_env.envs.gym_vector:SashaVectorEnv",
        )


_register()
