"""Run a benchmark grid (stages, then arms x seeds) in parallel processes, resumably.

Each job is an ordinary run folder: finished ones are read back, killed ones resumed from their last
checkpoint, so a rerun after a kill redoes nothing and ends with the table an uninterrupted run gives.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
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


def _waves(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped so that each wave only depends on earlier waves."""
    done: set[str] = set()
    waves, left = [], list(jobs)
    while left:
        ready = [j for j in left if set(j.after) <= done]
        if not ready:
            raise ValueError(f"benchmark jobs with unmet dependencies: {[j.name for j in left]}")
        waves.append(ready)
        done |= {j.name for j in ready}
        left = [j for j in left if j not in ready]
    return waves


def run_jobs(jobs: list[Job], workers: int = 1, gpus: int = 0) -> None:
    """Run unfinished jobs, ``workers`` at a time (each with cores/workers threads, one GPU each if any)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    for wave in _waves(jobs):
        todo = [j for j in wave if not j.finished]
        if not todo:
            continue
        if workers <= 1:
            for job in todo:
                log.warning("benchmark job %s", job.name)
                _call(job)
            continue
        ctx = mp.get_context("spawn")
        queue = None
        if gpus:
            queue = ctx.Manager().Queue()
            for i in range(workers):
                queue.put(i % gpus)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, queue)) as pool:
            for name in pool.map(_call, todo):
                log.warning("benchmark job %s finished", name)
