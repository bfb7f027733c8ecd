"""Zooming several slides in lockstep: one backbone forward per zoom step for all of them.

``sasha predict`` runs the agent of each slide as an episode of
:class:`~sasha_env.envs.wsi.SashaWSIEnv` whose distilled rows ``v`` are computed only for the
patches it zooms. One zoom is k sub-patches, few images for a backbone forward (at the demo's
32-px patches a forward of 16 images costs twice per image what one of 196 does), and the
slide's next zoom cannot join them: the agent picks it from the state this zoom produces. The
zooms of *other* slides can. :func:`run_lockstep` advances up to B slides together; at each
step every slide's agent picks its patch (:meth:`ZoomEpisode.choose`), the picked patches are
read by a small thread pool (one read per slide), their B·k sub-patches are embedded in one
backbone call and distilled by HAFED level 1 in one call, and each slide's environment steps
with its own row (:meth:`ZoomEpisode.step`).

Slides end at different steps (another N, an adaptive stop): a finished slide's slot goes to
the next slide. A slide that fails (an unreadable file, no tissue, a corrupt tile) is reported
and leaves its slot; the others go on. Each slide's episode is the one it has alone: the same
zooms, the same bytes read, the same probabilities up to float rounding (the backbone's
rounding depends on the batch it is in). Memory grows with B: B slides' states, B·k images.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from sasha_models.spaces import stop_index

from ..envs.slide_data import SlideData
from ..envs.wsi import SashaWSIEnv

if TYPE_CHECKING:
    from sasha_models.actor_critic import RowCache

__all__ = [
    "EpisodeResult",
    "LockstepJob",
    "PhaseTimer",
    "ZoomEpisode",
    "ZoomRows",
    "run_lockstep",
]

#: threads reading the zoomed regions of a step (one read per slide; tile decoding releases the GIL)
READ_THREADS = 4

Q = TypeVar("Q")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class PhaseTimer(defaultdict[str, float]):
    """Seconds per phase of one slide (``tissue``, ``read_highres``, ...)."""

    def __init__(self) -> None:
        super().__init__(float)

    def add(self, phase: str, t0: float) -> float:
        """Add the seconds since ``t0`` (a ``time.perf_counter()``) to ``phase``; returns now."""
        now = time.perf_counter()
        self[phase] += now - t0
        return now


class ZoomRows:
    """A slide's ``v`` for the environment (``SlideData.v``): the distilled row of the patch
    being zoomed, which the caller computes and :meth:`put` s before the step that reads it."""

    def __init__(self) -> None:
        self._a: int | None = None
        self._v: Tensor | None = None
        self.n_read = 0  # patches read at high resolution

    def put(self, a: int, v: Tensor) -> None:
        """``v (d,)`` float32: the distilled row of patch ``a``, read by the next step."""
        self._a, self._v = int(a), v

    def __getitem__(self, a: int) -> Tensor:
        if self._v is None or int(a) != self._a:
            raise RuntimeError(f"v[{int(a)}] was not computed before the step that zooms into it")
        v, self._a, self._v = self._v, None, None
        self.n_read += 1
        return v


class EpisodeResult(NamedTuple):
    """What an episode leaves for a slide's record.

    Attributes:
        probabilities: HAFED's raw class probabilities on the final state, ``(C,)`` float32.
        zoomed: patch indices in zoom order.
        updated: TSU-updated patches not zoomed later.
        n_read: patches read at high resolution.
        trace: for slide viewers: ``step_probabilities (T, C)``, ``attention (N,)`` and
            ``patch_probabilities (N, C)`` (``None`` unless asked for), and ``stop`` (the
            adaptive rule's ``stopped``, ``referred``, ``confidence``; empty without it).
    """

    probabilities: np.ndarray
    zoomed: list[int]
    updated: list[int]
    n_read: int
    trace: dict[str, Any]


class ZoomEpisode:
    """One slide's agent episode, stepped from outside: :meth:`choose`, then :meth:`step` with
    the zoomed patch's distilled row (computed by the caller, for many slides at once).

    The agent takes the argmax of its actor's logits over the legal patches (and, with the
    stop action, the stop logit: a learned-stop agent in an environment with
    ``stop_action``); the actor's outputs for the rows a step did not change are kept
    (:class:`~sasha_models.actor_critic.RowCache`). Any other SB3 policy (DQN's Q-network)
    acts on the whole observation at every step
    (:func:`~sasha_env.agents.episodes.agent_policy`): the same actions, without the cache.

    Args:
        env: the environment to run in (reset here on ``data``; built with ``copy_obs=False``,
            and with ``stop_action`` for a learned-stop agent).
        policy: the agent's :class:`~sasha_models.actor_critic.SashaActorCritic`, or an SB3
            policy of another network.
        data: the slide's arrays; its ``v`` is a :class:`ZoomRows`.
        timer: where ``agent`` and ``update`` (reset, TSU and classifier) seconds go.
        scores: keep HAFED's attention and per-patch probabilities on the final state.
    """

    def __init__(
        self, env: SashaWSIEnv, policy: nn.Module, data: SlideData, timer: PhaseTimer, scores: bool
    ) -> None:
        from sasha_models.actor_critic import RowCache  # lazy: sb3-contrib, SASHA mode only

        if not isinstance(data.v, ZoomRows):
            raise TypeError("ZoomEpisode needs a slide whose v is a ZoomRows")
        t0 = time.perf_counter()
        self.env: SashaWSIEnv = env
        self.rows: ZoomRows = data.v
        self.timer: PhaseTimer = timer
        self.scores: bool = scores
        obs, _ = env.reset(options={"slide_data": data})
        n = data.n
        self.n: int = n
        self._obs: dict[str, np.ndarray] = obs  # the env's own buffers (copy_obs=False)
        self._stop: bool = bool(env.stop_action)  # a learned-stop agent's environment
        net_stop = getattr(policy, "stop_action", None)  # SASHA's network says; DQN's does not
        if net_stop is not None and bool(net_stop) != self._stop:
            raise ValueError(
                f"the agent's stop action ({bool(net_stop)}) and the environment's stop_action "
                f"({self._stop}) differ: a learned-stop agent acts with the stop action, any "
                "other agent without it"
            )
        self._net: nn.Module | None = policy if hasattr(policy, "actor_outputs") else None
        self._act: Callable[[SashaWSIEnv, dict], int] | None = None
        self._inputs: list[Tensor] = []
        if self._net is None:  # another network: the whole observation at every step
            from .episodes import agent_policy  # lazy: sb3-contrib

            self._act = agent_policy(policy)
        else:  # read before each step, never kept
            keys = (
                ("features", "visited", "coords") if policy.use_coords else ("features", "visited")
            )
            self._inputs = [torch.from_numpy(obs[key])[:n] for key in keys]
        self._cache: RowCache = RowCache()  # the actor's outputs for each of the n real rows
        self._steps: list[np.ndarray] = []
        self._info: dict[str, Any] = {}
        self.done: bool = False
        timer.add("update", t0)

    def choose(self) -> int:
        """The patch the agent zooms next."""
        t0 = time.perf_counter()
        if self._act is not None:
            action = self._act(self.env, self._obs)
            self.timer.add("agent", t0)
            return action
        net = cast(Any, self._net)
        with torch.inference_mode():  # re-score only the rows the last step changed
            rows = torch.from_numpy(self.env.changed_rows)
            outputs = self._cache(net.actor_outputs, self._inputs, rows=rows)
            legal = torch.from_numpy(self.env.action_masks()[: self.n])
            logits = outputs[0].masked_fill(~legal, -math.inf)
            if self._stop:  # the stop logit last: a patch of exactly equal logit wins
                actor_rows, pool_scores = outputs[1][None], outputs[2][None]
                visited = self._inputs[1][None]
                stop = net.stop_logit(actor_rows, pool_scores, visited, torch.ones_like(visited))
                logits = torch.cat([logits, stop[0]])
            action = int(torch.argmax(logits))
        self.timer.add("agent", t0)
        if self._stop and action == self.n:
            return stop_index(self.env.max_patches)
        return action

    def zooms_into(self, action: int) -> bool:
        """Whether :meth:`step` with ``action`` needs the patch's distilled row."""
        return self.env.zooms_into(action)

    def step(self, action: int, v: Tensor | None) -> None:
        """Step the environment; ``v (d,)`` is the patch's distilled row when it zooms."""
        if v is not None:
            self.rows.put(action, v)
        t0 = time.perf_counter()
        self._obs, _, self.done, _, info = self.env.step(action)
        self._steps.append(self.env.probabilities)
        if self.done:
            self._info = info
        self.timer.add("update", t0)

    def result(self) -> EpisodeResult:
        """The finished episode (call once :attr:`done`, before the env runs another slide)."""
        if not self.done:
            raise RuntimeError("the episode has not ended")
        info, env = self._info, self.env
        trace = {
            "step_probabilities": np.stack(self._steps),
            "attention": env.attention() if self.scores else None,
            "patch_probabilities": env.patch_probabilities() if self.scores else None,
            "stop": {k: info[k] for k in ("stopped", "referred", "confidence") if k in info},
        }
        return EpisodeResult(
            info["probabilities"], info["zoomed"], info["updated"], self.rows.n_read, trace
        )


class LockstepJob(Protocol[R_co]):
    """A slide open for lockstep zooming (made by ``start`` in :func:`run_lockstep`)."""

    episode: ZoomEpisode

    def read_zoom(self, a: int) -> np.ndarray:
        """``(k, P, P, 3)`` uint8: patch ``a``'s high-res sub-patches. Called from a thread
        pool, never for two patches of one slide at once."""
        ...

    def finish(self) -> R_co:
        """The slide's output, once its episode is done (closes the slide)."""
        ...

    def close(self) -> None:
        """Release the slide (after a failure; ``finish`` closes it otherwise); idempotent."""
        ...


def run_lockstep(
    requests: Iterable[Q],
    start: Callable[[Q], LockstepJob[R]],
    embed: Callable[[np.ndarray], Tensor],
    distill: Callable[[Tensor], Tensor],
    batch_slides: int,
    read_threads: int = READ_THREADS,
) -> Iterator[tuple[int, R | Exception]]:
    """Predict slides ``batch_slides`` at a time, their zooms batched step by step.

    Args:
        requests: one per slide, in input order.
        start: opens a slide and runs everything before its first zoom (tissue, the low-res
            pass, the episode's reset); it may raise.
        embed: the backbone: ``(m·k, P, P, 3)`` uint8 sub-patches of m patches, in patch
            order → ``(m·k, d)`` float32 features (one call per step for every slide).
        distill: HAFED level 1: ``(m, k, d)`` → ``(m, d)`` distilled rows.
        batch_slides: B, the most slides zoomed together (1: one slide at a time).
        read_threads: the most reads in flight (at most B).

    Yields:
        ``(index, output)`` as each slide finishes (not in input order): ``output`` is what
        its job's ``finish`` returns, or the exception that stopped that slide. Work shared
        by the slides of a step (the reads, the backbone forward, the distillation) goes to
        their timers (``read_highres``, ``embed_highres``, ``distill``) in equal shares.
    """
    if batch_slides < 1:
        raise ValueError(f"batch_slides must be at least 1, got {batch_slides}")
    queue = iter(enumerate(requests))
    active: list[tuple[int, LockstepJob[R]]] = []
    workers = max(1, min(batch_slides, read_threads))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="sasha-read") as pool:
            while True:
                while len(active) < batch_slides:  # fill the free slots
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    try:
                        active.append((nxt[0], start(nxt[1])))
                    except Exception as exc:  # this slide only
                        yield nxt[0], exc
                if not active:
                    return
                failed: dict[int, Exception] = {}
                actions = {i: job.episode.choose() for i, job in active}
                zooming = [(i, job) for i, job in active if job.episode.zooms_into(actions[i])]
                rows: dict[int, Tensor] = {}
                if zooming:
                    t0 = time.perf_counter()
                    reads = {i: pool.submit(job.read_zoom, actions[i]) for i, job in zooming}
                    pixels = {}
                    for i, future in reads.items():
                        try:
                            pixels[i] = future.result()
                        except Exception as exc:
                            failed[i] = exc
                    zooming = [(i, job) for i, job in zooming if i in pixels]
                    _share(zooming, "read_highres", t0)
                    if zooming:
                        rows = _distill_together(zooming, pixels, embed, distill, failed)
                still: list[tuple[int, LockstepJob[R]]] = []
                for i, job in active:
                    if i in failed:
                        job.close()
                        yield i, failed[i]
                        continue
                    try:
                        job.episode.step(actions[i], rows.get(i))
                        if not job.episode.done:
                            still.append((i, job))
                            continue
                        out: R | Exception = job.finish()
                    except Exception as exc:
                        job.close()
                        out = exc
                    yield i, out
                active = still
    finally:  # the caller stopped early, or something above raised
        for _, job in active:
            job.close()


def _distill_together(
    jobs: list[tuple[int, LockstepJob[Any]]],
    pixels: dict[int, np.ndarray],
    embed: Callable[[np.ndarray], Tensor],
    distill: Callable[[Tensor], Tensor],
    failed: dict[int, Exception],
) -> dict[int, Tensor]:
    """Distilled rows of the jobs' zoomed patches, embedded together; a failure fails them all."""
    t0 = time.perf_counter()
    try:
        feats = embed(np.concatenate([pixels[i] for i, _ in jobs]))  # (m·k, d)
        t0 = _share(jobs, "embed_highres", t0)
        v = distill(feats.reshape(len(jobs), -1, feats.shape[-1]))  # (m, k, d) → (m, d)
        _share(jobs, "distill", t0)
    except Exception as exc:  # not one slide's fault: every slide of the batch reports it
        failed.update({i: exc for i, _ in jobs})
        return {}
    return {i: v[j] for j, (i, _) in enumerate(jobs)}


def _share(jobs: list[tuple[int, LockstepJob[Any]]], phase: str, t0: float) -> float:
    """Split the seconds since ``t0`` equally between the jobs' timers; returns now."""
    now = time.perf_counter()
    for _, job in jobs:
        job.episode.timer[phase] += (now - t0) / len(jobs)
    return now
