"""``sasha pipeline``: every stage from slides to ``results.json``, cached and resumable.

Stages, in order (each reads what the previous ones wrote into the workdir, see
:mod:`sasha_env.workdir`):

``extract``    features of every slide into ``features.zarr``
``hafed``      HAFED on the high-res features           → ``models/hafed/model.pt``
``distill``    HAFED level 1 → ``distilled`` (N × d) per slide in the store
``tsu``        the targeted state updater                → ``models/tsu/model.pt``
``lowres``     HAFED's slide level on low-res features   → ``models/lowres/model.pt``
``abmil``, ``meanmil``, ``maxmil``, ``transmil``  MIL baselines on full high-res features
``evaluate``   metrics of every trained method on the test split → ``results.json``

A stage writes ``stages/<stage>.json`` last, holding a key made of its configuration and the
keys of the stages it reads. A stage whose marker holds the same key is skipped; a changed
configuration re-runs that stage and everything after it. A killed run therefore resumes
at the stage it was in (and extraction resumes at the slide it was on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..config import load_config, quiet_lightning, say
from ..distributed import is_rank_zero
from ..features.bags import StoreBags
from ..features.store import FeatureStore
from ..slides.manifest import Manifest, ManifestError, read_manifest, read_manifest_lenient
from ..workdir import Workdir

__all__ = ["Pipeline", "STAGES", "BASELINE_STAGES"]

BASELINE_STAGES = ("abmil", "meanmil", "maxmil", "transmil")
STAGES = ("extract", "hafed", "distill", "tsu", "lowres", *BASELINE_STAGES, "agents", "evaluate")
#: what each stage reads (its key includes theirs)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "extract": (),
    "hafed": ("extract",),
    "distill": ("hafed",),
    "tsu": ("distill",),
    "lowres": ("extract",),
    **{name: ("extract",) for name in BASELINE_STAGES},
    "agents": ("distill", "tsu"),
    "evaluate": ("hafed", "lowres", *BASELINE_STAGES, "agents"),
}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Pipeline:
    """A pipeline run over one cohort in one workdir.

    Args:
        workdir: output folder (created).
        manifest: the cohort CSV; optional when the workdir already holds one.
        preset, config_path, overrides: the configuration (see :func:`load_config`).
        devices, strategy, accelerator, num_nodes: scale-out of extraction and training.
        progress: progress bars.
        log: where stage messages go.
    """

    workdir: Path
    manifest: Path | None = None
    preset: str = "demo"
    config_path: Path | None = None
    overrides: dict = field(default_factory=dict)
    devices: int | str = 1
    strategy: str = "auto"
    accelerator: str = "cpu"
    num_nodes: int = 1
    progress: bool = True
    log: Callable[[str], None] = say

    def __post_init__(self) -> None:
        self.wd = Workdir(self.workdir)
        self.wd.root.mkdir(parents=True, exist_ok=True)
        self.cfg = load_config(self.preset, self.config_path, self.overrides)
        self.seed = int(self.cfg.get("seed", 0))
        quiet_lightning()

    # ------------------------------------------------------------------ plumbing
    def run(
        self, stages: tuple[str, ...] | list[str] | None = None, force: tuple[str, ...] = ()
    ) -> dict:
        """Run ``stages`` (default: all) in order; ``force`` re-runs those even when cached.

        Returns:
            The markers of the stages run or skipped, by stage name.
        """
        stages = list(stages or STAGES)
        unknown = (set(stages) | set(force)) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        self._prepare()
        done = {}
        for stage in STAGES:
            if stage in stages:
                done[stage] = self._run_stage(stage, force=stage in force)
        return done

    def _prepare(self) -> None:
        """Write the resolved config, and the manifest with absolute paths and splits."""
        self.wd.config.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        if self.manifest is not None:
            parsed = read_manifest_lenient(self.manifest)
            if parsed.manifest is None:
                raise ManifestError(
                    f"{self.manifest}: no usable rows: " + "; ".join(parsed.errors.values())
                )
            for sid, msg in parsed.errors.items():
                self.log(f"[manifest] skipping {sid}: {msg}")
            fresh = parsed.manifest
            if self.wd.manifest.is_file():  # keep the splits already drawn for this workdir
                old = {r.slide_id: r.split for r in read_manifest(self.wd.manifest).records}
                records = [
                    dataclasses.replace(r, split=r.split or old.get(r.slide_id))
                    for r in fresh.records
                ]
                fresh = Manifest(fresh.path, records, fresh.class_names)
            split_cfg = self.cfg.get("split", {})
            shares = tuple(split_cfg.get("shares", (0.6, 0.2, 0.2)))
            fresh.with_split(seed=self.seed, shares=shares).write(self.wd.manifest)
        elif not self.wd.manifest.is_file():
            raise FileNotFoundError(f"{self.wd.manifest} is missing: give --manifest CSV")

    def _key(self, stage: str) -> str:
        """Hash of the stage's configuration and of its upstream stages' outputs (model hashes...)."""
        own = {"section": self._section(stage), "seed": self.seed}
        if stage == "extract":
            own = {"grid": self.cfg.get("grid"), "extract": self.cfg.get("extract")}
        upstream = []
        for u in UPSTREAM[stage]:
            marker = self.wd.marker(u)
            upstream.append(json.loads(marker.read_text())["outputs"] if marker.is_file() else None)
        return _hash([stage, own, upstream])

    def _section(self, stage: str) -> dict:
        """The stage's effective config: its section, with per-model overrides applied."""
        section = dict(self.cfg.get(_SECTION.get(stage, stage)) or {})
        per_model = dict(section.pop("models", None) or {}).get(stage, {})
        return {**section, **per_model}

    def _run_stage(self, stage: str, force: bool = False) -> dict:
        marker_path = self.wd.marker(stage)
        for upstream in UPSTREAM[stage]:
            if not self.wd.marker(upstream).is_file():
                raise FileNotFoundError(
                    f"stage '{stage}' needs stage '{upstream}' first (no {self.wd.marker(upstream)})"
                )
        key = self._key(stage)
        if marker_path.is_file() and not force:
            marker = json.loads(marker_path.read_text())
            if marker.get("key") == key:
                self.log(f"[{stage}] done earlier, skipped ({marker_path})")
                return marker
            self.log(f"[{stage}] configuration or upstream changed: running again")
        self.log(f"[{stage}] running")
        t0 = time.perf_counter()
        outputs = getattr(self, f"_stage_{_METHOD.get(stage, stage)}")(stage)
        marker = {
            "stage": stage,
            "key": key,
            "seconds": round(time.perf_counter() - t0, 2),
            "outputs": outputs,
        }
        if is_rank_zero():
            marker_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(marker, indent=2, default=str))
            tmp.replace(marker_path)
        self.log(f"[{stage}] finished in {marker['seconds']:.1f} s")
        return marker

    def bags(self) -> StoreBags:
        manifest = read_manifest(self.wd.manifest)
        return StoreBags(FeatureStore(self.wd.store), manifest)

    def _train_kwargs(self) -> dict:
        train = self.cfg.get("train", {})
        wandb = train.get("wandb")
        return {
            "seed": self.seed,
            "devices": self.devices,
            "strategy": self.strategy,
            "accelerator": self.accelerator,
            "num_nodes": self.num_nodes,
            "progress": self.progress,
            "cpu_threads": train.get("cpu_threads"),
            "wandb": dict(wandb) if isinstance(wandb, dict) else None,
        }

    # ------------------------------------------------------------------ stages
    def _stage_extract(self, stage: str) -> dict:
        from ..features.extract import ExtractConfig, extract_cohort
        from ..slides.grid import GridConfig

        report = extract_cohort(
            self.wd.manifest,
            self.wd.store,
            GridConfig.from_dict(self.cfg.get("grid")),
            ExtractConfig.from_dict(self.cfg.get("extract")),
            devices=self.devices,
            strategy=self.strategy,
            accelerator=self.accelerator,
            num_nodes=self.num_nodes,
            progress=self.progress,
        )
        for sid, msg in sorted(report.failed.items()):
            self.log(f"[extract] FAILED {sid}: {msg}")
        n = len(FeatureStore(self.wd.store))
        if n == 0:
            raise RuntimeError("extraction produced no slide; see the errors above")
        return {"slides": n, "failed": report.failed}

    def _stage_hafed(self, stage: str) -> dict:
        from sasha_models.data import BagDataModule
        from sasha_models.hafed import HAFEDConfig
        from sasha_models.lit import HAFEDModule, train_model

        bags = self.bags()
        section = self._section("hafed")
        cfg = HAFEDConfig(d_in=bags.feature_dim, n_classes=len(bags.class_names), **section)
        module = HAFEDModule(cfg, seed=self.seed)
        path = train_model(
            module,
            BagDataModule(bags, "highres"),
            self.wd.model_dir("hafed"),
            **self._train_kwargs(),
        )
        return {"model": str(path), "sha256": file_sha256(path)}

    def _stage_distill(self, stage: str) -> dict:
        from sasha_models.lit import check_feature_dim, load_model

        model_path = self.wd.require(self.wd.model("hafed"), "hafed")
        hafed = load_model(model_path).eval()
        store = FeatureStore(self.wd.store, mode="a")
        check_feature_dim(hafed, store.feature_dim, name=str(model_path))
        digest = file_sha256(model_path)
        n_new = 0
        ids = store.slide_ids()
        iterator = ids
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(ids, desc="distill", unit="slide")
        with torch.inference_mode():
            for sid in iterator:
                if (
                    store.has_array(sid, "distilled")
                    and store.array_attrs(sid, "distilled").get("hafed_sha256") == digest
                ):
                    continue
                hi = torch.from_numpy(store.read(sid, "highres"))
                v = hafed.distill(hi).float().numpy()
                store.write_array(
                    sid, "distilled", v, {"hafed_sha256": digest, "hafed": str(model_path)}
                )
                n_new += 1
        return {"slides": len(ids), "distilled_now": n_new, "hafed_sha256": digest}

    def _stage_tsu(self, stage: str) -> dict:
        from sasha_models.data import TSUPairDataModule
        from sasha_models.lit import TSUModule, train_model
        from sasha_models.tsu import TSUConfig

        bags = self.bags()
        section = self._section("tsu")
        tau = section.pop("tau", 0.95)
        if tau == "auto":
            tau = calibrate_tau(bags, float(section.pop("tau_quantile", 0.98)), self.seed)
            self.log(f"[tsu] tau calibrated on training slides: {tau:.4f}")
        section.pop("tau_quantile", None)
        cfg = TSUConfig(d=bags.feature_dim, tau=float(tau), **section)
        module = TSUModule(cfg, seed=self.seed)
        data = TSUPairDataModule(bags, tau=cfg.tau, n_anchors=cfg.n_anchors, seed=self.seed)
        path = train_model(module, data, self.wd.model_dir("tsu"), **self._train_kwargs())
        return {"model": str(path), "sha256": file_sha256(path), "tau": float(cfg.tau)}

    def _stage_mil(self, stage: str) -> dict:
        from sasha_models.data import BagDataModule
        from sasha_models.lit import MILModule, train_model

        bags = self.bags()
        section = self._section(stage)
        train_kwargs = self._train_kwargs()
        if "cpu_threads" in section:  # e.g. a transformer wants every core, small bags one
            train_kwargs["cpu_threads"] = section.pop("cpu_threads")
        name = "attention_mil" if stage == "lowres" else stage
        kind = "lowres" if stage == "lowres" else "highres"
        module = MILModule(name, bags.feature_dim, len(bags.class_names), seed=self.seed, **section)
        data = BagDataModule(bags, kind, flatten_highres=kind == "highres")
        path = train_model(module, data, self.wd.model_dir(stage), **train_kwargs)
        return {"model": str(path), "sha256": file_sha256(path)}

    def _stage_agents(self, stage: str) -> dict:
        from ..agents.train import AgentConfig, agent_name, train_agent

        cfg = AgentConfig.from_dict(self._section("agents"))
        wandb = self._train_kwargs()["wandb"]
        device = "cuda" if self.accelerator == "gpu" else "cpu"
        agents = {}
        for frac in cfg.fracs:
            out = self.wd.agent_dir(agent_name(frac, cfg.algo))
            done = out / "agent.json"
            if done.is_file() and json.loads(done.read_text()).get("key") == self._key(stage):
                self.log(f"[agents] f={frac:g}: trained earlier, kept")
            else:
                self.log(
                    f"[agents] f={frac:g}: training {cfg.algo} for {cfg.total_timesteps} steps"
                )
                train_agent(
                    self.wd,
                    frac,
                    cfg,
                    seed=self.seed,
                    out_dir=out,
                    wandb=wandb,
                    progress=self.progress,
                    device=device,
                )
                meta = json.loads(done.read_text())
                done.write_text(json.dumps({**meta, "key": self._key(stage)}, indent=2))
            agents[f"{frac:g}"] = {
                "agent": str(out / "agent.zip"),
                "sha256": file_sha256(out / "agent.zip"),
            }
        return {"agents": agents, "algo": cfg.algo}

    def _stage_evaluate(self, stage: str) -> dict:
        from .evaluate import evaluate_workdir

        results = evaluate_workdir(self.wd, self.cfg, log=self.log)
        if is_rank_zero():
            from .figures import write_figures

            for path in write_figures(self.wd):
                self.log(f"[evaluate] figure {path}")
        return {
            "results": str(self.wd.results),
            "methods": [m["method"] for m in results["methods"]],
        }


#: config section of each stage, where it is not the stage's own name
_SECTION = {
    "lowres": "lowres",
    **{name: "baselines" for name in BASELINE_STAGES},
    "distill": "hafed",
}
#: method implementing each stage, where it is not _stage_<name>
_METHOD = {"lowres": "mil", **{name: "mil" for name in BASELINE_STAGES}}


def calibrate_tau(bags: StoreBags, quantile: float, seed: int, n_slides: int = 32) -> float:
    """A TSU threshold for this backbone: the ``quantile`` of |cos| between low-res patches.

    The paper's τ = 0.95 suits its DINO ViT-S features; other backbones (e.g. post-ReLU CNN
    features, whose cosines are all high) need their own. With quantile q an anchor has on
    average (1 - q)·N similar patches.
    """
    rng = np.random.default_rng(seed)
    ids = bags.slide_ids("train")
    ids = [ids[i] for i in rng.permutation(len(ids))[:n_slides]]
    sims = []
    for sid in ids:
        z = torch.from_numpy(bags.features(sid, "lowres")).float()
        z = torch.nn.functional.normalize(z, dim=1)
        c = (z @ z.T).abs()
        off = ~torch.eye(len(z), dtype=torch.bool)
        sims.append(c[off].numpy())
    return float(np.quantile(np.concatenate(sims), quantile))
