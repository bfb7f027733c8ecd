"""What the verbs share: the preset, scale-out and run options, their parsing, the exit codes.

Each option is defined here once; a verb's module adds it to its sub-parser with ``add_*``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import PRESETS
from ..slides.slide import check_mpp

#: What ``ArgumentParser.add_subparsers`` returns: each verb's ``add_*`` adds its parser to it.
SubParsers = argparse._SubParsersAction

#: Exit status: everything asked for was done.
EXIT_OK = 0
#: Exit status: the rest finished, but some slide or manifest row was dropped (each named with
#: its reason in the verb's report).
EXIT_PARTIAL = 1
#: Exit status: a usage or configuration error (``ValueError``, ``FileNotFoundError``,
#: ``RuntimeError`` out of a verb), printed as ``sasha VERB: error: ...``.
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT); finished work is kept and a re-run resumes.
EXIT_INTERRUPTED = 130
#: Exit status after SIGTERM (128 + SIGTERM; a batch scheduler's end of a job, ``kill``);
#: finished work is kept and a re-run resumes.
EXIT_TERMINATED = 143


def zoom_budget(value: str) -> float:
    """An ``argparse`` type for a zoom budget f: a fraction of the patches in (0, 1].

    Raises:
        argparse.ArgumentTypeError: ``value`` is not a number in (0, 1] (argparse then prints
            it as a usage error and exits with status 2).
    """
    try:
        frac = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < frac <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is not a zoom budget: give a fraction of the patches in (0, 1], e.g. 0.1"
        )
    return frac


def mpp_value(value: str) -> float:
    """An ``argparse`` type for ``--mpp``: a level-0 resolution in µm/px a microscope gives.

    Raises:
        argparse.ArgumentTypeError: not a number, or outside
            :data:`~sasha_env.slides.slide.MPP_RANGE` (a usage error, status 2).
    """
    try:
        return check_mpp(value, "--mpp")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_mpp(p: argparse.ArgumentParser) -> None:
    """Add ``--mpp X`` (``args.mpp``): the level-0 µm/px assumed for slides without usable
    mpp metadata."""
    p.add_argument(
        "--mpp",
        type=mpp_value,
        default=None,
        metavar="X",
        help="level-0 um/px to assume for slides whose metadata has no usable mpp (e.g. 0.25 "
        "for 40x, 0.5 for 20x); without it such a slide stops with an error. A manifest's "
        "mpp column wins, slide by slide. Check a slide with 'sasha inspect SLIDE'",
    )


def mpp_overrides(args: argparse.Namespace) -> dict:
    """The config overrides ``--mpp`` asks for (``{}`` without it)."""
    return {} if args.mpp is None else {"extract": {"mpp": args.mpp}}


def add_preset(
    p: argparse.ArgumentParser, default: str = "demo", workdir_config: bool = False
) -> None:
    """Add ``--preset NAME`` (a settings bundle of :data:`sasha_env.config.PRESETS`) and
    ``--config YAML`` (sections that override it).

    With ``workdir_config`` (verbs that run on an existing workdir) ``--preset`` defaults to
    ``None``: :func:`~sasha_env.cli.run.resolve_settings` then takes the workdir's own
    ``config.yaml`` when it has one, and ``default`` otherwise."""
    when = (
        f"the workdir's own config.yaml when it has one, else {default}"
        if workdir_config
        else default
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None if workdir_config else default,
        help=f"settings bundle: tiny (seconds, tests), demo (the synthetic cohort's), he-cpu "
        f"(real H&E on a CPU: 64-px sub-patches at 0.5 um/px), paper (SASHA's CAMELYON16 "
        f"settings, for a GPU), large (the demo's settings on CAMELYON-sized synthetic "
        f"slides, >= 8,000 patches) (default: {when})",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="YAML",
        help="YAML file whose sections (synth, grid, extract, ...) override the preset"
        + (" (without --preset: the workdir's own settings)" if workdir_config else ""),
    )


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a batch job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def jobs_value(value: str) -> int:
    """An ``argparse`` type for ``--jobs``: a count of processes, or ``auto`` (one per usable
    core, :func:`usable_cores`).

    Raises:
        argparse.ArgumentTypeError: neither ``auto`` nor a whole number ≥ 1 (status 2).
    """
    if value == "auto":
        return usable_cores()
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of processes >= 1, or auto")
    return int(value)


def add_jobs(p: argparse.ArgumentParser, default: str, what: str) -> None:
    """Add ``--jobs J`` (``args.jobs``, an int): ``what`` says what runs at once."""
    p.add_argument(
        "--jobs",
        type=jobs_value,
        default=jobs_value(default),
        metavar="J",
        help=f"{what}; 'auto' = one per usable core ({usable_cores()} here) (default: {default})",
    )


def add_quiet(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    """Add ``--quiet`` (``args.quiet``: no progress output)."""
    p.add_argument("--quiet", action="store_true", help=help)


def add_scaleout(p: argparse.ArgumentParser) -> None:
    """Add Lightning's scale-out options: ``--accelerator``, ``--devices``, ``--num-nodes``,
    ``--strategy`` (read ``args.devices`` with :func:`parse_devices`)."""
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto (default: cpu)")
    p.add_argument(
        "--devices", default="1", help="devices (processes) per node, or 'auto' (default: 1)"
    )
    p.add_argument("--num-nodes", type=int, default=1, help="nodes for DDP (default: 1)")
    p.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)"
    )


def add_run_options(p: argparse.ArgumentParser, scaleout: bool = True) -> None:
    """Add the options of the verbs that train: ``--wandb``, ``--quiet`` and, when
    ``scaleout``, those of :func:`add_scaleout`."""
    p.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default=None,
        help="log training to Weights & Biases (offline needs no network; online needs `wandb login`)",
    )
    add_quiet(p, "no progress bars")
    if scaleout:
        add_scaleout(p)


def parse_devices(value: str) -> int | str:
    """``--devices`` as Lightning takes it: a count (``"2"`` -> 2) or a word such as ``"auto"``."""
    return int(value) if value.isdigit() else value


def wandb_overrides(args: argparse.Namespace) -> dict:
    """The config overrides ``--wandb`` asks for (``{}`` without it)."""
    if not args.wandb:
        return {}
    return {"train": {"wandb": None if args.wandb == "disabled" else {"mode": args.wandb}}}
