"""Subprocesses with a time limit, and the context every part receives.

A child runs in the repository root in its own process group with its output in a log file. Past its
time limit it gets SIGINT (pytest then still writes its JUnit XML and benchmark JSON for what
finished) and, :data:`GRACE` seconds later, SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

#: Seconds a child gets between SIGINT and SIGKILL.
GRACE = 10
#: Seconds waited for a child after SIGKILL before it is given up as stuck.
KILL_WAIT = 30


@dataclass
class Proc:
    """One finished child: ``rc`` is negative when a signal ended it (``-11``: segmentation fault)."""

    command: list[str]
    rc: int | None
    timed_out: bool
    seconds: float
    log: str
    tail: str = ""

    def brief(self) -> dict:
        return {"command": shlex.join(self.command), "rc": self.rc, "timed_out": self.timed_out,
                "seconds": round(self.seconds, 2), "log": self.log}  # fmt: skip

    def why(self) -> str:
        """``"timed out"``, ``"killed by signal N"`` or ``"exited N"``."""
        if self.timed_out:
            return "timed out"
        if self.rc is not None and self.rc < 0:
            return f"killed by signal {-self.rc}"
        return f"exited {self.rc}"


class PartFailed(Exception):
    """A part could not do its job; ``results`` keeps what it measured before that."""

    def __init__(self, reason: str, results: dict | None = None):
        super().__init__(reason)
        self.reason, self.results = reason, results or {}


class PartSkipped(Exception):
    """A part has nothing to run here; the message says why."""


def progress(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_left(deadline: float, reserve: float = 0.0) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value), less ``reserve``."""
    return deadline - time.monotonic() - reserve


def shares(total: float, weights: list[float]) -> list[float]:
    """Split ``total`` seconds by weight. Callers take the first share and split again what is left
    before the next run, so time an earlier run did not use goes to the later ones."""
    whole = sum(weights)
    return [total * w / whole for w in weights] if whole > 0 else [0.0 for _ in weights]


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def run_logged(command: list[str], timeout: float, log: Path, env: dict | None = None) -> Proc:
    """Run ``command`` in the repository root, stdout and stderr to ``log``, for at most ``timeout`` s."""
    start = time.monotonic()
    timed_out = False
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(proc)
        except BaseException:  # Ctrl-C or SIGTERM here: do not leave the child running
            _stop(proc)
            raise
    return Proc(command, rc, timed_out, time.monotonic() - start, str(log), tail(log))


def _stop(proc: subprocess.Popen) -> int:
    """SIGINT to the child's process group, SIGKILL after :data:`GRACE` s; its exit status, or
    ``-SIGKILL`` when it is still there :data:`KILL_WAIT` s after that (stuck in the driver)."""
    for sig, wait in ((signal.SIGINT, GRACE), (signal.SIGKILL, KILL_WAIT)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return -signal.SIGKILL


@dataclass
class Context:
    """What the parts share: the options, the device, the folders and what the build part found."""

    args: argparse.Namespace | None
    device: str  # "cuda" or "cpu"
    work: Path  # temporary files, removed at the end
    logs: Path
    out: Path | None = None  # the results folder (--out)
    capability: str | None = None  # "9.0" on an H100/H200
    info: dict | None = None  # mtlue_fast.info.collect() as the build part probed it
    notes: list[str] = field(default_factory=list)
    repo_on_path: bool = False  # after an in-place build that pip could not install
    no_jit: bool = False  # after a failed build: children do not each try to compile the ops again

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def env(self, **extra: str) -> dict:
        """The children's environment. ``PYTHONSAFEPATH`` keeps ``python -m`` / ``-c`` from putting
        the repository root first on ``sys.path``, so they import the *installed* package; ``bench/``
        is on the path for the pytest plugin (``-p device_check.bench_plugin``)."""
        env = dict(os.environ)
        first = [str(REPO)] if self.repo_on_path else []
        env["PYTHONPATH"] = os.pathsep.join([*first, str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # a GPU host may have no network
        if self.no_jit:
            env["MTLUE_NO_JIT"] = "1"
        env.update(extra)
        return env

    def pytest(self, name: str, targets: list[str], timeout: float, extra: list[str], env: dict | None = None) -> Proc:
        """``python -m pytest -q targets extra``, logged to ``<logs>/<name>.log``."""
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, *extra]
        progress(f"  {name}: {shlex.join(command[3:])} (up to {timeout:.0f} s)")
        return run_logged(command, timeout, self.logs / f"{name}.log", env or self.env())


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON (through a temporary file, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
