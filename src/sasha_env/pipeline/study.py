"""``sasha study``: the pipeline over several seeds, and what the numbers are across them.

A single run answers with one split and one initialisation; a study repeats the pipeline for
S seeds, each with its own stratified split of the cohort and its own initial weights, so that
every method's number comes with its spread. Features are extracted once and shared::

    DIR/
      features.zarr/        the cohort's features, extracted once
      seed-<s>/             one pipeline workdir per seed (its store hard-links the shared
                            features and adds its own distilled arrays)
      study.json            per method: mean, sd and 95 % CI over seeds, per-seed numbers;
                            paired differences across seeds; the AUC-against-budget curve
      study.md              the same as Markdown tables

Each seed is a resumable pipeline run, so a killed study resumes at the seed and stage it was
in. Several processes (or machines sharing the folder) may run one study: each seed is claimed
with a lock file (``seed-<s>/.claim``), so no seed is trained twice at once, and whoever
finishes last writes ``study.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sasha_models.stats import mean_sd, t_interval

from ..atomic import replace_atomically, write_json
from ..config import load_config, say
from ..features.store import link_store
from ..slides.grid import GridConfig
from ..slides.manifest import Manifest, read_manifest
from ..workdir import Workdir
from .report import cap_label, markdown_table
from .runner import Pipeline
from .schema import validate_config

__all__ = ["Study", "aggregate", "format_study"]

_HOST = socket.gethostname()
#: Metrics summarised across seeds.
METRICS = ("auc", "accuracy", "f1", "ece")
#: What adaptive rows (``sasha_adaptive``, the threshold rule; ``sasha_learned_stop``, the
#: learned rule) add, summarised across seeds too.
ADAPTIVE_KEYS = (
    "mean_frac",
    "frac_p50",
    "frac_p90",
    "share_confident",
    "share_stopped",
    "max_frac",
)
#: Sampling rows' tumour measures (when the manifest has masks): mean and sd over seeds.
TUMOUR_KEYS = ("tumour_hit_rate", "tumour_found", "tumour_area_read")


@dataclass
class Study:
    """The pipeline over ``seeds`` in ``workdir``; see the module docstring for the layout.

    Args:
        workdir: the study folder.
        manifest: the cohort CSV. Its ``split`` column is ignored: every seed draws its own
            stratified split (``keep_split=True`` keeps the CSV's split for every seed).
        seeds: the seeds (default ``0 … 4``).
        preset, config_path, overrides: the configuration of every seed's pipeline.
        progress, log: progress bars and where messages go.
        group: the process id of the ``sasha study`` command this process belongs to (its
            own, or the one that started it as a ``--jobs`` helper), written into each seed's
            claim, so a seed another process of the same command is running is reported as
            shared out, not as taken by someone else. ``None``: this process's own id.
    """

    workdir: Path
    manifest: Path
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    preset: str = "demo"
    config_path: Path | None = None
    overrides: dict = field(default_factory=dict)
    keep_split: bool = False
    progress: bool = True
    log: Callable[[str], None] = say
    group: int | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.workdir)
        if not self.seeds:
            raise ValueError("a study needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        self._group = os.getpid() if self.group is None else int(self.group)

    # ------------------------------------------------------------------ running
    def run(self) -> dict | None:
        """Run every seed not finished or claimed by another process, then aggregate.

        Returns:
            The study summary when every seed has finished (also written to ``study.json``),
            else ``None`` (other processes are still running some seeds).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        cohort = self._cohort_manifest()
        for seed in self.seeds:
            wd = self.seed_dir(seed)
            claim = _Claim(wd.root / ".claim", group=self._group)
            if not claim.acquire():
                self.log(f"[study] seed {seed}: {claim.describe_holder()}")
                continue
            try:
                self._share_features(wd, cohort)
                state = "checking" if _finished(wd) else "running"
                self.log(f"[study] seed {seed}: {state} the pipeline in {wd.root}")

                def seed_log(m: str, s: int = seed) -> None:
                    self.log(f"[seed {s}] {m}")

                Pipeline(
                    wd.root,
                    manifest=cohort,
                    preset=self.preset,
                    config_path=self.config_path,
                    overrides={**self.overrides, "seed": seed},
                    progress=self.progress,
                    log=seed_log,
                ).run()
            finally:
                claim.release()
        if not all(_finished(self.seed_dir(s)) for s in self.seeds):
            waiting = [s for s in self.seeds if not _finished(self.seed_dir(s))]
            self.log(f"[study] seeds {waiting} are not finished yet; study.json not written")
            return None
        summary = aggregate({s: _results(self.seed_dir(s)) for s in self.seeds}, self.preset)
        write_json(self.root / "study.json", summary)
        text = format_study(summary) + "\n"
        replace_atomically(self.root / "study.md", lambda tmp: tmp.write_text(text))
        from .figures import budget_curve  # lazy: matplotlib, only once every seed is done

        points = [
            {
                "method": c["method"],
                "frac": c["frac"],
                "auc": c["auc_mean"],
                "lo": None if c["auc_sd"] is None else c["auc_mean"] - c["auc_sd"],
                "hi": None if c["auc_sd"] is None else c["auc_mean"] + c["auc_sd"],
            }
            for c in summary["budget_curve"]
        ]
        title = f"AUC against budget over {len(self.seeds)} seeds (bands: mean ± sd)"
        budget_curve(points, self.root / "budget_curve.png", title)
        if summary["adaptive_curve"]:
            from .figures import adaptive_curve  # lazy: matplotlib, as above

            rows = [
                {
                    **r,
                    "auc": r["auc_mean"],
                    "mean_frac": r.get("mean_frac_mean"),
                    "lo": _minus(r["auc_mean"], r["auc_sd"]),
                    "hi": _plus(r["auc_mean"], r["auc_sd"]),
                }
                for r in summary["methods"]
            ]
            curve = [
                {
                    **c,
                    "auc": c["auc_mean"],
                    "mean_frac": c["mean_frac_mean"],
                    "lo": _minus(c["auc_mean"], c["auc_sd"]),
                    "hi": _plus(c["auc_mean"], c["auc_sd"]),
                }
                for c in summary["adaptive_curve"]
            ]
            title = f"Adaptive reading over {len(self.seeds)} seeds (bands: mean ± sd)"
            adaptive_curve(rows, curve, self.root / "adaptive_curve.png", title)
        return summary

    def seed_dir(self, seed: int) -> Workdir:
        return Workdir(self.root / f"seed-{seed}")

    # ------------------------------------------------------------------ helpers
    def _cohort_manifest(self) -> Path:
        """The cohort without its split column (each seed draws its own), or as given."""
        if self.keep_split:
            return Path(self.manifest)
        manifest = read_manifest(self.manifest)
        records = [dataclasses.replace(r, split=None) for r in manifest.records]
        unsplit = Manifest(manifest.path, records, manifest.class_names)
        out = self.root / "cohort.csv"
        unsplit.write(out)
        return out

    def _share_features(self, wd: Workdir, cohort: Path) -> None:
        """Give the seed's workdir the shared features (extracting them once, first)."""
        if wd.store.exists():
            return
        shared = self.root / "features.zarr"
        claim = _Claim(self.root / ".features.claim")
        while not claim.acquire():  # another process is extracting: wait for it
            time.sleep(2)
        try:
            self._extract_once(shared, cohort)
        finally:
            claim.release()
        link_store(shared, wd.store)

    def _extract_once(self, shared: Path, cohort: Path) -> None:
        from ..features.extract import ExtractConfig, extract_cohort  # lazy: Lightning

        cfg = validate_config(load_config(self.preset, self.config_path, self.overrides))
        report = extract_cohort(
            cohort,
            shared,
            GridConfig.from_dict(cfg.get("grid")),
            ExtractConfig.from_dict(cfg.get("extract")),
            progress=self.progress,
        )
        if report.extracted or report.failed:
            self.log(f"[study] features: {report.summary()}")


def _finished(wd: Workdir) -> bool:
    return wd.results.is_file() and wd.marker("evaluate").is_file()


def _results(wd: Workdir) -> dict:
    return json.loads(wd.results.read_text())


class _Claim:
    """A lock file naming its holder (host, process id and the study command it belongs to);
    a holder on this host whose process is gone is stale."""

    def __init__(self, path: Path, group: int | None = None) -> None:
        self.path = path
        self.group = os.getpid() if group is None else group

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"host": _HOST, "pid": os.getpid(), "group": self.group}))
            return True
        return False

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"process {h['pid']} on {h['host']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def describe_holder(self) -> str:
        """Why this process leaves the claimed item alone, for the log: another ``--jobs``
        process of the same command has it (expected), another command does, or a process
        is claiming it this moment (the file is created before its holder is written)."""
        try:
            h = json.loads(self.path.read_text())
        except (OSError, ValueError):
            h = None
        if not isinstance(h, dict) or "pid" not in h:
            return "being claimed by another process right now; left to it"
        if h.get("host") == _HOST and h.get("group") == self.group:
            return f"left to process {h['pid']}, another --jobs process of this study"
        return (
            f"process {h['pid']} on {h.get('host')} is running it (another command on this "
            "study folder); skipped. "
            f"If that process is gone, delete {self.path} and run the study again"
        )

    def _stale(self) -> bool:
        try:
            h = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False  # being written right now
        if h.get("host") != _HOST:
            return False  # another machine's: cannot tell (remove the file by hand if dead)
        try:
            os.kill(int(h["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- numbers


def aggregate(per_seed: dict[int, dict[str, Any]], preset: str) -> dict[str, Any]:
    """``study.json`` from each seed's ``results.json`` (contract in design.md).

    Per method and budget: mean, sample sd and a 95 % Student-t interval over seeds of AUC,
    accuracy, F1 and ECE (:func:`~sasha_models.stats.mean_sd`,
    :func:`~sasha_models.stats.t_interval`), with the per-seed values; per ``paired`` comparison
    of the seeds' results: the mean over seeds of the per-seed difference and its t interval
    (each seed's difference is on its own test slides); and the AUC-against-budget curve.
    """
    seeds = sorted(per_seed)
    rows: dict[tuple[str, float], dict[int, dict]] = {}
    for seed in seeds:
        for m in per_seed[seed]["methods"]:
            rows.setdefault((m["method"], float(m["frac"])), {})[seed] = m
    methods = []
    for (method, frac), by_seed in rows.items():
        row: dict[str, Any] = {"method": method, "frac": frac, "n_seeds": len(by_seed)}
        for metric in METRICS:
            values = [by_seed[s].get(metric) for s in by_seed]
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean_sd(values)
            row[f"{metric}_ci"] = t_interval(values)
        row["per_seed"] = [
            {
                "seed": s,
                **{k: by_seed[s].get(k) for k in METRICS},
                "n_slides": by_seed[s].get("n_slides"),
            }
            for s in sorted(by_seed)
        ]
        for key in TUMOUR_KEYS:  # sampling rows, with masks: where the zooms landed
            if any(by_seed[s].get(key) is not None for s in by_seed):
                row[f"{key}_mean"], row[f"{key}_sd"] = mean_sd(
                    [by_seed[s].get(key) for s in by_seed]
                )
                for entry in row["per_seed"]:
                    entry[key] = by_seed[entry["seed"]].get(key)
        if row.get("tumour_found_mean") is not None:  # counts over every seed's test slides
            seen = [s for s in by_seed if by_seed[s].get("tumour_found") is not None]
            slides = [int(by_seed[s].get("tumour_slides") or 0) for s in seen]
            found = [by_seed[s]["tumour_found"] * n for s, n in zip(seen, slides, strict=True)]
            row["tumour_slides_total"] = sum(slides)
            row["tumour_missed_total"] = round(sum(slides) - sum(found), 3)
        for key in ADAPTIVE_KEYS:  # adaptive rows: how much each seed read
            if any(key in by_seed[s] for s in by_seed):
                values = [by_seed[s].get(key) for s in by_seed]
                if key == "max_frac" and any(v is not None for v in values):
                    values = [row["frac"] if v is None else v for v in values]  # cap not lowered
                row[f"{key}_mean"], row[f"{key}_sd"] = mean_sd(values)
                for entry in row["per_seed"]:
                    entry[key] = by_seed[entry["seed"]].get(key)
        calibrated = [by_seed[s]["calibrated"] for s in by_seed if by_seed[s].get("calibrated")]
        for kind in sorted({k for c in calibrated for k in c}):  # val-fitted, on test
            of_kind = [c[kind] for c in calibrated if kind in c]
            row.setdefault("calibrated", {})[kind] = {"n_seeds": len(of_kind)}
            for metric in ("accuracy", "ece"):
                mean, sd = mean_sd([v.get(metric) for v in of_kind])
                row["calibrated"][kind] |= {f"{metric}_mean": mean, f"{metric}_sd": sd}
        methods.append(row)
    pairs: dict[tuple[str, str, str], list[float]] = {}
    for seed in seeds:
        for p in per_seed[seed].get("paired", []):
            if p.get("diff") is not None:
                pairs.setdefault((p["a"], p["b"], p["metric"]), []).append(p["diff"])
    paired = [
        {
            "a": a,
            "b": b,
            "metric": metric,
            "diff_mean": mean_sd(diffs)[0],
            "diff_sd": mean_sd(diffs)[1],
            "ci": t_interval(diffs, bounds=(-1.0, 1.0)),
            "n_seeds": len(diffs),
        }
        for (a, b, metric), diffs in pairs.items()
    ]
    curve = sorted(
        (
            {
                "method": r["method"],
                "frac": r["frac"],
                "auc_mean": r["auc_mean"],
                "auc_sd": r["auc_sd"],
                **({"mean_frac_mean": r["mean_frac_mean"]} if "mean_frac_mean" in r else {}),
            }
            for r in methods
        ),
        key=lambda r: (r["method"], r["frac"]),
    )
    return {
        "seeds": seeds,
        "preset": preset,
        "n_test_slides": [per_seed[s].get("n_slides") for s in seeds],  # in seed order
        "methods": methods,
        "paired": paired,
        "budget_curve": curve,
        "adaptive_curve": _over_seeds(
            per_seed, "adaptive_curve", ("method", "frac", "threshold"), ("mean_frac", "auc")
        ),
        "referral": _over_seeds(
            per_seed,
            "referral",
            ("method", "frac"),
            (
                "share_referred",
                "sensitivity",
                "specificity",
                "cleared_at_full_sensitivity",
                "aurc",
            ),
        ),
    }


def _over_seeds(
    per_seed: dict[int, dict[str, Any]], field: str, by: tuple[str, ...], values: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Entries of each seed's ``results.json[field]`` grouped on the keys ``by``: per value,
    its mean and sd over the seeds that have it (``<value>_mean``, ``<value>_sd``)."""
    groups: dict[tuple, list[dict]] = {}
    for seed in sorted(per_seed):
        for entry in per_seed[seed].get(field) or []:
            groups.setdefault(tuple(entry[k] for k in by), []).append(entry)
    out = []
    for key, entries in groups.items():
        row: dict[str, Any] = dict(zip(by, key, strict=True)) | {"n_seeds": len(entries)}
        for v in values:
            row[f"{v}_mean"], row[f"{v}_sd"] = mean_sd([e.get(v) for e in entries])
        out.append(row)
    return out


def _minus(mean: float | None, sd: float | None) -> float | None:
    return None if mean is None or sd is None else mean - sd


def _plus(mean: float | None, sd: float | None) -> float | None:
    return None if mean is None or sd is None else mean + sd


def _frac(row: dict) -> str:
    """A row's budget; adaptive rows: their mean fraction read over seeds, and the cap (the
    mean of the caps ``adaptive.mean_frac`` lowered, with the agents' budget)."""
    if row.get("mean_frac_mean") is not None:
        cap = cap_label(row["frac"], row.get("max_frac_mean"))
        return f"{row['mean_frac_mean']:.2f} (cap {cap})"
    return f"{row['frac']:.2f}"


def format_study(summary: dict[str, Any]) -> str:
    """The study as Markdown: methods (mean ± sd [95 % CI] over seeds), then paired differences."""
    n = len(summary["seeds"])

    def cell(row: dict, metric: str) -> str:
        mean, sd, ci = row.get(f"{metric}_mean"), row.get(f"{metric}_sd"), row.get(f"{metric}_ci")
        if mean is None:
            return "n/a"
        text = f"{mean:.3f} ± {sd:.3f}"
        return text + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    tables = [
        markdown_table(
            ["method", "frac", "AUC", "accuracy", "F1", "ECE"],
            ([r["method"], _frac(r), *(cell(r, m) for m in METRICS)] for r in summary["methods"]),
            f"Over {n} seeds (each its own split and initialisation): "
            "mean ± sd [95% CI of the mean].",
        )
    ]
    found = [r for r in summary["methods"] if r.get("tumour_found_mean") is not None]
    if found:
        rows = [
            [
                r["method"],
                _frac(r),
                f"{r['tumour_slides_total'] - r['tumour_missed_total']:.3g} of "
                f"{r['tumour_slides_total']}",
                f"{r['tumour_found_mean']:.3f} ± {r['tumour_found_sd']:.3f}",
                "n/a"
                if r.get("tumour_hit_rate_mean") is None
                else f"{r['tumour_hit_rate_mean']:.3f}",
                "n/a"
                if r.get("tumour_area_read_mean") is None
                else f"{r['tumour_area_read_mean']:.3f} ± {r['tumour_area_read_sd']:.3f}",
            ]
            for r in found
        ]
        tables.append(
            markdown_table(
                [
                    "method",
                    "frac",
                    "tumour slides found",
                    "share found per seed",
                    "zooms on tumour",
                    "tumour area read",
                ],
                rows,
                "Where the zooms landed on the test slides with tumour masks: slides with at "
                "least one zoom overlapping tumour, however little (over every seed; random: "
                "the mean of its draws), the share of zooms on tumour (mean over seeds), and "
                "the share of each slide's tumour area the zooms read (mean ± sd over seeds):",
            )
        )
    if summary["paired"]:
        rows = []
        for p in summary["paired"]:
            ci = "" if p["ci"] is None else f" [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
            rows.append([f"{p['a']} − {p['b']}", p["metric"], f"{p['diff_mean']:+.3f}{ci}"])
        tables.append(
            markdown_table(
                ["comparison", "metric", "difference"],
                rows,
                "Paired differences (per seed on its own test slides), mean over seeds [95% CI]:",
            )
        )
    calibrated = [r for r in summary["methods"] if r.get("calibrated")]
    if calibrated:
        rows = []
        for r in calibrated:
            cells = []
            for metric in ("accuracy", "ece"):
                steps = [cell(r, metric).split(" [")[0]]
                for kind in ("temperature", "temperature+bias"):
                    c = r["calibrated"].get(kind)
                    if c is not None and c[f"{metric}_mean"] is not None:
                        steps.append(f"{c[f'{metric}_mean']:.3f} ± {c[f'{metric}_sd']:.3f}")
                cells.append(" → ".join(steps))
            rows.append([r["method"], f"{r['frac']:.2f}", *cells])
        tables.append(
            markdown_table(
                ["method", "frac", "accuracy", "ECE"],
                rows,
                "Calibrated on each seed's val split, on its test slides (mean ± sd over seeds): "
                "raw → temperature → temperature and class bias:",
            )
        )
    return "\n\n".join(tables)
