"""What a check ran on: the device, the software versions, the git commit.

Taken before the build part runs, so none of it may need the compiled library (or an installed
package): the package version is read from the source tree, and the CPU model from
:mod:`mtlue_fast.machine`, imported from the source tree when the package is not installed.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

from .runner import REPO


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _import_cpu_model():
    try:
        from mtlue_fast.machine import cpu_model
    except ImportError:
        from mtlue_fast.report import cpu_model
    return cpu_model


def cpu_model() -> str:
    """The CPU model (``lscpu``'s name); "unknown" when the package's probe cannot be imported."""
    try:
        return _import_cpu_model()()
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))  # not installed yet: the source tree's copy (pure Python)
    try:
        for name in [n for n in sys.modules if n == "mtlue_fast" or n.startswith("mtlue_fast.")]:
            del sys.modules[name]
        return _import_cpu_model()()
    except Exception:  # noqa: BLE001 - a record must not stop the check
        return platform.processor() or "unknown"
    finally:
        sys.path.remove(str(REPO))


def package_version() -> str | None:
    """``__version__`` as written in the source tree's ``mtlue_fast/__init__.py``."""
    try:
        text = (REPO / "mtlue_fast" / "__init__.py").read_text()
    except OSError:
        return None
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi`` (None without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def git_revision(given: str | None = None) -> dict:
    """``{"commit", "dirty", "checkout_commit"}``: the checkout holding this script (None for each
    outside one); ``commit`` is ``given`` where one is given (``--commit``: a copy of a checkout whose
    ``.git`` is missing or stale), else the checkout's."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20, check=True).stdout.strip()

        checkout, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except Exception:  # noqa: BLE001 - no git, not a checkout
        checkout, dirty = None, None
    return {"commit": given or checkout, "dirty": None if given else dirty, "checkout_commit": checkout}


def device_record(device: str) -> dict:
    """The device (``device`` is "cuda" or "cpu"): its name, and on a GPU capability, memory,
    multiprocessors and count."""
    import torch

    info: dict = {"type": device, "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            gpus=torch.cuda.device_count(),
        )  # fmt: skip
    else:
        info["name"] = info["cpu"] or "cpu"
    return info


def versions(device: str) -> dict:
    """Python, torch, torch's CUDA, cuDNN, the driver, pytest-benchmark and the package."""
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "driver": driver_version() if device == "cuda" else None,
        "mtlue_fast": package_version(),
    }
    try:
        import pytest_benchmark

        out["pytest_benchmark"] = pytest_benchmark.__version__
    except Exception:  # noqa: BLE001
        out["pytest_benchmark"] = None
    return out
