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
SAMPLES_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The folder of the real sample datasets (one subfolder per dataset, ``SAMPLE_DATASETS``).

    ``$MTLUE_SAMPLES`` when set (CI sets it): a missing folder or dataset fails, never skips.
    Otherwise ``../shared/samples`` beside the repository, and the tests skip when that folder is
    absent (a developer checkout without the samples); a folder present but incomplete fails.
    """
    named = os.environ.get("MTLUE_SAMPLES")
    root = Path(named).expanduser() if named else SAMPLES_BESIDE_REPO
    where = f"MTLUE_SAMPLES={named}" if named else f"{root} (no MTLUE_SAMPLES set)"
    if not root.is_dir():
        if named:
            pytest.fail(f"{where}: no such folder; it must hold the sample datasets {', '.join(SAMPLE_DATASETS)}", pytrace=False)
        pytest.skip(f"no real sample files: set MTLUE_SAMPLES or put them in {root}")
    missing = [name for name in SAMPLE_DATASETS if not (root / name).is_dir()]
    if missing:
        pytest.fail(f"{where}: the sample folder lacks the dataset folder(s) {', '.join(missing)}", pytrace=False)
    return root
