"""Train several small runs at once, one process each, with one progress bar per run.

A small model does not use two threads well: ``unet-kanji`` trains 1500 steps in 3 min 9 s at two threads and 4 min
29 s at one, so ``make demo``'s two runs side by side, one core each, finish in 4 min 41 s instead of 6 min 23 s one
after the other at two threads (dense 189 s, RigL 194 s; README, "Quality numbers"). Each worker is a fresh
(spawned) process, so no state is shared; the parent follows each run's ``metrics.jsonl`` for its bar and reads back
the summary the run returns. Ctrl-C is handled by the parent alone: it stops the workers and re-raises.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from surgeon.progress import counted_bars
from surgeon.training.run import RunSummary


def _start_worker(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and stops the workers itself
    torch.set_num_threads(threads)


def _train(kwargs: dict) -> dict:
    from surgeon.training.run import sparsify

    return asdict(sparsify(**kwargs, progress=False))


def last_step(metrics: Path) -> int:
    """The last step a run has logged (0 before its first line); a line being written is skipped."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def workers_for(jobs: int, cpus: int | None = None) -> tuple[int, int]:
    """(processes, threads per process): one process per job up to the cores, the cores shared out among them."""
    if cpus is None:  # the cores this process may run on (a container's share, not the host's count)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = max(1, cpus or 1)
    processes = max(1, min(jobs, cpus))
    return processes, max(1, cpus // processes)


def train_side_by_side(
    jobs: list[dict], steps: list[int], progress: bool = True, threads: int | None = None
) -> list[RunSummary]:
    """Run ``surgeon.training.run.sparsify(**job)`` for every job at once; summaries in the order of ``jobs``.

    ``steps``: each job's training steps (for its bar). Each job's ``out`` must be its own folder. ``threads``: per
    process (default: the cores shared out).
    """
    processes, shared = workers_for(len(jobs))
    threads = threads or shared
    bars = counted_bars(progress)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker, initargs=(threads,))
    try:
        with bars:
            tasks = [bars.add_task(Path(job["out"]).name, total=n) for job, n in zip(jobs, steps)]
            futures = [pool.submit(_train, job) for job in jobs]
            while True:
                done, running = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                if not running or any(f.exception() for f in done):
                    break
                for task, job in zip(tasks, jobs):
                    bars.update(task, completed=last_step(Path(job["out"]) / "metrics.jsonl"))
            for task, n in zip(tasks, steps):
                bars.update(task, completed=n)
            return [RunSummary(**f.result()) for f in futures]  # a worker's error is raised here
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # the executor has no public kill
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
