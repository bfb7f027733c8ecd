"""The data verbs: ``synth`` (a synthetic cohort), ``inspect`` (what slides say about
themselves), ``extract`` (slides -> feature store) and ``import`` (TRIDENT/CLAM h5 files ->
feature store)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import PRESETS, load_config
from ..distributed import is_rank_zero
from ..pipeline.schema import validate_config
from .common import (
    EXIT_OK,
    EXIT_PARTIAL,
    SubParsers,
    add_jobs,
    add_mpp,
    add_preset,
    add_quiet,
    add_scaleout,
    mpp_overrides,
    parse_devices,
)


def add_synth(sub: SubParsers) -> None:
    """Register ``sasha synth OUT_DIR``."""
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
    add_preset(p)
    p.add_argument(
        "--slides",
        type=int,
        default=None,
        metavar="N",
        help="number of slides (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_jobs(p, "auto", "render J slides at once, one process each (the same cohort for any J)")
    add_quiet(p)
    p.set_defaults(func=_cmd_synth)


def add_inspect(sub: SubParsers) -> None:
    """Register ``sasha inspect SLIDE ...``."""
    p = sub.add_parser(
        "inspect",
        help="print what slides say about themselves: vendor, levels with mpp, size, tissue",
        description="For each slide: the scanner vendor, every pyramid level with its "
        "downsample and um/px, the objective power, the size in pixels and mm, and the share "
        "of the slide that is tissue (the segmentation the patch grid uses). With --preset, "
        "also the levels that preset reads its high- and low-res patches from and how many "
        "patches the slide gives. A file that cannot be read gets an error line (a record "
        "with 'error' under --json) and the others go on; the exit status is then 1, as it "
        "is when --preset cannot lay its grid on a slide (unknown mpp, no tissue).",
    )
    p.add_argument("slides", type=Path, nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="also say how this preset's grid reads each slide",
    )
    add_mpp(p)
    p.add_argument("--json", action="store_true", help="one JSON record per slide and line")
    p.set_defaults(func=_cmd_inspect)


def add_extract(sub: SubParsers) -> None:
    """Register ``sasha extract CSV --out STORE``."""
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
    add_preset(p)
    add_mpp(p)
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
    add_quiet(p)
    add_scaleout(p)
    p.set_defaults(func=_cmd_extract)


def add_import(sub: SubParsers) -> None:
    """Register ``sasha import CSV --lowres DIR --highres DIR --out STORE``."""
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
    add_quiet(p)
    p.set_defaults(func=_cmd_import)


def _cmd_synth(args: argparse.Namespace) -> int:
    from ..slides.synth import SynthConfig, synthesize_cohort  # lazy: scipy, tifffile

    cfg = validate_config(load_config(args.preset, args.config), ["synth"])
    synth_cfg = SynthConfig.from_dict(cfg.get("synth", {}))
    if args.slides is not None:
        if args.slides < 2:
            raise ValueError("--slides must be at least 2 (one per class)")
        synth_cfg.n_slides = args.slides
    manifest = synthesize_cohort(
        args.out_dir, synth_cfg, seed=args.seed, progress=not args.quiet, jobs=args.jobs
    )
    print(f"wrote {synth_cfg.n_slides} slides; manifest: {manifest}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..slides.grid import GridConfig  # lazy: scipy, scikit-image
    from ..slides.inspect import format_inspection, inspect_slide  # lazy: as above

    grid = None
    if args.preset is not None:
        cfg = validate_config(load_config(args.preset), ["grid"])
        grid = GridConfig.from_dict(cfg.get("grid"))
    failed = 0
    for i, path in enumerate(args.slides):
        try:
            record = inspect_slide(path, grid=grid, fallback_mpp=args.mpp)
        except Exception as exc:  # one bad file never stops the others
            failed += 1
            if args.json:
                print(json.dumps({"slide": str(path), "error": str(exc)}), flush=True)
            else:
                print(f"sasha inspect: error: {exc}", file=sys.stderr, flush=True)
            continue
        failed += "error" in record.get("grid", {})
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(("\n" if i else "") + format_inspection(record, args.preset), flush=True)
    return EXIT_PARTIAL if failed else EXIT_OK


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..features.extract_config import ExtractConfig
    from ..slides.grid import GridConfig  # lazy: scipy, scikit-image
    from ..slides.manifest import read_manifest_lenient

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
    overrides.update(mpp_overrides(args).get("extract", {}))
    cfg = validate_config(
        load_config(args.preset, args.config, {"extract": overrides}), ["grid", "extract"]
    )
    read_manifest_lenient(args.manifest)  # an unusable manifest is reported before torch loads
    from ..features.extract import extract_cohort  # lazy: torch, Lightning

    report = extract_cohort(
        args.manifest,
        args.out,
        GridConfig.from_dict(cfg.get("grid")),
        ExtractConfig.from_dict(cfg.get("extract")),
        devices=parse_devices(args.devices),
        strategy=args.strategy,
        accelerator=args.accelerator,
        num_nodes=args.num_nodes,
        progress=not args.quiet,
    )
    if is_rank_zero():
        print(report.summary())
    return EXIT_OK if report.ok else EXIT_PARTIAL


def _cmd_import(args: argparse.Namespace) -> int:
    from ..features.importer import import_cohort  # lazy: zarr

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
    return EXIT_OK if report.ok else EXIT_PARTIAL
