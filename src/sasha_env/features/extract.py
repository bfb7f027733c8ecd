"""Feature extraction: every slide of a manifest into the zarr feature store.

DataLoader workers open slides, segment tissue, lay the grid and decode patches (one slide
per worker at a time) while the main process runs the backbone, so reading hides behind
compute. Lightning's ``Trainer.predict`` runs the loop, which gives multi-GPU / multi-node
scale-out (``devices``, ``strategy="ddp"``) for free: slides are sharded across ranks, and
each rank writes whole slides into the shared store.

Robustness: a slide that cannot be read (missing, truncated, not a slide, no tissue,
smaller than one patch, unsafe or duplicate id) is named, skipped and summarised, and the
others are extracted. Finished slides are skipped on the next run unless their file changed
(each slide group records its file's size, time and a content fingerprint as ``source``); a
slide is written to staging and renamed into place, so a killed run never leaves a
half-written slide.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..atomic import replace_atomically, write_json
from ..config import quiet_lightning
from ..distributed import is_rank_zero
from ..slides.grid import GridConfig, PatchGrid, build_grid
from ..slides.manifest import SlideRecord, file_identity, read_manifest_lenient
from ..slides.patches import LowResRows, read_patch
from ..slides.slide import Slide
from .backbones import Backbone, build_backbone
from .embed import embed_patches
from .extract_config import ExtractConfig
from .records import SlideInfo, StoreInfo
from .store import FeatureStore

__all__ = ["ExtractConfig", "ExtractReport", "extract_cohort", "store_info"]


@dataclass
class ExtractReport:
    """What a run did. ``failed`` maps slide id → error message."""

    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_patches: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"extracted {len(self.extracted)} slide(s), {self.n_patches} patches "
            f"in {self.seconds:.1f} s; {len(self.skipped)} already in the store; "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  FAILED {sid}: {msg}" for sid, msg in sorted(self.failed.items())]
        return "\n".join(lines)


def store_info(backbone: Backbone, grid_cfg: GridConfig, input_px: int) -> StoreInfo:
    """The root attributes of a store ``backbone`` fills on ``grid_cfg``'s grid, with patches
    resized to ``input_px`` pixels."""
    return StoreInfo(
        backbone=backbone.name,
        backbone_dim=backbone.dim,
        backbone_input_px=backbone.input_px,
        backbone_weights_sha256=backbone.weights_sha256,
        backbone_mean=tuple(float(v) for v in backbone.mean.flatten()),
        backbone_std=tuple(float(v) for v in backbone.std.flatten()),
        input_px=int(input_px),
        patch_px=grid_cfg.patch_px,
        zoom=grid_cfg.zoom,
        hi_downsample=grid_cfg.hi_downsample,
        hi_mpp=grid_cfg.hi_mpp,
        min_tissue=grid_cfg.min_tissue,
        grid=asdict(grid_cfg),
    )


# ---------------------------------------------------------------------------- records
# What flows from the reader (DataLoader) through the backbone (LightningModule) to the
# writer (callback). Plain dataclasses: Lightning moves their tensors to the device.


@dataclass
class SlideHeader:
    """A slide is about to be read: its grid and the attributes its store group gets."""

    slide_id: str
    grid: PatchGrid
    info: SlideInfo


@dataclass
class SlideFailed:
    """A slide could not be read; ``message`` names the problem."""

    slide_id: str
    message: str


@dataclass
class PixelBatch:
    """Pixels of ``B`` patches, possibly of several slides (batches fill across slides).

    Attributes:
        slide_ids, index: the slide and patch index of each of the B patches.
        lo: ``(B, P, P, 3)`` uint8 low-res views.
        hi: ``(B, k, P, P, 3)`` uint8 high-res sub-patches, row-major.
    """

    slide_ids: list[str]
    index: list[int]
    lo: torch.Tensor
    hi: torch.Tensor


@dataclass
class FeatureBatch:
    """Backbone features of a :class:`PixelBatch`: ``lo (B, d)``, ``hi (B, k, d)`` float32."""

    slide_ids: list[str]
    index: list[int]
    lo: np.ndarray
    hi: np.ndarray


ReaderItem = SlideHeader | SlideFailed | PixelBatch
WriterItem = SlideHeader | SlideFailed | FeatureBatch


# ---------------------------------------------------------------------------- data


class _SlidePatches(IterableDataset):
    """Yields, per slide, a :class:`SlideHeader`, :class:`PixelBatch` items, or a :class:`SlideFailed`.

    Slides are sharded over ranks (``rank::world``) and then over DataLoader workers, so that
    each slide is read by exactly one worker of one process.
    """

    def __init__(
        self,
        records: list[SlideRecord],
        grid_cfg: GridConfig,
        patches_per_batch: int,
        qc_dir: Path | None,
        fallback_mpp: float | None = None,
    ):
        self.records = records
        self.grid_cfg = grid_cfg
        self.fallback_mpp = fallback_mpp
        self.patches_per_batch = max(1, patches_per_batch)
        self.qc_dir = qc_dir

    def __iter__(self) -> Iterator[ReaderItem]:
        if get_worker_info() is None:  # no DataLoader workers: read in a thread instead
            return _prefetched(self._items(), depth=4)
        return self._items()

    def _items(self) -> Iterator[ReaderItem]:
        """Batches are filled across slide boundaries, so every forward pass is full size."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        pending: list[tuple[str, int, np.ndarray, np.ndarray]] = []
        for record in self.records[wid::nw]:
            for item in self._slide_items(record):
                if isinstance(item, tuple):
                    pending.append(item)
                    if len(pending) == self.patches_per_batch:
                        yield _batch(pending)
                        pending = []
                else:
                    yield item
        if pending:
            yield _batch(pending)

    def _slide_items(
        self, record: SlideRecord
    ) -> Iterator[SlideHeader | SlideFailed | tuple[str, int, np.ndarray, np.ndarray]]:
        """A header, then ``(slide_id, i, lo, hi)`` per patch; or a failure."""
        try:
            slide = Slide(record.path, mpp=record.mpp, fallback_mpp=self.fallback_mpp)
        except Exception as exc:
            yield SlideFailed(record.slide_id, _message(exc))
            return
        try:
            grid, thumb, mask, thumb_ds = build_grid(slide, self.grid_cfg)
        except Exception as exc:
            slide.close()
            yield SlideFailed(record.slide_id, _message(exc))
            return
        if self.qc_dir is not None:
            _write_qc(self.qc_dir / f"{record.slide_id}.png", thumb, mask, thumb_ds, grid)
        yield SlideHeader(
            record.slide_id,
            grid,
            SlideInfo(
                label=record.label,
                path=str(record.path),
                source=file_identity(record.path),
                dimensions=tuple(slide.dimensions),  # type: ignore[arg-type]
                mpp=slide.mpp,
                mpp_source=slide.mpp_source,
                level_downsamples=tuple(slide.level_downsamples),
                n_patches=grid.n,
                shape=tuple(grid.shape),  # type: ignore[arg-type]
                hi_downsample=grid.hi_downsample,
                lo_downsample=grid.lo_downsample,
                patch_px=grid.patch_px,
                zoom=grid.zoom,
            ),
        )
        try:
            lows = LowResRows(slide, grid)
            for i in range(grid.n):
                yield (record.slide_id, i, lows[i], read_patch(slide, grid, i, low=False)[1])
        except Exception as exc:
            yield SlideFailed(record.slide_id, _message(exc))
        finally:
            slide.close()


def _prefetched(items: Iterator[ReaderItem], depth: int) -> Iterator[ReaderItem]:
    """Run ``items`` in a background thread, ``depth`` items ahead.

    Without DataLoader worker processes this still overlaps reading and JPEG decoding (which
    release the GIL) with the backbone's forward pass; errors surface in the consumer.
    """
    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():  # never block forever once the consumer has gone
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            put(exc)
        put(done)

    threading.Thread(target=produce, daemon=True, name="sasha-read").start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _batch(patches: list[tuple[str, int, np.ndarray, np.ndarray]]) -> PixelBatch:
    """Stack patches (of one or more slides) into one batch."""
    return PixelBatch(
        slide_ids=[p[0] for p in patches],
        index=[p[1] for p in patches],
        lo=torch.from_numpy(np.stack([p[2] for p in patches])),
        hi=torch.from_numpy(np.stack([p[3] for p in patches])),
    )


def _message(exc: Exception) -> str:
    return str(exc) if str(exc) else type(exc).__name__


def _write_qc(
    path: Path, thumb: np.ndarray, mask: np.ndarray, thumb_ds: float, grid: PatchGrid
) -> None:
    """Thumbnail with the tissue mask tinted green and the kept patches outlined."""
    img = thumb.astype(np.float32)
    img[mask] = 0.7 * img[mask] + 0.3 * np.array([0, 200, 0], dtype=np.float32)
    pil = Image.fromarray(img.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    side = grid.cell_px / thumb_ds
    for x, y in grid.coords / thumb_ds:
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(20, 60, 200))
    replace_atomically(path, lambda tmp: pil.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------- Lightning


class _Extractor(L.LightningModule):
    """Embeds each :class:`PixelBatch`; passes slide headers and failures through."""

    def __init__(self, backbone: Backbone, input_px: int):
        super().__init__()
        self.backbone = backbone
        self.input_px = input_px

    def predict_step(self, item: ReaderItem, batch_idx: int) -> WriterItem:
        if not isinstance(item, PixelBatch):
            return item
        lo, hi = item.lo, item.hi
        b, k = hi.shape[:2]
        images = torch.cat([lo, hi.reshape(b * k, *hi.shape[2:])])
        feats = embed_patches(self.backbone, images, self.input_px).cpu()
        return FeatureBatch(
            slide_ids=item.slide_ids,
            index=item.index,
            lo=feats[:b].numpy(),
            hi=feats[b:].reshape(b, k, -1).numpy(),
        )


class _OpenSlide:
    """A slide whose patches are being embedded: rows filled as their batches arrive."""

    def __init__(self, header: SlideHeader) -> None:
        self.header = header
        self.lo: list[np.ndarray | None] = [None] * header.grid.n
        self.hi: list[np.ndarray | None] = [None] * header.grid.n
        self.left = header.grid.n


class _SlideWriter(L.Callback):
    """Assembles per-slide features and writes each finished slide atomically."""

    def __init__(self, store: FeatureStore, n_slides: int, progress: bool):
        self.store = store
        self.n_slides = n_slides  # over all ranks
        self.progress = progress
        self.open: dict[str, _OpenSlide] = {}
        self.report = ExtractReport()
        self._bar = None

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.progress and trainer.global_rank == 0:
            share = len(range(0, self.n_slides, trainer.world_size))
            self._bar = tqdm(
                total=share,
                desc="extract (rank 0)" if trainer.world_size > 1 else "extract",
                unit="slide",
            )

    def on_predict_batch_end(
        self, trainer, pl_module, out: WriterItem, batch, batch_idx, dataloader_idx=0
    ):
        if isinstance(out, FeatureBatch):
            for j, (sid, i) in enumerate(zip(out.slide_ids, out.index, strict=True)):
                slot = self.open.get(sid)
                if slot is None:  # the slide failed after these patches were read
                    continue
                slot.lo[i], slot.hi[i] = out.lo[j], out.hi[j]
                slot.left -= 1
                if slot.left == 0:
                    self._finish(self.open.pop(sid))
                    self._tick(trainer)
        elif isinstance(out, SlideFailed):
            self.open.pop(out.slide_id, None)
            self.report.failed[out.slide_id] = out.message
            self._tick(trainer, failed=True)
        elif isinstance(out, SlideHeader):
            self.open[out.slide_id] = _OpenSlide(out)

    def _finish(self, slot: _OpenSlide) -> None:
        grid = slot.header.grid
        arrays = {
            "lowres": np.stack(slot.lo).astype(np.float32),
            "highres": np.stack(slot.hi).astype(np.float32),
            "coords": grid.coords,
            "cells": grid.cells,
            "tissue": grid.tissue,
        }
        self.store.write_slide(slot.header.slide_id, arrays, slot.header.info)
        self.report.extracted.append(slot.header.slide_id)
        self.report.n_patches += grid.n

    def _tick(self, trainer, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if failed:
                self._bar.set_postfix(failed=len(self.report.failed))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
        for sid in self.open:  # slides whose batches never all arrived
            self.report.failed[sid] = "extraction stopped before all patches were embedded"
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[ExtractReport | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self.report)
            merged = ExtractReport()
            for rep in gathered:
                assert rep is not None
                merged.extracted += rep.extracted
                merged.failed.update(rep.failed)
                merged.n_patches += rep.n_patches
            self.report = merged


# ---------------------------------------------------------------------------- entry point


def extract_cohort(
    manifest: str | Path,
    out: str | Path,
    grid_cfg: GridConfig | None = None,
    extract_cfg: ExtractConfig | None = None,
    devices: int | str = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
    num_nodes: int = 1,
    progress: bool = True,
    dropped: Mapping[str, str] | None = None,
) -> ExtractReport:
    """Extract every slide of ``manifest`` into the store at ``out``.

    ``dropped`` (slide id → reason) names rows a caller already left out of ``manifest`` (the
    pipeline's copy of a user's manifest): they are reported as failed, with their reason.

    Returns:
        The report (on every rank; merged across ranks under DDP). Slides already in the
        store are listed as ``skipped``; failures map slide id to a message naming the problem.

    Raises:
        ManifestError: the manifest itself is unreadable (no header, missing columns).
        StoreError: ``out`` holds a store made with another backbone or grid.
    """
    t0 = time.perf_counter()
    grid_cfg = grid_cfg or GridConfig()
    extract_cfg = extract_cfg or ExtractConfig()
    parsed = read_manifest_lenient(manifest)
    backbone = build_backbone(extract_cfg.backbone, extract_cfg.backbone_checkpoint)
    input_px = extract_cfg.input_px or backbone.input_px
    store = FeatureStore.create(out, store_info(backbone, grid_cfg, input_px))
    store.clean_staging()

    report = ExtractReport(failed={**dict(dropped or {}), **parsed.errors})
    pending = []
    for record in parsed.manifest.records if parsed.manifest else []:
        if not record.path.is_file():
            if record.slide_id in store:  # extracted earlier; its file has moved since
                report.skipped.append(record.slide_id)
            else:
                report.failed[record.slide_id] = f"{record.path}: file not found"
        elif record.slide_id in store and not _changed(store, record, extract_cfg.mpp):
            report.skipped.append(record.slide_id)
        else:
            pending.append(record)  # new, or its file changed: (re-)extracted, then replaced

    if pending:
        quiet_lightning()
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[writer := _SlideWriter(store, len(pending), progress)],
        )
        data = _ExtractData(pending, grid_cfg, extract_cfg, store.path / "qc")
        (store.path / "qc").mkdir(exist_ok=True)
        trainer.predict(_Extractor(backbone, input_px), datamodule=data, return_predictions=False)
        report.extracted = writer.report.extracted
        report.failed.update(writer.report.failed)
        report.n_patches = writer.report.n_patches
    report.seconds = time.perf_counter() - t0
    if is_rank_zero():
        write_json(store.path / "extract_report.json", asdict(report))
    return report


def _changed(store: FeatureStore, record: SlideRecord, fallback_mpp: float | None = None) -> bool:
    """Whether the slide file differs from the one its store group was extracted from, or its
    resolution was given otherwise (another manifest ``mpp``, or another ``--mpp`` for a slide
    without usable metadata).

    Size and time first; the content fingerprint only when they differ (a copied cohort has new
    times but the same content). Groups written before sources were recorded count as unchanged.
    """
    info = store.slide_info(record.slide_id)
    if _mpp_changed(info, record, fallback_mpp):
        return True
    source = info.source
    if not source:
        return False
    now = file_identity(record.path, fingerprint=False)
    if (now["size"], now["mtime_ns"]) == (source.get("size"), source.get("mtime_ns")):
        return False
    return file_identity(record.path)["fingerprint"] != source.get("fingerprint")


def _mpp_changed(info: SlideInfo, record: SlideRecord, fallback_mpp: float | None) -> bool:
    """Whether the mpp a slide would be read at now differs from the one its group was read at,
    where a value other than the file's metadata decided it (then or now): a manifest ``mpp``
    wins; a slide read at ``--mpp`` before takes today's ``--mpp`` (none: it fails again, naming
    ``--mpp``); the others read their metadata, which changes only with the file."""
    before = (info.mpp_source, info.mpp) if info.mpp_source in ("manifest", "assumed") else None
    if record.mpp is not None:
        now: tuple[str, float | None] | None = ("manifest", record.mpp)
    elif before is not None:
        now = ("assumed", fallback_mpp)
    else:
        now = None
    return before != now


class _ExtractData(L.LightningDataModule):
    """Builds the predict DataLoader once the rank is known, sharding slides ``rank::world``."""

    def __init__(
        self,
        records: list[SlideRecord],
        grid_cfg: GridConfig,
        extract_cfg: ExtractConfig,
        qc_dir: Path,
    ):
        super().__init__()
        self.records, self.grid_cfg, self.extract_cfg, self.qc_dir = (
            records,
            grid_cfg,
            extract_cfg,
            qc_dir,
        )

    def transfer_batch_to_device(
        self, batch: ReaderItem, device: torch.device, dataloader_idx: int
    ) -> ReaderItem:
        """Move a :class:`PixelBatch` to ``device``; headers and failures hold no tensors
        (and Lightning's traversal refuses their frozen :class:`SlideInfo`)."""
        if not isinstance(batch, PixelBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        images_per_patch = 1 + self.grid_cfg.k
        dataset = _SlidePatches(
            self.records[rank::world],
            self.grid_cfg,
            patches_per_batch=self.extract_cfg.batch_size // images_per_patch,
            qc_dir=self.qc_dir,
            fallback_mpp=self.extract_cfg.mpp,
        )
        workers = self.extract_cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )
