"""What a result was measured on: the CPU model, the software versions (with the GPU's name) and the
checkout's git revision. Recorded in ``report.json`` and by the benchmark scripts; every probe falls
back to ``unknown`` / None instead of raising.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (falls back to /proc/cpuinfo), e.g. ``AMD EPYC``."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (macOS, some containers)
        pass
    return "unknown"


def cpu_bf16_flags() -> list[str]:
    """The CPU features that decide the bf16 path (``amx*``, ``avx512_bf16``), sorted; [] when the
    flags cannot be read."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")


def versions() -> dict:
    """Software versions: ``mtlue_fast``, ``python``, ``torch``, ``torchvision``, ``cuda`` (torch's
    CUDA or None), ``dali`` (None when not installed), ``gpu`` (device 0's name or None) and
    ``ops_library`` (where the compiled ops came from, or None). Never raises."""
    from . import __version__

    try:
        from .info import collect

        info = collect()
    except Exception:  # noqa: BLE001 - the report must not fail on a broken backend probe
        info = {}
    out = {"mtlue_fast": __version__, **_torch_versions()}
    out["python"] = info.get("python") or _python_version()
    out["torchvision"] = info.get("torchvision")
    dali = info.get("dali")
    out["dali"] = None if dali in (None, "not installed") else dali
    out["ops_library"] = (info.get("library") or {}).get("source")
    return out


def _torch_versions() -> dict:
    """torch / CUDA / GPU name straight from torch (None where unavailable)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}
    except Exception:  # noqa: BLE001
        return {"torch": None, "cuda": None, "gpu": None}


def _python_version() -> str:
    import platform

    return platform.python_version()


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package, or None (not a work tree, no git,
    any error). Never raises."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--is-inside-work-tree", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except Exception:  # noqa: BLE001 - git missing, timeout, ...
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or lines[0] != "true":
        return None
    rev = lines[1]
    return rev if all(c in "0123456789abcdef" for c in rev) and len(rev) >= 40 else None
