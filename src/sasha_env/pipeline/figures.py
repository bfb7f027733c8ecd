"""Pictures of a pipeline run: agents' learning curves and zoom paths over slide thumbnails."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from ..atomic import replace_atomically  # noqa: E402
from ..envs.geojson import replay_geojson, write_geojson  # noqa: E402
from ..envs.render import UPDATED_RGB, ZOOMED_RGB, ThumbnailCache, draw_patches  # noqa: E402
from ..features.records import SlideInfo  # noqa: E402
from ..features.store import FeatureStore  # noqa: E402
from ..slides.manifest import read_manifest  # noqa: E402
from ..workdir import Workdir  # noqa: E402
from .report import cap_label  # noqa: E402

__all__ = [
    "adaptive_curve",
    "agent_files",
    "evaluated_episodes",
    "episode_geojsons",
    "fraction_read_by_class",
    "learning_curves",
    "risk_coverage_figure",
    "zoom_paths",
    "write_figures",
]


def _save(fig: Figure, out: Path, dpi: int = 110, legend_axes: Iterable[Axes] = ()) -> Path:
    """Grid and legend on ``legend_axes``, tight layout, PNG written atomically, figure closed."""
    for ax in legend_axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return out


def _curves(csvs: dict[str, Path]) -> Iterator[tuple[str, list[dict]]]:
    """``(agent name, rows)`` of each per-agent CSV that has rows, by name."""
    for name, path in sorted(csvs.items()):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            yield name, rows


def _rolling(x: np.ndarray, window: int) -> np.ndarray:
    if len(x) < window:
        return x
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def learning_curves(episode_csvs: dict[str, Path], out: Path, window: int = 50) -> Path:
    """Episode return and training accuracy against environment steps, one line per agent."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in _curves(episode_csvs):
        t = np.array([int(r["timestep"]) for r in rows])
        ret = np.array([float(r["episode_return"]) for r in rows])
        acc = np.array([int(r["correct"]) for r in rows], dtype=float)
        w = max(1, min(window, len(rows) // 5))
        axes[0].plot(t[w - 1 :], _rolling(ret, w), label=name)
        axes[1].plot(t[w - 1 :], _rolling(acc, w), label=name)
    axes[0].set(
        xlabel="environment steps", ylabel=f"episode return (mean of {window})", title="return"
    )
    axes[1].set(
        xlabel="environment steps", ylabel="final prediction correct", title="training accuracy"
    )
    return _save(fig, out, legend_axes=axes)


#: Zooms numbered on a zoom-path figure; the rest are told apart by colour alone.
NUMBERED_ZOOMS = 5


def _zoom_order(ax: Axes, centres: np.ndarray) -> None:
    """Mark zoom centres ``(T, 2)`` (thumbnail px) coloured by order, with a colour bar, and
    number the first :data:`NUMBERED_ZOOMS`: stays readable with hundreds of zooms."""
    if not len(centres):
        return
    order = np.arange(1, len(centres) + 1)
    dots = ax.scatter(
        centres[:, 0], centres[:, 1], c=order, cmap="viridis", s=14, edgecolors="white",
        linewidths=0.4, vmin=1, vmax=max(2, len(centres)), zorder=3,
    )  # fmt: skip
    for (x, y), k in zip(centres[:NUMBERED_ZOOMS], order, strict=False):
        ax.annotate(
            str(k), (x, y), xytext=(3, 3), textcoords="offset points", color="white",
            fontsize=6, weight="bold", zorder=4,
        )  # fmt: skip
    bar = ax.figure.colorbar(dots, ax=ax, fraction=0.035, pad=0.01)
    bar.set_label("zoom order", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def zoom_paths(
    wd: Workdir, episodes_json: Path, out_dir: Path, n_slides: int = 4, px: int = 480
) -> list[Path]:
    """For a few test slides: thumbnail, zoomed patches numbered in order, TSU-updated patches,
    and (synthetic cohorts) the true tumour outline. Positive slides first."""
    store = FeatureStore(wd.store)
    records = read_manifest(wd.manifest).by_id()
    episodes = json.loads(episodes_json.read_text())
    episodes.sort(key=lambda e: -e["label"])
    thumbs = ThumbnailCache(px)
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    episodes = [e for e in episodes if has_pixels(store.slide_info(e["slide_id"]))]
    for ep in episodes[:n_slides]:
        sid = ep["slide_id"]
        info = store.slide_info(sid)
        coords = store.read(sid, "coords")
        cell = store.cell_px(sid)
        thumb, ds = thumbs.get(info.path, info.dimensions)  # type: ignore[arg-type]
        img = draw_patches(thumb, ds, coords, cell, ep["zoomed"], ep["updated"], grid=False)
        fig, ax = plt.subplots(figsize=(5.2, 5.2 * img.shape[0] / img.shape[1] + 0.5))
        ax.imshow(img)
        record = records.get(sid)
        handles = [
            plt.Line2D(
                [], [], color=tuple(np.array(ZOOMED_RGB) / 255), lw=4, label="zoomed (order)"
            ),
            plt.Line2D([], [], color=tuple(np.array(UPDATED_RGB) / 255), lw=4, label="TSU-updated"),
        ]
        if record is not None and record.mask and Path(record.mask).is_file():
            mask = np.asarray(Image.open(record.mask).convert("L")) > 0
            if mask.any():
                scale = mask.shape[1] / info.dimensions[0]  # type: ignore[index]
                ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
                ax.contour(
                    xs / scale / ds,
                    ys / scale / ds,
                    mask,
                    levels=[0.5],
                    colors="yellow",
                    linewidths=1.2,
                )
                handles.append(plt.Line2D([], [], color="yellow", lw=1.5, label="tumour (mask)"))
        _zoom_order(ax, (coords[ep["zoomed"]] + cell / 2) / ds)
        p = ep["probabilities"]
        ax.set_title(
            f"{sid}: label {ep['label']}, p(class 1) = {p[-1]:.2f}, read {ep['frac_read']:.0%}",
            fontsize=8,
        )
        ax.axis("off")
        ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.8)
        written.append(_save(fig, out_dir / f"{sid}-{episodes_json.stem}.png", dpi=120))
    return written


def has_pixels(info: SlideInfo) -> bool:
    """Whether a store slide names a slide file to draw on (imported features without a
    ``path`` column name their feature file instead)."""
    return Path(info.path or "").suffix.lower() not in (".h5", ".hdf5", "")


def evaluated_episodes(wd: Workdir, method: str) -> list[Path]:
    """``episodes/<method>-<f>.json`` for each budget f of ``method`` in ``results.json`` (the
    evaluate stage's last run; files of budgets dropped since are left out), in order of f;
    every such file when there is no ``results.json``."""
    files = sorted((wd.root / "episodes").glob(f"{method}-*.json"))
    if not wd.results.is_file():
        return files
    methods = json.loads(wd.results.read_text())["methods"]
    names = {f"{method}-{m['frac']:g}" for m in methods if m["method"] == method}
    return sorted(
        (p for p in files if p.stem in names), key=lambda p: float(p.stem.rsplit("-", 1)[1])
    )


def agent_files(wd: Workdir, name: str) -> dict[str, Path]:
    """``{agent folder: its file called name}`` for the agents the workdir's agents stage
    last trained or kept (its record's agents, ensemble members and learned-stop agents), so
    folders left by an earlier configuration (a dropped budget, a smaller ensemble) are not
    drawn; every folder with the file when the stage has no record."""
    found = {p.parent.name: p for p in sorted((wd.root / "agents").glob(f"*/{name}"))}
    marker = wd.marker("agents")
    if not marker.is_file():
        return found
    outputs = json.loads(marker.read_text()).get("outputs", {})
    units = [*outputs.get("agents", {}).values(), *outputs.get("learned_stop", {}).values()]
    units += [u for members in outputs.get("members", {}).values() for u in members]
    current = {Path(u["agent"]).parent.name for u in units}  # the folder: the workdir may move
    return {folder: path for folder, path in found.items() if folder in current}


def kept_check(timesteps: np.ndarray, scores: np.ndarray, kept: dict | None) -> int:
    """Index of the check an agent kept: the one at ``kept['timestep']`` (its ``agent.json``'s
    ``selected_on_val``; the last check there when a timestep was validated twice), else the
    lowest criterion (old workdirs without the record)."""
    at = np.flatnonzero(timesteps == float(kept["timestep"])) if kept else np.array([], int)
    return int(at[-1]) if len(at) else int(np.argmin(scores))


def val_curves(curve_csvs: dict[str, Path], out: Path, kept: dict[str, dict] | None = None) -> Path:
    """Validation AUC and the selection criterion against environment steps, one line per
    agent, with the weights each agent kept marked.

    ``kept`` maps an agent's name to its ``agent.json``'s ``selected_on_val``: a circle on the
    kept check (``agents.keep: best``), or a star at the end of training for the averaged
    policy (``keep: average``). Without it the lowest-criterion check is circled.
    """
    kept = kept or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in _curves(curve_csvs):
        t = np.array([float(r["timestep"]) for r in rows])
        auc = np.array([float(r["auc"]) for r in rows])
        score = np.array([float(r["score"]) for r in rows])
        (line,) = axes[0].plot(t, auc, marker=".", label=name)
        axes[1].plot(t, score, marker=".", color=line.get_color(), label=name)
        row = kept.get(name)
        if row is not None and row.get("rule") == "average":
            for ax, key in ((axes[0], "auc"), (axes[1], "score")):
                ax.scatter([row["timestep"]], [row[key]], s=90, marker="*", color=line.get_color())
            continue
        best = kept_check(t, score, row)
        for ax, y in ((axes[0], auc), (axes[1], score)):
            ax.scatter([t[best]], [y[best]], s=60, facecolors="none", edgecolors=line.get_color())
    axes[0].set(xlabel="environment steps", ylabel="validation AUC", title="validation AUC")
    axes[1].set(
        xlabel="environment steps",
        ylabel="(2 − AUC − F1) + CE",
        title="selection criterion (circle: kept; star: averaged)",
    )
    return _save(fig, out, legend_axes=axes)


#: Methods the budget curve draws: the samplers as lines, HAFED (f = 1) and low-res (f = 0) as
#: reference levels; the MIL baselines would only crowd it.
BUDGET_METHODS = (
    "sasha",
    "random",
    "attention_topk",
    "greedy_attention",
    "lowres_attention_topk",
    "hafed",
    "lowres_only",
)


def budget_curve(points: list[dict], out: Path, title: str) -> Path:
    """AUC against the fraction of the slide read at high resolution, one line per method.

    Args:
        points: ``{"method", "frac", "auc", "lo", "hi"}`` each (methods outside
            :data:`BUDGET_METHODS` are left out); ``lo``/``hi`` (may be None)
            draw the band: a bootstrap CI for one run, mean ± sd over seeds for a study.
        out: the PNG to write.
        title: the figure's title (say what the band is).
    """
    colours = {
        "sasha": "#d50032",
        "random": "#7f7f7f",
        "attention_topk": "#0072b2",
        "greedy_attention": "#e69f00",
        "lowres_attention_topk": "#009e73",
    }
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    by_method: dict[str, list[dict]] = {}
    for p in points:
        if p.get("auc") is not None and p["method"] in BUDGET_METHODS:
            by_method.setdefault(p["method"], []).append(p)
    for method, pts in sorted(by_method.items()):
        pts.sort(key=lambda p: p["frac"])
        x = [p["frac"] for p in pts]
        y = [p["auc"] for p in pts]
        if len(pts) == 1 and method not in colours:  # full-resolution or low-res reference
            ax.axhline(y[0], ls=":", lw=1, color="black" if method == "hafed" else "#bbbbbb")
            ax.annotate(
                f"{method} (f={x[0]:g}): {y[0]:.3f}",
                (0.99, y[0]),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                ha="right",
                va="bottom",
            )
            continue
        colour = colours.get(method)
        ax.plot(x, y, marker="o", ms=4, label=method, color=colour)
        if all(p.get("lo") is not None for p in pts):
            lo = np.clip([p["lo"] for p in pts], 0, 1)  # AUC lives in [0, 1]
            hi = np.clip([p["hi"] for p in pts], 0, 1)
            ax.fill_between(x, lo, hi, alpha=0.18, color=colour)
    ax.set(xlabel="fraction of patches read at high resolution (f)", ylabel="test AUC", title=title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)


def adaptive_curve(points: list[dict], curve: list[dict], out: Path, title: str) -> Path:
    """AUC against the mean fraction read: each agent's stop rule over the threshold grid
    (thresholds fixed beforehand; the rule's val-fitted operating point marked), beside
    fixed-budget SASHA and random on the same axes, each with its band.

    Args:
        points: ``{"method", "frac", "auc", "lo", "hi"}`` of the fixed-budget rows (``sasha``,
            ``random``, ``hafed`` as a reference line) and the ``sasha_adaptive`` rows (the
            threshold rule) and ``sasha_learned_stop`` rows (the learned rule, drawn as
            diamonds in its cap's colour), which add ``mean_frac``.
        curve: ``{"frac" (cap), "threshold", "mean_frac", "auc", "lo", "hi"}`` per point.
    """
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    fixed = {"sasha": "#d50032", "random": "#7f7f7f"}
    for method, colour in fixed.items():
        pts = sorted(
            (p for p in points if p["method"] == method and p.get("auc") is not None),
            key=lambda p: p["frac"],
        )
        if not pts:
            continue
        x = [p["frac"] for p in pts]
        ax.plot(
            x, [p["auc"] for p in pts], marker="o", ms=4, color=colour, label=f"{method} (fixed f)"
        )
        if all(p.get("lo") is not None for p in pts):
            ax.fill_between(
                x, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.15, color=colour
            )
    caps = sorted({c["frac"] for c in curve})
    blues = ["#0072b2", "#56b4e9", "#009e73", "#cc79a7"]
    for cap, colour in zip(caps, blues * (1 + len(caps) // len(blues)), strict=False):
        pts = sorted(
            (c for c in curve if c["frac"] == cap and c.get("auc") is not None),
            key=lambda c: c["mean_frac"],
        )
        if not pts:
            continue
        x = [c["mean_frac"] for c in pts]
        lowered = [
            p["max_frac"]
            for p in points
            if p["method"] == "sasha_adaptive" and p["frac"] == cap and p.get("max_frac")
        ]
        cap_text = cap_label(cap, lowered[0] if lowered else None, "g")
        ax.plot(
            x,
            [c["auc"] for c in pts],
            ls="--",
            marker=".",
            color=colour,
            label=f"sasha_adaptive, cap {cap_text} (thresholds)",
        )
        if all(c.get("lo") is not None for c in pts):
            ax.fill_between(
                x, [c["lo"] for c in pts], [c["hi"] for c in pts], alpha=0.15, color=colour
            )
        for p in points:
            if p["method"] == "sasha_adaptive" and p["frac"] == cap and p.get("auc") is not None:
                ax.plot(
                    [p["mean_frac"]],
                    [p["auc"]],
                    marker="*",
                    ms=12,
                    color=colour,
                    ls="none",
                    label=f"rule fitted on val, cap {cap_text}",
                )
    learned = [
        p for p in points if p["method"] == "sasha_learned_stop" and p.get("auc") is not None
    ]
    for p in sorted(learned, key=lambda p: p["frac"]):
        at = caps.index(p["frac"]) if p["frac"] in caps else len(caps)
        ax.plot(
            [p["mean_frac"]],
            [p["auc"]],
            marker="D",
            ms=7,
            color=blues[at % len(blues)],
            ls="none",
            label=f"learned stop, cap {p['frac']:g}",
        )
    for p in points:
        if p["method"] == "hafed" and p.get("auc") is not None:
            ax.axhline(p["auc"], ls=":", lw=1, color="black", label=f"hafed (f=1): {p['auc']:.3f}")
    ax.set(
        xlabel="mean fraction of patches read at high resolution", ylabel="test AUC", title=title
    )
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


def fraction_read_by_class(
    episodes: dict[float, list[dict]], class_names: list[str], out: Path
) -> Path:
    """Per slide, the fraction read under each agent's stop rule, by true class (one dot per
    slide; stars: stopped at the cap; open circles: referred)."""
    fig, axes = plt.subplots(
        1, max(1, len(episodes)), figsize=(4.2 * max(1, len(episodes)), 3.6), squeeze=False
    )
    rng = np.random.default_rng(0)
    for ax, (cap, eps) in zip(axes[0], sorted(episodes.items()), strict=False):
        for c in range(len(class_names)):
            of = [e for e in eps if e["label"] == c]
            x = c + rng.uniform(-0.15, 0.15, len(of))
            y = np.array([e["frac_read"] for e in of])
            cap_hit = np.array([e["stopped"] == "cap" for e in of], bool)
            ref = np.array([e["referred"] for e in of], bool)
            ax.scatter(
                x[~cap_hit],
                y[~cap_hit],
                s=18,
                color="#0072b2",
                label="stopped: confident" if c == 0 else None,
            )
            ax.scatter(
                x[cap_hit],
                y[cap_hit],
                s=40,
                marker="*",
                color="#d55e00",
                label="stopped: cap" if c == 0 else None,
            )
            ax.scatter(
                x[ref],
                y[ref],
                s=90,
                facecolors="none",
                edgecolors="black",
                label="referred" if c == 0 else None,
            )
        ax.set_xticks(range(len(class_names)), class_names)
        ax.set(ylabel="fraction of patches read", title=f"cap {cap:g}")
        ax.set_ylim(bottom=0)
    return _save(fig, out, legend_axes=axes[0][:1])


def risk_coverage_figure(referral: list[dict], out: Path) -> Path:
    """Risk (error rate) against coverage (share of slides kept, most confident first), one
    line per agent's stop rule, with its AURC."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for r in referral:
        pts = r.get("risk_coverage") or []
        if pts:
            ax.plot(
                [p["coverage"] for p in pts],
                [p["risk"] for p in pts],
                marker=".",
                label=f"{r['method']} cap {r['frac']:g} (AURC {r['aurc']:.3f})",
            )
    ax.set(
        xlabel="coverage (share of slides decided)",
        ylabel="risk (error rate)",
        title="risk-coverage on the test slides",
    )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    return _save(fig, out, legend_axes=[ax])


def write_adaptive_figures(wd: Workdir, results: dict) -> list[Path]:
    """The three adaptive-reading figures of a run (when ``results.json`` has them)."""
    if not results.get("adaptive_curve"):
        return []
    figs = wd.root / "figures"
    points = [
        {
            "method": m["method"],
            "frac": m["frac"],
            "auc": m.get("auc"),
            "mean_frac": m.get("mean_frac"),
            "max_frac": m.get("max_frac"),
            "lo": (m.get("auc_ci") or [None, None])[0],
            "hi": (m.get("auc_ci") or [None, None])[1],
        }
        for m in results["methods"]
    ]
    curve = [
        c | {"lo": (c.get("auc_ci") or [None, None])[0], "hi": (c.get("auc_ci") or [None, None])[1]}
        for c in results["adaptive_curve"]
    ]
    n = results.get("n_slides", "the")
    title = f"Adaptive reading ({n} test slides; bands: 95% bootstrap CI)"
    written = [adaptive_curve(points, curve, figs / "adaptive_curve.png", title)]
    episodes = {
        float(p.stem.rsplit("-", 1)[1]): json.loads(p.read_text())
        for p in evaluated_episodes(wd, "sasha_adaptive")
    }
    if episodes:
        written.append(
            fraction_read_by_class(
                episodes, results["class_names"], figs / "adaptive_fraction_read.png"
            )
        )
    if results.get("referral"):
        written.append(risk_coverage_figure(results["referral"], figs / "risk_coverage.png"))
    return written


def write_figures(wd: Workdir, log: Callable[[str], None] | None = None) -> list[Path]:
    """Learning curves of every agent, zoom paths of the SASHA agents and the AUC-against-budget
    curve, under ``WORKDIR/figures``. Zoom paths need slide pixels: slides known only by their
    features are left out, with a note to ``log``."""
    figs = wd.root / "figures"
    written = []
    if wd.results.is_file():
        results = json.loads(wd.results.read_text())
        points = [
            {
                "method": m["method"],
                "frac": m["frac"],
                "auc": m.get("auc"),
                "lo": (m.get("auc_ci") or [None, None])[0],
                "hi": (m.get("auc_ci") or [None, None])[1],
            }
            for m in results["methods"]
        ]
        n = results.get("n_slides", "the")
        title = f"AUC against budget ({n} test slides; bands: 95% bootstrap CI)"
        written.append(budget_curve(points, figs / "budget_curve.png", title))
        written += write_adaptive_figures(wd, results)
    csvs = agent_files(wd, "episodes.csv")
    if csvs:
        written.append(learning_curves(csvs, figs / "learning_curves.png"))
    val = agent_files(wd, "val_curve.csv")
    if val:
        metas = {name: path.with_name("agent.json") for name, path in val.items()}
        kept = {
            n: json.loads(m.read_text()).get("selected_on_val")
            for n, m in metas.items()
            if m.exists()
        }
        written.append(
            val_curves(val, figs / "val_curves.png", {n: k for n, k in kept.items() if k})
        )
    store = FeatureStore(wd.store)
    without = [s for s in store.slide_ids() if not has_pixels(store.slide_info(s))]
    if without and log is not None:
        log(
            f"[evaluate] {len(without)} slide(s) have features but no slide file (imported "
            "without a 'path' column): their zoom paths are not drawn; GeoJSON is written"
        )
    for episodes in evaluated_episodes(wd, "sasha"):
        written += zoom_paths(wd, episodes, figs / "paths")
        written += episode_geojsons(wd, episodes, figs / "geojson" / episodes.stem)
    return written


def episode_geojsons(wd: Workdir, episodes_json: Path, out_dir: Path) -> list[Path]:
    """``out_dir/<slide_id>.geojson`` for every episode of an ``episodes/<agent>-<f>.json``:
    its zooms replayed on the test split (:func:`~sasha_env.envs.geojson.replay_geojson`)."""
    from ..envs.wsi import SashaWSIEnv  # lazy: torch, only to replay episodes (not for plots)

    episodes = json.loads(episodes_json.read_text())
    frac = float(episodes_json.stem.rsplit("-", 1)[1])
    env = SashaWSIEnv(wd.root, split="test", frac=frac, max_patches="cohort")
    return [
        write_geojson(replay_geojson(env, e["slide_id"], e["zoomed"]), out_dir, e["slide_id"])
        for e in episodes
    ]
