"""E episodes of ``Sasha-WSI-v0`` stepped as one vectorised operation: the engine of
:class:`~sasha_env.envs.vector.SashaVecEnv`.

:class:`EpisodeBatch` holds the states of E slides padded to P rows, ``S, z, v (E, P, d)`` on
one torch device, and applies :class:`~sasha_env.envs.wsi.SashaWSIEnv`'s dynamics to all of
them at once. A step of E actions is:

1. legality, frozen steps and the budget on the host (NumPy, ``(E,)``);
2. the similarity test ``|cos(z_j, anchor_e)| ≥ τ`` over the rows neither zoomed nor updated:
   on a GPU one batched product ``(E, n_max, d) @ (E, d, 1)``; on the CPU one matrix-vector
   product per env over its compacted candidates, the single env's own test (a batched
   product with one column runs several times slower there than E of them, and reads every
   row where the candidates shrink as the episode covers the slide);
3. the TSU on every updated row of every env in one call
   (:meth:`sasha_models.tsu.TSU.forward_anchors`);
4. HAFED's classifier re-scoring the changed rows of every env in one call and updating every
   env's pooled sums (:class:`~sasha_models.incremental_batch.BatchedIncrementalClassifier`);
5. rewards (with ``zoom_cost``, and the stop action's held reward with ``stop_action``),
   terminations and predictions as ``(E,)`` arrays.

No autoreset, random numbers or output copies here: :class:`~sasha_env.envs.vector.SashaVecEnv`
adds them. The host keeps the observation buffers (``features``, ``visited``, ``valid``,
``coords``, ``(E, P, ·)``); on the CPU ``S`` *is* the ``features`` buffer (no projection), on
another device only the changed rows are copied back each step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sasha_models.incremental_batch import BatchedIncrementalClassifier
from sasha_models.spaces import legal_actions, stop_index

from .similarity import Candidates
from .slide_data import SlideData
from .wsi import SashaWSIEnv, episode_budget, final_info

__all__ = ["BatchStep", "EpisodeBatch"]


class BatchStep(NamedTuple):
    """What one step of the E envs returns (envs that did not step: reward 0, all False)."""

    reward: np.ndarray
    """``(E,)`` float64, with ``correct_bonus`` on a correct episode's last step."""
    terminated: np.ndarray
    """``(E,)`` bool: the episode's budget is spent."""
    illegal: np.ndarray
    """``(E,)`` bool: the action was illegal (no zoom, ``illegal_penalty``)."""
    frozen: np.ndarray
    """``(E,)`` bool: every patch was covered and ``freeze_covered`` ignored the action."""
    stopped: np.ndarray
    """``(E,)`` bool: the env took the stop action (``stop_action``; it ended the episode)."""


class EpisodeBatch:
    """The states and dynamics of E ``Sasha-WSI-v0`` episodes, stepped together.

    Args:
        spec: a :class:`~sasha_env.envs.wsi.SashaWSIEnv` whose settings (``tau``, ``anchor``,
            ``freeze_covered``, ``reward_mode``, ``correct_bonus``, ``illegal_penalty``,
            ``zoom_cost``, ``stop_action``, ``frac``, ``obs_projection``, ``incremental``),
            models and sizes (``max_patches`` P, ``d``) apply to every episode; read at every
            step, so changing a setting on it changes the batch's dynamics too.
        n_envs: E.
        device: where the states and models live (``"cpu"``, ``"cuda"``...). The models are
            copied there when they are elsewhere; observations always come back to the host.
        layout: ``"auto"`` (by device), ``"host"`` (the CPU's: ``S`` is the host's
            ``features`` buffer, one similarity product per env over its compacted
            candidates) or ``"device"`` (a GPU's: ``S`` apart, changed rows copied back, one
            batched similarity product over every row; on the CPU too, to test that path).

    Attributes:
        features: ``(E, P, d)`` float32, the states (padding rows 0), on the host.
        obs_features: what observations carry: ``features`` or its projection ``(E, P, k)``.
        visited, valid: ``(E, P)`` int8; coords: ``(E, P, 2)`` float32.
        slides: each env's slide (``None`` before its first :meth:`load`).
        changed: each env's rows changed by its last load or step, ``(r,)`` int64.
    """

    def __init__(
        self,
        spec: SashaWSIEnv,
        n_envs: int,
        device: str | torch.device = "cpu",
        layout: str = "auto",
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        if layout not in ("auto", "host", "device"):
            raise ValueError(f"layout must be 'auto', 'host' or 'device', got {layout!r}")
        self.spec, self.n_envs = spec, int(n_envs)
        self.device = torch.device(device)
        E, P, d = self.n_envs, spec.max_patches, spec.d
        self.tsu = _on(spec.tsu, self.device)
        hafed = _on(spec.hafed, self.device)
        self.features = np.zeros((E, P, d), np.float32)
        proj = spec.obs_projection
        self.obs_features = (
            self.features if proj is None else np.zeros((E, P, proj.d_out), np.float32)
        )
        self.visited = np.zeros((E, P), np.int8)
        self.valid = np.zeros((E, P), np.int8)
        self.coords = np.zeros((E, P, 2), np.float32)
        self.n = np.zeros(E, np.int64)
        self.t = np.zeros(E, np.int64)
        self.budget = np.zeros(E, np.int64)
        self.n_free = np.zeros(E, np.int64)
        self.done = np.zeros(E, bool)  # the episode ended (at the cap, or stopped)
        self.labels = np.zeros(E, np.int64)
        self.ce = np.zeros(E, np.float64)
        self.probs = np.zeros((E, len(spec.class_names)), np.float32)
        self.slides: list[SlideData | None] = [None] * E
        self.zoomed: list[list[int]] = [[] for _ in range(E)]
        self.changed: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(E)]
        if layout == "host" and self.device.type != "cpu":
            raise ValueError(f"layout 'host' needs the CPU, not {self.device}")
        # S is the host's features buffer itself (the CPU's layout)
        self._shared = layout == "host" or (layout == "auto" and self.device.type == "cpu")
        # on the CPU, each env's similarity test over its compacted candidates (see _similar)
        self._candidates: list[Candidates] | None = (
            [Candidates(torch.zeros(0, 1), torch.zeros(0)) for _ in range(E)]
            if self._shared
            else None
        )
        with torch.inference_mode():
            f32, dev = torch.float32, self.device
            self.S = (
                torch.from_numpy(self.features)
                if self._shared
                else torch.zeros(E, P, d, dtype=f32, device=dev)
            )
            self.z = torch.zeros(E, P, d, dtype=f32, device=dev)
            self.v = torch.zeros(E, P, d, dtype=f32, device=dev)
            self.z_norm = torch.zeros(E, P, dtype=f32, device=dev)
            self.free = torch.zeros(E, P, dtype=torch.bool, device=self.device)
            self.updated = torch.zeros(E, P, dtype=torch.bool, device=self.device)
        self.clf = BatchedIncrementalClassifier(hafed, E, P, incremental=spec.incremental)

    # ------------------------------------------------------------------ episodes
    def load(self, e: int, data: SlideData) -> None:
        """Start env ``e``'s episode on ``data``: ``S = z``, nothing visited."""
        n = data.n
        if n > self.spec.max_patches:
            raise ValueError(
                f"slide {data.slide_id!r} has {n} patches > max_patches={self.spec.max_patches}; "
                "build the env with max_patches='cohort' to fit every slide"
            )
        with torch.inference_mode():
            for dst, src in ((self.z, data.z), (self.v, data.v), (self.S, data.z)):
                dst[e, :n] = src.to(self.device)
                dst[e, n:] = 0.0
            self.z_norm[e, :n], self.z_norm[e, n:] = data.z_norm.to(self.device), 0.0
            self.free[e], self.updated[e] = False, False
            self.free[e, :n] = True
            if self._candidates is not None:
                self._candidates[e] = Candidates(data.z, data.z_norm)
            logits = self.clf.reset(e, self.S[e, :n])
        if not self._shared:
            self.features[e, :n], self.features[e, n:] = data.z.numpy(), 0.0
        if self.spec.obs_projection is not None:
            self.obs_features[e, :n] = self.spec.obs_projection(self.features[e, :n])
            self.obs_features[e, n:] = 0.0
        self.visited[e], self.valid[e] = 0, 0
        self.valid[e, :n] = 1
        self.coords[e, :n], self.coords[e, n:] = data.grid, 0.0
        self.slides[e], self.n[e], self.labels[e] = data, n, data.label
        self.t[e], self.budget[e], self.n_free[e] = 0, episode_budget(self.spec.frac, n), n
        self.done[e] = False
        self.zoomed[e] = []
        self.changed[e] = np.arange(n, dtype=np.int64)
        self._set_predictions(np.array([e]), logits.unsqueeze(0))

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> BatchStep:
        """Zoom into ``actions[e]`` in every active env ``e`` (all by default), or stop it
        (``stop_action``); see :class:`~sasha_env.envs.wsi.SashaWSIEnv` for dynamics and
        rewards.

        Args:
            actions: ``(E,)`` patch indices (any integers: illegal ones are penalised).
            active: bool ``(E,)``, the envs that step; the others are left as they are.

        Raises:
            RuntimeError: an active env has no episode, or its episode has terminated.
        """
        E, spec = self.n_envs, self.spec
        a = np.asarray(actions).reshape(E).astype(np.int64)
        on = np.ones(E, bool) if active is None else np.asarray(active, bool).reshape(E)
        if any(self.slides[e] is None for e in np.flatnonzero(on)):
            raise RuntimeError("call reset() before step()")
        if (on & self.done).any():
            raise RuntimeError("an episode has terminated; reset it first")
        stop = on & bool(spec.stop_action) & (a == stop_index(spec.max_patches))
        moving = on & ~stop  # a zoom, a frozen or an illegal step: one of the budget's
        self.t[moving] += 1
        in_range = (a >= 0) & (a < self.n)
        legal = moving & in_range
        legal[legal] = self.visited[legal, a[legal]] == 0
        frozen = legal & bool(spec.freeze_covered) & (self.n_free == 0)
        zoom = legal & ~frozen
        for e in np.flatnonzero(on):
            self.changed[e] = np.zeros(0, np.int64)
        # frozen: the action is spent (marked visited), the state stays
        self.visited[np.flatnonzero(frozen), a[frozen]] = 1
        for e in np.flatnonzero(frozen):
            self.changed[e] = a[e : e + 1].copy()
        ce_before = self.ce.copy()
        if zoom.any():
            self._zoom(np.flatnonzero(zoom), a[zoom])
        ce = spec.reward_mode == "ce"
        kept = -self.ce if ce else np.zeros(E)
        gain = (-self.ce if ce else ce_before - self.ce) - spec.zoom_cost
        # a stop holds the state for the budget's steps left, at no zoom cost
        held = (self.budget - self.t) * -self.ce if ce else np.zeros(E)
        reward = np.where(zoom, gain, np.where(frozen, kept, spec.illegal_penalty))
        reward = np.where(stop, held, reward)
        reward[~on] = 0.0
        terminated = on & ((self.t >= self.budget) | stop)
        self.done |= terminated
        correct = self.probs.argmax(1) == self.labels
        reward[terminated & correct] += spec.correct_bonus
        return BatchStep(reward, terminated, moving & ~legal, frozen, stop)

    def action_masks(self) -> np.ndarray:
        """Legal actions, bool ``(E, P)``: real patches not zoomed yet; with ``stop_action``
        ``(E, P + 1)``, the last (stop) always True."""
        return legal_actions(self.valid, self.visited, stop=self.spec.stop_action)

    def updated_rows(self, e: int) -> list[int]:
        """Env ``e``'s patches whose row came from the TSU and were not zoomed afterwards."""
        mask = self.updated[e, : self.n[e]].cpu().numpy().copy()
        mask[self.zoomed[e]] = False
        return np.flatnonzero(mask).tolist()

    def final_info(self, e: int) -> dict[str, Any]:
        """The last ``info`` entries of env ``e``'s episode (:func:`~sasha_env.envs.wsi.final_info`)."""
        data = self.slides[e]
        assert data is not None
        return final_info(data, self.probs[e], self.zoomed[e], self.updated_rows(e))

    # ------------------------------------------------------------------ internals
    def _zoom(self, envs: np.ndarray, actions: np.ndarray) -> None:
        """One zoom in each env of ``envs (k,)``, patch ``actions (k,)`` (all legal)."""
        spec, dev, E = self.spec, self.device, self.n_envs
        with torch.inference_mode():
            ez, at = torch.from_numpy(envs).to(dev), torch.from_numpy(actions).to(dev)
            zooming = torch.zeros(E, dtype=torch.bool, device=dev)
            zooming[ez] = True
            anchors = torch.zeros(E, spec.d, device=dev)
            anchors[ez] = (self.S if spec.anchor == "state" else self.z)[ez, at]
            self.free[ez, at] = False
            te, tr = self._similar(envs, anchors, zooming)
            v_a = self.v[ez, at]
            if tr.numel():
                owner = torch.full((E,), -1, dtype=torch.long, device=dev)
                owner[ez] = torch.arange(len(envs), device=dev)
                new = self.tsu.forward_anchors(v_a, anchors[ez], self.z[te, tr], owner[te])
                self.S[te, tr] = new
                self.free[te, tr] = False
                self.updated[te, tr] = True
            self.S[ez, at] = v_a
            env_rows, rows = torch.cat([ez, te]), torch.cat([at, tr])
            logits = self.clf.update(self.S, env_rows, rows)[ez]
            host_env, host_rows = env_rows.cpu().numpy(), rows.cpu().numpy()
            if not self._shared:
                self.features[host_env, host_rows] = self.S[env_rows, rows].cpu().numpy()
        if spec.obs_projection is not None:
            self.obs_features[host_env, host_rows] = spec.obs_projection(
                self.features[host_env, host_rows]
            )
        self.visited[envs, actions] = 1
        targets = host_rows[len(envs) :]
        counts = np.bincount(host_env[len(envs) :], minlength=E)
        self.n_free[envs] -= 1 + counts[envs]
        if self._candidates is not None:
            for e in envs.tolist():
                self._candidates[e].compact(self.free[e, : self.n[e]], int(self.n_free[e]))
        per_env = np.split(targets, np.cumsum(counts)[:-1])  # nonzero() lists env by env
        for e, a in zip(envs.tolist(), actions.tolist(), strict=True):
            self.zoomed[e].append(a)
            self.changed[e] = np.concatenate([[a], per_env[e]]).astype(np.int64)
        self._set_predictions(envs, logits)

    def _similar(self, envs: np.ndarray, anchors: Tensor, zooming: Tensor) -> tuple[Tensor, Tensor]:
        """The rows each zoom updates: ``(env, row)`` pairs, env by env, rows ascending.

        Rows neither zoomed nor updated still hold z_j, so ``cos(S_j, anchor) = cos(z_j,
        anchor)``. On the CPU one ``(n_cand, d) @ (d,)`` product per env over its compacted
        candidates (:class:`~sasha_env.envs.similarity.Candidates`, the single env's test, so
        the same rows are found); elsewhere one batched product over every env's rows.
        """
        if self._candidates is not None:
            found = [
                self._candidates[e].similar(anchors[e], self.spec.tau, self.free[e, : self.n[e]])
                for e in envs.tolist()
            ]
            te = torch.cat(
                [torch.full_like(f, e) for e, f in zip(envs.tolist(), found, strict=True)]
            )
            return te, torch.cat(found)
        m = int(self.n[envs].max())
        dots = torch.bmm(self.z[:, :m], anchors.unsqueeze(2)).squeeze(2)  # (E, m)
        # τ·‖anchor‖ rounded to float32 once, as the single env's float scalar is
        scale = (anchors.norm(dim=1).double() * self.spec.tau).float().unsqueeze(1)
        hit = (dots.abs() >= self.z_norm[:, :m] * scale) & self.free[:, :m]
        te, tr = torch.nonzero(hit & zooming.unsqueeze(1), as_tuple=True)
        return te, tr

    def _set_predictions(self, envs: np.ndarray | Sequence[int], logits: Tensor) -> None:
        """CE and probabilities of ``envs`` from their slide logits ``(k, C)``."""
        envs = np.asarray(envs)
        with torch.inference_mode():
            log_p = torch.log_softmax(logits.float(), dim=-1).cpu()
            self.probs[envs] = log_p.exp().numpy()
        self.ce[envs] = -log_p.numpy()[np.arange(len(envs)), self.labels[envs]].astype(np.float64)


def _on(module: torch.nn.Module, device: torch.device) -> Any:
    """``module`` on ``device``: itself when it is there already, else a copy (the caller's
    module stays where it was)."""
    param = next(module.parameters(), None)
    if param is None or param.device == device:
        return module
    return copy.deepcopy(module).to(device)
