"""``sasha predict``: diagnose new slides straight from disk, reading only where the agent zooms.

Per slide: segment tissue, embed every low-res patch, then run the trained agent. At each
zoom only the chosen patch's high-resolution region is read (tiffslide), its k sub-patches
are embedded and distilled by HAFED level 1, and the TSU updates similar patches — the
environment's own dynamics (``SashaWSIEnv`` with a slide whose ``v`` rows are computed on
demand). ``full=True`` is the baseline SASHA is measured against: every high-res sub-patch
read and embedded, then HAFED on the slide's ``(N, k, d)`` feature bag. Both modes embed
pixels as they are read, so only one batch of pixels is ever held.

:meth:`Predictor.predict_many` zooms several slides in lockstep (:mod:`sasha_env.agents.lockstep`):
each zoom step embeds the sub-patches that all of them chose in one backbone forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import numpy as np
import torch
import yaml
from PIL import Image

from sasha_models.calibration import fitted_members, read_calibrations
from sasha_models.checkpoint import load_model
from sasha_models.projection import ObsProjection

from .agents.lockstep import EpisodeResult, PhaseTimer, ZoomEpisode, ZoomRows, run_lockstep
from .atomic import replace_atomically
from .envs.geojson import episode_geojson, write_geojson
from .envs.render import ThumbnailCache, draw_patches
from .envs.slide_data import SlideData
from .envs.wsi import SashaWSIEnv
from .features.backbones import build_backbone
from .features.embed import embed_patches
from .features.store import FeatureStore
from .slides.grid import GridConfig, PatchGrid, build_grid
from .slides.manifest import read_manifest
from .slides.patches import LowResRows, read_patch
from .slides.slide import Slide, check_mpp
from .workdir import Workdir

__all__ = [
    "BATCH_SLIDES",
    "Prediction",
    "Predictor",
    "SlideRequest",
    "default_batch_size",
    "unique_slide_ids",
]

#: a slide whose mpp differs from the cohort's by more than this is read at the cohort's mpp
MPP_TOLERANCE = 0.1

#: slides zoomed in lockstep by :meth:`Predictor.predict_many` (``sasha predict --batch-slides``)
BATCH_SLIDES = 8


def default_batch_size(input_px: int, device: torch.device) -> int:
    """Images per backbone forward: 256 on an accelerator; on a CPU, what fits its caches.

    A CPU is fastest per image when a batch's activations stay in cache: a few images of
    224 px (EfficientNet-Lite0 on 2 cores: 20 ms/image in batches of 4, 32 ms in 16, 55 ms
    in 64), more for smaller images: ``4·(224/input_px)²`` clipped to [4, 256].
    """
    if device.type != "cpu":
        return 256
    return int(min(256, max(4, round(4 * (224 / input_px) ** 2))))


class SlideRequest(NamedTuple):
    """A slide to predict (:meth:`Predictor.predict_many`).

    Attributes:
        path: the slide file.
        slide_id: the record's id and the GeoJSON's file name; ``None``: the file's stem.
        mpp: the slide's level-0 µm/px, instead of its metadata (a manifest's ``mpp``).
        picture: write the zoom path as a PNG here (SASHA mode).
    """

    path: Path
    slide_id: str | None = None
    mpp: float | None = None
    picture: Path | None = None


class Prediction(TypedDict, total=False):
    """One slide's record from :meth:`Predictor.predict` (a dict, ready for ``json.dumps``).

    Always present: ``slide`` (path), ``slide_id``, ``mode`` (``sasha-<f>`` or ``full``),
    ``probabilities`` (class → probability, calibrated when ``calibrated``), ``label`` (the
    argmax class), ``calibrated``, ``n_patches`` (N), ``zoomed_coords`` (level-0 ``[x, y]``
    top-left corners in zoom order), ``zoomed_size_px`` (their side, level-0 pixels),
    ``fraction_read`` (share of high-res sub-patches read; ``frac_read`` is its older name),
    ``bytes_read`` (bytes fetched from the slide file: the TIFF's structure, the tissue
    thumbnail, the low-res pass and the zooms, counted at the reader; ``bytes_read_phases``
    splits it into ``tissue``, ``lowres``, ``highres``) and ``seconds`` (per phase,
    ``total``: the slide's share of the run's time; slides zoomed in lockstep share the reads,
    backbone forwards and distillation of each step equally). With ``adaptive``: ``stopped``
    (``confident`` or ``cap``), ``referred`` (read this slide in full) and ``confidence``
    (calibrated, at the stop). With ``learned_stop``: ``stopped`` (``learned`` or ``cap``).
    With a calibration: ``probabilities_raw`` and ``calibration`` (``temperature``, ``bias``).
    When asked or relevant: ``picture``, ``geojson`` (paths written) and ``note``.
    A slide that failed in :meth:`Predictor.predict_many` has only ``slide``, ``slide_id`` and
    ``error`` (the exception's type and message).
    """

    slide: str
    slide_id: str
    mode: str
    probabilities: dict[str, float]
    label: str
    calibrated: bool
    n_patches: int
    zoomed_coords: list[list[int]]
    zoomed_size_px: float
    frac_read: float
    fraction_read: float
    bytes_read: int
    bytes_read_phases: dict[str, int]
    seconds: dict[str, float]
    stopped: str
    referred: bool
    confidence: float
    probabilities_raw: dict[str, float]
    calibration: dict[str, Any]
    picture: str
    geojson: str
    note: str
    error: str


def unique_slide_ids(paths: list[Path], given: list[str | None] | None = None) -> list[str]:
    """One id per slide, unique across the batch: an id given for it (a manifest's), else the
    file's stem; stems that collide take their folder's name as a prefix
    (``a/slide.tiff``, ``b/slide.tiff`` → ``a_slide``, ``b_slide``), and ``-2``, ``-3``, ... if
    that is not enough.

    Args:
        paths: the slide files, in input order.
        given: an id per path, or ``None`` where the input gave none.
    """
    given = given or [None] * len(paths)
    ids = [g or p.stem for p, g in zip(paths, given, strict=True)]
    counts: dict[str, int] = {}
    for sid in ids:
        counts[sid] = counts.get(sid, 0) + 1
    ids = [
        f"{p.parent.name}_{sid}" if counts[sid] > 1 and g is None and p.parent.name else sid
        for p, g, sid in zip(paths, given, ids, strict=True)
    ]
    seen: dict[str, int] = {}
    out = []
    for sid in ids:
        seen[sid] = seen.get(sid, 0) + 1
        out.append(sid if seen[sid] == 1 else f"{sid}-{seen[sid]}")
    return out


class Predictor:
    """Loads a pipeline workdir's backbone, HAFED, TSU and agent once; predicts slide by slide.

    Args:
        workdir: a finished pipeline workdir.
        frac: zoom budget f; its agent, of the workdir's ``agents.algo``
            (``agents/sasha-<f>`` for MaskablePPO, ``agents/<algo>-<f>`` else), must exist.
            Ignored with ``full``.
        full: read every high-res sub-patch instead (the baseline).
        batch_size: images per backbone forward, in every phase (a zoom's k sub-patches are
            cut into such batches too); ``None``: :func:`default_batch_size`.
        device: where the backbone runs (``"cpu"``, ``"cuda"``, ...); the small models
            (HAFED, TSU, agent) stay on the CPU.
        calibration: ``"temperature+bias"`` (default: on the 5-seed demo study it lowered
            ECE and raised accuracy for HAFED and SASHA), ``"temperature"`` or ``None``: apply
            that calibration, fitted on the val split by the calibrate stage for this mode
            (``hafed@1`` with ``full``, ``sasha_learned_stop@<f>`` with ``learned_stop``, else
            ``sasha@<f>``), when the workdir has it; the raw
            probabilities are kept in the record too.
        adaptive: stop each slide when the agent's stop rule fires (thresholds fitted on the
            val split by the calibrate stage, ``agents/<algo>-<f>/adaptive.json``), f being
            the cap (or the rule's own lower one, ``max_frac``); records add ``stopped``
            (``confident``/``cap``), ``referred`` and ``confidence``.
        learned_stop: run the learned-stop agent of cap f (``agents.stop: learned``,
            ``agents/<algo>-<f>-stop/``), which stops by itself: records add ``stopped``
            (``learned``/``cap``); no referral (the learned rule has no threshold). Not with
            ``adaptive`` or ``full``.
        mpp: level-0 µm/px assumed for a slide whose metadata has no usable mpp (``--mpp``);
            without it such a slide fails with a message naming ``--mpp``, as in extraction.
    """

    def __init__(
        self,
        workdir: str | Path,
        frac: float = 0.1,
        full: bool = False,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        calibration: str | None = "temperature+bias",
        adaptive: bool = False,
        mpp: float | None = None,
        learned_stop: bool = False,
    ):
        if adaptive and full:
            raise ValueError("--adaptive stops the agent's reading early: it cannot go with --full")
        if learned_stop and (adaptive or full):
            raise ValueError(
                "--learned-stop runs the agent that stops by itself: it cannot go with "
                + ("--adaptive (the threshold rule)" if adaptive else "--full")
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.fallback_mpp = None if mpp is None else check_mpp(mpp, "--mpp")
        self.wd = Workdir(workdir)
        self.full, self.frac, self.adaptive = full, float(frac), adaptive
        self.learned_stop = learned_stop
        cfg = yaml.safe_load(self.wd.require(self.wd.config, "pipeline").read_text())
        self.store = FeatureStore(self.wd.require(self.wd.store, "extract"))
        info = self.store.info
        if info.imported is not None:
            raise ValueError(
                f"{self.store.path} holds features imported from {info.imported.get('tool')} "
                f"({info.backbone}): sasha predict embeds new slides with its own backbone, "
                "so it needs a workdir whose features 'sasha extract' made. Import the new "
                "slides' features too and evaluate them in a pipeline workdir instead"
            )
        self.backbone = build_backbone(
            info.backbone, (cfg.get("extract") or {}).get("backbone_checkpoint")
        )
        if self.backbone.weights_sha256 != info.backbone_weights_sha256:
            raise ValueError(
                f"backbone {info.backbone} here has other weights than the one that made "
                f"{self.store.path}; predictions would not match the trained models"
            )
        self.backbone.to(device)
        self.input_px = int(info.input_px)  # type: ignore[arg-type]
        self.batch_size = batch_size or default_batch_size(self.input_px, torch.device(device))
        self.grid_cfg = GridConfig(**info.grid)  # type: ignore[arg-type]
        slides = [self.store.slide_info(s) for s in self.store.slide_ids()]
        self.cohort_max_patches = max(int(s.n_patches) for s in slides)  # type: ignore[arg-type]
        mpps = [s.mpp for s in slides]
        mpps = [m for m in mpps if m]
        self.cohort_mpp = float(np.median(mpps)) if mpps else None
        self.manifest = read_manifest(self.wd.manifest)
        self.class_names = self.manifest.class_names
        self.hafed = load_model(self.wd.require(self.wd.model("hafed"), "hafed")).eval()
        # the TSU of this budget when the workdir has one per budget (tsu.budgets); the
        # full baseline reads every sub-patch and needs none
        self.tsu = None if full else load_model(self.wd.tsu_model(self.frac)).eval()
        self.calibration = None
        if calibration is not None:
            method = "hafed" if full else "sasha_learned_stop" if learned_stop else "sasha"
            key = f"{method}@{1 if full else self.frac:g}"
            self.calibration = read_calibrations(self.wd.calibration, calibration).get(key)
        self.policy: Any = None
        self.projection: ObsProjection | None = None
        self.fixed_patches: int | None = None  # the patches a fixed-size network reads
        self.algo = "maskable_ppo"
        self._idle_envs: list[SashaWSIEnv] = []  # environments between slides
        if not full:
            # lazy: loads SB3, which --full never needs
            from .agents.config import agent_name
            from .agents.envs import has_agent, load_agent

            algo = self.algo = str((cfg.get("agents") or {}).get("algo") or "maskable_ppo")
            if learned_stop and not has_agent(self.wd, self.frac, algo, learned_stop=True):
                raise FileNotFoundError(
                    f"{self.wd.agent_dir(agent_name(self.frac, algo, True))} does not exist: "
                    f"this workdir has no learned-stop agent at cap {self.frac:g}. Train one "
                    "with 'agents: {stop: learned}' in a config file (sasha pipeline --workdir "
                    f"{self.wd.root} --config FILE), or use --adaptive (the threshold rule)"
                )
            members = int((cfg.get("agents") or {}).get("ensemble") or 1)  # agents.ensemble
            agent = load_agent(  # weights only
                self.wd, self.frac, algo, learned_stop=learned_stop, ensemble=members
            )
            net = getattr(agent.policy, "net", None)  # SASHA's network: its outputs row by row
            self.policy = net.eval() if hasattr(net, "actor_outputs") else agent.policy
            self.projection = agent.projection
            if self.policy is agent.policy:  # another network (DQN's): a fixed-size input
                space = agent.policy.observation_space["features"]  # type: ignore[index]
                self.fixed_patches = int(space.shape[0])
            if self.calibration is not None and not learned_stop:
                self._check_calibration_members(members, adaptive)
        self.stop_rule = None
        if adaptive:
            from .agents.adaptive import read_stop_rule  # lazy: as above

            self.stop_rule = read_stop_rule(agent.path)
            if self.stop_rule is None:
                raise FileNotFoundError(
                    f"{agent.path} has no stop rule (adaptive.json): run the calibrate stage "
                    f"(sasha pipeline --workdir {self.wd.root} --force calibrate)"
                )
            fitted_on = int(self.stop_rule.info.get("members", 1))
            if fitted_on != members:
                raise ValueError(
                    f"{agent.path}'s stop rule was fitted on an agent of {fitted_on} member(s), "
                    f"but the workdir's agents.ensemble is {members}: run the calibrate stage "
                    f"(sasha pipeline --workdir {self.wd.root} --force calibrate)"
                )

    def _check_calibration_members(self, members: int, adaptive: bool) -> None:
        """Refuse a calibration fitted on an agent of another ensemble size than ``members``
        (the workdir's ``agents.ensemble``), or one that does not say which it was fitted on
        while the agent is an ensemble."""
        fitted_on = fitted_members(self.wd.calibration, f"sasha@{self.frac:g}")
        if (fitted_on or 1) == members:
            return
        what = (
            f"was fitted on an agent of {fitted_on} member(s)"
            if fitted_on is not None
            else "does not record the ensemble size it was fitted on"
        )
        instead = "" if adaptive else ", or predict with --calibration none"
        raise ValueError(
            f"{self.wd.calibration}: the calibration of sasha@{self.frac:g} {what}, but the "
            f"workdir's agents.ensemble is {members}: run the calibrate stage (sasha pipeline "
            f"--workdir {self.wd.root} --force calibrate){instead}"
        )

    @property
    def mode(self) -> str:
        """The records' ``mode``: ``full``, ``sasha-<f>``, ``sasha-adaptive-<f>`` or
        ``sasha-learned-stop-<f>``."""
        if self.full:
            return "full"
        kind = "adaptive-" if self.adaptive else "learned-stop-" if self.learned_stop else ""
        return f"sasha-{kind}{self.frac:g}"

    # ------------------------------------------------------------------ geometry
    def grid_config(self, slide: Slide) -> tuple[GridConfig, str | None]:
        """The grid for this slide: the cohort's. A grid fixed in µm/px (every preset's) reads
        every slide at the cohort's resolution by itself; a store made by downsample
        (``grid.hi_mpp`` null) is read at the cohort's mpp when the slide's differs."""
        cfg, notes = self.grid_cfg, []
        if slide.mpp is not None and slide.mpp_source != "metadata":
            notes.append(f"slide read as {slide.mpp:g} um/px at level 0 ({slide.mpp_source})")
        differs = (
            self.cohort_mpp and slide.mpp and abs(slide.mpp / self.cohort_mpp - 1) > MPP_TOLERANCE
        )
        if cfg.hi_mpp is None and differs:
            target = self.cohort_mpp * cfg.hi_downsample
            notes.append(
                f"slide mpp {slide.mpp:g} differs from the cohort's {self.cohort_mpp:g}: "
                f"read at {target:g} um/px"
            )
            cfg = replace(cfg, hi_mpp=target)
        elif cfg.hi_mpp is None and slide.mpp is None and self.cohort_mpp:
            notes.append("slide declares no mpp: assumed to match the cohort")
        return cfg, "; ".join(notes) or None

    def _embed(self, pixels: np.ndarray) -> torch.Tensor:
        """``(n, P, P, 3)`` uint8 → ``(n, dim)`` float32 CPU features, ``batch_size`` at a time."""
        out = [
            embed_patches(
                self.backbone, torch.from_numpy(pixels[i : i + self.batch_size]), self.input_px
            ).cpu()
            for i in range(0, len(pixels), self.batch_size)
        ]
        return torch.cat(out)

    def _embed_zooms(self, pixels: np.ndarray, batch_slides: int) -> torch.Tensor:
        """Features of the sub-patches of a lockstep step, ``(m·k, P, P, 3)`` uint8 →
        ``(m·k, dim)``: embedded in one forward padded with blank images to ``k·2^j`` images
        (at most ``batch_slides·k``), so that forwards take at most ``1 + log2(B)`` shapes. A
        CPU backbone (oneDNN) keeps memory for every batch shape it has run, about 20 MB each
        for EfficientNet-Lite0 at 32 px; the blanks cost compute only while fewer than B
        slides remain at the end of a run."""
        k, n = self.grid_cfg.zoom**2, len(pixels)
        m = -(-n // k)  # slides in this step
        size = k * min(batch_slides, 1 << (m - 1).bit_length())
        if size > n:
            blank = np.zeros((size - n, *pixels.shape[1:]), pixels.dtype)
            pixels = np.concatenate([pixels, blank])
        return self._embed(pixels)[:n]

    def _embed_stream(
        self, groups: Iterator[np.ndarray], n: int, timer: PhaseTimer, read: str, embed: str
    ) -> torch.Tensor:
        """Embed images as they are read, ``batch_size`` at a time: one batch of pixels is held,
        and the features go straight into their ``(n, dim)`` array (no second copy to join).

        Args:
            groups: arrays ``(m, P, P, 3)`` uint8, ``n`` images in all, read lazily (time spent
                in it is ``read``).

        Returns:
            ``(n, dim)`` float32 features on the CPU, in input order.
        """
        out = torch.empty(n, self.backbone.dim)
        done = 0
        pending: list[np.ndarray] = []  # images read but not embedded yet
        t0 = time.perf_counter()
        for group in groups:
            pending.extend(group)
            while len(pending) >= self.batch_size or pending and done + len(pending) == n:
                t0 = timer.add(read, t0)
                batch = np.stack(pending[: self.batch_size])
                out[done : done + len(batch)] = self._embed(batch)
                done += len(batch)
                del pending[: len(batch)]
                t0 = timer.add(embed, t0)
        timer.add(read, t0)
        if done != n:
            raise RuntimeError(f"expected {n} images to embed, read {done + len(pending)}")
        return out

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        path: str | Path,
        picture: Path | None = None,
        geojson: Path | None = None,
        slide_id: str | None = None,
        mpp: float | None = None,
    ) -> Prediction:
        """One JSON-ready record for the slide at ``path`` (:class:`Prediction`).

        Args:
            picture: write the zoom path as a PNG here (SASHA mode).
            geojson: write ``<geojson>/<slide_id>.geojson`` for slide viewers (SASHA mode;
                :mod:`~sasha_env.envs.geojson`).
            slide_id: the record's id and the GeoJSON's file name; default: the file's stem
                (:func:`unique_slide_ids` gives ids unique across a batch).
            mpp: the slide's level-0 µm/px, instead of its metadata (a manifest's ``mpp``).

        Raises:
            SlideError: the slide is unreadable, has no tissue, or its resolution is unknown
                (no usable mpp metadata, no ``mpp`` and no ``--mpp``).
        """
        request = SlideRequest(Path(path), slide_id, mpp, picture)
        ((_, out),) = self._run([request], geojson, batch_slides=1)
        if isinstance(out, Exception):
            raise out
        return out

    def predict_many(
        self,
        slides: Iterable[SlideRequest | str | Path],
        geojson: Path | None = None,
        batch_slides: int = BATCH_SLIDES,
    ) -> Iterator[Prediction]:
        """Records for many slides, in input order, zooming ``batch_slides`` of them in lockstep.

        At each zoom step the agents of up to B = ``batch_slides`` slides choose their
        patches, the chosen regions are read by a small thread pool, and their B·k
        sub-patches go through the backbone in one forward (one zoom's k images are too few to
        keep a CPU's threads busy; see :mod:`sasha_env.agents.lockstep`). Each slide's record equals
        :meth:`predict`'s (the same zooms, bytes read and, to float rounding, probabilities),
        apart from ``seconds``. B = 1 predicts one slide at a time; ``full`` ignores B.

        A slide that fails gets ``{"slide", "slide_id", "error"}`` and the others go on.
        Memory grows with B: each slide in flight holds its ``N × d`` state.

        Args:
            slides: paths or :class:`SlideRequest` s.
            geojson: write ``<geojson>/<slide_id>.geojson`` for each (SASHA mode).
            batch_slides: B, at least 1.
        """
        requests = [s if isinstance(s, SlideRequest) else SlideRequest(Path(s)) for s in slides]
        done: dict[int, Prediction | Exception] = {}
        upcoming = 0
        for i, out in self._run(requests, geojson, batch_slides):
            done[i] = out
            while upcoming in done:  # in input order
                out = done.pop(upcoming)
                if isinstance(out, Exception):
                    r = requests[upcoming]
                    out = {
                        "slide": str(r.path),
                        "slide_id": r.slide_id or Path(r.path).stem,
                        "error": f"{type(out).__name__}: {out}",
                    }
                yield out
                upcoming += 1

    def _run(
        self, requests: list[SlideRequest], geojson: Path | None, batch_slides: int
    ) -> Iterator[tuple[int, Prediction | Exception]]:
        """``(index, record or the exception that stopped it)`` as slides finish."""
        if geojson is not None and self.full:
            raise ValueError("--geojson draws the agent's zooms: it needs SASHA mode, not --full")
        if batch_slides < 1:
            raise ValueError(f"batch_slides must be at least 1, got {batch_slides}")
        if self.full:  # no zooms to batch: one slide at a time
            for i, request in enumerate(requests):
                try:
                    yield i, _SlideRun(self, request, None).finish()
                except Exception as exc:  # this slide only
                    yield i, exc
            return

        def distill(feats: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.hafed.distill(feats)

        try:
            yield from run_lockstep(
                requests,
                lambda r: _SlideRun(self, r, geojson),
                lambda pixels: self._embed_zooms(pixels, batch_slides),
                distill,
                batch_slides,
            )
        finally:  # keep one environment for the next call, not B slides' buffers
            del self._idle_envs[1:]

    def _named(self, probs: np.ndarray) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}

    def _full(self, slide: Slide, grid: PatchGrid, timer: PhaseTimer) -> EpisodeResult:
        hi = (read_patch(slide, grid, i, low=False)[1] for i in range(grid.n))
        k = grid.zoom**2
        feats = self._embed_stream(hi, grid.n * k, timer, "read_highres", "embed_highres")
        feats = feats.reshape(grid.n, k, -1)  # the bag HAFED takes: (N, k, d)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.hafed(feats.unsqueeze(0))["slide_logits"][0]
        timer.add("classify", t0)
        probs = torch.softmax(logits.float(), -1).numpy()
        return EpisodeResult(probs, [], [], grid.n, {})

    def _episode(
        self, slide: Slide, grid: PatchGrid, z: torch.Tensor, timer: PhaseTimer, scores: bool
    ) -> ZoomEpisode:
        """The agent's episode on a slide, reset on its low-res features ``z (N, d)``."""
        assert self.policy is not None
        data = SlideData(
            slide_id=Path(slide.path).stem,
            label=0,  # unknown: the reward is not used here
            z=z.float().contiguous(),
            v=ZoomRows(),  # type: ignore[arg-type]  # rows computed for the zoomed patches only
            z_norm=z.float().norm(dim=1),
            coords=grid.coords,
            grid=grid.grid_positions(),
            path=str(slide.path),
            dimensions=slide.dimensions,
            cell_px=grid.cell_px,
        )
        return ZoomEpisode(self._take_env(grid.n), self.policy, data, timer, scores)

    def _take_env(self, n_patches: int) -> SashaWSIEnv:
        """An environment for a slide of ``n_patches``: an idle one that fits, else a new one
        (replacing the smallest idle one); :meth:`_give_env` returns it. At most as many exist
        as slides are in flight."""
        size = max(n_patches, self.cohort_max_patches)
        if self.fixed_patches is not None:
            if n_patches > self.fixed_patches:
                raise ValueError(
                    f"{n_patches} patches, more than the {self.fixed_patches} that the "
                    f"{self.algo} agent's network reads (a fixed-size input). Only SASHA's "
                    "actor-critic (agents.algo maskable_ppo, ppo or a2c) reads any number of "
                    "patches; predict this slide with such an agent or with --full"
                )
            size = self.fixed_patches
        fits = [e for e in self._idle_envs if e.max_patches >= size]
        if fits:
            self._idle_envs.remove(fits[0])
            return fits[0]
        if self._idle_envs:  # too small for this slide: let it go
            self._idle_envs.remove(min(self._idle_envs, key=lambda e: e.max_patches))
        return SashaWSIEnv(
            store=self.store,
            manifest=self.manifest,
            hafed=self.hafed,
            tsu=self.tsu,
            split=None,
            frac=self.frac,
            max_patches=size,
            copy_obs=False,
            obs_projection=self.projection,
            stop_rule=self.stop_rule,
            stop_action=self.learned_stop,
        )

    def _give_env(self, env: SashaWSIEnv) -> None:
        self._idle_envs.append(env)

    def _draw(self, path: Path, grid, zoomed: list[int], updated: list[int], out: Path) -> None:
        """The slide thumbnail with the zoomed (red) and TSU-updated (blue) patches."""
        thumb, ds = ThumbnailCache(768).get(path, (1, 1))
        img = draw_patches(thumb, ds, grid.coords, grid.cell_px, zoomed, updated, grid=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(out, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


class _SlideRun:
    """One slide from opening to its record (a :class:`~sasha_env.agents.lockstep.LockstepJob`).

    Opening runs everything before the first zoom: tissue and grid, then the low-res pass and
    the episode's reset (SASHA), or every high-res sub-patch and HAFED (``full``). The slide
    stays open until :meth:`finish` or :meth:`close`.
    """

    def __init__(self, p: Predictor, request: SlideRequest, geojson: Path | None) -> None:
        self.p, self.request, self.geojson = p, request, geojson
        self.path = Path(request.path)
        self.sid = request.slide_id or self.path.stem
        self.timer = PhaseTimer()
        self.result: EpisodeResult | None = None
        self._env: SashaWSIEnv | None = None
        t0 = time.perf_counter()
        self.slide = Slide(self.path, mpp=request.mpp, fallback_mpp=p.fallback_mpp)
        self.dimensions = self.slide.dimensions
        try:
            grid_cfg, self.note = p.grid_config(self.slide)
            self.grid, *_ = build_grid(self.slide, grid_cfg)
            self.timer.add("tissue", t0)
            self.fetched = {"tissue": self.slide.bytes_read}  # bytes from the file, by phase
            if p.full:  # the baseline needs no low-res view
                self.result = p._full(self.slide, self.grid, self.timer)
                return
            rows = LowResRows(self.slide, self.grid)
            lo = (rows[i][None] for i in range(self.grid.n))
            z = p._embed_stream(lo, self.grid.n, self.timer, "read_lowres", "embed_lowres")
            self.fetched["lowres"] = self.slide.bytes_read - self.fetched["tissue"]
            self.episode = p._episode(self.slide, self.grid, z, self.timer, geojson is not None)
            self._env = self.episode.env
        except BaseException:
            self.close()
            raise

    def read_zoom(self, a: int) -> np.ndarray:
        """``(k, P, P, 3)`` uint8: patch ``a``'s high-res sub-patches."""
        return read_patch(self.slide, self.grid, a, low=False)[1]

    def close(self) -> None:
        """Close the slide and hand the environment back (idempotent)."""
        if self._env is not None:
            self.p._give_env(self._env)
            self._env = None
        if self.slide is not None:
            self.slide.close()
            self.slide = None  # type: ignore[assignment]

    def finish(self) -> Prediction:
        """The slide's record (closes the slide)."""
        t0 = time.perf_counter()
        try:
            if self.result is None:
                self.result = self.episode.result()
            bytes_read = self.slide.bytes_read
        finally:
            self.close()
        self.fetched["highres"] = bytes_read - sum(self.fetched.values())
        record = self._record(self.result, bytes_read)
        self.timer.add("write", t0)
        record["seconds"] = {k: round(v, 4) for k, v in self.timer.items()} | {
            "total": round(sum(self.timer.values()), 4)
        }
        return record

    def _record(self, result: EpisodeResult, bytes_read: int) -> Prediction:
        p, grid, trace = self.p, self.grid, result.trace
        raw = probs = result.probabilities
        if p.calibration is not None:
            probs = p.calibration.apply(raw)
        record: Prediction = {
            "slide": str(self.path),
            "slide_id": self.sid,
            "mode": p.mode,
            "probabilities": p._named(probs),
            "label": p.class_names[int(np.argmax(probs))],
            "calibrated": p.calibration is not None,
            "n_patches": grid.n,
            "zoomed_coords": grid.coords[result.zoomed].tolist(),
            "zoomed_size_px": float(grid.cell_px),
            "frac_read": result.n_read / grid.n,
            "fraction_read": result.n_read / grid.n,
            "bytes_read": bytes_read,
            "bytes_read_phases": self.fetched,
        }
        if p.stop_rule is not None:
            record["stopped"] = trace["stop"]["stopped"]
            record["referred"] = trace["stop"]["referred"]
            record["confidence"] = trace["stop"]["confidence"]
        elif p.learned_stop:
            record["stopped"] = trace["stop"]["stopped"]
        if p.calibration is not None:
            record["probabilities_raw"] = p._named(raw)
            record["calibration"] = {
                "temperature": p.calibration.temperature,
                "bias": list(p.calibration.bias),
            }
        if self.note:
            record["note"] = self.note
        picture = self.request.picture
        if picture is not None and not p.full:
            p._draw(self.path, grid, result.zoomed, result.updated, picture)
            record["picture"] = str(picture)
        if self.geojson is not None:
            collection = episode_geojson(  # HAFED's raw probabilities throughout, as per zoom
                self.sid, self.dimensions, grid.coords, grid.cell_px, result.zoomed,
                result.updated, p.class_names, trace["attention"], trace["patch_probabilities"],
                trace["step_probabilities"], raw,
            )  # fmt: skip
            record["geojson"] = str(write_geojson(collection, self.geojson, self.sid))
        return record
