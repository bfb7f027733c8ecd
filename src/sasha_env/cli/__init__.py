"""The ``sasha`` command line: one console script, a verb per stage, ``--help`` on each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..config import PRESETS, load_config
from ..distributed import is_rank_zero
from ..pipeline.schema import validate_config
from ..pipeline.stages import REGISTRY, STAGES
from ..pipeline.stages import describe as describe_stages

EPILOG = """\
typical use:
  sasha synth cohort/ --preset demo                 # embedded synthetic cohort
  sasha extract cohort/manifest.csv --out cohort/features.zarr
  sasha demo runs/demo                              # synth + every stage, prints the table
"""


def _add_preset(p: argparse.ArgumentParser, default: str = "demo") -> None:
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=default,
        help=f"settings bundle: tiny (seconds, tests), demo (the embedded cohort), "
        f"paper (SASHA's CAMELYON16 settings, for a GPU), large (the demo's settings on "
        f"CAMELYON-sized synthetic slides, >= 8,000 patches) (default: {default})",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="YAML",
        help="YAML file whose sections (synth, grid, extract, ...) override the preset",
    )


def _add_scaleout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto (default: cpu)")
    p.add_argument(
        "--devices", default="1", help="devices (processes) per node, or 'auto' (default: 1)"
    )
    p.add_argument("--num-nodes", type=int, default=1, help="nodes for DDP (default: 1)")
    p.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)"
    )


def _add_run_options(p: argparse.ArgumentParser, scaleout: bool = True) -> None:
    p.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default=None,
        help="log training to Weights & Biases (offline needs no network; online needs `wandb login`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if scaleout:
        _add_scaleout(p)


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sasha",
        description="SASHA: read a whole-slide image at low resolution and zoom into "
        "10-20% of it, with a Gymnasium environment, Lightning models and SB3 agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sasha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="write the synthetic cohort (pyramidal TIFFs, manifest, tumour masks)",
        description="Write a synthetic H&E-like cohort: tiled, JPEG-compressed pyramidal TIFF "
        "slides with mpp metadata, OUT_DIR/manifest.csv (slide_id,path,label,split) and a "
        "tumour mask per slide (OUT_DIR/masks, for analysis only). Tumour foci differ from "
        "lymphoid aggregates in nuclear morphology: clear at high resolution, faint at low. "
        "Deterministic for a seed; finished slides are kept when re-run.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    _add_preset(p)
    p.add_argument(
        "--slides",
        type=int,
        default=None,
        metavar="N",
        help="number of slides (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "extract",
        help="embed every slide of a manifest into a zarr feature store",
        description="Segment tissue, lay the two-level patch grid, and embed every low-res "
        "patch and every high-res sub-patch with a frozen backbone into a zarr store (one "
        "group per slide). Finished slides are skipped, so a killed run resumes; a slide "
        "that fails is named and skipped, the others are kept, and the exit status is 1.",
    )
    p.add_argument(
        "manifest", type=Path, metavar="CSV", help="manifest: slide_id,path,label[,split]"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="STORE",
        help="feature store directory (e.g. features.zarr)",
    )
    _add_preset(p)
    p.add_argument(
        "--backbone",
        default=None,
        help="backbone: efficientnet-lite0, timm:NAME (with --backbone-checkpoint) or hf:DIR (a local Hugging Face model folder; hf:DIR@cls+mean pools CLS + mean patch token) (default: the preset's)",
    )
    p.add_argument(
        "--backbone-checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="local weights for the backbone (.safetensors or a state_dict .pt)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: the preset's)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers decoding patches (default: the preset's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_scaleout(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "import",
        help="build a feature store from TRIDENT or CLAM per-slide h5 feature files",
        description="Build a feature store from features computed elsewhere: LOWRES/<slide_id>.h5 "
        "(one feature per low-res patch: SASHA's state) and HIGHRES/<slide_id>.h5 (the "
        "high-res patches), as TRIDENT or CLAM write them ('features' (n, d), 'coords' (n, 2) "
        "level-0 top-left). Each high-res patch goes to the low-res cell that holds its centre, "
        "by coordinates; a cell missing any of its zoom^2 sub-patches is left out and counted. "
        "TRIDENT files say their patch size; CLAM's feature files do not: give --lowres-px and "
        "--highres-px (patch_size x downsample of create_patches_fp's patches/<slide_id>.h5). "
        "Then: sasha pipeline --features STORE --workdir DIR. A slide that fails is named and "
        "skipped (exit status 1); slides already imported from the same files are skipped.",
    )
    p.add_argument(
        "cohort",
        type=Path,
        metavar="CSV",
        help="slide_id,label with optional split and path (the slide file, for pictures)",
    )
    p.add_argument(
        "--lowres", type=Path, required=True, metavar="DIR", help="low-magnification h5 files"
    )
    p.add_argument(
        "--highres", type=Path, required=True, metavar="DIR", help="high-magnification h5 files"
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="STORE", help="feature store to write"
    )
    p.add_argument(
        "--lowres-px",
        type=float,
        default=None,
        metavar="PX",
        help="low-res patch side in level-0 px (default: from the files)",
    )
    p.add_argument(
        "--highres-px",
        type=float,
        default=None,
        metavar="PX",
        help="high-res patch side in level-0 px (default: from the files)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="the encoder's name, recorded in the store (default: from HIGHRES's folder name, e.g. features_uni_v1 -> uni_v1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

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
        "and splits. The workdir gets a hard-linked copy: the store itself is not changed.",
    )
    _add_preset(p)
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
    _add_run_options(p)
    p.set_defaults(func=_cmd_pipeline)

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
    _add_preset(p)
    _add_run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict",
        help="diagnose new slides from disk, zooming only where the agent chooses",
        description="For each slide: segment tissue, embed the low-res patches, then let the "
        "trained agent zoom: only the chosen patches' high-res regions are read, embedded and "
        "distilled, and the TSU updates similar patches. Prints one JSON record per line "
        "(probabilities, predicted label, zoomed patch coordinates in level-0 pixels with their "
        "side, fraction of high-res sub-patches read, seconds per phase). --full reads every "
        "high-res sub-patch instead (the baseline). Probabilities are calibrated with the "
        "temperature and bias the calibrate stage fitted on the val split, when the workdir has "
        "them (--calibration; 'calibrated': true, the raw ones in 'probabilities_raw'). "
        "A slide that fails gets a record with "
        "'error' and the others go on; the exit status is then 1.",
    )
    p.add_argument("slides", type=Path, nargs="*", metavar="SLIDE", help="slide files")
    p.add_argument(
        "--workdir", type=Path, required=True, metavar="DIR", help="a finished pipeline workdir"
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="CSV",
        help="predict every slide of a manifest",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--frac", type=float, default=0.1, help="zoom budget f; its agent must exist (default: 0.1)"
    )
    mode.add_argument(
        "--full", action="store_true", help="read every high-res sub-patch (the baseline)"
    )
    p.add_argument(
        "--geojson",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/<slide_id>.geojson for QuPath and other viewers: the zooms in order, "
        "TSU-updated patches, per-patch attention and probabilities, level-0 pixels",
    )
    p.add_argument(
        "--calibration",
        choices=("temperature", "temperature+bias", "none"),
        default="temperature+bias",
        help="calibration fitted on the val split to apply: a temperature (keeps every "
        "decision), a temperature and class bias (moves the threshold too), or none "
        "(default: temperature+bias, which lowered ECE and raised accuracy on the demo study)",
    )
    p.add_argument(
        "--pictures",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each slide's zoom path as PNG here",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="images per backbone forward (default: 256 on a GPU; on a CPU about 4 images of "
        "224 px, more for smaller patches, which keeps activations in cache)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the backbone runs, e.g. cpu or cuda (default: cpu); the small models stay "
        "on the CPU",
    )
    p.set_defaults(func=_cmd_predict)

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
    _add_preset(p)
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
    _add_run_options(p, scaleout=False)
    p.set_defaults(func=_cmd_study)

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
    _add_preset(p)
    _add_run_options(p, scaleout=False)
    p.set_defaults(func=_cmd_demo)

    return parser


def _wandb_overrides(args: argparse.Namespace) -> dict:
    """The config overrides ``--wandb`` asks for."""
    if not args.wandb:
        return {}
    return {"train": {"wandb": None if args.wandb == "disabled" else {"mode": args.wandb}}}


def _pipeline(
    args: argparse.Namespace, workdir: Path, manifest: Path | None, features: Path | None = None
):
    from ..pipeline.runner import Pipeline

    overrides = _wandb_overrides(args)
    return Pipeline(
        workdir=workdir,
        manifest=manifest,
        features=features,
        preset=args.preset,
        config_path=args.config,
        overrides=overrides,
        devices=_devices(getattr(args, "devices", "1")),
        strategy=getattr(args, "strategy", "auto"),
        accelerator=getattr(args, "accelerator", "cpu"),
        num_nodes=getattr(args, "num_nodes", 1),
        progress=not args.quiet,
    )


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from ..pipeline.evaluate import format_table

    pipe = _pipeline(args, args.workdir, args.manifest, args.features)
    pipe.run(args.stages, force=tuple(args.force))
    if (
        is_rank_zero()
        and pipe.wd.results.is_file()
        and (args.stages is None or "evaluate" in args.stages)
    ):
        print(format_table(pipe.wd.results))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    pipe = _pipeline(args, args.workdir, None)
    pipe.run([args.stage], force=(args.stage,))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from ..pipeline.evaluate import format_table
    from ..slides.synth import SynthConfig, synthesize_cohort

    t0 = time.perf_counter()
    cfg = validate_config(load_config(args.preset, args.config))
    manifest = synthesize_cohort(
        args.dir / "cohort",
        SynthConfig.from_dict(cfg["synth"]),
        seed=int(cfg.get("seed", 0)),
        progress=not args.quiet,
    )
    pipe = _pipeline(args, args.dir, manifest)
    pipe.run()
    if is_rank_zero():
        print()
        print(format_table(pipe.wd.results))
        print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {args.dir}/")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    import json

    from ..pipeline.study import Study, format_study

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    helpers = _spawn_helpers(args._argv, args.jobs - 1)
    try:
        summary = Study(
            workdir=args.workdir,
            manifest=args.manifest,
            seeds=tuple(range(args.seeds)),
            preset=args.preset,
            config_path=args.config,
            overrides=_wandb_overrides(args),
            keep_split=args.keep_split,
            progress=not args.quiet,
        ).run()
    finally:  # never leave the helpers behind, whatever happened here
        failed = [p.args for p in helpers if p.wait() != 0]
    if summary is None and helpers:  # a helper finished last and wrote the study
        study_json = args.workdir / "study.json"
        summary = json.loads(study_json.read_text()) if study_json.is_file() else None
    if summary is not None:
        print()
        print(format_study(summary))
    if failed:
        raise RuntimeError(f"{len(failed)} of the --jobs processes failed; see their output above")
    return 0


def _helper_command(argv: list[str]) -> list[str]:
    """The study command a ``--jobs`` helper runs: the same, with one job (the last
    ``--jobs`` given wins, so abbreviations such as ``--job 4`` cannot multiply)."""
    return [sys.executable, "-m", "sasha_env.cli", *argv, "--jobs", "1"]


def _spawn_helpers(argv: list[str], n: int) -> list:
    """Start ``n`` more processes of the same study command, one job each."""
    import subprocess

    if n <= 0:
        return []
    return [subprocess.Popen(_helper_command(argv)) for _ in range(n)]


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from ..predict import Predictor
    from ..slides.manifest import read_manifest

    slides = list(args.slides)
    if args.manifest is not None:
        slides += [r.path for r in read_manifest(args.manifest).records]
    if not slides:
        raise ValueError("give slide files or --manifest CSV")
    if args.geojson is not None and args.full:
        raise ValueError("--geojson draws the agent's zooms: it needs SASHA mode, not --full")
    predictor = Predictor(
        args.workdir,
        frac=args.frac,
        full=args.full,
        batch_size=args.batch_size,
        device=args.device,
        calibration=None if args.calibration == "none" else args.calibration,
    )
    failed = 0
    for path in slides:
        picture = args.pictures / f"{Path(path).stem}.png" if args.pictures else None
        try:
            record = predictor.predict(path, picture=picture, geojson=args.geojson)
        except Exception as exc:  # one bad slide never stops the batch
            failed += 1
            record = {"slide": str(path), "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from ..slides.synth import SynthConfig, synthesize_cohort

    cfg = validate_config(load_config(args.preset, args.config), ["synth"])
    synth_cfg = SynthConfig.from_dict(cfg.get("synth", {}))
    if args.slides is not None:
        if args.slides < 2:
            raise ValueError("--slides must be at least 2 (one per class)")
        synth_cfg.n_slides = args.slides
    manifest = synthesize_cohort(args.out_dir, synth_cfg, seed=args.seed, progress=not args.quiet)
    print(f"wrote {synth_cfg.n_slides} slides; manifest: {manifest}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..features.extract import ExtractConfig, extract_cohort
    from ..slides.grid import GridConfig

    overrides = {
        k: v
        for k, v in {
            "backbone": args.backbone,
            "backbone_checkpoint": str(args.backbone_checkpoint)
            if args.backbone_checkpoint
            else None,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        }.items()
        if v is not None
    }
    cfg = validate_config(
        load_config(args.preset, args.config, {"extract": overrides}), ["grid", "extract"]
    )
    report = extract_cohort(
        args.manifest,
        args.out,
        GridConfig.from_dict(cfg.get("grid")),
        ExtractConfig.from_dict(cfg.get("extract")),
        devices=_devices(args.devices),
        strategy=args.strategy,
        accelerator=args.accelerator,
        num_nodes=args.num_nodes,
        progress=not args.quiet,
    )
    if is_rank_zero():
        print(report.summary())
    return 0 if report.ok else 1


def _cmd_import(args: argparse.Namespace) -> int:
    from ..features.importer import import_cohort

    report = import_cohort(
        args.cohort,
        args.lowres,
        args.highres,
        args.out,
        lowres_px=args.lowres_px,
        highres_px=args.highres_px,
        encoder=args.encoder,
        progress=not args.quiet,
    )
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sasha`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a re-run resumes", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"sasha {args.command}: error: {exc}", file=sys.stderr)
        return 2
