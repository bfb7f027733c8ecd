"""The ``sasha`` command line: one console script, a verb per stage, ``--help`` on each.

Each module holds a group of verbs, their sub-parsers and their handlers: :mod:`.data`
(``synth``, ``inspect``, ``extract``, ``import``), :mod:`.cohort` (``cohort``: public cohorts
with SASHA's splits), :mod:`.run` (``pipeline``, ``train``, ``study``, ``demo``),
:mod:`.predict` (``predict``) and :mod:`.experiments` (``sweep``, ``trial``, ``benchmark``);
:mod:`.common` defines the shared options and the
exit codes. A verb's wing is imported only when the verb runs, so ``sasha --help`` and
``sasha predict`` load neither Lightning nor W&B.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

from .. import __version__
from ..distributed import end_process_group
from ..memory import keep_freed_memory
from ..processes import raise_on_sigterm, stop_reason
from . import cohort, data, experiments, predict, run
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED

EPILOG = """\
typical use:
  sasha synth cohort/ --preset demo                 # embedded synthetic cohort
  sasha cohort camelyon16 /data/camelyon16 --out c16.csv   # CAMELYON16 with SASHA's splits
  sasha inspect slides/*.svs --preset he-cpu        # levels, mpp, tissue; how a preset reads them
  sasha extract cohort/manifest.csv --out cohort/features.zarr
  sasha demo runs/demo                              # synth + every stage, prints the table
"""

#: The verbs in the order ``sasha --help`` lists them, each as the function that registers it.
VERBS = (
    data.add_synth,
    data.add_inspect,
    data.add_extract,
    data.add_import,
    cohort.add_cohort,
    run.add_pipeline,
    run.add_train,
    predict.add_predict,
    run.add_study,
    run.add_demo,
    experiments.add_sweep,
    experiments.add_trial,
    experiments.add_benchmark,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``sasha`` parser: ``--version`` and a sub-parser per verb, whose ``func`` default is
    the verb's handler (``args -> exit status``)."""
    parser = argparse.ArgumentParser(
        prog="sasha",
        description="SASHA: read a whole-slide image at low resolution and zoom into "
        "10-20% of it, with a Gymnasium environment, Lightning models and SB3 agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sasha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sasha`` console script.

    :param argv: the arguments after ``sasha`` (default: ``sys.argv[1:]``).
    :return: the exit status (:mod:`sasha_env.cli.common`'s ``EXIT_*``): 0 done, 1 some slide
        or row dropped, 2 an error (printed as ``sasha VERB: error: ...``), 130 interrupted
        (Ctrl-C), 143 terminated (SIGTERM; only run as the process's command, ``argv`` None:
        called in-process, SIGTERM is left to the host).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.command != "predict":  # predict: glibc's defaults keep its peak memory lower
        keep_freed_memory()  # torch's per-batch tensors otherwise fault their pages in every time
    try:  # as the process's command, SIGTERM ends the run; in-process, the host's handling stays
        with raise_on_sigterm() if argv is None else nullcontext():
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"sasha {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as exc:  # Ctrl-C or SIGTERM (stop_reason), or not ours to handle
        how = stop_reason(exc)
        if how is None:
            raise
        print(f"{how}; finished work is kept and a re-run resumes", file=sys.stderr)
        return EXIT_TERMINATED if how == "terminated" else EXIT_INTERRUPTED
    finally:
        end_process_group()
