"""Device helpers shared by the data, training and op layers."""

from __future__ import annotations

import torch


def cuda_index(device: torch.device) -> int:
    """The GPU ``device`` names: its index, or the current GPU for a bare ``"cuda"``."""
    return device.index if device.index is not None else torch.cuda.current_device()
