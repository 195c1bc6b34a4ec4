"""Make torchvision importable beside a CPU-only torch build.

PyPI's torchvision wheels are CUDA builds; beside the CPU torch their ``_C.so`` cannot be loaded,
and ``import torchvision`` then fails with ``operator torchvision::nms does not exist`` because its
meta registrations look the operators up. Defining the two schemas first (no kernels) lets the
import finish: models, transforms and datasets work; ``torchvision.ops`` kernels and
``torchvision.io.decode_*`` do not (decode with DALI or PIL). Where torchvision's own library loads
(GPU machines), this does nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

_shim_library: torch.library.Library | None = None  # kept alive: dropping it removes the schemas


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
        return True
    except RuntimeError:
        return False


def _torchvision_ops_loadable() -> bool:
    if _schema_exists("torchvision::nms"):
        return True  # torchvision's library (or another shim) is loaded already
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to fix, the import error will say so
    for lib in Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except OSError:
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision's compiled ops cannot load."""
    global _shim_library
    if _shim_library is not None or _torchvision_ops_loadable():
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _shim_library = lib


def import_torchvision() -> ModuleType:
    """``import torchvision`` after :func:`ensure_torchvision_importable`."""
    ensure_torchvision_importable()
    import torchvision

    return torchvision
