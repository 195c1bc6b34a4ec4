"""Shared fixtures: the devices whose compiled kernels are tested against the reference."""

from __future__ import annotations

import os

import pytest
import torch

from mtlue_fast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """A device whose compiled kernels must be present (a missing library fails, never skips)."""
    dev = torch.device(request.param)
    if os.environ.get("MTLUE_BACKEND", "").lower() == "reference":
        pytest.skip("MTLUE_BACKEND=reference: no compiled kernels to compare")
    assert ops.backend_for(dev) == "compiled", f"compiled mtlue ops missing for {dev}: see python -m mtlue_fast.info"
    return dev


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator per test (seed from pytest's node id would fix the inputs; fresh
    random inputs each run are intended, the seed is printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
