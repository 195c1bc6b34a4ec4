"""``python -m mtlue_fast.info``: versions, op backends, DALI and GPU availability."""

from __future__ import annotations

import importlib.metadata
import platform

from . import startup_interrupt  # noqa: F401 - before torch: Ctrl-C while it loads prints one line

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``main`` prints, as a dict (also recorded with benchmark results)."""
    from mtlue_fast import __version__
    from mtlue_fast.ops import _backend

    state = _backend.state()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "mtlue_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": _version("torchvision"),
        "dali": _dali_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "library": {"source": state.source, "path": state.library_path, "errors": state.errors},
        "ops": {
            op: {dev: ("compiled " + dev.upper()) if dev in state.kernel_devices else "reference" for dev in devices}
            for op in ("perturb_apply", "embedding_reg", "quantize_export")
        },
    }


def _dali_version() -> str:
    try:
        import nvidia.dali as dali

        return dali.__version__
    except ImportError:
        return "not installed"


def main() -> None:
    info = collect()
    lib = info["library"]
    print(f"mtlue_fast {info['mtlue_fast']}  python {info['python']}  {info['platform']}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  torchvision {info['torchvision']}")
    print(f"DALI: {info['dali']}")
    print(f"GPU: {info['gpu'] or 'none'}")
    print(f"compiled library: {lib['source'] or 'none'}" + (f" ({lib['path']})" if lib["path"] else ""))
    for err in lib["errors"]:
        print(f"  note: {err}")
    for op, backends in info["ops"].items():
        print(f"  {op:16s} " + "  ".join(f"{dev}: {how}" for dev, how in backends.items()))


if __name__ == "__main__":
    main()
