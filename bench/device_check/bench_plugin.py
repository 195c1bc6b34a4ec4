"""pytest plugin for the benchmark runs (``-p device_check.bench_plugin``, ``bench/`` on the path).

- Sizes: the bench modules choose their sizes in ``sizes(device)`` and have no option for them; the
  ``--cpu`` check wants smaller ones still. ``$DEVICE_CHECK_BENCH_SIZES`` (JSON ``{module: {key:
  value}}``) is laid over each named module's choice once collection has imported it.
- Interrupted runs: a benchmark stopped by the time limit has no timings, and pytest-benchmark then
  writes no JSON at all (``min()`` of an empty sequence); the unfinished ones are dropped first, so
  the JSON keeps every benchmark that finished.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

SIZES_ENV = "DEVICE_CHECK_BENCH_SIZES"


def pytest_collection_finish(session) -> None:
    """Wrap each named module's ``sizes(device)`` so it returns the override over its own choice."""
    wanted = json.loads(os.environ.get(SIZES_ENV) or "{}")
    for name, override in wanted.items():
        module = sys.modules.get(name)
        if module is None or not hasattr(module, "sizes"):
            continue
        original = module.sizes

        def patched(device, _original=original, _override=override):
            return {**_original(device), **_override}

        module.sizes = patched


def drop_unfinished(session) -> None:
    """Keep only the benchmarks that have timings."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Before pytest-benchmark's own end-of-run hook, which writes the JSON."""
    drop_unfinished(session)
    yield
