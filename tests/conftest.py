"""Shared fixtures: the devices whose compiled kernels are tested against the reference; the folder of
the real sample datasets."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def no_pending_gpu_errors(request):
    """A CUDA test starts with no value errors recorded by the kernels (they are raised later, by
    ``ops.raise_pending_errors``): one left by a test that failed before reading its own must not
    fail the next ones too."""
    if torch.cuda.is_available() and "cuda" in request.keywords:
        try:
            ops.raise_pending_errors("cuda")
        except ValueError:
            pass
    yield


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


SAMPLE_DATASETS = ("celeba", "chestxray14", "nyuv2", "utkface")


@pytest.fixture(scope="session")
def samples() -> Path:
    """The folder of the real sample datasets (one subfolder per dataset, ``SAMPLE_DATASETS``),
    named by ``$MTLUE_SAMPLES``: a few real files of each dataset in its distributed layout.

    When it is set (CI sets it), a missing folder or dataset fails, never skips; when it is not set,
    the tests that read real files skip.
    """
    named = os.environ.get("MTLUE_SAMPLES")
    if not named:
        pytest.skip("no real sample files: set MTLUE_SAMPLES to a folder of sample datasets")
    root = Path(named).expanduser()
    where = f"MTLUE_SAMPLES={named}"
    if not root.is_dir():
        pytest.fail(f"{where}: no such folder; it must hold the sample datasets {', '.join(SAMPLE_DATASETS)}", pytrace=False)
    missing = [name for name in SAMPLE_DATASETS if not (root / name).is_dir()]
    if missing:
        pytest.fail(f"{where}: the sample folder lacks the dataset folder(s) {', '.join(missing)}", pytrace=False)
    return root
