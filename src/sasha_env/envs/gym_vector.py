"""``SashaVectorEnv``: the batched envs of :class:`~sasha_env.envs.vector.SashaVecEnv` through
Gymnasium's vector API (``gymnasium.vector.VectorEnv``).

``gymnasium.make_vec("Sasha-WSI-v0", num_envs=E, workdir=DIR, ...)`` builds one (the env's
``vector_entry_point``); ``vectorization_mode="sync"`` still gives Gymnasium's
``SyncVectorEnv`` of single envs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .vector import SashaVecEnv

__all__ = ["SashaVectorEnv"]

PathLike = str | os.PathLike


class SashaVectorEnv(VectorEnv):
    """E ``Sasha-WSI-v0`` environments stepped as one vectorised operation, with Gymnasium's
    vector API.

    Step by step equal (to float rounding, see :class:`~sasha_env.envs.vector.SashaVecEnv`)
    to Gymnasium's ``SyncVectorEnv`` of E single envs with the same seeds and autoreset mode:
    ``reset(seed=s)`` seeds env e with ``s + e`` (or takes a list of seeds), infos are a dict
    of ``(E, ...)`` arrays with ``_key`` masks, rewards are float64, ``truncated`` is never set.

    Args:
        num_envs: E.
        workdir, split, frac: as :class:`~sasha_env.envs.wsi.SashaWSIEnv`.
        autoreset_mode: ``NEXT_STEP`` (Gymnasium's default: the step after an episode's end
            resets that env, with reward 0 and its action ignored), ``SAME_STEP`` (the env is
            reset in the step that ends its episode; ``info["final_obs"]`` and
            ``info["final_info"]`` keep the end) or ``DISABLED`` (reset ended envs yourself:
            ``reset(options={"reset_mask": mask})``).
        kwargs: :class:`~sasha_env.envs.vector.SashaVecEnv`'s (``device``, ``copy_obs``) and
            the env's arguments.

    :attr:`venv` is the underlying ``SashaVecEnv``; :meth:`action_masks` gives the legal
    actions ``(E, P)``, and ``call("action_masks")`` a tuple of E rows.
    """

    def __init__(
        self,
        num_envs: int = 8,
        workdir: PathLike | None = None,
        split: str | None = "train",
        frac: float = 0.1,
        *,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        self.venv = SashaVecEnv(num_envs, workdir, split, frac, **kwargs)
        self.num_envs = num_envs
        self.single_observation_space = self.venv.observation_space
        self.single_action_space = self.venv.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {"autoreset_mode": self.autoreset_mode, "render_modes": []}
        self.render_mode = None
        self._ended = np.zeros(num_envs, dtype=bool)  # episodes that ended at the last step

    def reset(
        self,
        *,
        seed: int | list[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset every env (or those of ``options["reset_mask"]``); ``options["slide_id"]``
        starts them all on one slide."""
        E = self.num_envs
        if seed is None:
            seeds: list[int | None] = [None] * E
        elif isinstance(seed, int):
            seeds = [seed + e for e in range(E)]
        else:
            seeds = list(seed)
        if len(seeds) != E:
            raise ValueError(f"{len(seeds)} seeds for {E} envs")
        options = dict(options or {})
        mask = np.asarray(options.pop("reset_mask", np.ones(E, dtype=bool)), dtype=bool)
        if mask.shape != (E,):
            raise ValueError(f"options['reset_mask'] must have shape ({E},), got {mask.shape}")
        infos: dict[str, Any] = {}
        for e in np.flatnonzero(mask).tolist():
            infos = self._add_info(infos, self.venv.reset_env(e, seeds[e], options), e)
        self._ended[mask] = False
        return self.venv.observations(), infos

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions).reshape(self.num_envs)
        infos: dict[str, Any] = {}
        mode = self.autoreset_mode
        if mode == AutoresetMode.DISABLED and self._ended.any():
            raise RuntimeError(
                "an episode has ended: reset it first (reset(options={'reset_mask': mask}))"
            )
        resetting = self._ended if mode == AutoresetMode.NEXT_STEP else None
        active = None if resetting is None else ~resetting
        result, step_infos = self.venv.advance(actions, active)
        for e in np.flatnonzero(resetting if resetting is not None else []).tolist():
            step_infos[e] = self.venv.reset_env(e)
        if mode == AutoresetMode.SAME_STEP:
            for e in np.flatnonzero(result.terminated).tolist():
                final = {
                    "final_obs": self.venv.terminal_observation(e),
                    "final_info": step_infos[e],
                }
                infos = self._add_info(infos, final, e)
                step_infos[e] = self.venv.reset_env(e)
        for e, info in enumerate(step_infos):
            infos = self._add_info(infos, info, e)
        ended = result.terminated.copy()
        self._ended = ended.copy() if mode != AutoresetMode.SAME_STEP else np.zeros_like(ended)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self.venv.observations(), result.reward.copy(), ended, truncated, infos

    def action_masks(self) -> np.ndarray:
        """Legal actions, bool ``(E, P)``."""
        return self.venv.action_masks()

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Each env's ``name``: called with the arguments if it is a method."""
        values = self.venv.get_attr(name)
        return tuple(v(*args, **kwargs) if callable(v) else v for v in values)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return tuple(self.venv.get_attr(name))

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """One value for every env, or a list of E values (not for shared settings)."""
        if isinstance(values, (list, tuple)):
            if len(values) != self.num_envs:
                raise ValueError(f"{len(values)} values for {self.num_envs} envs")
            for e, value in enumerate(values):
                self.venv.set_attr(name, value, indices=e)
        else:
            self.venv.set_attr(name, values)

    def close_extras(self, **kwargs: Any) -> None:
        self.venv.close()

    def __repr__(self) -> str:
        return f"SashaVectorEnv({self.venv!r}, autoreset_mode={self.autoreset_mode.value})"
