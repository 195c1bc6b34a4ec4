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
