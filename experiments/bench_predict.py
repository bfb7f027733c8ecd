"""Compute cost of SASHA on raw slides: SASHA-0.1, SASHA-0.2 and --full, side by side.

    python experiments/bench_predict.py                         # SASHA's patch geometry (224 px)
    python experiments/bench_predict.py --workdir demo-run      # a finished workdir's test slides
    python experiments/bench_predict.py --workdir demo-run --slides-from large/manifest.csv
                                        # CAMELYON-sized slides (sasha synth large --preset large)

Without ``--workdir`` the script builds its own setting under ``--out`` (resumable: finished
slides and stages are kept): a small synthetic training cohort at SASHA's patch geometry
(``experiments/bench_predict.yaml``: 224-px sub-patches at 0.5 um/px, 4x4 of them under each
224-px low-res patch at 2 um/px, EfficientNet-Lite0 at 224 px), the pipeline stages the
agents need, and larger slides to time. With ``--workdir`` it times that workdir's slides of
``--split`` (the demo's 32-px patches: a regime where fixed per-call costs dominate), or, with
``--slides-from CSV``, the slides of that manifest (one workdir slide warms up, uncounted): the
large preset's slides have over 10,000 patches, where the costs that grow with N show.

For each timed slide, each mode runs in turn in one process (modes rotate between slides, so
that drift of a shared machine hits all alike; one warm-up slide is not counted). Reported:
wall time per slide by phase, and the peak memory the prediction adds (``/proc/self/
clear_refs`` resets the peak before every slide, after ``malloc_trim`` returns freed heap to
the OS; peak RSS minus RSS before the slide: pixels, features, activations, not the libraries
and models loaded once).
Targets: --full / SASHA-0.1 >= 5x time, --full / SASHA-0.2 >= 3.5x, SASHA peak <= half of --full's.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import yaml

from procfs import proc_kib, reset_peak  # experiments/procfs.py, next to this script
from sasha_env.config import load_config
from sasha_env.features.embed import embed_patches
from sasha_env.pipeline.runner import Pipeline
from sasha_env.predict import Predictor
from sasha_env.slides.manifest import read_manifest
from sasha_env.slides.synth import SynthConfig, synthesize_cohort
from sasha_env.workdir import Workdir

T = TypeVar("T")

MODES = {"sasha-0.1": dict(frac=0.1), "sasha-0.2": dict(frac=0.2), "full": dict(full=True)}
HERE = Path(__file__).resolve().parent

#: a CAMELYON16 slide: level 0 ~100k x 200k px at 0.24 um/px, tissue on ~25 % of the glass
CAMELYON_TISSUE_MM2 = 100_000 * 200_000 * 0.243**2 * 1e-6 * 0.25


def _peak_added_mib(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the peak memory it added on top of this process's RSS before it, MiB."""
    reset_peak()
    before = proc_kib("VmRSS")
    result = fn()
    return result, (proc_kib("VmHWM") - before) / 1024


def build_setting(out: Path, config: Path, n_slides: int, progress: bool) -> tuple[Path, list]:
    """Train the pipeline's models on a small cohort at ``config``'s geometry; synth slides.

    Returns:
        The workdir and the paths of ``n_slides`` slides to time.
    """
    spec = yaml.safe_load(config.read_text())
    bench_slides = spec.pop("bench_slides", {})
    cfg = load_config("demo", None, spec)
    seed = int(cfg.get("seed", 0))
    manifest = synthesize_cohort(
        out / "cohort", SynthConfig.from_dict(cfg["synth"]), seed=seed, progress=progress
    )
    pipe = Pipeline(out / "workdir", manifest=manifest, overrides=spec, progress=progress)
    pipe.run(["extract", "hafed", "distill", "tsu", "agents"])
    slides_cfg = SynthConfig.from_dict({**cfg["synth"], **bench_slides, "n_slides": n_slides})
    slides = synthesize_cohort(out / "slides", slides_cfg, seed=seed + 1, progress=progress)
    return pipe.wd.root, [r.path for r in read_manifest(slides).records]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=None, help="time this workdir's slides")
    p.add_argument("--split", default="test", help="with --workdir: the split to time")
    p.add_argument(
        "--slides-from",
        type=Path,
        default=None,
        metavar="CSV",
        help="with --workdir: time the slides of this manifest instead (e.g. the large preset's)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-predict-run"), help="own setting")
    p.add_argument("--config", type=Path, default=HERE / "bench_predict.yaml")
    p.add_argument("--slides", type=int, default=4, help="slides timed (plus one warm-up)")
    p.add_argument("--batch-size", type=int, default=None, help="see sasha predict --help")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    if args.workdir is None:
        root, paths = build_setting(args.out, args.config, args.slides + 1, not args.quiet)
    else:
        root = Workdir(args.workdir).root
        records = read_manifest(Workdir(root).manifest).records
        paths = [r.path for r in records if r.split == args.split][: args.slides + 1]
        if args.slides_from is not None:  # a workdir slide warms up, these are timed
            timed = [r.path for r in read_manifest(args.slides_from).records]
            paths = paths[:1] + timed[: args.slides]
    predictors = {m: Predictor(root, batch_size=args.batch_size, **kw) for m, kw in MODES.items()}
    for predictor in predictors.values():
        predictor.predict(paths[0])  # warm-up (kernels, caches)

    seconds: dict[str, list[float]] = defaultdict(list)
    peaks: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    images: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    n_patches = []
    for i, path in enumerate(paths[1:]):
        order = list(MODES)[i % 3 :] + list(MODES)[: i % 3]
        for mode in order:
            out, peak = _peak_added_mib(partial(predictors[mode].predict, path))
            peaks[mode].append(peak)
            seconds[mode].append(out["seconds"]["total"])
            for phase, s in out["seconds"].items():
                phases[mode][phase] += s
            k = predictors[mode].grid_cfg.zoom ** 2
            images[mode]["embed_lowres"] += 0 if mode == "full" else out["n_patches"]
            images[mode]["embed_highres"] += round(out["frac_read"] * out["n_patches"]) * k
        n_patches.append(out["n_patches"])
    n = len(paths) - 1
    p0 = predictors["full"]
    print(
        f"\n{n} slides ({min(n_patches)}-{max(n_patches)} patches, k = {p0.grid_cfg.zoom**2}, "
        f"{p0.grid_cfg.patch_px}-px patches fed at {p0.input_px} px, backbone batch "
        f"{p0.batch_size}) of {root}; per slide, mean"
    )
    print("| mode | seconds | peak MiB added | time vs full | memory vs full |")
    print("|---|---|---|---|---|")
    full_t, full_m = np.mean(seconds["full"]), np.mean(peaks["full"])
    for mode in MODES:
        t, m = np.mean(seconds[mode]), np.mean(peaks[mode])
        print(f"| {mode} | {t:.3f} | {m:.1f} | {full_t / t:.2f}x faster | {m / full_m:.2f} |")

    print("\nwhere the time goes (seconds per slide):")
    names = ["tissue", "read_lowres", "embed_lowres", "agent", "read_highres", "embed_highres"]
    names += ["distill", "update", "classify"]
    print("| mode | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mode in MODES:
        row = [f"{phases[mode].get(name, 0.0) / n:.3f}" for name in names]
        print(f"| {mode} | " + " | ".join(row) + " |")
    print("\nbackbone ms per image:")
    for mode in MODES:
        parts = [
            f"{ph} {1000 * phases[mode][ph] / images[mode][ph]:.2f}"
            for ph in ("embed_lowres", "embed_highres")
            if images[mode][ph]
        ]
        print(f"  {mode}: " + ", ".join(parts))

    r1, r2 = full_t / np.mean(seconds["sasha-0.1"]), full_t / np.mean(seconds["sasha-0.2"])
    mem = max(np.mean(peaks["sasha-0.1"]), np.mean(peaks["sasha-0.2"])) / full_m
    print(
        f"\nfull/SASHA-0.1 = {r1:.2f}x (target 5x) {'PASS' if r1 >= 5 else 'MISS'}; "
        f"full/SASHA-0.2 = {r2:.2f}x (target 3.5x) {'PASS' if r2 >= 3.5 else 'MISS'}; "
        f"SASHA peak / full's = {mem:.2f} (target <= 0.5) {'PASS' if mem <= 0.5 else 'MISS'}"
    )
    floors = {b: _forward_peak_mib(p0, b) for b in sorted({p0.batch_size, p0.grid_cfg.zoom**2})}
    print(
        "one backbone forward alone adds (peak MiB): "
        + ", ".join(f"{m:.1f} at {b} images" for b, m in floors.items())
        + "; the rest of a peak is what a mode holds (full: the N x k x d bag; SASHA: N x d)"
    )
    _camelyon_estimate(p0, phases, n, np.mean(n_patches))


def _forward_peak_mib(predictor: Predictor, batch: int) -> float:
    """Peak memory one backbone forward of ``batch`` patches adds: a floor every mode shares."""
    px = predictor.grid_cfg.patch_px
    pixels = torch.randint(0, 256, (batch, px, px, 3), dtype=torch.uint8)
    embed_patches(predictor.backbone, pixels, predictor.input_px)  # warm
    return _peak_added_mib(partial(embed_patches, predictor.backbone, pixels, predictor.input_px))[
        1
    ]


def _camelyon_estimate(p0: Predictor, phases: dict, n_slides: int, mean_patches: float) -> None:
    """Scale the measured per-patch costs to a CAMELYON16 slide (time grows with N)."""
    cell_um = p0.grid_cfg.patch_px * p0.grid_cfg.zoom * (p0.cohort_mpp or 0.5)
    n_cam = CAMELYON_TISSUE_MM2 / (cell_um / 1000) ** 2
    print(
        f"\nCAMELYON16-sized slide, from these per-patch costs: ~{n_cam:.0f} tissue patches "
        f"of {cell_um:.0f} um ({n_cam * p0.grid_cfg.zoom**2:.0f} high-res sub-patches)"
    )
    for mode in MODES:
        per_patch = sum(phases[mode].values()) - phases[mode]["total"]
        print(f"  {mode}: ~{per_patch / n_slides / mean_patches * n_cam / 60:.1f} min")


if __name__ == "__main__":
    main()
