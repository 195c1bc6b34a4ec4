"""Waits between ranks without a timer (:mod:`mtlue_fast.dist.liveness`), with 2 and 3 gloo ranks.

- a rank-0 step that outlasts the collective timeout (``MTLUE_DIST_TIMEOUT``) completes: the other
  ranks wait in :func:`mtlue_fast.dist.barrier` / :func:`~mtlue_fast.dist.broadcast_object`, which
  poll the store and watch heartbeats instead of timing out;
- a rank killed (SIGKILL) while the others wait for it, or in a collective, ends the survivors well
  within the collective timeout with an error that names the dead rank.

The ranks are separate ``python`` processes started here (as torchrun starts its workers), not
``torch.multiprocessing.spawn``, which would kill the survivors as soon as one process dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(job: str, world: int, out: Path, *, timeout_s: float, liveness_s: float = 60.0) -> list[subprocess.Popen]:
    """``job`` (a function name of this module) on ``world`` ranks, one process each."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "MTLUE_DIST_TIMEOUT": str(timeout_s), "MTLUE_DIST_LIVENESS": str(liveness_s)}  # fmt: skip
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_dist_liveness as t; t._entry({job!r}, {str(out)!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _entry(job: str, out: str) -> None:
    from mtlue_fast import dist

    place = dist.setup("cpu")
    result: dict = {"rank": place.rank}
    started = time.perf_counter()
    try:
        result.update(globals()[job](place.rank, place.world_size, Path(out)) or {})
    except Exception as err:  # noqa: BLE001 - what a surviving rank sees is the result
        result["error"] = f"{type(err).__name__}: {err}"
    result["seconds"] = time.perf_counter() - started
    Path(out, f"rank{place.rank}.json").write_text(json.dumps(result))
    dist.teardown()


def _wait_all(procs: list[subprocess.Popen], limit_s: float) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=limit_s)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"a rank did not end within {limit_s} s") from None
    return outputs


def _results(out: Path, ranks) -> dict[int, dict]:
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in ranks}


# ---------------------------------------------------------------------------- jobs


def _slow_main_job(rank: int, world: int, out: Path) -> dict:
    from mtlue_fast import dist

    if rank == 0:
        time.sleep(4.0)  # rank-0-only work, four times the collective timeout
    dist.barrier("waiting for rank 0's slow step")
    value = dist.broadcast_object({"made by": rank, "time": time.time()} if rank == 0 else None)
    if rank == 0:
        time.sleep(3.0)
    dist.barrier()
    import torch

    total = dist.all_reduce_sum(torch.ones(1) * (rank + 1))  # a real collective still works afterwards
    return {"from": value["made by"], "sum": float(total)}


def _killed_while_waited_for_job(rank: int, world: int, out: Path) -> dict:
    from mtlue_fast import dist

    dist.barrier()  # every rank is up
    if rank == world - 1:
        (out / "ready").write_text("")
        time.sleep(600)  # killed by the test while the others wait for it
    dist.barrier("waiting for the last rank")
    return {}


def _killed_in_collective_job(rank: int, world: int, out: Path) -> dict:
    import torch

    from mtlue_fast import dist

    dist.barrier()
    if rank == world - 1:
        (out / "ready").write_text("")
        time.sleep(600)
    try:
        dist.all_reduce_sum(torch.ones(4))
    except Exception as err:  # noqa: BLE001 - turned into a message naming the dead rank
        raise dist.liveness.explain(err) from err
    return {}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank0_step_longer_than_the_collective_timeout_completes(tmp_path, world):
    procs = _launch("_slow_main_job", world, tmp_path, timeout_s=1.0)
    _wait_all(procs, 120)
    results = _results(tmp_path, range(world))
    for rank, result in results.items():
        assert "error" not in result, result
        assert result["from"] == 0 and result["sum"] == sum(range(1, world + 1)), result
    assert all(r["seconds"] >= 6.5 for r in results.values())  # they did wait for rank 0's 4 + 3 s


@pytest.mark.parametrize("job", ["_killed_while_waited_for_job", "_killed_in_collective_job"])
def test_survivors_of_a_killed_rank_end_with_an_error_naming_it(tmp_path, job):
    world, timeout_s, liveness_s = 3, 60.0, 3.0
    procs = _launch(job, world, tmp_path, timeout_s=timeout_s, liveness_s=liveness_s)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and procs[-1].poll() is None, "the last rank never got ready"
        time.sleep(0.1)
    time.sleep(0.5)
    killed_at = time.monotonic()
    procs[-1].send_signal(signal.SIGKILL)
    _wait_all(procs[:-1], timeout_s)
    ended_after = time.monotonic() - killed_at
    results = _results(tmp_path, range(world - 1))
    for result in results.values():
        assert result["error"].startswith("RankDiedError") and f"rank {world - 1} stopped" in result["error"], result
    assert ended_after < timeout_s / 2, ended_after
