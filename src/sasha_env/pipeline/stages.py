"""The pipeline's stages, one declaration each: what a stage reads, writes and how it runs.

:data:`REGISTRY` lists them in run order; the order, the cache keys
(:class:`~sasha_env.pipeline.runner.Pipeline`) and the CLI's stage lists all follow from it.
A stage's ``run(pipeline, ctx)`` returns the JSON-ready outputs recorded in its marker
``stages/<name>.json``; stages downstream are keyed on those outputs. A stage with several
independent pieces of work (one agent per zoom budget) caches each with ``ctx.cached``, so a
killed run keeps what it finished.

To add a stage: write its ``run`` function below and add a :class:`Stage` to
:data:`REGISTRY` at its place in the order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..agents.config import AgentConfig, agent_name, member_name, member_seed, steps_for
from ..atomic import write_json
from ..distributed import is_rank_zero
from ..slides.manifest import read_manifest
from ..workdir import Workdir

if TYPE_CHECKING:  # the stages import their heavy dependencies when they run
    from sasha_models.hafed import HAFED

    from ..features.bags import StoreBags
    from ..features.store import FeatureStore

__all__ = [
    "BASELINE_STAGES",
    "REGISTRY",
    "STAGES",
    "RunContext",
    "Stage",
    "StageContext",
    "describe",
    "distill_store",
    "file_sha256",
    "fit_settings",
]


class RunContext(Protocol):
    """What a stage may use of the pipeline run that calls it: the run's settings and helpers.

    The running :class:`~sasha_env.pipeline.runner.Pipeline` is one; :class:`StageContext`
    is what the stage knows about its own cache entry.
    """

    wd: Workdir
    features: Path | None
    cfg: dict[str, Any]
    seed: int
    progress: bool
    devices: int | str
    strategy: str
    accelerator: str
    num_nodes: int

    @property
    def log(self) -> Callable[[str], None]:
        """Where stage messages go (read-only for stages)."""
        ...

    def section(self, stage: Stage) -> dict:
        """The stage's effective config section (per-model overrides applied)."""
        ...

    def bags(self) -> StoreBags:
        """The workdir's store as labelled bags."""
        ...

    def train_kwargs(self) -> dict:
        """Keyword arguments of ``sasha_models.lit.train_model``."""
        ...

    def key(self, stage: Stage, drop: tuple[str, ...] = ()) -> str:
        """The stage's cache key; ``drop``: keys of its own section left out (a unit that does
        not depend on them keeps its key when only they change)."""
        ...


@dataclass
class StageContext:
    """What a running stage knows about its own cache entry.

    Attributes:
        stage: the declaration.
        key: the cache key of this run (configuration, seed and upstream outputs).
        units_dir: where :meth:`cached` keeps the stage's finished units.
        force: recompute every unit (``--force``), whatever was cached.
        only: run this one unit and skip the others (:meth:`wants`): the stage's units then
            run in separate processes (``sasha pipeline --jobs``), and a last run with every
            unit cached collects their outputs. ``None``: every unit.
        collecting: this run collects units other processes have just computed (their cached
            outputs are not news, so a stage need not say it kept them).
    """

    stage: Stage
    key: str
    units_dir: Path
    force: bool = False
    only: str | None = None
    collecting: bool = False

    def wants(self, unit: str) -> bool:
        """Whether this run computes ``unit`` (every unit unless :attr:`only` names another)."""
        return self.only is None or unit == self.only

    def cached(
        self,
        unit: str,
        compute: Callable[[], dict],
        intact: Callable[[dict], bool] = lambda outputs: True,
        key: str | None = None,
    ) -> tuple[dict, bool]:
        """One unit of the stage's work, computed once per key.

        Args:
            unit: the unit's name (a file name).
            compute: does the work; returns its JSON-ready outputs.
            intact: whether recorded outputs still stand (e.g. their files exist unchanged);
                a unit whose outputs do not is computed again.
            key: the unit's own key, for a unit that depends on less than the whole stage
                (:meth:`RunContext.key` with ``drop``); default the stage's key.

        Returns:
            ``(outputs, was_cached)``: the unit's outputs, from an earlier run with the same
            key when there is one, else from ``compute()`` (then recorded, rank zero only).
        """
        key = self.key if key is None else key
        path = self.units_dir / f"{unit}.json"
        if path.is_file() and not self.force:
            done = json.loads(path.read_text())
            if done.get("key") == key and intact(done["outputs"]):
                return done["outputs"], True
        outputs = compute()
        if is_rank_zero():
            write_json(path, {"key": key, "outputs": outputs})
        return outputs, False


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage name (``sasha pipeline --stages NAME``, ``stages/NAME.json``).
        sections: config sections its key covers; the first one's ``models.<name>`` entry
            overrides it for this stage (see :meth:`RunContext.section`).
        reads: stages whose outputs it reads (they must have run; their outputs are in its key).
        writes: what it writes, relative to the workdir (for ``--help`` and the docs).
        run: ``run(pipeline, ctx) -> outputs``.
        seeded: the pipeline's seed is in its key (every stage that draws random numbers).
        retrainable: ``sasha train NAME`` offers it.
        reads_manifest: the cohort itself (slide ids, file paths and identities, labels,
            splits) is in its key. Stages downstream see the cohort through its outputs.
        distributed: runs on every process of a DDP run (Lightning stages, which shard their
            work across processes); the others run on rank 0 while the rest wait.
        version: raised when the stage's code changes what it produces with the same
            configuration (a new default, say), so that workdirs run before re-run it. Part of
            the key from version 2 on: markers written before versions existed stay valid.
        units: for a stage whose work splits into independent units (one agent per budget),
            ``units(pipeline) -> [unit name, ...]``, the longest first: with ``--jobs`` they
            run in separate processes at once, each a run of the stage with
            :attr:`StageContext.only` set, started in this order.
    """

    name: str
    sections: tuple[str, ...]
    reads: tuple[str, ...]
    writes: str
    run: Callable[[RunContext, StageContext], dict]
    seeded: bool = True
    retrainable: bool = False
    reads_manifest: bool = False
    distributed: bool = False
    version: int = 1
    units: Callable[[RunContext], list[str]] | None = None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (a model's identity in downstream keys)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- runs


def _run_extract(p: RunContext, ctx: StageContext) -> dict:
    # lazy: each stage loads its heavy dependencies when it runs (the CLI loads this module)
    from ..features.extract import ExtractConfig, extract_cohort  # lazy: torch, Lightning
    from ..features.store import FeatureStore  # lazy: zarr
    from ..slides.grid import GridConfig  # lazy: scipy, scikit-image

    if p.features is not None or _imported(p.wd.store):
        return _adopt_features(p)
    report = extract_cohort(
        p.wd.manifest,
        p.wd.store,
        GridConfig.from_dict(p.cfg.get("grid")),
        ExtractConfig.from_dict(p.cfg.get("extract")),
        dropped=_dropped_rows(p.wd),
        devices=p.devices,
        strategy=p.strategy,
        accelerator=p.accelerator,
        num_nodes=p.num_nodes,
        progress=p.progress,
    )
    for sid, msg in sorted(report.failed.items()):
        p.log(f"[extract] FAILED {sid}: {msg}")
    store = FeatureStore(p.wd.store)
    if len(store) == 0:
        raise RuntimeError("extraction produced no slide; see the errors above")
    return {"slides": len(store), "failed": report.failed, "cohort": cohort_digest(p, store)}


def _dropped_rows(wd: Workdir) -> dict[str, str]:
    """Rows of the user's manifest that the workdir's copy left out, with their reasons."""
    if not wd.dropped_rows.is_file():
        return {}
    return dict(json.loads(wd.dropped_rows.read_text()))


def _imported(path: Path) -> bool:
    from ..features.store import FeatureStore  # lazy: zarr

    return (path / "zarr.json").is_file() and FeatureStore(path).info.is_imported


def _adopt_features(p: RunContext) -> dict:
    """The extract stage of a workdir whose features came from elsewhere: nothing to embed;
    manifest slides missing from the store are named, as extraction names its failures."""
    from ..features.store import FeatureStore, store_identity  # lazy: zarr

    store = FeatureStore(p.wd.store)
    records = read_manifest(p.wd.manifest).records
    failed = _dropped_rows(p.wd)
    failed.update(
        {r.slide_id: "not in the feature store" for r in records if r.slide_id not in store}
    )
    for sid in sorted(failed):
        p.log(f"[extract] {sid}: not in the feature store, left out")
    if all(r.slide_id not in store for r in records):
        raise RuntimeError(f"{p.wd.store}: none of the manifest's slides is in the store")
    source = store.info.imported or {}
    p.log(
        f"[extract] features from {store.info.backbone}"
        + (f" (imported from {source['tool']})" if source else "")
        + ": nothing to extract"
    )
    return {
        "slides": len(store),
        "failed": failed,
        "cohort": cohort_digest(p, store),
        "store": store_identity(store),  # another store re-keys every later stage
    }


def cohort_digest(p: RunContext, store: FeatureStore) -> str:
    """Identity of the cohort the models see: id, label, split and file content of every
    manifest slide in the store (and the mpp it was read at, where the user gave it). Later stages are keyed on it (through extract's outputs), so
    a relabelled, re-split, added, removed or changed slide retrains them, while a copied
    cohort (new file times, same content) does not."""
    entries = []
    for r in read_manifest(p.wd.manifest).records:
        if r.slide_id not in store:
            continue
        info = store.slide_info(r.slide_id)
        entry: tuple = (r.slide_id, r.label, r.split, info.fingerprint)
        if info.mpp_source in ("manifest", "assumed"):  # read at a resolution the user gave
            entry += (info.mpp_source, info.mpp)
        entries.append(entry)
    return hashlib.sha256(json.dumps(sorted(entries, key=str)).encode()).hexdigest()[:16]


def _export(path: Path) -> dict:
    return {"model": str(path), "sha256": file_sha256(path)}


def _resume(ctx: StageContext) -> dict[str, Any]:
    """:func:`~sasha_models.lit.train_model`'s resume arguments for a fit of this stage: a
    killed fit resumes from its last resume point of the stage's key, unless forced."""
    return {"resume_key": ctx.key, "restart": ctx.force}


#: ``hafed.temperature`` when a config does not set it: ``"val"`` (a temperature fitted on the
#: val split, folded into HAFED's heads: :func:`~sasha_env.pipeline.calibrate.fold_hafed_temperature`)
#: or a number (1: HAFED as trained, the official code's).
HAFED_TEMPERATURE: float | str = 1.0


def _run_hafed(p: RunContext, ctx: StageContext) -> dict:
    from sasha_models.data import BagDataModule  # lazy: torch, Lightning, when the stage runs
    from sasha_models.hafed import HAFEDConfig  # lazy: as above
    from sasha_models.lit import HAFEDModule, train_model  # lazy: as above

    from .calibrate import fold_hafed_temperature  # lazy: as above

    bags = p.bags()
    section = p.section(ctx.stage)
    fit = fit_settings(section)
    temperature = section.pop("temperature", HAFED_TEMPERATURE)
    cfg = HAFEDConfig(d_in=bags.feature_dim, n_classes=len(bags.class_names), **section)
    module = HAFEDModule(cfg, seed=p.seed)
    data = BagDataModule(bags, "highres", train_lowres=cfg.partial_states > 0)
    out = p.wd.model_dir("hafed")
    kw = {**p.train_kwargs(), **fit}
    path = train_model(module, data, out, **_resume(ctx), **kw)
    folded = fold_hafed_temperature(path, bags, temperature, log=p.log)
    outputs: dict[str, Any] = _export(path)  # the folded file's digest: later stages key on it
    if folded != 1.0:  # recorded only when folded: a default run's outputs stay as before
        outputs["temperature"] = folded
    return outputs


def fit_settings(section: dict) -> dict[str, Any]:
    """Pop the keys of a classifier's section (``hafed``, ``lowres``, ``baselines``) that go to
    :func:`~sasha_models.lit.train_model` rather than to the model: ``select_ties`` (default
    ``"loss"``), ``patience`` (early stopping; default none) and, where a MIL section sets
    it, ``cpu_threads`` (otherwise the ``train`` section's applies)."""
    fit: dict[str, Any] = {
        "select_ties": section.pop("select_ties", "loss"),
        "patience": section.pop("patience", None),
    }
    if "cpu_threads" in section:  # e.g. a transformer wants every core, small bags one
        fit["cpu_threads"] = section.pop("cpu_threads")
    return fit


def _run_distill(p: RunContext, ctx: StageContext) -> dict:
    return distill_store(p.wd, progress=p.progress)


def distill_store(wd: Workdir, progress: bool = False) -> dict:
    """The distill stage: HAFED's level 1 on every slide's high-res features.

    Writes ``distilled (N, d)`` float32 into the workdir's store for each slide, from its
    ``highres (N, k, d)`` and the workdir's ``models/hafed/model.pt``, with the model's SHA-256
    in the array's attributes; a slide already distilled by the same model is kept.

    Returns:
        The stage's outputs: ``{"slides": int, "hafed_sha256": str}``.
    """
    import torch  # lazy: torch, only when the stage runs

    from sasha_models.checkpoint import check_feature_dim, load_model  # lazy: as above

    from ..features.store import FeatureStore  # lazy: zarr, as above

    model_path = wd.require(wd.model("hafed"), "hafed")
    hafed = cast("HAFED", load_model(model_path))  # the HAFED stage's export
    store = FeatureStore(wd.store, mode="a")
    check_feature_dim(hafed, store.feature_dim, name=str(model_path))
    digest = file_sha256(model_path)
    ids = store.slide_ids()
    iterator = ids
    if progress:
        from tqdm.auto import tqdm  # lazy: only with a progress bar

        iterator = tqdm(ids, desc="distill", unit="slide")
    with torch.inference_mode():
        for sid in iterator:
            if (
                store.has_array(sid, "distilled")
                and store.array_attrs(sid, "distilled").get("hafed_sha256") == digest
            ):
                continue
            v = hafed.distill(torch.from_numpy(store.read(sid, "highres"))).float().numpy()
            store.write_array(
                sid, "distilled", v, {"hafed_sha256": digest, "hafed": str(model_path)}
            )
    return {"slides": len(ids), "hafed_sha256": digest}


def _run_tsu(p: RunContext, ctx: StageContext) -> dict:
    """One TSU for every budget (``models/tsu``), or one per budget f of ``tsu.budgets``
    (``models/tsu-f<f>``, each with the section's keys overridden by its own, e.g. its
    epochs: the official code's 200 for f = 0.1 and 1000 for f = 0.2). The other layout's
    models are removed, so an environment never picks up a stale TSU."""
    import shutil  # lazy: only when the stage runs

    from sasha_models.data import TSUPairDataModule  # lazy: torch, Lightning, when the stage runs
    from sasha_models.lit import TSUModule, train_model  # lazy: as above
    from sasha_models.tsu import TSUConfig, calibrate_tau  # lazy: as above

    bags = p.bags()
    section = p.section(ctx.stage)
    tau = section.get("tau", 0.95)
    if tau == "auto":
        tau = calibrate_tau(bags, float(section.get("tau_quantile", 0.98)), p.seed)
        p.log(f"[tsu] tau calibrated on training slides: {tau:.4f}")
    configs = tsu_configs(section, bags.feature_dim, float(tau))

    def train(cfg: TSUConfig, out: Path, key: str = ctx.key) -> dict:
        module = TSUModule(cfg, seed=p.seed)
        data = TSUPairDataModule(
            bags,
            tau=cfg.tau,
            n_anchors=cfg.n_anchors,
            eval_anchors=1 if cfg.validation == "official" else cfg.n_val_anchors,
            eval_resample=cfg.validation == "official",
            include_anchor=cfg.anchor_in_target,
            seed=p.seed,
        )
        resume = {**_resume(ctx), "resume_key": key}
        return _export(train_model(module, data, out, **resume, **p.train_kwargs()))

    wanted = {p.wd.tsu_dir(f).name for f in configs if f is not None}  # by name: f is :g-cut
    stale = [path for path in p.wd.budget_tsu_dirs().values() if path.name not in wanted]
    if None not in configs:
        stale.append(p.wd.tsu_dir())
    if is_rank_zero():
        for path in stale:  # the other layout's models (and a dropped budget's folder)
            shutil.rmtree(path, ignore_errors=True)
    # a budget's TSU depends on the section without the other budgets, and on its own
    # settings: adding a budget, or changing one, keeps the others
    shared = p.key(ctx.stage, drop=("budgets",))
    if None in configs:
        return {**train(configs[None], p.wd.tsu_dir()), "tau": float(tau)}
    models = {}
    for frac, cfg in configs.items():  # each budget's TSU a unit: a killed run keeps those done
        assert frac is not None
        out = p.wd.tsu_dir(frac)

        own = {k: v for k, v in cfg.to_dict().items() if k != "tau"}  # tau: in shared's section
        key = hashlib.sha256(json.dumps([shared, own]).encode()).hexdigest()[:16]

        def compute(
            frac: float = frac, cfg: TSUConfig = cfg, out: Path = out, key: str = key
        ) -> dict:
            p.log(f"[tsu] f={frac:g}: {cfg.max_epochs} epochs")
            return train(cfg, out, key)

        def intact(outputs: dict, model: Path = out / "model.pt") -> bool:
            return model.is_file() and file_sha256(model) == outputs["sha256"]

        models[f"{frac:g}"], cached = ctx.cached(out.name, compute, intact, key)
        if cached:
            p.log(f"[tsu] f={frac:g}: trained earlier, kept")
    return {"models": models, "tau": float(tau)}


def tsu_configs(section: dict, d: int, tau: float) -> dict[float | None, Any]:
    """The TSU configurations the tsu stage trains from its config ``section``:
    ``{None: TSUConfig}`` (one TSU for every budget), or ``{f: TSUConfig}`` for each budget
    of ``section["budgets"]`` (the section's keys overridden by the budget's own), in
    increasing f. ``tau`` is the resolved threshold (``"auto"`` already calibrated)."""
    from sasha_models.tsu import TSUConfig  # lazy: torch

    base = {k: v for k, v in section.items() if k not in ("tau", "tau_quantile", "budgets")}
    budgets = {float(f): dict(o or {}) for f, o in (section.get("budgets") or {}).items()}
    if not budgets:
        return {None: TSUConfig(d=d, tau=tau, **base)}
    return {f: TSUConfig(d=d, tau=tau, **{**base, **budgets[f]}) for f in sorted(budgets)}


def _run_mil(p: RunContext, ctx: StageContext) -> dict:
    """The low-res classifier (``lowres``) and the MIL baselines on full high-res features."""
    from sasha_models.data import BagDataModule  # lazy: torch, Lightning, when the stage runs
    from sasha_models.lit import MILModule, train_model  # lazy: as above

    name = ctx.stage.name
    bags = p.bags()
    section = p.section(ctx.stage)
    train_kwargs = {**p.train_kwargs(), **fit_settings(section)}
    model = "attention_mil" if name == "lowres" else name
    kind = "lowres" if name == "lowres" else "highres"
    module = MILModule(model, bags.feature_dim, len(bags.class_names), seed=p.seed, **section)
    data = BagDataModule(bags, kind, flatten_highres=kind == "highres")
    out = p.wd.model_dir(name)
    return _export(train_model(module, data, out, **_resume(ctx), **train_kwargs))


#: ``agents`` keys only the learned-stop agents depend on: the fixed-budget agents' units are
#: keyed without them, so turning learned stopping on (or changing its cost) keeps them.
LEARNED_STOP_KEYS = ("stop", "zoom_cost")
#: ``agents`` keys no single agent depends on: an ensemble's size (``agents.ensemble``) says how
#: many members train, not how each does, so growing it keeps the members trained before.
ENSEMBLE_KEYS = ("ensemble",)


def _agent_units(cfg: AgentConfig) -> list[tuple[float, bool, int]]:
    """The agents stage's units, in training order: ``(f, learned_stop, member)`` for each
    budget f, its ensemble's members (``agents.ensemble``; member 0 is the agent itself), then
    the learned-stop agent (with ``agents.stop: learned``; never an ensemble)."""
    units = []
    for frac in cfg.fracs:
        units += [(frac, False, member) for member in range(cfg.ensemble)]
        if cfg.stop == "learned":
            units.append((frac, True, 0))
    return units


def _unit_name(cfg: AgentConfig, frac: float, learned_stop: bool, member: int) -> str:
    """An agents-stage unit's name: its agent's folder name."""
    if learned_stop:
        return agent_name(frac, cfg.algo, learned_stop=True)
    return member_name(frac, cfg.algo, member)


def _agent_unit_names(p: RunContext) -> list[str]:
    """The agents stage's unit names (the agents' folder names), for ``--jobs``: the largest
    budget first, the longest to train (more zooms per episode; with ``equal_episodes`` more
    steps too), so that it does not start last."""
    cfg = AgentConfig.from_dict(p.section(REGISTRY["agents"]))
    units = sorted(_agent_units(cfg), key=lambda unit: (-unit[0], unit[1], unit[2]))
    names = [_unit_name(cfg, *unit) for unit in units]
    return list(dict.fromkeys(names))  # a budget listed twice is one agent


def _run_agents(p: RunContext, ctx: StageContext) -> dict:
    """One agent per zoom budget f (with ``agents.ensemble`` K, K members per f, each its own
    seed), and with ``agents.stop: learned`` one learned-stop agent per f beside it
    (``agents/<name>-stop/``); each is a cached unit, so a killed run keeps finished agents.
    The fixed-budget agents' units are keyed without :data:`LEARNED_STOP_KEYS`, and no unit
    with :data:`ENSEMBLE_KEYS`."""
    from ..agents.export import POLICY_WEIGHTS  # lazy: torch and SB3, only when agents train
    from ..agents.train import train_agent  # lazy: as above

    cfg = AgentConfig.from_dict(p.section(ctx.stage))
    device = "cuda" if p.accelerator == "gpu" else "cpu"
    fixed_key = p.key(ctx.stage, drop=LEARNED_STOP_KEYS + ENSEMBLE_KEYS)
    stop_key = p.key(ctx.stage, drop=ENSEMBLE_KEYS)
    agents: dict[str, dict] = {}
    learned: dict[str, dict] = {}
    members: dict[str, list[dict]] = {}
    for frac, learned_stop, member in _agent_units(cfg):
        out = p.wd.agent_dir(_unit_name(cfg, frac, learned_stop, member))
        if not ctx.wants(out.name):
            continue
        what = f"f={frac:g}" + (" learned stop" if learned_stop else "")
        what += (
            f" member {member + 1} of {cfg.ensemble}"
            if cfg.ensemble > 1 and not learned_stop
            else ""
        )
        seed = member_seed(p.seed, member)

        def train(
            frac: float = frac,
            out: Path = out,
            stop: bool = learned_stop,
            seed: int = seed,
            what: str = what,
        ) -> dict:
            budget = (
                f"{cfg.epochs} epochs, slide-ordered (paper protocol)"
                if cfg.protocol == "paper"
                else f"{steps_for(cfg, frac)} steps"
            )
            extra = f", learned stop at {cfg.zoom_cost:g} per zoom" if stop else ""
            p.log(f"[agents] {what}: training {cfg.algo} for {budget}{extra}")
            train_agent(
                p.wd,
                frac,
                cfg,
                seed=seed,
                out_dir=out,
                wandb=p.train_kwargs()["wandb"],
                progress=p.progress,
                device=device,
                run_config={"pipeline": p.cfg},  # the whole resolved config in the W&B run
                learned_stop=stop,
            )
            weights = out / POLICY_WEIGHTS
            return {"agent": str(weights), "sha256": file_sha256(weights)}

        def intact(outputs: dict, weights: Path = out / POLICY_WEIGHTS) -> bool:
            # this workdir's own file: the recorded path is where the agent was trained, which
            # is another folder once the workdir has been moved or copied
            return weights.is_file() and file_sha256(weights) == outputs["sha256"]

        unit, cached = ctx.cached(out.name, train, intact, stop_key if learned_stop else fixed_key)
        if learned_stop:
            learned[f"{frac:g}"] = unit
        elif member == 0:
            agents[f"{frac:g}"] = unit
        else:
            members.setdefault(f"{frac:g}", []).append(unit)
        if cached and not ctx.collecting:
            p.log(f"[agents] {what}: trained earlier, kept")
    outputs: dict[str, Any] = {"agents": agents, "algo": cfg.algo}
    # only when there are some: the outputs (and downstream keys) of other runs stay as they were
    if learned:
        outputs["learned_stop"] = learned
    if members:
        outputs["members"] = members
    return outputs


def _run_calibrate(p: RunContext, ctx: StageContext) -> dict:
    from .calibrate import calibrate_workdir  # lazy: zarr, when the stage runs

    out = calibrate_workdir(p.wd, p.cfg, log=p.log)
    return {"calibration": str(p.wd.calibration), "methods": sorted(out["methods"])}


def _run_evaluate(p: RunContext, ctx: StageContext) -> dict:
    from .evaluate import evaluate_workdir  # lazy: zarr, scipy, when the stage runs

    results = evaluate_workdir(p.wd, p.cfg, log=p.log)
    if is_rank_zero():
        from .figures import write_figures  # lazy: matplotlib, as above

        for path in write_figures(p.wd, log=p.log):
            p.log(f"[evaluate] figure {path}")
    return {"results": str(p.wd.results), "methods": [m["method"] for m in results["methods"]]}


# ---------------------------------------------------------------------------- registry

BASELINE_STAGES = ("abmil", "meanmil", "maxmil", "transmil")


def _stages() -> dict[str, Stage]:
    stages = [
        Stage(
            "extract",
            ("grid", "extract"),
            (),
            "features.zarr (low-res and high-res features of every slide)",
            _run_extract,
            seeded=False,
            distributed=True,
            reads_manifest=True,
        ),
        Stage(
            "hafed",
            ("hafed",),
            ("extract",),
            "models/hafed/model.pt (HAFED on high-res features)",
            _run_hafed,
            retrainable=True,
            distributed=True,
            # 2: of the epochs with the best val AUC + F1, the lowest val loss (select_ties)
            version=2,
        ),
        Stage(
            "distill",
            ("hafed",),
            ("hafed",),
            "features.zarr distilled (HAFED level 1: v per patch)",
            _run_distill,
            retrainable=True,
        ),
        Stage(
            "tsu",
            ("tsu",),
            ("distill",),
            "models/tsu/model.pt (the targeted state updater)",
            _run_tsu,
            retrainable=True,
            distributed=True,
        ),
        Stage(
            "lowres",
            ("lowres",),
            ("extract",),
            "models/lowres/model.pt (HAFED's slide level on low-res features)",
            _run_mil,
            retrainable=True,
            distributed=True,
            # 2: of the epochs with the best val AUC + F1, the lowest val loss (select_ties)
            version=2,
        ),
        *(
            Stage(
                name,
                ("baselines",),
                ("extract",),
                f"models/{name}/model.pt (MIL baseline on full high-res features)",
                _run_mil,
                retrainable=True,
                distributed=True,
                # 2: of the epochs with the best val AUC + F1, the lowest val loss (select_ties)
                version=2,
            )
            for name in BASELINE_STAGES
        ),
        Stage(
            "agents",
            ("agents",),
            ("distill", "tsu"),
            "agents/<algo>-<f>/ (one trained agent per zoom budget f; with agents.stop: "
            "learned also agents/<algo>-<f>-stop/)",
            _run_agents,
            units=_agent_unit_names,
            # 2: row-pooled rollout buffers (agents.row_pool) by default; 3: SB3's progress.csv
            # beside each agent, dqn's learning_starts at most a tenth of the budget; protocol
            # paper = the official agent at 6385fe6 (its networks, unmasked update, two
            # optimisers, constant lr, 15 epochs)
            version=3,
        ),
        Stage(
            "calibrate",
            ("agents", "adaptive"),
            ("hafed", "agents"),
            "calibration.json (temperature and bias per method, fitted on val), "
            "agents/<algo>-<f>/adaptive.json (each agent's stop rule, fitted on val)",
            _run_calibrate,
            # 2: fits each agent's stop rule (adaptive.json); 3: a stable threshold; 4: the rule
            # keeps its own cap (max_frac), and a stop_classes rule's val curve is its kind's
            version=4,
        ),
        Stage(
            "evaluate",
            ("agents", "adaptive"),
            ("hafed", "lowres", *BASELINE_STAGES, "agents", "calibrate"),
            "results.json, episodes/, figures/ (every method on the test split)",
            _run_evaluate,
            # 2: sasha_adaptive rows, adaptive_curve and referral; 3: tumour slides found; 4: the
            # adaptive_curve of the fitted rule's kind, and max_frac in the rows
            version=4,
        ),
    ]
    return {s.name: s for s in stages}


#: Every stage, in run order.
REGISTRY: dict[str, Stage] = _stages()
#: Stage names in run order.
STAGES: tuple[str, ...] = tuple(REGISTRY)


def describe(stages: dict[str, Stage] | None = None) -> str:
    """One line per stage: name, what it writes (for ``--help``)."""
    stages = stages or REGISTRY
    return "\n".join(f"  {s.name:<9} {s.writes}" for s in stages.values())
