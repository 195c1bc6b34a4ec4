"""A dependency-free progress line with throughput, for long loops (cache builds, exports)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "caching celeba/train", unit="img")``; call ``update(n)``, then ``close()``.

    On a terminal the line is redrawn in place; otherwise a line is printed every ``every`` seconds.
    """

    def __init__(self, total: int, label: str, unit: str = "img", enabled: bool = True, every: float = 10.0):
        self.total, self.label, self.unit, self.enabled, self.every = total, label, unit, enabled, every
        self.done = 0
        self.start = self.last_print = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (self.tty or now - self.last_print >= self.every):
            self._print(end="\r" if self.tty else "\n")
            self.last_print = now

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _print(self, end: str) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {self.rate():.0f} {self.unit}/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            self._print(end="\n")
