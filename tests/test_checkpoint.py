"""Checkpoint helpers: random-generator states and optimisers resumed under another setup."""

from __future__ import annotations

import pytest
import torch

from mtlue_fast.train import checkpoint
from mtlue_fast.train.graphed import capturable_adam


def _stepped(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _plain(model: torch.nn.Module) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    checkpoint.keep_setup_on_load(optimizer)
    return optimizer


def test_a_plain_run_resumed_by_a_capturable_optimiser_keeps_the_capturable_setup():
    """A run started without CUDA graphs (on the CPU) resumed where the step is captured."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    saved = _stepped(_plain(model), model)
    resumed = capturable_adam([{"params": list(model.parameters())}], 5e-4, torch.device("cpu"))
    own_lr = resumed.param_groups[0]["lr"]
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert group["capturable"] is True and group["fused"] is True and group["foreach"] is None
    assert group["lr"] is own_lr and float(own_lr) == pytest.approx(1e-3)
    for p in model.parameters():
        step = resumed.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and float(step) == 1


def test_a_capturable_run_resumed_by_a_plain_optimiser_keeps_the_plain_setup():
    """A CUDA-graph run (tensor learning rates, capturable) resumed without graphs: the next step
    must not fail on a tensor learning rate with ``capturable=False``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    graphed = capturable_adam([{"params": list(model.parameters())}], 1e-3, torch.device("cpu"))
    saved = graphed.state_dict()
    saved["param_groups"][0]["lr"] = torch.tensor(2e-4)  # as a scheduler left it, read back on the host
    saved["state"] = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for i, p in enumerate(model.parameters())}  # fmt: skip
    resumed = _plain(model)
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert group["capturable"] is False and group["fused"] is None
    assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(2e-4)
    for p in model.parameters():
        step = resumed.state[p]["step"]
        assert step.device.type == "cpu" and float(step) == 3
    before = [p.detach().clone() for p in model.parameters()]
    _stepped(resumed, model)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _FakeCudaRng:
    """Records which GPU's generator state is read and written."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def get_rng_state(self, device=0):
        self.calls.append(("get", device))
        return torch.tensor([device], dtype=torch.uint8)

    def set_rng_state(self, state, device=0):
        self.calls.append(("set", device, int(state[0])))


@pytest.fixture
def fake_cuda_rng(monkeypatch):
    fake = _FakeCudaRng()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("every GPU's generator touched"))
    return fake


def test_checkpoints_keep_the_training_gpus_generator_only(fake_cuda_rng):
    """Under torch.distributed rank r trains on cuda:r and draws what rank 0 draws: the state saved
    is the training device's, and it is restored onto each rank's own device."""
    state = checkpoint.rng_state(torch.device("cuda", 1))
    assert fake_cuda_rng.calls == [("get", 1)] and int(state["cuda"][0]) == 1
    checkpoint.set_rng_state(state, torch.device("cuda", 3))
    assert fake_cuda_rng.calls[-1] == ("set", 3, 1)
    # Checkpoints that held every visible GPU's state: the first one's (rank 0 trained on it).
    checkpoint.set_rng_state({"cpu": state["cpu"], "cuda": [torch.tensor([7], dtype=torch.uint8)] * 2}, "cuda")
    assert fake_cuda_rng.calls[-1] == ("set", 0, 7)


def test_cpu_runs_touch_no_gpu_generator(fake_cuda_rng):
    state = checkpoint.rng_state("cpu")
    assert "cuda" not in state
    checkpoint.set_rng_state({**state, "cuda": torch.tensor([5], dtype=torch.uint8)}, "cpu")
    assert fake_cuda_rng.calls == []
