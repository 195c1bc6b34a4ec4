"""progress: tqdm wrapper; one whole line per report on a non-terminal, nothing when disabled."""

import sys
import time

from mtlue_fast.progress import Progress


def test_non_terminal_lines_are_whole_and_rate_limited(capsys):
    bar = Progress(100, "caching x", every=3600.0)
    for _ in range(10):
        bar.update(10)  # reaching total closes the bar: one final line
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and err.startswith("caching x: 100/100 img (100%)")
    assert bar.done == 100 and bar.rate() > 0


def test_disabled_prints_nothing_but_counts(capsys):
    bar = Progress(10, "quiet", enabled=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == "" and bar.done == 3


def test_lines_every_interval_and_a_final_line(capsys):
    bar = Progress(0, "open-ended", every=0.05)
    for _ in range(3):
        bar.update(1)
        time.sleep(0.06)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("open-ended: 3 img")


def test_bars_make_no_multiprocessing_semaphore():
    """tqdm's default lock would create a multiprocessing semaphore in every process that draws a
    bar; a victim process stopped by Ctrl-C then left it to be reported as leaked at exit. Checked
    in a fresh process: in this one an earlier bar may already hold tqdm's lock."""
    import subprocess

    script = (
        "import multiprocessing.synchronize\n"
        "def no_semaphores(*args, **kwargs):\n"
        "    raise AssertionError('a progress bar created a multiprocessing semaphore')\n"
        "multiprocessing.synchronize.SemLock.__init__ = no_semaphores\n"
        "from mtlue_fast.progress import Progress\n"
        "bar = Progress(10, 'epoch', every=0.0)\n"
        "bar.update(10)\n"
        "bar.close()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "epoch: 10/10" in done.stderr, done.stderr
