"""Ctrl-C while a command is still importing torch prints one line, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtlue_fast import cli, startup_interrupt

COMMANDS = ("run", "sweep", "protect", "info")
#: ``import torch`` interrupted by a real SIGINT; the first variant lets the KeyboardInterrupt out,
#: the second swallows it and fails with another error, as numpy can when interrupted mid-import.
INTERRUPTED_IMPORTS = {
    "raised": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n",
    "swallowed": ("import os, signal, time\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
                  "except KeyboardInterrupt:\n    pass\nraise ImportError('cannot load module more than once per process')\n"),
}  # fmt: skip


def _environment(tmp_path: Path, torch_init: str) -> dict:
    """An environment in which ``import torch`` (and ``import yaml``, protect's first) runs ``torch_init``."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(torch_init)
    (tmp_path / "yaml.py").write_text(torch_init)
    return {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    # Python ignores SIGINT in a child started with SIG_IGN (a background job): give it the default.
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_interrupted_while_importing_prints_one_line(command: str, tmp_path: Path):
    proc = _run(["-m", f"mtlue_fast.{command}", "--help"], _environment(tmp_path, INTERRUPTED_IMPORTS["raised"]))
    assert proc.stderr.strip() == startup_interrupt.MESSAGE
    assert proc.returncode == -signal.SIGINT  # still exits as killed by SIGINT (130 in a shell)


def test_an_interruption_a_library_swallowed_prints_the_same_line(tmp_path: Path):
    proc = _run(["-m", "mtlue_fast.run", "--help"], _environment(tmp_path, INTERRUPTED_IMPORTS["swallowed"]))
    assert proc.stderr.strip() == startup_interrupt.MESSAGE
    assert proc.returncode == 130


def test_without_an_interruption_an_import_error_keeps_its_traceback(tmp_path: Path):
    proc = _run(["-m", "mtlue_fast.run", "--help"], _environment(tmp_path, "raise ImportError('no torch here')\n"))
    assert "Traceback" in proc.stderr and "ImportError: no torch here" in proc.stderr and proc.returncode == 1


@pytest.mark.parametrize("variant", sorted(INTERRUPTED_IMPORTS))
def test_a_users_program_keeps_pythons_behaviour(variant: str, tmp_path: Path):
    code = "import mtlue_fast.startup_interrupt\nimport torch\n"
    proc = _run(["-c", code], _environment(tmp_path, INTERRUPTED_IMPORTS[variant]))
    assert "Traceback" in proc.stderr and startup_interrupt.MESSAGE not in proc.stderr


def test_other_errors_reach_the_previous_hook_and_the_command_restores_sigint(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[0]))
    monkeypatch.setattr(startup_interrupt, "_interrupted", False)
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        startup_interrupt.install()
        startup_interrupt.install()  # once only
        assert signal.getsignal(signal.SIGINT) is startup_interrupt._on_sigint
        sys.excepthook(ValueError, ValueError("x"), None)
        assert seen == [ValueError]
        sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
        assert seen == [ValueError]
        assert cli.run_command(lambda: 0, interrupted="x") == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous_sigint)


def test_an_interruption_swallowed_during_startup_stops_the_command_before_it_starts(monkeypatch):
    monkeypatch.setattr(startup_interrupt, "_interrupted", True)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        cli.run_command(lambda: ran.append(1) or 0, interrupted="x")
    assert not ran
