"""``--jobs J``: the pipeline's independent stages at once, each in its own process.

The stages form a graph through what each reads (:attr:`~sasha_env.pipeline.stages.Stage.reads`):
after ``extract``, the chain ``hafed → distill → tsu`` and the low-res classifier and the MIL
baselines are independent of one another, and so are the agents stage's budgets (its
:attr:`~sasha_env.pipeline.stages.Stage.units`). :func:`run_parallel` starts each stage, or each
unit of a stage with units, on one of ``jobs`` worker processes as soon as the stages it reads
are done; among those ready, the one with the longest chain of stages after it first (HAFED →
TSU → agents → calibrate → evaluate before a baseline), then registry order. Each process runs
the same stage code on the same workdir as a run with one job, with the same threads (the
training stages set their own), so the outputs are the same: a stage writes its own marker, a
unit its own record, and a stage with units is finished in this process once they are done,
by a run of it that finds every unit recorded.

A stage that fails stops new starts; the tasks already running finish and are kept, so the
same command resumes after the fix. A worker the system kills (out of memory, say) breaks the
pool: the tasks beside it are reported failed too, and what they had not recorded is
computed again by the next run.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..memory import keep_freed_memory
from ..processes import stop_reason, worker_pool
from .stages import REGISTRY, STAGES

if TYPE_CHECKING:
    from .runner import Pipeline

__all__ = ["run_parallel"]


@dataclass(frozen=True)
class _Task:
    """One process's work: a whole stage, or one unit of a stage with units."""

    stage: str
    unit: str | None = None

    @property
    def label(self) -> str:
        return self.stage if self.unit is None else f"{self.stage} {self.unit}"


def _settings(pipe: Pipeline) -> dict[str, Any]:
    """The :class:`~sasha_env.pipeline.runner.Pipeline` arguments of a worker: the parent's,
    with its configuration as resolved at the start (a config file edited during the run does
    not reach the workers), printing its messages (a custom ``log`` stays in the parent);
    progress bars are set per task (several would share one terminal)."""
    return {
        "workdir": pipe.workdir,
        "features": pipe.features,
        "preset": pipe.preset,
        "overrides": pipe.cfg,  # merged over the preset, the resolved config itself
        "devices": pipe.devices,
        "strategy": pipe.strategy,
        "accelerator": pipe.accelerator,
        "num_nodes": pipe.num_nodes,
    }


def _worker_started(threads: int) -> None:
    """A worker's set-up (after :func:`~sasha_env.processes.worker_pool`'s: it ends with the
    run): the parent's torch threads (stages that do not set their own compute as in the
    parent), and freed memory kept as the CLI keeps it."""
    import torch  # lazy: a spawned worker loads it here

    torch.set_num_threads(threads)
    keep_freed_memory()


def _work(settings: dict[str, Any], task: _Task, force: bool) -> None:
    """A worker process's task: run it on a pipeline over the same workdir."""
    from .runner import Pipeline  # lazy: a spawned worker imports it on its first task

    pipe = Pipeline(**settings)
    stage = REGISTRY[task.stage]
    if task.unit is None:
        pipe._run_stage(stage, force=force)
    else:
        pipe.run_unit(stage, task.unit, force=force)


def _downstream_depth() -> dict[str, int]:
    """Per stage, the most stages that must run after it (its longest chain of dependents):
    among ready tasks the deepest starts first, so the critical path (HAFED → TSU → agents →
    calibrate → evaluate) is never queued behind a baseline."""
    depth: dict[str, int] = {}
    for name in reversed(STAGES):  # a stage's dependents come after it in the registry
        below = [depth[d] + 1 for d in STAGES if name in REGISTRY[d].reads]
        depth[name] = max(below, default=0)
    return depth


def run_parallel(pipe: Pipeline, stages: list[str], force: tuple[str, ...], jobs: int) -> dict:
    """Run ``stages`` of a prepared pipeline on up to ``jobs`` worker processes at once.

    The workers are started once (spawned: a fork of a process holding torch's threads can
    hang) and take one task after another, so each imports torch and Lightning once.

    Args:
        pipe: the pipeline (its workdir already prepared by :meth:`Pipeline.run`).
        stages: stage names, in registry order. A stage they read that is not among them must
            have run before.
        force: stages to run even when cached.
        jobs: the most tasks at once (≥ 2).

    Returns:
        The markers of the stages run or skipped, by stage name, in registry order.

    Raises:
        RuntimeError: a stage failed (raised after the tasks running beside it finished).
        FileNotFoundError: a stage reads one that neither ran before nor is in ``stages``.
    """
    import torch  # lazy: the stages' processes inherit its thread count

    settings = _settings(pipe)
    depth = _downstream_depth()
    wanted = set(stages)
    pending = list(stages)  # not queued yet, registry order
    markers: dict[str, dict] = {}
    queue: list[_Task] = []  # ready, not started
    running: dict[Future, _Task] = {}
    units_left: dict[str, set[str]] = {}
    started: dict[str, float] = {}
    failed: list[str] = []

    def ready(name: str) -> bool:
        return all(up in markers or up not in wanted for up in REGISTRY[name].reads)

    def promote() -> None:
        """Queue the stages whose inputs are done; a cached stage is done at once."""
        changed = True
        while changed:
            changed = False
            for name in [n for n in pending if ready(n)]:
                pending.remove(name)
                changed = True
                stage = REGISTRY[name]
                stale = pipe.wd.marker(name).is_file()
                marker = pipe.cached_stage(stage, force=name in force)
                if marker is not None:
                    pipe.log(f"[{name}] done earlier, skipped ({pipe.wd.marker(name)})")
                    markers[name] = marker
                    continue
                if stale:
                    pipe.log(f"[{name}] configuration or upstream changed: running again")
                started[name] = time.perf_counter()
                units = stage.units(pipe) if stage.units is not None else []
                if len(units) > 1:
                    pipe.log(f"[{name}] running: {len(units)} units, up to {jobs} at once")
                    units_left[name] = set(units)
                    queue.extend(_Task(name, unit) for unit in units)
                else:
                    queue.append(_Task(name))
        # the deepest first, then registry order; stable, so units keep their order
        queue.sort(key=lambda t: (-depth[t.stage], STAGES.index(t.stage)))

    def finished(task: _Task) -> None:
        if task.unit is None:
            markers[task.stage] = json.loads(pipe.wd.marker(task.stage).read_text())
            return
        units_left[task.stage].discard(task.unit)
        if not units_left[task.stage]:  # every unit recorded: gather them into the marker
            stage = REGISTRY[task.stage]
            markers[task.stage] = pipe._run_stage(
                stage, collecting=True, started=started[task.stage]
            )

    with worker_pool(
        jobs, _worker_started, (torch.get_num_threads(),), cancel_on_error=True
    ) as pool:
        try:
            promote()
            while queue or running:
                while queue and len(running) < jobs and not failed:
                    task = queue.pop(0)
                    # progress bars only for a task nothing will run beside (extract, evaluate)
                    alone = {**settings, "progress": pipe.progress and not (queue or running)}
                    running[pool.submit(_work, alone, task, task.stage in force)] = task
                if not running:
                    break  # a failure left queued tasks unstarted
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    exc = future.exception()
                    if exc is not None:
                        failed.append(task.label)
                        pipe.log(f"[{task.label}] FAILED: {type(exc).__name__}: {exc}")
                        cause = exc.__cause__  # the worker's traceback, as text
                        if cause is not None:
                            print(str(cause).strip(), file=sys.stderr, flush=True)
                        if running:
                            pipe.log(
                                f"waiting for the {len(running)} task(s) running to finish "
                                "(kept); no new task starts"
                            )
                    elif not failed:
                        finished(task)
                        promote()
        except BaseException as exc:  # stopped: the pool ends the workers; an error: they finish
            if running:
                verb = "stopping" if stop_reason(exc) else "waiting for"
                pipe.log(f"{verb} the {len(running)} task(s) running")
            raise
    if failed:
        raise RuntimeError(
            f"stage(s) {', '.join(failed)} failed (messages above); what finished is kept, "
            "so the same command resumes after the fix"
        )
    missing = [name for name in pending if name not in markers]
    if missing:  # cannot happen with registry order; a guard against a cycle
        raise RuntimeError(f"stage(s) {', '.join(missing)} never became ready")
    return {name: markers[name] for name in stages if name in markers}
