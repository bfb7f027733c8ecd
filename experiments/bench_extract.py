"""Extraction throughput vs the backbone's bare forward rate, measured side by side.

    python experiments/bench_extract.py [--slides 8] [--preset demo] [--workdir DIR]

1. Synthesises ``--slides`` slides of the preset's cohort (kept in ``--workdir`` between runs).
2. Times ``extract_cohort`` end to end into a fresh store: reading, decoding, tissue and grid,
   the backbone, and writing (images/s, where a patch brings 1 low-res + k high-res images).
3. Loads exactly the same patches into memory and times the backbone alone on them, batch
   for batch (images/s).

Prints both and their ratio; the target is >= 0.80 (reading and decoding hidden behind compute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sasha_env.config import load_config
from sasha_env.features.backbones import build_backbone
from sasha_env.features.embed import embed_patches
from sasha_env.features.extract import ExtractConfig, extract_cohort
from sasha_env.features.store import FeatureStore
from sasha_env.slides.grid import GridConfig, PatchGrid
from sasha_env.slides.patches import read_patch
from sasha_env.slides.slide import Slide
from sasha_env.slides.synth import SynthConfig, synthesize_cohort


def bare_forward_rate(store: FeatureStore, extract_cfg: ExtractConfig) -> tuple[float, int]:
    """Images/s of the backbone alone on the store's patches, already decoded in memory."""
    backbone = build_backbone(store.info.backbone)
    images = []
    for sid in store.slide_ids():
        info = store.slide_info(sid)
        grid = PatchGrid(
            coords=store.read(sid, "coords"),
            cells=store.read(sid, "cells"),
            tissue=store.read(sid, "tissue"),
            shape=info.shape,
            hi_downsample=info.hi_downsample,
            lo_downsample=info.lo_downsample,
            patch_px=info.patch_px,
            zoom=info.zoom,
        )
        with Slide(info.path) as slide:
            for i in range(grid.n):
                lo, hi = read_patch(slide, grid, i)
                images.append(lo)
                images.extend(hi)
    pixels = torch.from_numpy(np.stack(images))
    bs = extract_cfg.batch_size
    input_px = store.info.input_px
    embed_patches(backbone, pixels[:bs], input_px)  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(pixels), bs):
        embed_patches(backbone, pixels[start : start + bs], input_px)
    return len(pixels) / (time.perf_counter() - t0), len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--preset", default="demo")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sasha-bench-extract"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1],
        help="DataLoader worker counts to time (default: 0 1)",
    )
    args = parser.parse_args()

    cfg = load_config(args.preset)
    synth = SynthConfig.from_dict(cfg["synth"])
    synth.n_slides = args.slides
    cohort = args.workdir / f"cohort-{args.preset}-{args.slides}"
    manifest = synthesize_cohort(cohort, synth, seed=0, progress=False)
    grid_cfg = GridConfig.from_dict(cfg["grid"])
    extract_cfg = ExtractConfig.from_dict(cfg["extract"])
    build_backbone(extract_cfg.backbone)  # load once: every run then finds the weights cached

    rates: dict[int, float] = {}
    for workers in args.workers:
        extract_cfg.num_workers = workers
        out = args.workdir / f"features-w{workers}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = extract_cohort(manifest, out, grid_cfg, extract_cfg, progress=False)
        seconds = time.perf_counter() - t0
        assert report.ok, report.summary()
        n_images = report.n_patches * (1 + grid_cfg.k)
        rates[workers] = n_images / seconds
    bare_rate, n_bare = bare_forward_rate(FeatureStore(out), extract_cfg)
    assert n_bare == n_images

    print(
        f"preset={args.preset} slides={args.slides} patches={report.n_patches} images={n_images} "
        f"batch={extract_cfg.batch_size} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}"
    )
    print("| measure | images/s | vs bare |")
    print("|---|---|---|")
    for workers, rate in rates.items():
        print(
            f"| extraction pipeline, {workers} DataLoader worker(s) (read, decode, grid, embed, write) | {rate:.0f} | {rate / bare_rate:.2f} |"
        )
    print(f"| backbone bare forward on the same images, in memory | {bare_rate:.0f} | 1.00 |")
    best = max(rates.values()) / bare_rate
    print(
        f"best pipeline/bare = {best:.2f} (target >= 0.80) -> {'PASS' if best >= 0.8 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
