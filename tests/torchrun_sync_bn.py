"""A job for ``tests/test_dist.py::test_sync_batchnorm_in_bf16_under_torchrun``, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrun_sync_bn.py OUT

Four steps of the victim's training step (ResNet-18 at width 0.25, global batch 64 of 32x32 crops)
with synchronised batch norms (``train.sync_bn=true``) in bf16 autocast (``train.amp=true``). Each
process writes ``OUT.<rank>`` (``torch.save``): its batch norms' classes and input dtypes, its
thread count, the first step's global mean per-task losses and running statistics, every step's
global mean loss, and the running statistics and weights at the end.
"""

from __future__ import annotations

import sys

import torch
from test_train import make_cache  # this file's folder is first on sys.path

from mtlue_fast import dist
from mtlue_fast.train import TrainConfig, build_training, make_batches, select_tasks

STEPS = 4


def main(out: str) -> None:
    place = dist.setup("cpu")
    try:
        view = select_tasks(make_cache(256, 0), None, (32, 32))
        config = TrainConfig(width=0.25, batch_size=64, lr=2e-3, progress=False, amp=True, sync_bn=True)
        parts = build_training(view, config, "cpu")
        batches = make_batches(view, config, "cpu", train=True)
        batches.set_epoch(0)
        norms = [m for m in parts.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        dtypes: set[str] = set()
        for m in norms:
            m.register_forward_pre_hook(lambda module, args: dtypes.add(str(args[0].dtype)))
        losses, first_losses, first_running = [], None, None
        for index, (images, labels) in enumerate(list(iter(batches))[:STEPS]):
            mean = parts.step(images, labels).float()
            dist.all_reduce_sum(mean)
            mean /= place.world_size  # equal shards: the global batch's mean per-task losses
            losses.append(float(mean.sum()))
            if index == 0:
                first_losses = mean.tolist()
                first_running = [t.clone() for m in norms for t in (m.running_mean, m.running_var)]
        torch.save({"norms": sorted({type(m).__name__ for m in norms}), "norm_input_dtypes": sorted(dtypes),
                    "threads": torch.get_num_threads(), "losses": losses, "first_losses": first_losses,
                    "first_running": first_running,
                    "running": [t.clone() for m in norms for t in (m.running_mean, m.running_var)],
                    "weights": [p.detach().clone() for p in parts.model.parameters()]}, f"{out}.{place.rank}")  # fmt: skip
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
