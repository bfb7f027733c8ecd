"""What the ``he-cpu`` preset costs on this machine's CPU: seconds per slide and per 1,000 patches.

    nice -n 5 python experiments/bench_he_cpu.py [--mosaic 3] [--out DIR]

Real H&E only: the vendored Aperio SVS (``tests/data/cmu_small_region.svs``, 20x, 0.499 µm/px,
1.1 x 1.5 mm) and a larger slide made of it, a ``--mosaic`` x ``--mosaic`` mosaic of the same
region (flipped tile by tile, written as a tiled JPEG pyramid at the same mpp). Each slide is
extracted with he-cpu's grid and backbone into a fresh store (``extract_cohort``: tissue and
grid, reading, EfficientNet-Lite0 on every low-res patch and its 16 high-res sub-patches,
writing), and the backbone alone is timed on 128-px images for comparison. Prints one JSON
object: per slide its patches, wall-clock and CPU seconds (all threads of the process), both
per 1,000 patches, the machine's load average before and after, the date and the commit. On a
shared machine the wall-clock numbers are upper bounds; the CPU seconds are what the work
itself took (on an otherwise idle machine, wall-clock ≈ CPU seconds / the cores it uses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
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
from sasha_env.slides.grid import GridConfig
from sasha_env.slides.slide import Slide
from sasha_env.slides.synth import write_pyramid_tiff

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT / "tests" / "data" / "cmu_small_region.svs"


def mosaic_slide(path: Path, n: int) -> Path:
    """An ``n x n`` mosaic of the SVS's region (tiles flipped in turn), at the SVS's mpp."""
    with Slide(SVS) as slide:
        region = slide.read_rect(0, 0, *slide.dimensions, 1.0)
        mpp = slide.mpp
    assert mpp is not None
    rows = [
        np.concatenate([region[:: 1 - 2 * (r % 2), :: 1 - 2 * (c % 2)] for c in range(n)], 1)
        for r in range(n)
    ]
    write_pyramid_tiff(path, np.concatenate(rows, 0), (1, 4, 16), mpp=mpp, tile_px=256)
    return path


def extract_one(path: Path, work: Path, grid: GridConfig, extract: ExtractConfig) -> dict:
    """Extract one slide into a fresh store; its patches and seconds."""
    manifest = work / f"{path.stem}.csv"
    manifest.write_text(f"slide_id,path,label\n{path.stem},{path},x\n")
    out = work / f"{path.stem}.zarr"
    t0, c0 = time.perf_counter(), time.process_time()
    report = extract_cohort(manifest, out, grid, extract, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert report.ok, report.summary()
    info = FeatureStore(out).slide_info(path.stem)
    with Slide(path) as slide:
        w, h = slide.dimensions
        size_mm = [round(w * slide.mpp / 1000, 2), round(h * slide.mpp / 1000, 2)]
    return {
        "slide": path.name,
        "size_mm": size_mm,
        "patches": info.n_patches,
        "images": info.n_patches * (1 + grid.k),
        "seconds": round(seconds, 1),
        "seconds_per_1000_patches": round(seconds / info.n_patches * 1000, 1),
        "cpu_seconds": round(cpu, 1),
        "cpu_seconds_per_1000_patches": round(cpu / info.n_patches * 1000, 1),
    }


def backbone_ms_per_image(extract: ExtractConfig, repeats: int = 3) -> float:
    """CPU milliseconds per 128-px image of the backbone alone, in he-cpu's batches."""
    backbone = build_backbone(extract.backbone)
    px = int(extract.input_px or backbone.input_px)
    images = torch.randint(0, 255, (extract.batch_size, px, px, 3), dtype=torch.uint8)
    embed_patches(backbone, images[:4], px)  # warm-up
    t0 = time.process_time()
    for _ in range(repeats):
        embed_patches(backbone, images, px)
    return (time.process_time() - t0) / (repeats * len(images)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mosaic", type=int, default=3, help="mosaic side (default: 3)")
    parser.add_argument("--out", type=Path, default=None, help="keep the slides and stores here")
    args = parser.parse_args()
    cfg = load_config("he-cpu")
    grid, extract = GridConfig.from_dict(cfg["grid"]), ExtractConfig.from_dict(cfg["extract"])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        big = mosaic_slide(work / f"cmu_mosaic{args.mosaic}.tif", args.mosaic)
        slides = [extract_one(p, work, grid, extract) for p in (SVS, big)]
    result = {
        "preset": "he-cpu",
        "grid": {"hi_mpp": grid.hi_mpp, "patch_px": grid.patch_px, "zoom": grid.zoom},
        "slides": slides,
        "backbone_cpu_ms_per_image": round(backbone_ms_per_image(extract), 1),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
