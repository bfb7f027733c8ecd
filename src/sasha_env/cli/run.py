"""The verbs that run the stages: ``pipeline`` (every stage, cached), ``train`` (one training
stage again), ``study`` (the pipeline over seeds) and ``demo`` (synth + pipeline)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import deep_merge, load_config, read_config_file, say
from ..distributed import is_rank_zero
from ..pipeline.schema import validate_config
from ..pipeline.stages import REGISTRY, STAGES
from ..pipeline.stages import describe as describe_stages
from ..processes import end_with_parent, stop_reason
from ..threads import let_idle_threads_sleep
from .common import (
    EXIT_OK,
    EXIT_PARTIAL,
    SubParsers,
    add_jobs,
    add_mpp,
    add_preset,
    add_run_options,
    mpp_overrides,
    parse_devices,
    wandb_overrides,
)

if TYPE_CHECKING:
    from ..pipeline.runner import Pipeline


_JOBS_HELP = (
    "run up to J stages at once, each in its own process, as soon as the stages it reads are "
    "done: after extraction, HAFED -> distill -> TSU beside the low-res classifier and the MIL "
    "baselines, then one agent per budget at once. Same outputs as one at a time; progress "
    "bars only for a stage nothing runs beside, the others print their start and end. A DDP "
    "run (--devices other than 1) runs one at a time"
)


def add_pipeline(sub: SubParsers) -> None:
    """Register ``sasha pipeline --workdir DIR``."""
    p = sub.add_parser(
        "pipeline",
        help="run every stage (extract, HAFED, distillation, TSU, baselines, agents, evaluation) with caching",
        description="Run the stages in this order, writing into WORKDIR and finally "
        "WORKDIR/results.json:\n\n"
        + describe_stages()
        + "\n\nA stage whose outputs are complete (same configuration, seed and inputs)\n"
        "is skipped, so a killed run resumes where it stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="CSV",
        help="cohort manifest (optional when WORKDIR already has one)",
    )
    p.add_argument("--workdir", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        metavar="STORE",
        help="run every stage after extraction from this feature store (e.g. from 'sasha "
        "import'); no slide files are needed, and --manifest defaults to the store's labels "
        "and splits. The workdir gets a hard-linked copy: the store itself is not changed. "
        "Refused onto a workdir whose store was extracted from its slides, unless --force "
        "extract.",
    )
    add_preset(p, workdir_config=True)
    add_mpp(p)
    p.add_argument(
        "--stages",
        nargs="+",
        default=None,
        metavar="STAGE",
        choices=STAGES,
        help="only these stages (default: all)",
    )
    p.add_argument(
        "--force",
        nargs="+",
        default=(),
        choices=STAGES,
        metavar="STAGE",
        help="re-run these stages even if cached",
    )
    add_jobs(p, "1", _JOBS_HELP)
    add_run_options(p)
    p.set_defaults(func=_cmd_pipeline)


def add_train(sub: SubParsers) -> None:
    """Register ``sasha train STAGE --workdir DIR`` (the retrainable stages)."""
    retrainable = [name for name, stage in REGISTRY.items() if stage.retrainable]
    p = sub.add_parser(
        "train",
        help="(re)train one model of a pipeline workdir: " + ", ".join(retrainable),
        description="Re-run one training stage of a workdir, ignoring its cache (its inputs must "
        "exist). 'distill' rewrites the distilled features after a new HAFED. Use --devices 2 "
        "--strategy ddp for data-parallel training (gloo on CPU, NCCL on GPUs).",
    )
    p.add_argument("stage", choices=retrainable)
    p.add_argument("--workdir", type=Path, required=True, metavar="DIR")
    add_preset(p, workdir_config=True)
    add_run_options(p)
    p.set_defaults(func=_cmd_train)


def add_study(sub: SubParsers) -> None:
    """Register ``sasha study --manifest CSV --workdir DIR``."""
    p = sub.add_parser(
        "study",
        help="the pipeline over several seeds: every method's mean, sd and CI across seeds",
        description="Run the pipeline once per seed, each seed with its own stratified split "
        "and initialisation (the manifest's split column is ignored unless --keep-split), "
        "features extracted once into WORKDIR/features.zarr and shared. Writes "
        "WORKDIR/seed-<s>/ (a pipeline workdir each), WORKDIR/study.json (per method: mean, "
        "sd, 95% CI and per-seed numbers; paired differences; AUC against budget) and "
        "WORKDIR/study.md. Resumable per seed and stage. Several processes or machines may "
        "run the same command on one shared folder: each takes seeds nobody else is running, "
        "and the last to finish writes study.json; --jobs J starts J such processes here.",
    )
    p.add_argument("--manifest", type=Path, required=True, metavar="CSV", help="cohort manifest")
    p.add_argument("--workdir", type=Path, required=True, metavar="DIR", help="study folder")
    add_preset(p)
    add_mpp(p)
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        metavar="S",
        help="number of seeds, 0 .. S-1 (default: 5)",
    )
    p.add_argument(
        "--keep-split",
        action="store_true",
        help="use the manifest's split for every seed (only the initialisation varies)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="run J processes on this machine, each taking the seeds nobody runs (default: 1). "
        "Each uses one core; J = the number of seeds keeps every core busy to the end (with "
        "S seeds over C < S cores, J = C leaves the last seeds to run one per core while the "
        "others idle)",
    )
    add_run_options(p, scaleout=False)
    p.set_defaults(func=_cmd_study)


def add_demo(sub: SubParsers) -> None:
    """Register ``sasha demo [DIR]``."""
    p = sub.add_parser(
        "demo",
        help="synth + pipeline on the embedded default cohort; prints the results table",
        description="Write the embedded synthetic cohort into DIR/cohort and run the whole "
        "pipeline with DIR as its workdir, then print results.json as a Markdown table. "
        "Re-running resumes.",
    )
    p.add_argument(
        "dir",
        type=Path,
        nargs="?",
        default=Path("demo-run"),
        metavar="DIR",
        help="(default: demo-run)",
    )
    add_preset(p)
    add_jobs(p, "auto", "render slides and " + _JOBS_HELP[4:])
    add_run_options(p, scaleout=False)
    p.set_defaults(func=_cmd_demo)


def _pipeline(
    args: argparse.Namespace, workdir: Path, manifest: Path | None, features: Path | None = None
) -> Pipeline:
    """The :class:`~sasha_env.pipeline.runner.Pipeline` the parsed options describe (the
    scale-out options default to one CPU process for verbs without them)."""
    from ..pipeline.runner import Pipeline  # lazy: zarr

    preset, config, extra = resolve_settings(args.preset, args.config, workdir)
    return Pipeline(
        workdir=workdir,
        manifest=manifest,
        features=features,
        preset=preset,
        config_path=config,
        overrides=deep_merge(extra, _overrides(args)),
        devices=parse_devices(getattr(args, "devices", "1")),
        strategy=getattr(args, "strategy", "auto"),
        accelerator=getattr(args, "accelerator", "cpu"),
        num_nodes=getattr(args, "num_nodes", 1),
        progress=not args.quiet,
    )


def resolve_settings(
    preset: str | None, config: Path | None, workdir: Path, default: str = "demo"
) -> tuple[str, Path | None, dict]:
    """The settings of a run on ``workdir``: a preset, a config file and overrides.

    A workdir an earlier run wrote holds its resolved settings in ``config.yaml`` (seed
    included: a study's ``seed-<s>/`` has its own). Without ``--preset``, a run on it
    (``sasha pipeline --workdir W --force evaluate``, ``sasha train tsu --workdir W``) starts
    from those settings instead of the default preset's, which would differ (another seed,
    say) and so re-run every stage and replace what was trained; a ``--config`` given then
    changes them section by section, as it would change a preset. With ``--preset`` (or on a
    workdir without ``config.yaml``) the run uses the preset and ``--config`` alone.

    Returns:
        ``(preset, config_path, overrides)`` for
        :class:`~sasha_env.pipeline.runner.Pipeline` (``overrides``: ``--config``'s sections
        when they go over the workdir's own settings; to be merged under the command line's).
    """
    if preset is not None:
        return preset, config, {}
    from ..workdir import Workdir  # lazy: as Pipeline

    saved = Workdir(workdir).config
    if not saved.is_file():
        return default, config, {}
    try:
        data = read_config_file(saved)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; give --preset (and --config) to run on this workdir with other settings"
        ) from None
    kept = str(data.get("preset", default))
    extra = read_config_file(config) if config is not None else {}
    if is_rank_zero():
        also = f", changed by {config}" if config is not None else ""
        say(
            f"[settings] {saved} (preset {kept}, seed {data.get('seed', 0)}): the workdir's "
            f"own{also}; give --preset to start from a preset instead"
        )
    return kept, saved, extra


def _overrides(args: argparse.Namespace) -> dict:
    """The config overrides of ``--wandb`` and, for the verbs that read slides, ``--mpp``."""
    mpp = mpp_overrides(args) if getattr(args, "mpp", None) is not None else {}
    return {**wandb_overrides(args), **mpp}


def _cmd_pipeline(args: argparse.Namespace) -> int:
    pipe = _pipeline(args, args.workdir, args.manifest, args.features)
    pipe.run(args.stages, force=tuple(args.force), jobs=args.jobs)
    if (
        is_rank_zero()
        and pipe.wd.results.is_file()
        and (args.stages is None or "evaluate" in args.stages)
    ):
        from ..pipeline.evaluate import format_table  # lazy: torch, when there is a table

        print(format_table(pipe.wd.results))
    return _dropped_status(pipe)


def _dropped_status(pipe: Pipeline) -> int:
    """:data:`EXIT_PARTIAL`, after naming them, when manifest rows or slides were left out."""
    dropped = pipe.dropped()
    if not dropped:
        return EXIT_OK
    if is_rank_zero():
        print(
            f"sasha: {len(dropped)} slide(s) or manifest row(s) left out "
            f"(listed in {pipe.wd.store / 'extract_report.json'} and {pipe.wd.dropped_rows}):",
            file=sys.stderr,
        )
        for sid, reason in dropped.items():
            print(f"  {sid}: {reason}", file=sys.stderr)
    return EXIT_PARTIAL


def _cmd_train(args: argparse.Namespace) -> int:
    pipe = _pipeline(args, args.workdir, None)
    pipe.run([args.stage], force=(args.stage,))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline.evaluate import format_table  # lazy: zarr
    from ..slides.synth import SynthConfig, synthesize_cohort  # lazy: scipy, tifffile

    t0 = time.perf_counter()
    cfg = validate_config(load_config(args.preset, args.config))
    manifest = synthesize_cohort(
        args.dir / "cohort",
        SynthConfig.from_dict(cfg["synth"]),
        seed=int(cfg.get("seed", 0)),
        progress=not args.quiet,
        jobs=args.jobs,
    )
    pipe = _pipeline(args, args.dir, manifest)
    pipe.run(jobs=args.jobs)
    if is_rank_zero():
        print()
        print(format_table(pipe.wd.results))
        print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {args.dir}/")
    return _dropped_status(pipe)


def _cmd_study(args: argparse.Namespace) -> int:
    from ..pipeline.study import Study, format_study  # lazy: zarr

    if args.jobs > 1:  # before torch loads: the J processes share the cores
        let_idle_threads_sleep()
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    parent = os.environ.pop(_HELPER_OF, "")
    group = int(parent) if parent.isdigit() else os.getpid()
    if parent.isdigit():  # a --jobs helper: it ends when the study that started it does
        end_with_parent(group)
    helpers = _spawn_helpers(args._argv, args.jobs - 1)
    try:
        summary = Study(
            workdir=args.workdir,
            manifest=args.manifest,
            seeds=tuple(range(args.seeds)),
            preset=args.preset,
            config_path=args.config,
            overrides=_overrides(args),
            keep_split=args.keep_split,
            progress=not args.quiet,
            group=group,
        ).run()
    except BaseException as exc:
        if stop_reason(exc) is not None:  # stopped: the helpers stop too, keeping their work
            for proc in helpers:
                proc.terminate()
        raise
    finally:  # never leave the helpers behind: on an error here they finish their seeds
        failed = [p.args for p in helpers if p.wait() != 0]
    if summary is None and helpers:  # a helper finished last and wrote the study
        study_json = args.workdir / "study.json"
        summary = json.loads(study_json.read_text()) if study_json.is_file() else None
    if summary is not None:
        print()
        print(format_study(summary))
    if failed:
        raise RuntimeError(f"{len(failed)} of the --jobs processes failed; see their output above")
    return EXIT_OK


def _helper_command(argv: list[str]) -> list[str]:
    """The study command a ``--jobs`` helper runs: the same, with one job (the last
    ``--jobs`` given wins, so abbreviations such as ``--job 4`` cannot multiply)."""
    return [sys.executable, "-m", "sasha_env.cli", *argv, "--jobs", "1"]


#: environment variable naming a ``--jobs`` helper's study process (so it ends with it)
_HELPER_OF = "SASHA_STUDY_HELPER_OF"


def _spawn_helpers(argv: list[str], n: int) -> list[subprocess.Popen]:
    """Start ``n`` more processes of the same study command, one job each; each ends when
    this process does (:func:`~sasha_env.processes.end_with_parent`)."""
    if n <= 0:
        return []
    env = {**os.environ, _HELPER_OF: str(os.getpid())}
    return [subprocess.Popen(_helper_command(argv), env=env) for _ in range(n)]
