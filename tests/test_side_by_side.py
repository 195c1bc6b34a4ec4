"""How many processes the victims train in (``victims.processes``); equality with trainings run
alone is tested end to end in test_run.py."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mtlue_fast.config import ConfigError, VictimSettings, resolve
from mtlue_fast.train.side_by_side import AUTO_MIN_IMAGES, plan_processes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BIG = AUTO_MIN_IMAGES


@pytest.mark.parametrize(
    "requested, trainings, threads, expected",
    [
        ("auto", 2, 2, (2, 1)),   # the synthetic default's victim pair on 2 cores
        ("auto", 6, 2, (2, 1)),   # three pairs: two at a time
        ("auto", 2, 16, (2, 8)),
        ("auto", 6, 16, (6, 2)),
        ("auto", 2, 1, (1, 1)),   # OMP_NUM_THREADS=1: one after another, as before
        ("auto", 1, 8, (1, 8)),   # nothing to put beside it
        (1, 6, 16, (1, 16)),
        (3, 6, 16, (3, 5)),
        (8, 2, 4, (2, 2)),        # never more processes than trainings or threads
    ],
)
def test_plan_processes_on_a_cpu(requested, trainings, threads, expected):
    assert plan_processes(requested, trainings, threads, CPU, False, BIG) == expected


def test_one_process_on_a_gpu_under_torchrun_and_for_small_trainings():
    assert plan_processes("auto", 2, 16, CUDA, False, BIG) == (1, 16)
    assert plan_processes(2, 2, 16, CUDA, False, BIG) == (1, 16)
    assert plan_processes("auto", 2, 16, CPU, True, BIG) == (1, 16)
    assert plan_processes("auto", 2, 16, CPU, False, BIG - 1) == (1, 16)  # a process's start would outweigh it
    assert plan_processes(2, 2, 16, CPU, False, 10) == (2, 8)  # asked for explicitly


def test_processes_setting_is_checked_and_leaves_the_run_identity_alone():
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="victims.processes"):
            VictimSettings(processes=bad)
    plain = resolve("chestxray", synthetic=True)
    two = resolve("chestxray", synthetic=True, assignments=["victims.processes=2"])
    assert two.victims.processes == 2 and plain.victims.processes == "auto"
    assert plain.identity() == two.identity()


def test_a_failing_training_raises_its_error_in_the_caller(tmp_path):
    """A job whose cache folder is missing: the spawned process's error reaches the caller."""
    from mtlue_fast.train import TrainConfig
    from mtlue_fast.train.side_by_side import TrainJob, train_side_by_side

    missing = tmp_path / "no-such-cache"
    job = TrainJob(missing, missing, tmp_path / "out", TrainConfig(epochs=1, progress=False))
    with pytest.raises(FileNotFoundError, match="no-such-cache"):
        train_side_by_side([job, job], 2, 1, log=lambda text: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe to hold the training process")
def test_a_killed_training_process_names_the_setting_that_avoids_it(tmp_path):
    """A training process killed mid-job (as the kernel's out-of-memory killer would): the caller
    gets a RuntimeError that says how to train one network at a time, not a bare BrokenProcessPool."""
    from mtlue_fast.train import TrainConfig
    from mtlue_fast.train.side_by_side import TrainJob, train_side_by_side

    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "manifest.json")  # the job blocks opening it, until killed
    job = TrainJob(cache, cache, tmp_path / "out", TrainConfig(epochs=1, progress=False))

    def kill_the_training_process() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            children = multiprocessing.active_children()
            if children:
                time.sleep(1.0)  # let it reach the job
                for child in children:
                    child.kill()
                return
            time.sleep(0.05)
        try:  # no process seen: release one that may be blocked on the pipe, so the test fails, not hangs
            os.close(os.open(cache / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing is blocked
            pass

    killer = threading.Thread(target=kill_the_training_process)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="victims.processes=1"):
            train_side_by_side([job, job], 1, 1, log=lambda text: None)
    finally:
        killer.join()


# A caller of train_side_by_side in a process (and process group) of its own, so that a test can
# interrupt or kill it as a user or a job scheduler would. Each job reads its cache's manifest from a
# named pipe, which holds it until the test lets go.
_CALLER = """
import signal
import sys
from pathlib import Path

from mtlue_fast.train import TrainConfig
from mtlue_fast.train.side_by_side import TrainJob, train_side_by_side

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a test run in the background inherits SIGINT ignored
    root = Path(sys.argv[1])
    jobs = [TrainJob(root / f"cache-{k}", root / f"cache-{k}", root / f"out-{k}", TrainConfig(epochs=1, progress=False))
            for k in range(3)]
    try:
        train_side_by_side(jobs, 2, 1, log=lambda text: None)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def _pipe_jobs(tmp_path, count: int = 3) -> list:
    pipes = []
    for k in range(count):
        (tmp_path / f"cache-{k}").mkdir()
        os.mkfifo(tmp_path / f"cache-{k}" / "manifest.json")
        pipes.append(tmp_path / f"cache-{k}" / "manifest.json")
    (tmp_path / "caller.py").write_text(_CALLER)
    return pipes


def _wait_for_reader(pipe, deadline: float) -> int:
    """A write end of ``pipe``, opened once a job has opened it to read (the job then waits on it)."""
    while time.monotonic() < deadline:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
    raise AssertionError(f"no training process opened {pipe}")


def _has_reader(pipe) -> bool:
    try:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def _group_gone(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _caller_with_two_jobs_running(tmp_path):
    """A caller of three jobs in a process group of its own, yielded ``(caller, pipes)`` once the
    first two jobs are running (each waiting on its pipe); every process of the group is gone after."""
    pipes = _pipe_jobs(tmp_path)
    # output to files: a pipe would stay open as long as any training process that inherited it
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        caller = subprocess.Popen([sys.executable, str(tmp_path / "caller.py"), str(tmp_path)], stdout=out, stderr=err,
                                  start_new_session=True)  # fmt: skip
    held = []
    try:
        deadline = time.monotonic() + 120
        held = [_wait_for_reader(pipe, deadline) for pipe in pipes[:2]]
        yield caller, pipes
    finally:
        for fd in held:
            os.close(fd)
        if caller.poll() is None or not _group_gone(caller.pid, 0.1):
            os.killpg(caller.pid, signal.SIGKILL)
            caller.wait()


_NEEDS_PIPES_AND_GROUPS = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "killpg"),
                                             reason="needs named pipes and process groups")  # fmt: skip


@_NEEDS_PIPES_AND_GROUPS
def test_ctrl_c_stops_every_training_at_once_and_starts_no_other(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) while two trainings run and a third waits: the
    caller gets KeyboardInterrupt within seconds, no training process is left, and the third never
    started (before, the queued jobs still ran, and the caller waited for them)."""
    with _caller_with_two_jobs_running(tmp_path) as (caller, pipes):
        os.killpg(caller.pid, signal.SIGINT)
        caller.wait(timeout=60)
        out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
        assert caller.returncode == 130 and "interrupted" in out, err
        assert "Exception ignored" not in err and "leaked" not in err, err  # the executor wound down quietly
        assert _group_gone(caller.pid, 30), "a training process outlived the interrupted caller"
        assert not _has_reader(pipes[2]) and not (tmp_path / "out-2").exists()


@_NEEDS_PIPES_AND_GROUPS
def test_training_processes_end_when_their_caller_is_killed(tmp_path):
    """The caller killed outright (SIGKILL: no clean-up runs in it): its training processes notice
    and exit on their own, instead of training on unseen into the run's folder."""
    with _caller_with_two_jobs_running(tmp_path) as (caller, _):
        caller.kill()
        caller.wait(timeout=60)
        assert _group_gone(caller.pid, 30), "training processes outlived their killed caller"
