"""torchvision imports and builds models beside this machine's torch (CPU build or not)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

if importlib.util.find_spec("torchvision") is None:  # importing it here is what is under test
    pytest.skip("torchvision is an optional dependency (extra 'vision')", allow_module_level=True)

CODE = """
import torch
from mtlue_fast.compat import import_torchvision
tv = import_torchvision()
import_torchvision()  # idempotent
model = tv.models.resnet18(weights=None)
assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
from torchvision.transforms import v2
assert v2.RandomHorizontalFlip(p=1.0)(torch.arange(4.0).view(1, 1, 4)).flatten().tolist() == [3, 2, 1, 0]
print("ok", tv.__version__)
"""


def test_import_torchvision_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
