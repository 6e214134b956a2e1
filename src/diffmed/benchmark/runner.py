"""Run a benchmark grid (stages, then arms x seeds) in parallel processes, resumably.

Each job is an ordinary run folder: finished ones are read back, killed ones resumed from their last
checkpoint, so a rerun after a kill redoes nothing and ends with the table an uninterrupted run gives.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("diffmed.benchmark")


@dataclass
class Job:
    """One unit of work: ``fn(*args)`` writes into ``out`` and is skipped once ``done`` exists."""

    name: str
    fn: Callable
    args: tuple
    out: Path
    done: str = "metrics.json"
    after: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return (self.out / self.done).exists()


def _init_worker(threads: int, gpus) -> None:
    import torch

    torch.set_num_threads(threads)
    if gpus is not None:  # one GPU per worker process, fixed before CUDA starts
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


def _call(job: Job):
    job.fn(*job.args)
    return job.name


def _ordered(jobs: list[Job]) -> list[Job]:
    """Jobs in dependency order (each after the jobs it needs), plan order otherwise."""
    placed: set[str] = set()
    order, left = [], list(jobs)
    while left:
        ready = [j for j in left if set(j.after) <= placed]
        if not ready:
            raise ValueError(f"benchmark jobs with unmet dependencies: {[j.name for j in left]}")
        order += ready
        placed |= {j.name for j in ready}
        left = [j for j in left if j not in ready]
    return order


def pending_jobs(jobs: list[Job]) -> list[Job]:
    """The unfinished jobs a result still waits on, most depended-on first.

    A stage whose dependents have all finished (say, runs restored from committed records) is not rerun.
    """
    order = _ordered(jobs)
    dependents = {j.name: [d for d in order if j.name in d.after] for j in order}
    needed: set[str] = set()
    for job in reversed(order):
        if not job.finished and (not dependents[job.name] or any(d.name in needed for d in dependents[job.name])):
            needed.add(job.name)
    # heads of long chains first (the generator before the arms that do not need it), then the jobs that use a
    # stage, so that a stage's outputs are used up while its work folder exists
    weight = {j.name: 0 for j in order}
    for job in reversed(order):
        weight[job.name] = sum(1 + weight[d.name] for d in dependents[job.name] if d.name in needed)
    return sorted((j for j in order if j.name in needed), key=lambda j: (-weight[j.name], not j.after))


def run_jobs(jobs: list[Job], workers: int = 1, gpus: int = 0) -> None:
    """Run unfinished jobs, ``workers`` at a time (each with cores/workers threads, one GPU each if any).

    A job starts as soon as the jobs it needs have finished, not when a whole stage of the grid has.
    """
    todo = pending_jobs(jobs)
    if workers <= 1:
        names = {j.name for j in todo}
        for job in (j for j in _ordered(jobs) if j.name in names):
            log.warning("benchmark job %s", job.name)
            _call(job)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    others = set(mp.active_children())  # children the caller had already; a kill leaves them alone
    queue = None
    if gpus:
        queue = ctx.Manager().Queue()
        for i in range(workers):
            queue.put(i % gpus)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, queue)) as pool:
        try:
            with _sigterm_as_exit():
                _drive(pool, todo, workers)
        except (KeyboardInterrupt, SystemExit):  # killed: stop the workers too; each resumes from its checkpoint
            _stop_workers(others)
            raise


def _drive(pool: ProcessPoolExecutor, todo: list[Job], workers: int) -> None:
    """Submit each job once the jobs it needs have finished, ``workers`` at a time."""
    waiting = {j.name for j in todo}
    running: dict = {}
    while todo or running:
        for job in [j for j in todo if not waiting & set(j.after)][: workers - len(running)]:
            todo.remove(job)
            log.warning("benchmark job %s", job.name)
            running[pool.submit(_call, job)] = job
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            name = future.result()  # a failed job stops the benchmark once the running ones end
            waiting.discard(running.pop(future).name)
            log.warning("benchmark job %s finished", name)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit in the main thread, so a `kill` of the benchmark reaches its cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(others: set, grace_s: float = 30.0) -> None:
    """Terminate the worker processes (Lightning stops a SIGTERM'd fit at the next step); kill what lingers.

    Without this, workers outlive a killed benchmark and keep training; a rerun would wait on their locks.
    """
    children = [c for c in mp.active_children() if c not in others]
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace_s)
        if child.is_alive():
            child.kill()
