"""Count the package's host reads of tensor values: the calls that synchronise a GPU.

A value read (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.cpu()``,
``.numpy()``) waits for every queued kernel when the tensor lives on a GPU, and a per-step one keeps
the device idle while the host catches up; it also makes a step impossible to capture in a CUDA
graph. On the CPU these reads cost nothing, so a CPU test cannot see them by timing:
:func:`count_host_reads` counts them instead, attributing each to the line of this package that made
it (reads made inside PyTorch itself, such as the CPU optimiser's step counter, are not counted; on
a GPU ``torch.cuda.set_sync_debug_mode("error")`` covers those).

The other direction is counted too where a CPU run can see it: ``torch.tensor(data, device=...)``
and ``torch.as_tensor(data, device=...)`` of host data (lists, numbers, arrays) make a copy from
pageable host memory, which on a GPU waits for the device as a read does. (A ``.to(device)`` of a
host tensor is the same copy, but on the CPU it is a no-op indistinguishable from moving a tensor
that is already there; the GPU tests catch those.)

    with count_host_reads() as reads:
        step(images, labels)
    assert not reads, reads.where()
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

_PACKAGE = str(Path(__file__).resolve().parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__")
#: Functions of ``torch`` that copy host data to a device when given ``device=``.
FACTORIES = ("tensor", "as_tensor")


class HostReads(Counter):
    """``{"file.py:line method": count}`` of the reads seen."""

    def where(self) -> str:
        return ", ".join(f"{place} x{n}" for place, n in sorted(self.items())) or "none"


def _caller_in_package() -> str | None:
    """``"relative/path.py:line"`` of the code that made the read when it is this package's, else None
    (tests, PyTorch internals)."""
    frame = sys._getframe(2)  # 0: this function, 1: the counting wrapper, 2: the caller
    name = frame.f_code.co_filename
    if not name.startswith(_PACKAGE) or name == __file__:
        return None
    return f"{Path(name).relative_to(_PACKAGE).as_posix()}:{frame.f_lineno}"


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Within the block, count calls of :data:`READS` on tensors, and of :data:`FACTORIES` with host data
    and a device, made directly by this package's code."""
    reads = HostReads()
    # (object, attribute, how the read is named, whether a call counts: (first argument, kwargs) -> bool)
    patches = [(torch.Tensor, name, name, lambda first, kwargs: True) for name in READS if hasattr(torch.Tensor, name)]
    patches += [(torch, name, f"torch.{name}(host data, device=...)",
                 lambda first, kwargs: kwargs.get("device") is not None and not isinstance(first, torch.Tensor))
                for name in FACTORIES]  # fmt: skip

    def wrap(original, label, counts):
        def counted(first, *args, **kwargs):
            if counts(first, kwargs):
                place = _caller_in_package()
                if place is not None:
                    reads[f"{place} {label}"] += 1
            return original(first, *args, **kwargs)

        counted.__name__ = original.__name__
        return counted

    originals = [(owner, name, getattr(owner, name)) for owner, name, _, _ in patches]
    for (owner, name, label, counts), (_, _, original) in zip(patches, originals):
        setattr(owner, name, wrap(original, label, counts))
    try:
        yield reads
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
