"""``sasha pipeline``: every stage from slides to ``results.json``, cached and resumable.

The stages and what each reads and writes are declared once in
:data:`~sasha_env.pipeline.stages.REGISTRY` (in run order: extract → hafed → distill → tsu →
lowres → abmil, meanmil, maxmil, transmil → agents → evaluate); the workdir's layout is in
:mod:`sasha_env.workdir`.

A stage writes ``stages/<stage>.json`` last, holding a key made of its configuration (its
sections, per-model overrides applied), the seed (for seeded stages), the stage's code version
(:attr:`~sasha_env.pipeline.stages.Stage.version`) and the outputs of the
stages it reads. A stage whose marker holds the same key is skipped; a changed configuration
re-runs that stage and everything after it. A killed run therefore resumes at the stage it
was in (extraction at the slide it was on, agents at the budget it was on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import replace_atomically, write_json
from ..config import load_config, quiet_lightning, say
from ..distributed import barrier, is_rank_zero
from ..features.bags import StoreBags
from ..features.store import FeatureStore, link_store, store_identity
from ..slides.manifest import (
    Manifest,
    ManifestError,
    SlideRecord,
    file_identity,
    read_manifest,
    read_manifest_lenient,
)
from ..workdir import Workdir
from .schema import validate_config
from .stages import BASELINE_STAGES, REGISTRY, STAGES, Stage, StageContext

__all__ = ["Pipeline", "STAGES", "BASELINE_STAGES"]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Pipeline:
    """A pipeline run over one cohort in one workdir.

    Args:
        workdir: output folder (created).
        manifest: the cohort CSV; optional when the workdir already holds one, or when
            ``features`` is given (then the store's labels and splits make the cohort).
        features: an existing feature store (e.g. from ``sasha import``) to run every stage
            after extraction from; the workdir gets a hard-linked copy, and no slide file is
            read.
        preset, config_path, overrides: the configuration (see :func:`load_config`).
        devices, strategy, accelerator, num_nodes: scale-out of extraction and training.
        progress: progress bars.
        log: where stage messages go.
    """

    workdir: Path
    manifest: Path | None = None
    features: Path | None = None
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
        self.cfg = validate_config(load_config(self.preset, self.config_path, self.overrides))
        self.seed = int(self.cfg.get("seed", 0))

    # ------------------------------------------------------------------ running
    def run(
        self,
        stages: tuple[str, ...] | list[str] | None = None,
        force: tuple[str, ...] = (),
        jobs: int = 1,
    ) -> dict:
        """Run ``stages`` (default: all) in order; ``force`` re-runs those even when cached.

        Args:
            stages: the stages to run (default: all), in registry order whatever the order given.
            force: stages to re-run even when cached.
            jobs: at most this many stages (or units of a stage, such as one agent per budget)
                at once, each in its own process, as soon as the stages it reads are done
                (:func:`~sasha_env.pipeline.parallel.run_parallel`). 1: one after another, in
                this process. The outputs are the same either way. A DDP run
                (``devices`` or ``num_nodes`` above 1) runs one stage at a time.

        Returns:
            The markers of the stages run or skipped, by stage name.
        """
        stages = list(stages or STAGES)
        unknown = (set(stages) | set(force)) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self._prepare(replace_store="extract" in force)
        if jobs > 1 and (self.devices != 1 or self.num_nodes != 1):
            self.log(f"--jobs {jobs} with --devices {self.devices}: one stage at a time (DDP)")
        elif jobs > 1:
            from .parallel import run_parallel  # lazy: multiprocessing, only with jobs

            return run_parallel(self, [s for s in STAGES if s in stages], force, jobs)
        return {
            name: self._run_stage(REGISTRY[name], force=name in force)
            for name in STAGES
            if name in stages
        }

    def _prepare(self, replace_store: bool = False) -> None:
        """Write the resolved config, and the manifest with absolute paths and splits.

        Args:
            replace_store: let ``features`` replace a store this workdir extracted from slides
                (``--force extract``); without it that is refused, before anything is written.
        """
        if self.features is not None:
            self._adopt_store(Path(self.features), replace_store)
        if self.manifest is None and not self.wd.manifest.is_file():
            raise FileNotFoundError(f"{self.wd.manifest} is missing: give --manifest CSV")
        parsed = None
        if self.manifest is not None:  # checked before anything is written
            parsed = read_manifest_lenient(self.manifest)
            if parsed.manifest is None:
                raise ManifestError(
                    f"{self.manifest}: no usable rows: " + "; ".join(parsed.errors.values())
                )
        text = yaml.safe_dump(self.cfg, sort_keys=False)
        replace_atomically(self.wd.config, lambda tmp: tmp.write_text(text))
        if parsed is not None and parsed.manifest is not None:
            for sid, msg in parsed.errors.items():
                self.log(f"[manifest] skipping {sid}: {msg}")
            write_json(self.wd.dropped_rows, dict(sorted(parsed.errors.items())))
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

    def dropped(self) -> dict[str, str]:
        """Slide id → reason for every manifest row and slide this run left out.

        The rows the given manifest could not use (``WORKDIR/manifest_dropped.json``) and the
        slides extraction failed on (the ``extract`` stage's marker); empty when the whole
        cohort went through.
        """
        dropped: dict[str, str] = {}
        if self.wd.dropped_rows.is_file():
            dropped.update(json.loads(self.wd.dropped_rows.read_text()))
        marker = self.wd.marker("extract")
        if marker.is_file():
            dropped.update(json.loads(marker.read_text()).get("outputs", {}).get("failed", {}))
        return dict(sorted(dropped.items()))

    def _adopt_store(self, features: Path, replace_store: bool = False) -> None:
        """Give the workdir a hard-linked copy of ``features`` (again when it changed), and,
        without ``--manifest``, a cohort CSV made from the store's labels and splits.

        Raises:
            ValueError: the workdir holds a store extracted from slides (not one given by
                ``--features`` before) and ``replace_store`` is off: replacing it would throw
                away the extraction and retrain every stage.
        """
        source = FeatureStore(features)
        identity = store_identity(source)
        record = self.wd.root / "features.source.json"
        known = json.loads(record.read_text()) if record.is_file() else {}
        relinked = not self.wd.store.exists() or known.get("identity") != identity
        if relinked and self.wd.store.exists() and not known and not replace_store:
            raise ValueError(
                f"{self.wd.store} holds features extracted from this workdir's slides; "
                f"--features {features} would replace them and retrain every stage: "
                "add --force extract to do so, or give another --workdir"
            )
        if relinked:
            if self.wd.store.exists():
                self.log(f"[features] replacing the workdir's feature store with {features}")
            link_store(features, self.wd.store)
            write_json(record, {"store": str(features.resolve()), "identity": identity})
            self.wd.marker("extract").unlink(missing_ok=True)  # every stage after it re-keys
            self.log(f"[features] {len(source)} slide(s) from {features}")
        if self.manifest is None and (relinked or not self.wd.manifest.is_file()):
            cohort = self.wd.root / "cohort-from-store.csv"
            records = []
            for sid in source.slide_ids():
                info = source.slide_info(sid)
                if info.label is None:
                    raise ManifestError(
                        f"{features}: slide {sid!r} has no label; give --manifest CSV"
                    )
                records.append(SlideRecord(sid, Path(info.path or ""), str(info.label), info.split))
            Manifest(cohort, records, []).write(cohort)
            self.manifest = cohort

    def section(self, stage: Stage) -> dict:
        """The stage's effective config: its first section, with ``models.<stage>`` applied."""
        section = dict(self.cfg.get(stage.sections[0]) or {})
        per_model = dict(section.pop("models", None) or {}).get(stage.name, {})
        return {**section, **per_model}

    def key(self, stage: Stage, drop: tuple[str, ...] = ()) -> str:
        """Hash of the stage's configuration, seed, code version and upstream stages' outputs.

        Args:
            stage: the stage.
            drop: keys of the stage's own section to leave out: the key of a unit of its work
                that does not depend on them (the fixed-budget agents do not depend on
                ``agents.stop``). Without them in the section, the stage's key itself.
        """
        own: dict[str, Any] = {sec: self.cfg.get(sec) for sec in stage.sections[1:]}
        section = self.section(stage)
        own[stage.sections[0]] = {k: v for k, v in section.items() if k not in drop}
        if stage.seeded:
            own["seed"] = self.seed
        if stage.version > 1:
            own["version"] = stage.version
        if stage.reads_manifest:
            own["manifest"] = self._cohort_files()
        upstream = []
        for name in stage.reads:
            marker = self.wd.marker(name)
            upstream.append(json.loads(marker.read_text())["outputs"] if marker.is_file() else None)
        return _hash([stage.name, own, upstream])

    def _run_stage(
        self,
        stage: Stage,
        force: bool = False,
        collecting: bool = False,
        started: float | None = None,
    ) -> dict:
        """Run one stage, or skip it when its marker holds the same key.

        ``collecting`` and ``started`` (a ``time.perf_counter()``) are for a stage whose units
        other processes have just run (:func:`~sasha_env.pipeline.parallel.run_parallel`):
        the run gathers their outputs, and its time counts from ``started``.

        Under DDP every process runs this. Rank 0 decides, and takes away the marker of a stage
        it will run; the others then decide from the markers rank 0 left. Lightning stages
        (``stage.distributed``) run on every process; the others run on rank 0 alone while the
        rest wait for its marker.
        """
        name = stage.name
        marker_path = self.wd.marker(name)
        stale = marker_path.is_file()
        if is_rank_zero():
            key = self._checked_key(stage)
            cached = self.cached_stage(stage, force, key)
            barrier()
        else:
            barrier()
            key = self._checked_key(stage)
            cached = self._cached_marker(marker_path, key, force=False)
        if cached is not None:
            self.log(f"[{name}] done earlier, skipped ({marker_path})")
            return cached
        if stale and is_rank_zero():
            self.log(f"[{name}] configuration or upstream changed: running again")
        if not stage.distributed and not is_rank_zero():
            return self._await_marker(marker_path, key, name)
        if not collecting:
            self.log(f"[{name}] running")
        t0 = time.perf_counter() if started is None else started
        ctx = StageContext(stage, key, self.units_dir(stage), force=force, collecting=collecting)
        quiet_lightning()  # here, not earlier: a bad option is reported before Lightning loads
        outputs = stage.run(self, ctx)
        marker = {
            "stage": name,
            "key": key,
            "seconds": round(time.perf_counter() - t0, 2),
            "outputs": outputs,
        }
        if is_rank_zero():
            write_json(marker_path, marker)
        self.log(f"[{name}] finished in {marker['seconds']:.1f} s")
        return marker

    def cached_stage(
        self, stage: Stage, force: bool = False, key: str | None = None
    ) -> dict | None:
        """The stage's marker when it holds the stage's current key (and ``force`` is off);
        otherwise ``None``, and a marker left from other inputs is removed: the stage runs.

        Raises:
            FileNotFoundError: a stage ``stage`` reads has not run.
        """
        key = self._checked_key(stage) if key is None else key
        path = self.wd.marker(stage.name)
        cached = self._cached_marker(path, key, force)
        if cached is None:
            path.unlink(missing_ok=True)
        return cached

    def units_dir(self, stage: Stage) -> Path:
        """Where ``stage`` records its finished units (:meth:`StageContext.cached`)."""
        return self.wd.root / "stages" / f"{stage.name}.units"

    def run_unit(self, stage: Stage, unit: str, force: bool = False) -> None:
        """Compute one unit of ``stage`` (e.g. one budget's agent) and record it, without the
        stage's marker: a later :meth:`run` of the stage finds it cached.

        Raises:
            FileNotFoundError: a stage ``stage`` reads has not run.
            ValueError: ``unit`` is not one of the stage's units (with this configuration).
        """
        units = stage.units(self) if stage.units is not None else []
        if unit not in units:
            raise ValueError(f"stage '{stage.name}' has no unit {unit!r}; its units: {units}")
        key = self._checked_key(stage)
        ctx = StageContext(stage, key, self.units_dir(stage), force=force, only=unit)
        quiet_lightning()
        stage.run(self, ctx)

    def _cohort_files(self) -> list:
        """The workdir manifest's slides: id, path, size and time of the file, label, split
        (and mpp, where the manifest gives one)."""
        rows = []
        for r in read_manifest(self.wd.manifest).records:
            ident = file_identity(r.path, fingerprint=False) if r.path.is_file() else {}
            rows.append(
                [
                    r.slide_id,
                    str(r.path),
                    ident.get("size"),
                    ident.get("mtime_ns"),
                    r.label,
                    r.split,
                ]
                + ([r.mpp] if r.mpp is not None else [])  # as before for rows without one
            )
        return rows

    def _checked_key(self, stage: Stage) -> str:
        """The stage's key, once every stage it reads has run."""
        for upstream in stage.reads:
            if not self.wd.marker(upstream).is_file():
                raise FileNotFoundError(
                    f"stage '{stage.name}' needs stage '{upstream}' first "
                    f"(no {self.wd.marker(upstream)})"
                )
        return self.key(stage)

    @staticmethod
    def _cached_marker(path: Path, key: str, force: bool) -> dict | None:
        """The stage's marker when it holds ``key`` (and the stage is not forced)."""
        if force or not path.is_file():
            return None
        marker = json.loads(path.read_text())
        return marker if marker.get("key") == key else None

    def _await_marker(self, path: Path, key: str, name: str, poll_s: float = 0.5) -> dict:
        """Wait (on a rank other than 0) for rank 0 to finish a stage it runs alone."""
        parent = os.getppid()
        while True:
            marker = self._cached_marker(path, key, force=False)
            if marker is not None:
                return marker
            if os.getppid() != parent:  # Lightning's extra processes are rank 0's children
                raise RuntimeError(f"rank 0 stopped before finishing stage '{name}'")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ what stages use
    def bags(self) -> StoreBags:
        """The workdir's store as labelled bags, with the workdir manifest's splits."""
        return StoreBags(FeatureStore(self.wd.store), read_manifest(self.wd.manifest))

    def train_kwargs(self) -> dict:
        """Keyword arguments of :func:`sasha_models.lit.train_model` from the run's settings."""
        train = self.cfg.get("train", {})
        wandb = train.get("wandb")
        kw = {
            "seed": self.seed,
            "devices": self.devices,
            "strategy": self.strategy,
            "accelerator": self.accelerator,
            "num_nodes": self.num_nodes,
            "progress": self.progress,
            "cpu_threads": train.get("cpu_threads"),
            "wandb": dict(wandb) if isinstance(wandb, dict) else None,
        }
        if train.get("resume_every_s") is not None:  # else train_model's default
            kw["resume_every_s"] = float(train["resume_every_s"])
        return kw
