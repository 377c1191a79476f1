"""Where and in what order a sweep's tasks run: the executors (a process pool, submitit's local executor, SLURM,
inline) and the scheduler that starts each task once the tasks it depends on have finished.

A task is anything with `key` (str), `action` ('train' or 'evaluate') and `deps` (keys), as `tcmlab.sweep.Task`;
what running one means is passed in (`submitter`), so this module knows nothing of training or evaluation.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .sweep import Task

EXECUTORS = ("processes", "submitit-local", "slurm", "inline")
TASK_ERROR = "[tcmlab task] "  # marks the reason line in a failed task's text (a submitit traceback holds it)


class _Done:
    """A finished 'future' for inline execution (Ctrl-C is not caught: it stops the sweep)."""

    def __init__(self, fn, *args):
        try:
            self.value, self.error = fn(*args), None
        except Exception as e:
            self.value, self.error = None, e

    def done(self) -> bool:
        return True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class Dispatch:
    """Where tasks run. executor: 'processes' (a spawn pool on this machine, one torch thread per worker),
    'submitit-local' (submitit's LocalExecutor, one process per task), 'slurm' (submitit's SLURM executor),
    'inline' (this process, one task at a time). workers: tasks in flight at most (None: the CPU count; SLURM: no
    limit). The SLURM fields go to submitit.AutoExecutor.update_parameters."""

    executor: str = "processes"
    workers: int | None = None
    device: str | None = None
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    mem_gb: int | None = None

    def limit(self) -> int:
        if self.workers:
            return self.workers
        return 10 ** 6 if self.executor == "slurm" else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Submitter:
    """How a dispatch kind runs tasks: submit(task) -> a handle with done()/result(); interrupt(handles) asks the
    running tasks to stop (training checkpoints first); close() waits for the workers; poll_s between polls."""

    submit: Callable
    interrupt: Callable = lambda handles: None
    close: Callable = lambda: None
    poll_s: float = 0.0


def _worker_init() -> None:
    """Pool workers ignore Ctrl-C except while training (train() installs its own handler, which checkpoints and
    stops): an interrupted sweep stops its runs cleanly instead of breaking the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def submitit_executor(d: Dispatch, folder: Path):
    """submitit.AutoExecutor for 'slurm' (SLURM through sbatch; needs srun on PATH) or 'submitit-local', with the
    dispatch's time limit, GPUs, CPUs, memory and partition; job files and logs go to `folder/<job id>/`."""
    import submitit

    if d.executor == "slurm" and shutil.which("srun") is None:
        raise RuntimeError("--executor slurm: no SLURM here (srun is not on PATH). Run the sweep on a SLURM login "
                           "node, or use --executor processes on this machine")
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if d.executor == "slurm" else "local")
    ex.update_parameters(timeout_min=d.time_min, gpus_per_node=d.gpus, cpus_per_task=d.cpus, mem_gb=d.mem_gb,
                         name="tcmlab-sweep", slurm_partition=d.partition)
    return ex


def submitter(d: Dispatch, folder: Path, inline: Callable, pooled: Callable) -> Submitter:
    """The Submitter of a dispatch kind. inline(task) runs a task in this process ('inline'); pooled(task, threads=N)
    in a worker process or job with that many torch threads, its failure coming back as an exception whose text
    holds a TASK_ERROR line (a module-level function or a functools.partial of one: it is pickled)."""
    if d.executor == "inline":
        return Submitter(lambda t: _Done(inline, t))
    if d.executor == "processes":
        pool = concurrent.futures.ProcessPoolExecutor(d.limit(), mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_worker_init)

        def interrupt(handles):
            for proc in list((getattr(pool, "_processes", None) or {}).values()):  # the pool's worker processes
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGINT)

        return Submitter(lambda t: pool.submit(pooled, t, threads=1), interrupt,
                         lambda: pool.shutdown(wait=True, cancel_futures=True), 0.2)
    ex = submitit_executor(d, folder)

    def cancel(handles):  # scancel: SIGTERM, then train() checkpoints; local jobs get SIGINT
        for job in handles:
            job.cancel(check=False)

    return Submitter(lambda t: ex.submit(pooled, t, threads=d.cpus), cancel, lambda: None,
                     5.0 if d.executor == "slurm" else 0.5)


def _one_line(e: BaseException) -> str:
    """The reason of a failure in one line: the line marked with TASK_ERROR (`tcmlab.sweep.run_task`), else the
    last line of the message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    marked = [line.partition(TASK_ERROR)[2] for line in lines if TASK_ERROR in line]
    return marked[0] if marked else (lines[-1] if lines else type(e).__name__)


def schedule(tasks: list[Task], runner: Submitter, limit: int, log: Callable[[str], None],
             details: dict[str, str] | None = None) -> dict[str, str]:
    """Run tasks as their dependencies finish, at most `limit` at a time, training before evaluation and the trainings
    that most tasks wait on first (`waiting_on`); return the failed (or skipped because a dependency failed) task keys
    with a one-line reason; `details` receives the full text (traceback) of each failure. On KeyboardInterrupt
    (Ctrl-C, or SIGTERM through the CLI) the running tasks are asked to stop and the interrupt is raised again."""
    running: dict = {}
    try:
        return _schedule(tasks, runner, limit, log, details, running)
    except KeyboardInterrupt:
        log(f"interrupted: stopping {len(running)} running task(s) (training writes a checkpoint first)")
        runner.interrupt([h for h, _ in running.values()])
        raise


def waiting_on(tasks: list[Task]) -> dict[str, int]:
    """Per task key, how many tasks wait on it, directly or through others. Ready trainings start in that order
    (most first, then spec order): a seed's stage 0 → 1 chain, which the rest of its seed waits on, is not left to
    the end behind the other seeds' stage-2 runs."""
    children: dict[str, list[str]] = {}
    for t in tasks:
        for d in t.deps:
            children.setdefault(d, []).append(t.key)
    below: dict[str, set] = {}

    def descendants(key: str) -> set:
        if key not in below:
            below[key] = set()
            for c in children.get(key, ()):
                below[key] |= {c} | descendants(c)
        return below[key]

    return {t.key: len(descendants(t.key)) for t in tasks}


def _schedule(tasks, runner, limit, log, details, running) -> dict[str, str]:
    pending = {t.key: t for t in tasks}
    waiting = waiting_on(tasks)
    done, failed = set(), {}
    while pending or running:
        for key, t in list(pending.items()):
            bad = next((d for d in t.deps if d in failed), None)
            if bad:
                failed[key] = f"not run: {bad} failed"
                del pending[key]
        ready = sorted((t for t in pending.values() if all(d in done for d in t.deps)),
                       key=lambda t: (t.action != "train", -waiting[t.key]))
        for t in ready[: max(0, limit - len(running))]:
            start = time.perf_counter()  # before submit: the inline executor runs the task inside it
            running[t.key] = (runner.submit(t), start)
            del pending[t.key]
        if pending and not running and not ready:
            raise RuntimeError(f"sweep tasks wait on tasks that are not planned: {sorted(pending)[:3]}")
        finished = [k for k, (h, _) in running.items() if h.done()]
        if not finished:
            time.sleep(runner.poll_s)
            continue
        for key in finished:
            h, t0 = running.pop(key)
            try:
                h.result()
                done.add(key)
                log(f"{key}: done in {time.perf_counter() - t0:.1f} s")
            except Exception as e:
                failed[key] = _one_line(e)
                if details is not None:
                    details[key] = str(e)
                log(f"{key}: FAILED: {failed[key]}")
    return failed
