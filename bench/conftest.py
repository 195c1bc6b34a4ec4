"""Benchmark options: ``--bench-device cpu|cuda`` (default: cuda when available)."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="device to benchmark on (default: cuda if available)")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session", autouse=True)
def record_machine(request, bench_device):
    """Store versions and the device in the pytest-benchmark JSON (``machine_info`` is per run)."""
    from mtlue_fast.info import collect

    request.config._mtlue_info = {**collect(), "bench_device": str(bench_device)}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mtlue"] = getattr(config, "_mtlue_info", None)
