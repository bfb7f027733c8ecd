"""``SashaVecEnv``: E ``Sasha-WSI-v0`` environments stepped as one vectorised operation.

:class:`SashaVecEnv` is an SB3 ``VecEnv`` (what SB3 and sb3-contrib algorithms train on);
:class:`~sasha_env.envs.gym_vector.SashaVectorEnv` gives the same envs Gymnasium's vector API.
The dynamics run in :class:`~sasha_env.envs.batch.EpisodeBatch`; here are the vector-env
conventions: seeds and slide draws per env, auto-reset, SB3's ``Monitor`` statistics, infos,
observations handed out, and ``get_attr``/``env_method``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from sasha_models.spaces import legal_actions

from .batch import BatchStep, EpisodeBatch
from .slide_data import SlideData
from .wsi import SashaWSIEnv

__all__ = ["SETTABLE", "SHARED_SETTINGS", "SashaVecEnv", "UnsupportedOption"]

PathLike = str | os.PathLike

#: ``SashaWSIEnv`` arguments a :class:`SashaVecEnv` does not batch (it raises
#: :class:`UnsupportedOption`; use SB3's ``DummyVecEnv`` of single envs for them).
UNBATCHED = ("render_mode", "stop_rule")

#: Settings, models and sizes every env of a :class:`SashaVecEnv` shares: ``get_attr`` gives
#: the same value for every env; ``set_attr`` may change those of :data:`SETTABLE`, for all
#: envs at once.
SHARED_SETTINGS = (
    "split",
    "frac",
    "reward_mode",
    "correct_bonus",
    "illegal_penalty",
    "tau",
    "anchor",
    "freeze_covered",
    "max_patches",
    "d",
    "class_names",
    "slide_ids",
    "store",
    "manifest",
    "hafed",
    "tsu",
    "obs_projection",
    "incremental",
    "stop_rule",
    "stop_action",
    "zoom_cost",
)


#: The shared settings ``set_attr`` may change (the step reads them every time).
SETTABLE = (
    "reward_mode",
    "correct_bonus",
    "illegal_penalty",
    "zoom_cost",
    "tau",
    "anchor",
    "freeze_covered",
)


class UnsupportedOption(ValueError):
    """A ``SashaWSIEnv`` option :class:`SashaVecEnv` does not batch."""


class SashaVecEnv(VecEnv):
    """E ``Sasha-WSI-v0`` environments stepped as one vectorised operation (an SB3 ``VecEnv``).

    Equal, step by step, to E single :class:`~sasha_env.envs.wsi.SashaWSIEnv` (each wrapped
    in SB3's ``Monitor``) in SB3's ``DummyVecEnv``: the same slides drawn (env e's generator
    is seeded with ``seed + e`` by :meth:`seed`, then draws every auto-reset's slide), the same
    legal actions, episode ends, infos (final infos, ``terminal_observation``, ``episode``),
    and observations and rewards to float rounding: the batched products round differently in
    the last bits (tested within 1e-5 relative; the set of TSU-updated rows is the same unless
    a cosine lies within rounding of τ). A step of E envs is a few batched tensor operations
    (:mod:`~sasha_env.envs.batch`), on the CPU or, with ``device``, on a GPU.

    Args:
        num_envs: E.
        workdir, split, frac: as :class:`~sasha_env.envs.wsi.SashaWSIEnv`.
        device: torch device of the states and models (``"cpu"``, ``"cuda"``...);
            observations, rewards and masks are NumPy arrays on the host whatever the device.
        copy_obs: ``True`` (the default): every ``reset`` and ``step`` returns fresh arrays.
            ``False``: two sets of ``(E, ...)`` buffers are handed out in turn, each brought up
            to date with the rows that changed, instead of copying every ``(E, P, d)``
            observation: an observation stays valid until the second call after it (SB3's
            algorithms read the last one after stepping and copy what they keep; the agents
            stage trains this way). Terminal observations are always fresh copies.
        layout: how the states are kept (:class:`~sasha_env.envs.batch.EpisodeBatch`):
            ``"auto"`` by device; ``"device"`` runs a GPU's code path on the CPU (tests).
        kwargs: further :class:`~sasha_env.envs.wsi.SashaWSIEnv` arguments (``store``,
            ``manifest``, ``hafed``, ``tsu``, ``reward``, ``correct_bonus``,
            ``illegal_penalty``, ``tau``, ``anchor``, ``freeze_covered``, ``max_patches``,
            ``incremental``, ``cache_mb``, ``obs_projection``, ``stop_action``,
            ``zoom_cost``). ``render_mode`` and
            ``stop_rule`` raise :class:`UnsupportedOption`, as does ``reset`` with
            ``options={"slide_data": ...}``.

    Spaces are a single env's (``observation_space``: the ``Dict`` of one env; observations
    are batched ``(E, ...)``). :meth:`action_masks` gives the legal actions ``(E, P)``;
    ``env_method("action_masks")`` (how sb3-contrib's ``MaskablePPO`` asks) a list of E rows.
    ``get_attr`` answers the single env's per-episode attributes (``slide``, ``zoomed``,
    ``updated``, ``changed_rows``, ``budget``, ``probabilities``, ``np_random``) per env and
    :data:`SHARED_SETTINGS` for all (``set_attr`` changes those of :data:`SETTABLE` for all).
    Infos are those of a ``Monitor``-wrapped single env in a
    ``DummyVecEnv`` (``env_is_wrapped(Monitor)`` is True): ``info["episode"]`` holds the
    episode's return ``r`` (rounded to 6 decimals), length ``l`` and seconds since
    construction ``t``.
    """

    def __init__(
        self,
        num_envs: int = 8,
        workdir: PathLike | None = None,
        split: str | None = "train",
        frac: float = 0.1,
        *,
        device: str | torch.device = "cpu",
        copy_obs: bool = True,
        layout: str = "auto",
        **kwargs: Any,
    ) -> None:
        for name in UNBATCHED:
            if kwargs.get(name) is not None:
                raise UnsupportedOption(
                    f"SashaVecEnv does not batch {name}=; use SB3's DummyVecEnv of "
                    "SashaWSIEnv (agents.vec_env: dummy)"
                )
        self.template = SashaWSIEnv(workdir, split, frac, **kwargs)
        """The single env whose settings, models, spaces and slide cache every env shares."""
        self.batch = EpisodeBatch(self.template, num_envs, device, layout)
        self.device = self.batch.device
        self.copy_obs = bool(copy_obs)
        self._views = [EnvView(self, e) for e in range(num_envs)]
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        super().__init__(num_envs, self.template.observation_space, self.template.action_space)
        self._out = ObsBuffers(self.batch, self.copy_obs)
        self._rewards: list[list[float]] = [[] for _ in range(num_envs)]
        self._t_start = time.time()
        self._actions: np.ndarray | None = None

    # ------------------------------------------------------------------ SB3 VecEnv API
    def reset(self) -> dict[str, np.ndarray]:
        """Reset every env, with the seeds of :meth:`seed` and options of ``set_options``
        (``{"slide_id": ID}``) if given; ``reset_infos`` holds the infos."""
        for e in range(self.num_envs):
            self.reset_infos[e] = self.reset_env(e, self._seeds[e], self._options[e])
        self._reset_seeds()
        self._reset_options()
        return self._out.emit()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("call step_async(actions) before step_wait()")
        result, infos = self.advance(self._actions)
        self._actions = None
        for e, info in enumerate(infos):
            self._rewards[e].append(float(result.reward[e]))
            done = bool(result.terminated[e])
            if done:  # what SB3's Monitor adds
                ret = sum(self._rewards[e])
                info["episode"] = {
                    "r": round(ret, 6),
                    "l": len(self._rewards[e]),
                    "t": round(time.time() - self._t_start, 6),
                }
            info["TimeLimit.truncated"] = False
            if done:  # what DummyVecEnv does: keep the last observation, reset
                info["terminal_observation"] = self._out.snapshot(e)
                self.reset_infos[e] = self.reset_env(e)
        reward = result.reward.astype(np.float32)
        return self._out.emit(), reward, result.terminated.copy(), infos

    def close(self) -> None:
        self._actions = None

    def action_masks(self) -> np.ndarray:
        """Legal actions, bool ``(E, P)`` (``(E, P + 1)`` with ``stop_action``, the stop always
        legal): real patches not zoomed yet (sb3-contrib convention)."""
        return self.batch.action_masks()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self._views[e], attr_name) for e in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        envs = self._indices(indices)
        if attr_name in SHARED_SETTINGS:
            if attr_name not in SETTABLE:
                raise ValueError(f"{attr_name!r} of a SashaVecEnv is fixed when it is built")
            if sorted(envs) != list(range(self.num_envs)):
                raise ValueError(
                    f"{attr_name!r} is shared by every env of a SashaVecEnv: set it for all"
                )
            setattr(self.template, attr_name, value)
            return
        for e in envs:
            setattr(self._views[e], attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        envs = self._indices(indices)
        if method_name == "action_masks" and not method_args and not method_kwargs:
            masks = self.action_masks()  # one (E, P) computation, not E
            return [masks[e] for e in envs]
        return [getattr(self._views[e], method_name)(*method_args, **method_kwargs) for e in envs]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        """As single envs wrapped in SB3's ``Monitor`` (whose statistics the infos carry)."""
        return [issubclass(Monitor, wrapper_class) for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # ------------------------------------------------------------------ shared with the Gymnasium API
    def reset_env(
        self, e: int, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Start env ``e``'s next episode (its generator reseeded when ``seed`` is given) on a
        slide it draws, or on ``options["slide_id"]``; returns the reset info."""
        if seed is not None:
            self._rngs[e] = seeding.np_random(seed)[0]
        options = options or {}
        if "slide_data" in options:
            raise UnsupportedOption("SashaVecEnv loads slides from the store: no slide_data")
        sid = options.get("slide_id")
        if sid is None:
            ids = self.template.slide_ids
            sid = ids[int(self._rng(e).integers(len(ids)))]
        data: SlideData = self.template.load_slide(str(sid))
        self.batch.load(e, data)
        self._rewards[e] = []
        self._out.touch(e)
        return {
            "slide_id": data.slide_id,
            "label": data.label,
            "n_patches": data.n,
            "budget": int(self.batch.budget[e]),
            "action_mask": self._views[e].action_masks(),
        }

    def advance(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[BatchStep, list[dict[str, Any]]]:
        """Step the active envs (all by default) without resetting any; returns the batch's
        results and each env's info (``{}`` for the inactive)."""
        result = self.batch.step(actions, active)
        masks = self.action_masks()
        infos: list[dict[str, Any]] = []
        for e in range(self.num_envs):
            if active is not None and not active[e]:
                infos.append({})
                continue
            info: dict[str, Any] = {
                "illegal_action": bool(result.illegal[e]),
                "frozen": bool(result.frozen[e]),
                "action_mask": masks[e],
            }
            if result.terminated[e]:
                info.update(self.batch.final_info(e))
                if self.template.stop_action:
                    info["stopped"] = "learned" if result.stopped[e] else "cap"
            self._out.touch(e, self.batch.changed[e])
            infos.append(info)
        return result, infos

    def observations(self) -> dict[str, np.ndarray]:
        """The current observations ``(E, ...)`` (fresh, or the next buffer with
        ``copy_obs=False``)."""
        return self._out.emit()

    def terminal_observation(self, e: int) -> dict[str, np.ndarray]:
        """A fresh copy of env ``e``'s current observation (before it is reset)."""
        return self._out.snapshot(e)

    # ------------------------------------------------------------------ internals
    def _rng(self, e: int) -> np.random.Generator:
        rng = self._rngs[e]
        if rng is None:  # never seeded: a random seed, as gymnasium.Env does
            rng = self._rngs[e] = seeding.np_random()[0]
        return rng

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def __repr__(self) -> str:
        return (
            f"SashaVecEnv(num_envs={self.num_envs}, split={self.template.split!r}, "
            f"frac={self.template.frac}, device={str(self.device)!r})"
        )


class EnvView:
    """Env ``e`` of a :class:`SashaVecEnv` as ``get_attr`` and ``env_method`` see it: the single
    env's per-episode attributes and methods, and the shared settings."""

    def __init__(self, venv: SashaVecEnv, e: int) -> None:
        self._venv, self._e = venv, e

    @property
    def unwrapped(self) -> EnvView:
        return self

    @property
    def np_random(self) -> np.random.Generator:
        """Env e's generator (it draws the slides)."""
        return self._venv._rng(self._e)

    @property
    def slide(self) -> SlideData | None:
        return self._venv.batch.slides[self._e]

    @property
    def zoomed(self) -> list[int]:
        return list(self._venv.batch.zoomed[self._e])

    @property
    def updated(self) -> list[int]:
        return self._venv.batch.updated_rows(self._e)

    @property
    def changed_rows(self) -> np.ndarray:
        return self._venv.batch.changed[self._e].copy()

    @property
    def budget(self) -> int:
        return int(self._venv.batch.budget[self._e])

    @property
    def probabilities(self) -> np.ndarray:
        return self._venv.batch.probs[self._e].copy()

    @property
    def render_mode(self) -> None:
        return None

    def action_masks(self) -> np.ndarray:
        batch, stop = self._venv.batch, self._venv.template.stop_action
        return legal_actions(batch.valid[self._e], batch.visited[self._e], stop=stop)

    def state(self) -> np.ndarray:
        """A copy of env e's state ``S (N, d)`` (no padding)."""
        batch = self._venv.batch
        return batch.features[self._e, : batch.n[self._e]].copy()

    def __getattr__(self, name: str) -> Any:
        if name in SHARED_SETTINGS:
            return getattr(self._venv.template, name)
        raise AttributeError(f"a SashaVecEnv env has no attribute {name!r}")


class ObsBuffers:
    """The observations a :class:`SashaVecEnv` hands out, from the batch's host buffers.

    With ``copy``, fresh arrays every time. Without, two sets of buffers in turn: each env
    marks the rows its last load or step changed (:meth:`touch`), and a set is brought up to
    date with the rows changed since it was last handed out, so an observation stays valid
    until the second :meth:`emit` after it.
    """

    def __init__(self, batch: EpisodeBatch, copy: bool) -> None:
        self.batch, self.copy = batch, copy
        E = batch.n_envs
        self._sets = [] if copy else [_copy(self._master()), _copy(self._master())]
        # per set and env: rows to copy (a list of index arrays), or None for every row
        self._dirty: list[list[list[np.ndarray] | None]] = [[None] * E, [None] * E]
        self._next = 0

    def _master(self) -> dict[str, np.ndarray]:
        b = self.batch
        return {
            "features": b.obs_features,
            "visited": b.visited,
            "valid": b.valid,
            "coords": b.coords,
        }

    def touch(self, e: int, rows: np.ndarray | None = None) -> None:
        """Env ``e``'s rows ``rows`` changed (``None``: all of them, as after a reset)."""
        if self.copy:
            return
        for dirty in self._dirty:
            pending = dirty[e]
            if rows is None:
                dirty[e] = None
            elif pending is not None and len(rows):
                pending.append(rows)

    def emit(self) -> dict[str, np.ndarray]:
        """The observations ``(E, ...)`` as they are now."""
        master = self._master()
        if self.copy:
            return _copy(master)
        k = self._next
        self._next = 1 - k
        out, dirty = self._sets[k], self._dirty[k]
        for e, pending in enumerate(dirty):
            if pending is None:
                for key, array in master.items():
                    out[key][e] = array[e]
            elif pending:
                rows = np.concatenate(pending)
                for key in ("features", "visited"):  # valid and coords change only on reset
                    out[key][e, rows] = master[key][e, rows]
            dirty[e] = []
        return out

    def snapshot(self, e: int) -> dict[str, np.ndarray]:
        """A fresh copy of env ``e``'s observation."""
        return {key: array[e].copy() for key, array in self._master().items()}


def _copy(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: array.copy() for key, array in arrays.items()}
