"""torch.distributed on the CPU (gloo): two spawned processes against one.

Synchronised batch norm equals batch norm over the whole batch; a training run with N = 2 ends with
the same weights and metrics as with N = 1 (deterministic settings, fp32) for equal weighting and a
gradient strategy; a world size that does not divide the global batch is refused on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mtlue_fast import dist

sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: int, job, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MTLUE_DIST_TIMEOUT=str(timeout_s))  # fmt: skip
    torch.set_num_threads(1)
    dist.setup("cpu")
    try:
        job(rank, *args)
    finally:
        dist.teardown()


def spawn(job, *args, world: int = 2, timeout_s: int = 120) -> None:
    mp.spawn(_entry, args=(world, _free_port(), timeout_s, job, args), nprocs=world, join=True)


# ---------------------------------------------------------------------------- sync batch norm


def _bn_job(rank: int, out: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    bn = dist.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "cpu")
    bn[0].weight.data.uniform_(0.5, 1.5)
    bn[0].bias.data.uniform_(-0.5, 0.5)
    part = x[rank * 4 : rank * 4 + 4].clone().requires_grad_()
    weights = torch.arange(8 * 3 * 25, dtype=torch.float32).view(8, 3, 5, 5)[rank * 4 : rank * 4 + 4] / 100
    y = bn(part)
    (y * weights).sum().backward()
    dist.average_gradients(bn.parameters())
    if rank == 0:
        torch.save({"y": y.detach(), "gx": part.grad, "gw": bn[0].weight.grad, "gb": bn[0].bias.grad,
                    "rm": bn[0].running_mean, "rv": bn[0].running_var}, out)  # fmt: skip


def test_cpu_sync_batchnorm_equals_whole_batch(tmp_path):
    out = tmp_path / "bn.pt"
    spawn(_bn_job, str(out))
    got = torch.load(out)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    weights = torch.arange(8 * 3 * 25, dtype=torch.float32).view(8, 3, 5, 5) / 100
    y = bn(x)
    (y * weights).sum().backward()
    torch.testing.assert_close(got["y"], y.detach()[:4], rtol=1e-5, atol=1e-5)
    # rank 0's input gradient is the whole-batch gradient of its rows; parameter gradients are the
    # mean over ranks of the per-rank sums, i.e. half the whole-batch sum (each rank's loss is its own).
    torch.testing.assert_close(got["gx"], x.grad[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["gw"], bn.weight.grad / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["gb"], bn.bias.grad / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["rm"], bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["rv"], bn.running_var, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- training


def _config(weighting: str):
    """fp32, deterministic, contiguous: oneDNN's channels-last convolutions on this CPU deviate from
    float64 by ~5e-3 relative in their gradients (measured), which would drown the comparison."""
    from mtlue_fast.train import TrainConfig

    return TrainConfig(width=0.25, batch_size=32, epochs=2, lr=2e-3, progress=False, amp=False, deterministic=True, channels_last=False,
                       weighting=weighting)  # fmt: skip


def _train_job(rank: int, out: str, weighting: str) -> None:
    from test_train import make_cache

    from mtlue_fast.train import train

    train(make_cache(128, 0), make_cache(48, 1), out, _config(weighting), crop=(32, 32))


def _step_job(rank: int, out: str, weighting: str) -> None:
    """One optimisation step's averaged gradients (what every rank applies)."""
    from test_train import make_cache

    from mtlue_fast.train import build_training, make_batches, select_tasks

    view = select_tasks(make_cache(128, 0), None, (32, 32))
    config = _config(weighting)
    parts = build_training(view, config, "cpu")
    batches = make_batches(view, config, "cpu", train=True)
    batches.set_epoch(0)
    images, labels = next(iter(batches))
    step = parts.step
    step.optimizer.step = lambda: None  # keep the gradients for inspection
    step.optimizer.zero_grad = lambda set_to_none=True: None
    step(images, labels)
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in parts.model.named_parameters()}, out)


@pytest.mark.parametrize("weighting", ["ew", "pcgrad"])
def test_two_processes_take_the_same_step_as_one(tmp_path, weighting):
    _step_job(0, str(tmp_path / "one.pt"), weighting)
    spawn(_step_job, str(tmp_path / "two.pt"), weighting)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name, grad in one.items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((two[name] - grad).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("weighting", ["ew", "pcgrad"])
def test_two_processes_train_like_one(tmp_path, weighting):
    from test_train import make_cache

    from mtlue_fast.train import train

    single = train(make_cache(128, 0), make_cache(48, 1), tmp_path / "one", _config(weighting), crop=(32, 32))
    spawn(_train_job, str(tmp_path / "two"), weighting)
    two = json_result(tmp_path / "two")
    np.testing.assert_allclose(two["metrics"]["accuracy"], single.metrics["accuracy"], atol=1e-5)
    # Per-epoch losses agree to float tolerance amplified by Adam: its first updates are sign-like,
    # so a parameter whose gradient is ~0 may step either way (reduction order differs with N).
    losses_one = [r["train_loss_mean"] for r in single.history]
    losses_two = [record["train_loss_mean"] for record in history(tmp_path / "two")]
    np.testing.assert_allclose(losses_two, losses_one, rtol=5e-3)
    assert (tmp_path / "two" / "final.pt").exists() and not list((tmp_path / "two").glob("*.tmp"))


def json_result(path: Path) -> dict:
    import json

    return json.loads((path / "result.json").read_text())


def history(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _bad_batch_job(rank: int, out: str) -> None:
    try:
        dist.per_rank_batch(33, dist.info().world_size)
    except ValueError as err:
        Path(f"{out}.{rank}").write_text(str(err))


def test_indivisible_global_batch_is_refused_on_every_rank(tmp_path):
    spawn(_bad_batch_job, str(tmp_path / "err"))
    for rank in range(2):
        assert "not divisible by the 2 processes" in (tmp_path / f"err.{rank}").read_text()


# ---------------------------------------------------------------------------- generator and export


def _generate_job(rank: int, root: str) -> None:
    from test_generate import FAST_GEN, surrogate

    from mtlue_fast.data import open_cache
    from mtlue_fast.ue.generate import export_generator, generate, load_generator

    clean = open_cache(Path(root) / "clean")
    config = FAST_GEN.replace(base="tap", max_passes=1, stop_error=1.0, batch_size=32, amp=False)
    generate(clean, Path(root) / "generator-two", config, surrogates=surrogate())
    generator = load_generator(Path(root) / "generator-one" / "generator.pt")  # the single process's
    export_generator(generator, clean, Path(root) / "protected-two", batch_size=16, progress=False)


def test_generator_training_and_sharded_export(tmp_path):
    from test_generate import FAST_GEN, cache_dir, surrogate

    from mtlue_fast.data import open_cache
    from mtlue_fast.ue.generate import export_generator, generate

    clean = open_cache(cache_dir(tmp_path / "clean", 72, 0))
    config = FAST_GEN.replace(base="tap", max_passes=1, stop_error=1.0, batch_size=32, amp=False)
    one = generate(clean, tmp_path / "generator-one", config, surrogates=surrogate())
    export_generator(one.load_generator(), clean, tmp_path / "protected-one", batch_size=16, progress=False)
    spawn(_generate_job, str(tmp_path))
    # The sharded export of the same generator is the single-process export byte for byte.
    for name in ("images.npy", "delta.npy", "labels.npy"):
        assert (tmp_path / "protected-one" / name).read_bytes() == (tmp_path / "protected-two" / name).read_bytes(), name
    assert not list(tmp_path.glob(".protected-two.parts"))
    # Generator training: the same losses and stop-test error as one process, to float tolerance.
    two = json.loads((tmp_path / "generator-two" / "result.json").read_text())["history"]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one.history], rtol=1e-3)
    np.testing.assert_allclose([r["stop_error"] for r in two], [r["stop_error"] for r in one.history], atol=0.02)


# ---------------------------------------------------------------------------- the whole command

RUN_FLAGS = ["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--quiet",
             "--set", "train.amp=false", "--set", "train.channels_last=false", "--set", "train.deterministic=true",
             "--set", "generate.amp=false"]  # fmt: skip


def _run_job(rank: int, out: str) -> None:
    from mtlue_fast.run import main

    assert main([*RUN_FLAGS, "--out", out]) == 0


def test_run_command_with_two_processes_matches_one(tmp_path):
    from mtlue_fast.run import main

    assert main([*RUN_FLAGS, "--out", str(tmp_path / "one")]) == 0
    spawn(_run_job, str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    for side in ("clean", "protected"):
        assert two[side]["mean"] == pytest.approx(one[side]["mean"], abs=0.02), side
    assert (tmp_path / "two" / "protected" / "train_images.npy").exists()
    stages_one = json.loads((tmp_path / "one" / "stages.json").read_text())
    stages_two = json.loads((tmp_path / "two" / "stages.json").read_text())
    assert stages_one.keys() == stages_two.keys()


# ---------------------------------------------------------------------------- failures and resume


def _dying_job(rank: int, marker: str) -> None:
    if rank == 1:
        # A rank that dies before the first collective. Exit status 0 on purpose: with a failing
        # status, torch.multiprocessing.spawn would kill the survivor before it can report.
        os._exit(0)
    started = time.perf_counter()
    try:
        dist.barrier()
    except Exception as err:  # noqa: BLE001 - what the surviving rank sees
        Path(marker).write_text(f"{time.perf_counter() - started:.1f} {type(err).__name__}")


def test_a_dead_rank_ends_the_job_within_the_timeout(tmp_path):
    marker = tmp_path / "survivor"
    spawn(_dying_job, str(marker), timeout_s=10)
    seconds = float(marker.read_text().split()[0])
    assert seconds < 60  # an error (closed connection or the 10 s collective timeout), not a hang


def _interrupted_job(rank: int, out: str) -> None:
    from test_train import make_cache

    from mtlue_fast.train import train

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    try:
        train(make_cache(128, 0), make_cache(48, 1), out, _config("ew"), crop=(32, 32), on_epoch_end=stop)
    except KeyboardInterrupt:
        pass


def test_training_started_with_two_processes_resumes_with_one(tmp_path):
    from test_train import make_cache

    from mtlue_fast.train import train

    spawn(_interrupted_job, str(tmp_path / "run"))
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "final.pt").exists()
    resumed = train(make_cache(128, 0), make_cache(48, 1), tmp_path / "run", _config("ew"), crop=(32, 32))
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert (tmp_path / "run" / "final.pt").exists()
