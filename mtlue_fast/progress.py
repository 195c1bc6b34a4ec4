"""A progress line with throughput and time left, for long loops (cache builds, exports, epochs).

A thin wrapper over ``tqdm`` that keeps this package's small interface. On a terminal the bar is
redrawn in place (at most every 0.1 s); on anything else (CI logs, pipes, files) each report is one
complete line, at most one every ``every`` seconds, and :meth:`Progress.close` adds a final line
(unless the last line already showed the final count).
Everything goes to ``sys.stderr`` (looked up when the bar is created).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

TTY_INTERVAL = 0.1  # seconds between redraws on a terminal
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, {remaining} left"
LOG_FORMAT_OPEN = "{desc}: {n_fmt} {unit}, {rate_fmt}, {elapsed} elapsed"  # total unknown


class _Bar(tqdm):
    """tqdm without its monitor thread, so that nothing is printed from another thread, and with a
    thread lock only: tqdm's default lock adds a multiprocessing semaphore, which a training process
    stopped by the run (Ctrl-C, :mod:`mtlue_fast.train.side_by_side`) leaves for Python's resource
    tracker to report as leaked. A spawned process makes a semaphore of its own anyway, which
    orders nothing between processes."""

    monitor_interval = 0
    _lock = threading.RLock()


class _LineWriter:
    """A file for tqdm on a non-terminal: each redraw (``"\\r" + status``) becomes one whole line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """``Progress(total, "caching celeba/train", unit="img")``; call ``update(n)``, then ``close()``.

    Args:
        total: items expected (0 or less: unknown).
        label: the line's name.
        unit: the item's name (rates are ``unit/s``).
        enabled: False prints nothing (the counts are still kept).
        every: on a non-terminal, seconds between two lines (tqdm's ``mininterval``).

    Attributes:
        done: items counted so far.
    """

    def __init__(self, total: int, label: str, unit: str = "img", enabled: bool = True, every: float = 10.0):
        self.total, self.label, self.unit, self.enabled, self.every = total, label, unit, enabled, every
        self.done = 0
        self.start = time.perf_counter()
        self._tty = _is_tty(sys.stderr)
        self._bar = _make_bar(total, label, unit, every, self._tty) if enabled else None

    def update(self, n: int) -> None:
        """Count ``n`` more items (the line is redrawn when its interval has passed); reaching a known
        ``total`` closes the bar, so that a line printed right after the loop starts on a fresh line."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if 0 < self.total <= self.done:
                self.close()

    def rate(self) -> float:
        """Items per second since the bar was created."""
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        """Print the final state (a last line on a non-terminal) and end the line; idempotent."""
        bar, self._bar = self._bar, None
        if bar is None:
            return
        if not self._tty:
            printed = bar.last_print_t >= bar.start_t + bar.delay
            bar.leave = not (printed and bar.last_print_n == bar.n)  # no repeat of the last line
            bar.delay = 0  # print the final line even if no line was printed yet
        bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


def _make_bar(total: int, label: str, unit: str, every: float, tty: bool) -> tqdm:
    """An in-place tqdm bar on a terminal; else whole lines every ``every`` s, none at the start."""
    common = dict(total=total if total > 0 else None, desc=label, unit=unit, leave=True, disable=False, position=0)
    if tty:
        return _Bar(file=sys.stderr, mininterval=TTY_INTERVAL, dynamic_ncols=True, **common)
    every = max(float(every), 0.0)
    return _Bar(file=_LineWriter(sys.stderr), mininterval=every, maxinterval=max(every, 10.0), delay=every,
                bar_format=LOG_FORMAT if total > 0 else LOG_FORMAT_OPEN, ascii=True, **common)
