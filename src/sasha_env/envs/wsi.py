"""``Sasha-WSI-v0``: SASHA's zoom-in environment over a whole-slide image's feature state."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from sasha_models.incremental import IncrementalClassifier
from sasha_models.projection import ObsProjection
from sasha_models.spaces import (
    action_space,
    episode_budget,
    legal_actions,
    observation_space,
    stop_index,
)
from sasha_models.stopping import StopRule

from ..features.store import FeatureStore
from ..slides.manifest import Manifest
from .obs_pool import ObservationPool
from .render import ThumbnailCache, draw_patches
from .similarity import Candidates
from .slide_data import SlideCache, SlideData
from .sources import resolve_sources

__all__ = [
    "SashaWSIEnv",
    "episode_budget",
    "final_info",
    "mean_attention",
    "observation_nbytes",
]

PathLike = str | os.PathLike
_EPS = 1e-8


def mean_attention(clf: nn.Module, S: Tensor) -> np.ndarray:
    """An attention MIL classifier's attention over the rows of ``S (N, d)``, ``(N,)`` float32
    summing to 1: its attention logits (``clf.instance_scores``, ``(N, M)``) softmaxed per
    branch over the rows, then averaged over the M branches.

    ``clf`` is HAFED's level 2 or any
    :class:`~sasha_models.hafed.AttentionMILClassifier` (the low-res classifier).
    """
    with torch.inference_mode():
        a, _ = clf.instance_scores(S)
        return torch.softmax(a.float(), dim=0).mean(dim=1).numpy()


def observation_nbytes(max_patches: int, d: int) -> int:
    """Bytes of one observation: ``max_patches · (4·d + 1 + 1 + 2·4)``.

    ``features`` float32 (4·d per row), ``visited`` and ``valid`` int8 (1 + 1), ``coords``
    float32 (2·4). E.g. 150 patches × d = 1280: 769,500 B; 8192 × 384: 12.7 MB.
    """
    return int(max_patches) * (4 * int(d) + 1 + 1 + 2 * 4)


class SashaWSIEnv(gym.Env[dict[str, np.ndarray], np.int64]):
    """Zoom into a whole-slide image, a patch at a time, under a budget (SASHA, NeurIPS 2025).

    A slide is a set of N low-resolution patch features ``z (N, d)``. The state ``S (N, d)``
    starts as ``z``. Each step the agent names a patch ``a`` to read at high resolution:

    1. every patch ``j`` that is neither zoomed nor already TSU-updated, ``j ≠ a``, with
       ``|cos(S[j], S[a])| ≥ τ`` gets ``S[j] ← TSU([v_a, S[a], S[j]])`` and is marked updated
       (``S`` is the state *before* this step; such a ``j`` always still holds ``z_j``);
    2. ``S[a] ← v_a``, the distilled high-resolution vector (HAFED level 1, store array
       ``distilled``). Zoomed rows always hold their true ``v`` (no later update touches them).

    This is the official code's training environment (``envs/WSI_cosine_env.py``,
    ``WSICosineObservationEnv.step``): the cosine and the TSU's anchor input use the current
    state row ``S[a]``, which is ``z_a`` unless ``a`` was TSU-updated earlier (the agent may
    zoom an updated patch; only zoomed patches are masked). The paper's text and the TSU's
    training pairs use ``z_a``; ``anchor="lowres"`` gives that variant (``cos(z_j, z_a)``,
    ``TSU([v_a, z_a, z_j])``). The two differ only when an updated patch is zoomed.

    **Every patch covered** (each one zoomed or TSU-updated) before the budget is spent: by
    default zooming goes on (a zoom still replaces the patch's row by its ``v``). With
    ``freeze_covered`` the state freezes, as in the official code (``envs/WSI_cosine_env.py``
    at 6385fe6): the remaining steps ignore the action (it is marked visited, as the official
    training loop adds it to the agent's visited list, but not zoomed), leave the state
    unchanged and still give the reward of that state; ``info["frozen"]`` is True on them.

    Cost of a step: the similarity test is one ``(n_cand, d) @ (d,)`` product over the rows
    still eligible (a compacted copy of their ``z``), the TSU runs on the r updated rows, and
    HAFED's classifier re-scores only the ``1 + r`` changed rows and updates its pooled sums
    (:class:`~sasha_models.incremental.IncrementalClassifier`): ``O(N·d + r·d·h)`` instead of
    the ``O(N·d·h)`` of re-running the classifier (``incremental=False``).

    Episodes last ``⌈frac·N⌉`` steps (fewer under a ``stop_rule``, below); ``terminated`` is
    set at the budget (``truncated`` comes only from wrappers such as ``TimeLimit``). The
    reward uses the frozen HAFED slide classifier on the new state,
    ``CE_t = −log p(label | S_t)``:

    * ``reward="ce"`` (the paper's default): ``r_t = −CE_t``;
    * ``reward="delta"``: ``r_t = CE_{t−1} − CE_t`` with ``CE_0`` on ``S_0 = z``, so the
      rewards of an episode sum to ``CE_0 − CE_T`` (the official code gives ``−CE_1`` at t = 1);
    * plus ``correct_bonus`` on the last step when the final prediction is right;
    * minus ``zoom_cost`` on every zoom (a step that reads a patch; not on illegal, frozen or
      stop steps).

    **Learned stopping** (``stop_action=True``): the action space gets one more action, index
    ``P`` (:func:`~sasha_models.spaces.stop_index`), always legal. Choosing it ends the episode
    (``terminated``) on the current state: no zoom, the prediction is HAFED's on S_t, and the
    reward is what the rest of the budget would give if the state were held there, at no zoom
    cost: ``(⌈frac·N⌉ − t) · (−CE_t)`` under ``"ce"`` (t zooms or other steps taken so far),
    ``0`` under ``"delta"`` (the state does not change), plus ``correct_bonus`` as at the cap.
    So, with γ = 1, an episode's return counts the same ⌈frac·N⌉ CE terms whether it stops or
    reads to the cap, and ``zoom_cost`` is what makes reading less worth it: a zoom pays when
    it lowers CE by more than ``zoom_cost`` (``"delta"``), or by more than
    ``zoom_cost / steps left`` (``"ce"``). (A stop paid the one-step reward ``−CE_t`` instead
    would make ``"ce"`` episodes cheaper the shorter they are, and an agent learn to stop at
    once.) ``⌈frac·N⌉`` is the cap; the last ``info`` adds ``stopped`` (``"learned"`` or
    ``"cap"``). Exclusive with ``stop_rule``.

    **Illegal actions** (a zoomed patch, a padding index ``≥ N``, or out of range) from agents
    that ignore :meth:`action_masks` never raise: the step is consumed without a zoom (it
    counts toward the budget), the state is unchanged, the reward is ``illegal_penalty``
    (plus ``correct_bonus`` if it is the last step) and ``info["illegal_action"]`` is True.

    Args:
        workdir: a pipeline workdir (``features.zarr``, ``manifest.csv``,
            ``models/hafed/model.pt``, ``models/tsu/model.pt``). Explicit arguments below
            override its files; without a workdir, ``store``, ``manifest``, ``hafed`` and
            ``tsu`` are all required.
        split: the manifest split to draw slides from (``"train"``, ``"val"``, ``"test"``), or
            ``None`` for every slide.
        frac: fraction f of a slide's patches zoomed per episode, in (0, 1].
        store: a :class:`~sasha_env.features.store.FeatureStore` or its path.
        manifest: a :class:`~sasha_env.slides.manifest.Manifest` or its path (labels and splits).
        hafed: HAFED (or its level-2 ``AttentionMILClassifier``) or an exported ``model.pt``.
        tsu: the TSU or its ``model.pt``.
        reward: ``"ce"`` or ``"delta"`` (above).
        correct_bonus: added to the last reward when the final prediction is correct.
        illegal_penalty: reward of an illegal step.
        tau: cosine threshold τ; ``None`` takes the TSU checkpoint's ``cfg.tau``.
        anchor: ``"state"`` (official code) or ``"lowres"`` (paper text), above; ``None``
            takes the TSU checkpoint's ``cfg.anchor`` (``"state"`` when it has none).
        freeze_covered: freeze the state once every patch is covered (official code),
            above; ``None`` takes the TSU checkpoint's ``cfg.freeze_covered`` (``False`` when
            it has none). A workdir's TSU is the one of budget ``frac`` when it holds one per
            budget (``tsu.budgets``).
        max_patches: padded size P of the observation and action space: ``"cohort"`` (the
            default: the largest N of every slide of the manifest in the store, so that an
            agent trained on one split runs on another), ``None`` or ``"split"`` (the largest
            N of this split), or an int. Slides with N > P cannot be loaded.
        incremental: re-score only the rows a step changed (``False``: re-run the classifier
            over all N rows every step; same results to float rounding).
        cache_mb: MiB of per-slide arrays kept in memory (LRU).
        render_mode: ``None`` or ``"rgb_array"``: :meth:`render` draws the slide thumbnail
            (read once per slide) with the patch grid, TSU-updated and zoomed patches.
        render_px: longest side of the rendered thumbnail in pixels.
        copy_obs: every reset and step returns its own read-only snapshot (the default),
            which no later step changes while the caller holds it (or a view of it, or a
            tensor made from it); snapshots the caller has dropped are brought up to date row
            by row and handed out again (:class:`~sasha_env.envs.obs_pool.ObservationPool`),
            so a step copies the rows it changed, not the whole state (at N = 8,192 and
            d = 384 a whole copy is 12.6 MB, as long as the rest of the step). Write into a
            copy (``np.array(obs["features"])``). ``False`` returns the env's buffers
            themselves, which the next step changes in place: for callers that copy anyway
            (SB3's vector envs copy every observation into their own buffers; the agents
            stage trains this way) or read the observation before stepping again
            (``sasha predict``). The last step of an episode returns writable copies either
            way, since vector envs keep it past the reset.
        obs_projection: observations carry ``(S − μ) W`` (``k`` columns,
            :class:`~sasha_models.projection.ObsProjection`) instead of the state S; updated
            in the changed rows only. The models and rewards still use S. For agents at real
            N and d (``agents.obs_dim``): k = 128 of d = 1,280 makes the policy's first layer
            and the rollout buffer 10× smaller.
        stop_rule: stop when confident (:class:`~sasha_models.stopping.StopRule`, fitted on
            val by the calibrate stage and stored beside each agent): the episode also ends
            (``terminated``) after the first zoom whose calibrated confidence exceeds the
            rule's threshold; ``⌈frac·N⌉`` is then the cap (``⌈max_frac·N⌉`` when the rule has
            a lower cap of its own, ``max_frac``; ``reset``'s ``budget`` says which). The last
            ``info`` adds ``stopped`` (``"confident"`` or ``"cap"``), ``confidence``,
            ``referred`` and ``calibrated_probabilities``. ``None`` (the default): every episode reads the cap.
            Not with ``stop_action`` (one stopping rule at a time).
        stop_action: add the always-legal stop action (learned stopping, above); the action
            space becomes ``Discrete(P + 1)`` and :meth:`action_masks` ``(P + 1,)``.
        zoom_cost: subtracted from the reward of every zoom (``>= 0``; in the reward's units,
            nats of cross-entropy). Meant for learned stopping; without ``stop_action`` every
            episode pays it ``⌈frac·N⌉`` times, whatever the agent does.

    Observation (``Dict``), P = ``max_patches``, rows ≥ N are padding (zeros):
        ``features`` ``Box(-inf, inf, (P, d), float32)`` — the state S;
        ``visited`` ``Box(0, 1, (P,), int8)`` — 1 on zoomed patches;
        ``valid`` ``Box(0, 1, (P,), int8)`` — 1 on the slide's N real patches;
        ``coords`` ``Box(0, 1, (P, 2), float32)`` — lattice (row, col) / (shape − 1).
        One observation is :func:`observation_nbytes` ``= P·(4d + 10)`` bytes; arrays are
        read-only snapshots unless ``copy_obs=False`` (see ``copy_obs``), writable copies
        on the last step of an episode. :attr:`changed_rows` names the
        rows the last reset or step changed, for agents that cache per-row work.

    Action: ``Discrete(P)``, the patch to zoom; with ``stop_action``, ``Discrete(P + 1)``, the
    last one stopping. :meth:`action_masks` gives the legal ones.

    Info: ``action_mask`` (bool ``(P,)``, the legal actions, as :meth:`action_masks`) after
    every reset and step, for RL libraries that read masks from infos; every step has
    ``illegal_action`` and ``frozen``; ``reset`` gives ``slide_id``, ``label``, ``n_patches`` and ``budget``; the last step adds ``probabilities`` (C,) float32,
    ``prediction``, ``label``, ``correct``, ``slide_id``, ``zoomed`` (patch indices in zoom
    order), ``zoomed_coords`` (their level-0 ``[x, y]``), ``updated`` (TSU-updated patches
    not zoomed later), ``n_patches`` and ``frac_read`` (``len(zoomed) / N``), and ``stopped``
    with ``stop_action`` or ``stop_rule``. Lists, not arrays, for the
    variable-length entries, so that Gymnasium's vector envs can batch infos.

    The models run under ``torch.inference_mode()`` in eval mode (modules passed in are put
    in eval mode); ``torch.set_num_threads`` is left alone.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        workdir: PathLike | None = None,
        split: str | None = "train",
        frac: float = 0.1,
        *,
        store: FeatureStore | PathLike | None = None,
        manifest: Manifest | PathLike | None = None,
        hafed: nn.Module | PathLike | None = None,
        tsu: nn.Module | PathLike | None = None,
        reward: Literal["ce", "delta"] = "ce",
        correct_bonus: float = 0.0,
        illegal_penalty: float = -1.0,
        tau: float | None = None,
        anchor: Literal["state", "lowres"] | None = None,
        freeze_covered: bool | None = None,
        max_patches: int | Literal["split", "cohort"] | None = "cohort",
        incremental: bool = True,
        cache_mb: float = 1024,
        render_mode: str | None = None,
        render_px: int = 512,
        copy_obs: bool = True,
        obs_projection: ObsProjection | None = None,
        stop_rule: StopRule | None = None,
        stop_action: bool = False,
        zoom_cost: float = 0.0,
    ) -> None:
        if not 0.0 < float(frac) <= 1.0:
            raise ValueError(f"frac must be in (0, 1], got {frac}")
        if reward not in ("ce", "delta"):
            raise ValueError(f"reward must be 'ce' or 'delta', got {reward!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if stop_action and stop_rule is not None:
            raise ValueError(
                "stop_action (learned stopping) and stop_rule (the confidence threshold) are two "
                "stopping rules; give one of them"
            )
        if not (math.isfinite(float(zoom_cost)) and float(zoom_cost) >= 0.0):
            raise ValueError(f"zoom_cost must be a finite number >= 0, got {zoom_cost}")
        src = resolve_sources(workdir, split, store, manifest, hafed, tsu, frac=float(frac))
        self.split, self.frac = split, float(frac)
        self.reward_mode = reward
        self.correct_bonus, self.illegal_penalty = float(correct_bonus), float(illegal_penalty)
        self.render_mode = render_mode
        self.copy_obs = bool(copy_obs)
        self.store, self.manifest = src.store, src.manifest
        self.class_names: list[str] = src.class_names
        self.slide_ids: list[str] = list(src.slides.slide_ids)
        self.hafed, self.tsu = src.hafed, src.tsu
        if tau is None:
            cfg = getattr(self.tsu, "cfg", None)
            if cfg is None or not hasattr(cfg, "tau"):
                raise ValueError("the TSU has no cfg.tau; pass tau=")
            tau = cfg.tau
        self.tau = float(tau)
        if anchor is None:
            anchor = getattr(getattr(self.tsu, "cfg", None), "anchor", "state")
        if anchor not in ("state", "lowres"):
            raise ValueError(f"anchor must be 'state' or 'lowres', got {anchor!r}")
        self.anchor = anchor
        if freeze_covered is None:
            freeze_covered = getattr(getattr(self.tsu, "cfg", None), "freeze_covered", False)
        self.freeze_covered = bool(freeze_covered)
        self.d = int(self.store.feature_dim)
        largest = max(src.slides.n_patches.values())
        if max_patches is None or max_patches == "split":
            self.max_patches = largest
        elif max_patches == "cohort":
            self.max_patches = max(self.store.n_patches(s) for s in src.slides.labels)
        else:
            self.max_patches = int(max_patches)
        too_big = [s for s, n in src.slides.n_patches.items() if n > self.max_patches]
        if too_big:
            raise ValueError(
                f"max_patches={self.max_patches} is smaller than {len(too_big)} slide(s) of the "
                f"split (largest N = {largest}, e.g. {too_big[0]!r}); max_patches='cohort' "
                "fits every slide"
            )
        self._slides = SlideCache(self.store, src.slides.labels, cache_mb)
        self._clf = IncrementalClassifier(self.hafed, incremental=incremental)
        self._thumbs = ThumbnailCache(render_px)

        P, d = self.max_patches, self.d
        if obs_projection is not None and obs_projection.d_in != d:
            raise ValueError(
                f"obs_projection maps {obs_projection.d_in} features, the store has {d}"
            )
        self.obs_projection = obs_projection
        self.stop_rule = stop_rule
        self.stop_action, self.zoom_cost = bool(stop_action), float(zoom_cost)
        d_obs = d if obs_projection is None else obs_projection.d_out
        self.observation_space = observation_space(P, d_obs)
        self.action_space = action_space(P, stop=self.stop_action)

        # Episode state. ``_features`` is the padded observation buffer; ``_S`` views its
        # first N rows and is what the models read and write.
        self._features = np.zeros((P, d), np.float32)
        # what the agent sees: the state itself, or its projection (kept row by row)
        self._obs_features = (
            self._features if obs_projection is None else np.zeros((P, d_obs), np.float32)
        )
        self._visited = np.zeros(P, np.int8)
        self._valid = np.zeros(P, np.int8)
        self._coords = np.zeros((P, 2), np.float32)
        self._slide: SlideData | None = None
        self._S: Tensor | None = None
        self._free: Tensor | None = None  # (N,) bool: neither zoomed nor TSU-updated
        self._updated: Tensor | None = None  # (N,) bool: ever TSU-updated
        self._cand = Candidates(torch.zeros(0, 1), torch.zeros(0))  # the similarity test
        self._n_free = 0
        self._zoomed: list[int] = []
        self._changed = np.zeros(0, np.int64)
        self._t = 0
        self._budget = 0
        self._done = False  # the episode ended (at the cap, or stopped)
        self._ce = 0.0
        self._probs = np.zeros(len(self.class_names), np.float32)
        self._copies = ObservationPool()  # read-only snapshots, refreshed row by row

    # ------------------------------------------------------------------ properties
    @property
    def incremental(self) -> bool:
        return self._clf.incremental

    @property
    def slide(self) -> SlideData | None:
        """The current slide's arrays (``None`` before the first reset)."""
        return self._slide

    @property
    def probabilities(self) -> np.ndarray:
        """HAFED's class probabilities ``(C,)`` on the current state."""
        return self._probs.copy()

    @property
    def zoomed(self) -> list[int]:
        """Patches zoomed so far, in order."""
        return list(self._zoomed)

    @property
    def updated(self) -> list[int]:
        """Patches whose row came from the TSU and that were not zoomed afterwards."""
        if self._updated is None:
            return []
        mask = self._updated.numpy().copy()
        mask[self._zoomed] = False  # not ``visited``: a frozen step marks without zooming
        return np.flatnonzero(mask).tolist()

    @property
    def changed_rows(self) -> np.ndarray:
        """Rows of the observation the last reset or step changed, ``(r,)`` int64: every real
        row after a reset; the zoomed row and the TSU-updated rows after a step (the zoomed
        row's ``visited`` changed too); the chosen row after a frozen step (only its ``visited``);
        none after an illegal step."""
        return self._changed.copy()

    @property
    def budget(self) -> int:
        """Steps of the current episode at most, ``⌈frac·N⌉`` (``⌈max_frac·N⌉`` when a stop
        rule has a lower cap of its own)."""
        return self._budget

    def load_slide(self, slide_id: str) -> SlideData:
        """The arrays of a slide this env can load (any slide of the manifest in the store),
        from its per-slide cache."""
        return self._slides.get(str(slide_id))

    def state(self) -> np.ndarray:
        """A copy of the current state ``S (N, d)`` (no padding)."""
        n = 0 if self._slide is None else self._slide.n
        return self._features[:n].copy()

    # ------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode on a slide drawn from the split with ``self.np_random``.

        ``options={"slide_id": ID}`` picks the slide instead (any slide of the manifest that
        is in the store and has at most ``max_patches`` patches). ``options={"slide_data":
        SlideData}`` runs on arrays given directly; its ``v`` only needs ``v[a]`` for an int
        ``a``, so it may compute rows lazily (how ``sasha predict`` reads only zoomed patches).
        """
        super().reset(seed=seed)
        options = options or {}
        if "slide_data" in options:  # arrays given directly (sasha predict: a slide off the store)
            data = options["slide_data"]
        else:
            sid = options.get("slide_id")
            if sid is None:
                sid = self.slide_ids[int(self.np_random.integers(len(self.slide_ids)))]
            data = self.load_slide(sid)
        n = data.n
        if n > self.max_patches:
            raise ValueError(
                f"slide {data.slide_id!r} has {n} patches > max_patches={self.max_patches}; build the "
                "env with max_patches='cohort' to fit every slide"
            )
        self._slide = data
        self._features[:n] = data.z.numpy()
        self._features[n:] = 0.0
        if self.obs_projection is not None:
            self._obs_features[:n] = self.obs_projection(self._features[:n])
            self._obs_features[n:] = 0.0
        self._visited[:] = 0
        self._valid[:] = 0
        self._valid[:n] = 1
        self._coords[:n] = data.grid
        self._coords[n:] = 0.0
        self._zoomed = []
        self._changed = np.arange(n, dtype=np.int64)
        self._copies.changed(None)  # the padding, valid and coords rows too
        budget = episode_budget(self.frac, n)
        if self.stop_rule is not None:  # its own cap, when it has one below the budget
            budget = self.stop_rule.cap_steps(n, budget)
        self._t, self._budget = 0, budget
        self._done = False
        with torch.inference_mode():
            self._S = torch.from_numpy(self._features)[:n]
            self._free = torch.ones(n, dtype=torch.bool)
            self._cand = Candidates(data.z, data.z_norm)
            self._n_free = n
            self._updated = torch.zeros(n, dtype=torch.bool)
            self._set_prediction(self._clf.reset(self._S))
        info = {
            "slide_id": data.slide_id,
            "label": data.label,
            "n_patches": n,
            "budget": self._budget,
            "action_mask": self.action_masks(),
        }
        return self._obs(), info

    def step(
        self, action: int | np.integer
    ) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        """Zoom into patch ``action``; see the class docstring for dynamics and rewards."""
        if self._slide is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has terminated; call reset()")
        a = int(action)
        if self.stop_action and a == stop_index(self.max_patches):
            return self._stop()
        self._t += 1
        legal, frozen = self._kind(a)
        if frozen:  # every patch covered: the action is spent, the state stays (official)
            self._visited[a] = 1
            self._changed = np.array([a], np.int64)  # its visited flag changed
            reward = -self._ce if self.reward_mode == "ce" else 0.0
        elif legal:
            ce_before = self._ce
            with torch.inference_mode():
                rows = self._zoom(a)
                self._set_prediction(self._clf.update(self._S, rows))
            self._changed = rows.numpy()
            if self.obs_projection is not None:
                changed = self._changed
                self._obs_features[changed] = self.obs_projection(self._features[changed])
            reward = -self._ce if self.reward_mode == "ce" else ce_before - self._ce
            reward -= self.zoom_cost
        else:
            self._changed = np.zeros(0, np.int64)
            reward = self.illegal_penalty
        self._copies.changed(self._changed)
        confident = legal and self.stop_rule is not None and self.stop_rule.confident(self._probs)
        terminated = self._t >= self._budget or confident
        info: dict[str, Any] = {
            "illegal_action": not legal,
            "frozen": frozen,
            "action_mask": self.action_masks(),
        }
        if terminated:
            self._done = True
            info.update(self._final_info())
            if self.stop_rule is not None:
                info.update(self._stop_info(confident))
            if self.stop_action:
                info["stopped"] = "cap"
            if info["correct"]:
                reward += self.correct_bonus
        # a terminal observation outlives the next reset (vector envs keep it in the info)
        return self._obs(fresh=terminated), float(reward), terminated, False, info

    def _stop(self) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """The stop action: end the episode on the current state (see the class docstring)."""
        held = self._budget - self._t  # budget steps left, which would hold this state
        reward = held * -self._ce if self.reward_mode == "ce" else 0.0
        self._done = True
        self._changed = np.zeros(0, np.int64)
        info: dict[str, Any] = {
            "illegal_action": False,
            "frozen": False,
            "action_mask": self.action_masks(),
            **self._final_info(),
            "stopped": "learned",
        }
        if info["correct"]:
            reward += self.correct_bonus
        return self._obs(fresh=True), float(reward), True, False, info

    def attention(self) -> np.ndarray:
        """HAFED's level-2 attention over the current state's N patches, ``(N,)`` summing to 1
        (softmax per branch, averaged over branches)."""
        if self._S is None:
            raise RuntimeError("call reset() before attention()")
        return mean_attention(getattr(self.hafed, "level2", self.hafed), self._S.float())

    def patch_probabilities(self) -> np.ndarray:
        """``(N, C)``: the class probabilities HAFED gives each patch's current row on its own
        (a one-patch bag), for pictures and slide viewers."""
        if self._S is None:
            raise RuntimeError("call reset() before patch_probabilities()")
        clf = getattr(self.hafed, "level2", self.hafed)
        with torch.inference_mode():
            return torch.softmax(clf.classify(self._S.float().unsqueeze(1)).float(), -1).numpy()

    def zooms_into(self, action: int | np.integer) -> bool:
        """Whether :meth:`step` with ``action`` would zoom, i.e. read the slide's ``v[action]``:
        a legal action on a step that is not frozen. A caller that computes ``v`` rows on demand
        for several slides at once (``sasha predict --batch-slides``) asks this before stepping."""
        if self._slide is None:
            raise RuntimeError("call reset() before zooms_into()")
        legal, frozen = self._kind(int(action))
        return legal and not frozen

    def action_masks(self) -> np.ndarray:
        """Legal actions, bool ``(P,)``: real patches not zoomed yet (sb3-contrib convention);
        with ``stop_action``, ``(P + 1,)``, the last (stop) always True."""
        return legal_actions(self._valid, self._visited, stop=self.stop_action)

    def render(self) -> np.ndarray | None:
        """``(h, w, 3)`` uint8: thumbnail, patch grid, TSU-updated and zoomed patches.

        Colours are :data:`~sasha_env.envs.render.GRID_RGB`, :data:`~sasha_env.envs.render.UPDATED_RGB`
        and :data:`~sasha_env.envs.render.ZOOMED_RGB`.
        """
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='rgb_array'")
            return None
        if self._slide is None:
            raise RuntimeError("call reset() before render()")
        data = self._slide
        thumb, ds = self._thumbs.get(data.path, data.dimensions)
        return draw_patches(thumb, ds, data.coords, data.cell_px, self._zoomed, self.updated)

    # ------------------------------------------------------------------ internals
    def _kind(self, a: int) -> tuple[bool, bool]:
        """``(legal, frozen)`` of action ``a`` on the current step (class docstring)."""
        assert self._slide is not None
        legal = bool(0 <= a < self._slide.n and self._visited[a] == 0)
        return legal, bool(legal and self.freeze_covered and self._n_free == 0)

    def _zoom(self, a: int) -> Tensor:
        """Apply one zoom to ``_S`` in place; returns the changed rows ``(1 + n_updated,)``."""
        data, S, free = self._slide, self._S, self._free
        assert data is not None and S is not None and free is not None
        assert self._updated is not None
        anchor = (S[a] if self.anchor == "state" else data.z[a]).clone()  # (d,)
        free[a] = False
        targets = self._cand.similar(anchor, self.tau, free)
        v_a = data.v[a]
        if targets.numel():
            S[targets] = self.tsu(v_a, anchor, data.z[targets])
            free[targets] = False
            self._updated[targets] = True
        S[a] = v_a
        self._visited[a] = 1
        self._zoomed.append(a)
        self._n_free -= 1 + targets.numel()
        self._cand.compact(free, self._n_free)
        return torch.cat([torch.tensor([a]), targets])

    def _set_prediction(self, logits: Tensor) -> None:
        assert self._slide is not None
        log_p = torch.log_softmax(logits.float().reshape(-1), dim=-1)
        self._ce = float(-log_p[self._slide.label])
        self._probs = log_p.exp().numpy().astype(np.float32)

    def _obs(self, fresh: bool = False) -> dict[str, np.ndarray]:
        buffers = {
            "features": self._obs_features,
            "visited": self._visited,
            "valid": self._valid,
            "coords": self._coords,
        }
        if fresh:  # writable copies: vector envs keep it past the reset and make tensors of it
            return {key: array.copy() for key, array in buffers.items()}
        if self.copy_obs:
            return self._copies.copy(buffers)
        return buffers

    def _stop_info(self, confident: bool) -> dict[str, Any]:
        rule = self.stop_rule
        assert rule is not None
        confidence = float(rule.confidence(self._probs))
        return {
            "stopped": "confident" if confident else "cap",
            "confidence": confidence,
            "referred": not confident and rule.referred(self._probs),
            "calibrated_probabilities": rule.calibrated(self._probs),
        }

    def _final_info(self) -> dict[str, Any]:
        assert self._slide is not None
        return final_info(self._slide, self._probs, self._zoomed, self.updated)


def final_info(
    data: SlideData, probs: np.ndarray, zoomed: list[int], updated: list[int]
) -> dict[str, Any]:
    """The entries the last ``info`` of an episode adds (see :class:`SashaWSIEnv`).

    Args:
        data: the episode's slide.
        probs: HAFED's class probabilities on the final state ``(C,)`` (copied).
        zoomed: the patches zoomed, in order (copied).
        updated: the TSU-updated patches not zoomed later.
    """
    prediction = int(np.argmax(probs))
    zoomed = list(zoomed)
    return {
        "probabilities": np.array(probs, np.float32),
        "prediction": prediction,
        "label": data.label,
        "correct": prediction == data.label,
        "slide_id": data.slide_id,
        "zoomed": zoomed,
        "zoomed_coords": data.coords[zoomed].tolist(),
        "updated": list(updated),
        "n_patches": data.n,
        "frac_read": len(zoomed) / data.n,
    }
