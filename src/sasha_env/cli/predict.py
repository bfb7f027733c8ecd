"""The ``predict`` verb: diagnose new slides with a finished workdir's agent, one JSON record
per slide on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..slides.manifest import read_manifest
from ..threads import let_idle_threads_sleep
from .common import EXIT_OK, EXIT_PARTIAL, SubParsers, add_mpp, zoom_budget

#: ``--adaptive``'s and ``--learned-stop``'s default cap: the budget of the agent that reads at most this much.
F_MAX = 0.2


def add_predict(sub: SubParsers) -> None:
    """Register ``sasha predict --workdir DIR SLIDE ...``."""
    p = sub.add_parser(
        "predict",
        help="diagnose new slides from disk, zooming only where the agent chooses",
        description="For each slide: segment tissue, embed the low-res patches, then let the "
        "trained agent zoom: only the chosen patches' high-res regions are read, embedded and "
        "distilled, and the TSU updates similar patches. Prints one JSON record per line "
        "(probabilities, predicted label, zoomed patch coordinates in level-0 pixels with their "
        "side, fraction of high-res sub-patches read, bytes read from the slide file, seconds "
        "per phase). --full reads every high-res sub-patch instead (the baseline); --adaptive "
        "stops each slide when the agent is confident; --learned-stop runs an agent trained "
        "to stop by itself. Probabilities are calibrated with the "
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
        "--frac",
        type=zoom_budget,
        default=None,
        help="zoom budget f in (0, 1]; its agent must exist (default: 0.1; with --adaptive, "
        "the cap: 0.2)",
    )
    mode.add_argument(
        "--full", action="store_true", help="read every high-res sub-patch (the baseline)"
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="stop each slide when the calibrated classifier is confident (thresholds fitted on "
        "the val split, stored with the agent) or at the agent's budget --frac (the cap); "
        "records add 'stopped' (confident/cap) and 'referred' (true: read this slide in full)",
    )
    p.add_argument(
        "--learned-stop",
        action="store_true",
        help="run the learned-stop agent of cap --frac (trained with 'agents: {stop: learned}'; "
        "default cap 0.2), which decides by itself when to stop; records add 'stopped' "
        "(learned/cap)",
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
        "--batch-slides",
        type=_at_least_one,
        default=None,
        metavar="B",
        help="slides zoomed in lockstep: each zoom step reads the patches the agents of B slides "
        "chose (a small thread pool) and embeds their sub-patches in one backbone forward; the "
        "records are those of one slide at a time, in input order. Memory grows with B (each "
        "slide in flight holds its N x d state). 1: one slide at a time (default: 8)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the backbone runs, e.g. cpu or cuda (default: cpu); the small models stay "
        "on the CPU",
    )
    add_mpp(p)
    p.set_defaults(func=_cmd_predict)


def _at_least_one(text: str) -> int:
    """An integer of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_predict(args: argparse.Namespace) -> int:
    # OpenMP threads that finish a parallel region wait passively, not spinning: between two
    # backbone forwards predict reads tiles and steps environments on one thread, and on a
    # shared CPU spinning threads took the cores those need (10-35x slower, docs/benchmarks.md).
    # Read when torch loads its OpenMP, below; OMP_WAIT_POLICY=ACTIVE in the environment wins,
    # and SASHA_PASSIVE_THREADS=0 leaves OpenMP's policy.
    let_idle_threads_sleep()
    from ..predict import BATCH_SLIDES, Predictor, SlideRequest, unique_slide_ids  # lazy: torch

    slides: list[Path] = [Path(s) for s in args.slides]
    given: list[str | None] = [None] * len(slides)
    mpps: list[float | None] = [None] * len(slides)
    if args.manifest is not None:
        records = read_manifest(args.manifest).records
        slides += [r.path for r in records]
        given += [r.slide_id for r in records]
        mpps += [r.mpp for r in records]
    if not slides:
        raise ValueError("give slide files or --manifest CSV")
    if args.geojson is not None and args.full:
        raise ValueError("--geojson draws the agent's zooms: it needs SASHA mode, not --full")
    if args.adaptive and args.full:
        raise ValueError("--adaptive stops the agent's reading early: it cannot go with --full")
    stops_early = args.adaptive or args.learned_stop
    frac = args.frac if args.frac is not None else F_MAX if stops_early else 0.1
    predictor = Predictor(
        args.workdir,
        frac=frac,
        adaptive=args.adaptive,
        learned_stop=args.learned_stop,
        full=args.full,
        batch_size=args.batch_size,
        device=args.device,
        calibration=None if args.calibration == "none" else args.calibration,
        mpp=args.mpp,
    )
    requests = [
        SlideRequest(path, sid, mpp, args.pictures / f"{sid}.png" if args.pictures else None)
        for path, sid, mpp in zip(slides, unique_slide_ids(slides, given), mpps, strict=True)
    ]
    batch_slides = args.batch_slides or BATCH_SLIDES
    failed = 0
    for record in predictor.predict_many(requests, args.geojson, batch_slides):
        failed += "error" in record  # one bad slide never stops the others
        print(json.dumps(record), flush=True)
    return EXIT_PARTIAL if failed else EXIT_OK
