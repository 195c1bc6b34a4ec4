"""Independent trainings side by side on a CPU: one process per training, the threads shared out.

A narrow network on a few cores spends much of each step in per-operator work that a second
thread does not shorten, so two trainings at one thread each finish sooner than the same two one
after the other at two threads (the synthetic CelebA victim, ResNet-18 at width 0.25 on 2 cores:
see docs/results.md). The victims of a run are independent of one another, so the victim stage
trains them this way on a CPU (``victims.processes``).

Each training runs :func:`mtlue_fast.train.victim.train` (or ``train_stl``) in a spawned process
with ``torch.set_num_threads(threads)``, on caches it reopens from their folders, and leaves its
usual files (``result.json``, ``metrics.jsonl``, ``last.pt``); the caller then reads each result
with ``train(..., resume=True)``, which returns the stored one without training. A training's
numbers are those of the same training run alone with that many threads (its digest, and so
``--resume``, does not depend on the thread count, as with ``OMP_NUM_THREADS``).

Interruption: Ctrl-C (or any ``KeyboardInterrupt`` / ``SystemExit`` in the caller) stops every
training at once and starts no other; the training processes ignore SIGINT themselves, so that the
caller alone decides, and exit on their own when the caller dies (killed, SIGTERM), instead of
training on unseen into the run's folder. Files are written atomically, so a stopped training
resumes from its ``last.pt``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch

from .settings import TrainConfig

__all__ = ["TrainJob", "plan_processes", "train_side_by_side"]


@dataclass(frozen=True)
class TrainJob:
    """One training to run in a process of its own.

    Attributes:
        train_cache, test_cache: folders of complete cache entries (:func:`mtlue_fast.data.open_cache`).
        out_dir: the training's folder (as ``train``'s ``out_dir``).
        config: its settings.
        crop: the victim's crop ``(h, w)``, or None for the dataset's.
        label: the progress line's name.
        single_task: one network per task (``train_stl``) instead of one multi-task network.
    """

    train_cache: Path
    test_cache: Path
    out_dir: Path
    config: TrainConfig
    crop: tuple[int, int] | None = None
    label: str = "train"
    single_task: bool = False


#: ``auto`` trains side by side only trainings that see at least this many images (epochs x
#: training images): below it a process's start (about 3 s to import torch) outweighs the gain.
AUTO_MIN_IMAGES = 20_000


def plan_processes(
    requested: int | str, trainings: int, threads: int, device: torch.device, distributed: bool, images_seen: int
) -> tuple[int, int]:
    """``(processes, threads per process)`` for ``trainings`` independent trainings.

    Args:
        requested: ``"auto"`` or a process count >= 1 (``victims.processes``).
        trainings: how many trainings there are to run.
        threads: the threads this process may use (``torch.get_num_threads()``).
        device: where the trainings run; only a CPU trains side by side.
        distributed: under ``torchrun`` every rank already trains its share: one process.
        images_seen: images one training sees over all its epochs.

    ``auto`` gives as many processes as there are trainings and threads (each at least one
    thread), for trainings of at least :data:`AUTO_MIN_IMAGES` images; an explicit count is capped
    the same way. One process means: train in this one, one training after another, with every
    thread.
    """
    if device.type != "cpu" or distributed or trainings < 2 or threads < 2:
        return 1, threads
    if requested == "auto" and images_seen < AUTO_MIN_IMAGES:
        return 1, threads
    wanted = trainings if requested == "auto" else int(requested)
    processes = max(1, min(wanted, trainings, threads))
    return processes, (threads // processes if processes > 1 else threads)


def train_side_by_side(jobs: Sequence[TrainJob], processes: int, threads: int, log: Callable[[str], None] = print) -> None:
    """Run ``jobs`` in ``processes`` spawned processes of ``threads`` threads each, in order (the
    first ``processes`` jobs start together). Returns when every job has finished; the first
    failure is raised (the jobs not yet started are cancelled; finished ones keep their files).
    An interruption (``KeyboardInterrupt``, ``SystemExit``) stops the running jobs too."""
    if not jobs:
        return
    log(f"training {len(jobs)} networks side by side: {processes} processes of {threads} thread{'s' if threads > 1 else ''}")
    context = multiprocessing.get_context("spawn")
    stop = context.Event()  # set: every training process exits at once
    with ProcessPoolExecutor(
        max_workers=processes, mp_context=context, initializer=_start_worker, initargs=(threads, os.getpid(), stop)
    ) as pool:
        try:
            futures = [pool.submit(_run_job, job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: without this the queued jobs would still start, and the caller wait for them
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)  # the processes are gone; waiting keeps the exit quiet
            raise
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is None:
            return
        pool.shutdown(wait=True, cancel_futures=True)  # the running jobs finish; the others never start
        error = failed.exception()
    if isinstance(error, BrokenProcessPool):
        raise RuntimeError(
            "a training process ended without a result (killed, e.g. out of memory?); "
            "rerun with --set victims.processes=1 to train one network at a time"
        ) from error
    raise error


#: How often a training process checks that the caller is still alive and has not asked it to stop (seconds).
PARENT_POLL_SECONDS = 0.5


def _start_worker(threads: int, parent: int, stop) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the caller stops us
    threading.Thread(target=_exit_when_stopped, args=(parent, stop), name="parent-watch", daemon=True).start()


def _exit_when_stopped(parent: int, stop) -> None:
    """End this process once the caller sets ``stop`` (interrupted) or ``parent`` is gone
    (re-parented: the caller was killed, nobody reads our result)."""
    while os.getppid() == parent and not stop.wait(PARENT_POLL_SECONDS):
        pass
    os._exit(1)


def _run_job(job: TrainJob) -> None:
    from ..data.cache import open_cache
    from .victim import train, train_stl

    train_cache, test_cache = open_cache(job.train_cache), open_cache(job.test_cache)
    if job.single_task:
        train_stl(train_cache, test_cache, job.out_dir, job.config, device="cpu", crop=job.crop)
    else:
        train(train_cache, test_cache, job.out_dir, job.config, device="cpu", crop=job.crop, label=job.label)
