"""Waiting for other ranks without a timer: heartbeats and barriers on the job's key-value store.

A collective (``torch.distributed.barrier``, ``broadcast_object_list``) fails once the slowest rank
is later than the collective timeout (``MTLUE_DIST_TIMEOUT``). That is right for the collectives of a
training step, where every rank arrives at about the same time, and wrong for a rank that waits
while another works alone (rank 0 finalising a cache of 100,000 images, writing a report): there a
slow rank is fine and only a *dead* one should end the job. So the waits of this package between
stages go through the store that ``torch.distributed`` rendezvoused on (torchrun's, or the one
``MASTER_ADDR``/``MASTER_PORT`` name):

- every rank runs a heartbeat thread that increments its key ``alive/<rank>`` every
  :data:`HEARTBEAT_S` seconds;
- :func:`barrier` publishes ``barrier/<n>/<rank>`` and polls until every rank's key exists;
  :func:`broadcast_object` publishes rank 0's pickled object under ``object/<n>``;
- while it polls, a waiting rank watches the heartbeats of the ranks it still waits for; one whose
  counter has not moved for :func:`liveness_timeout` seconds (``MTLUE_DIST_LIVENESS``, default 60,
  at most the collective timeout) is declared dead and the wait raises :class:`RankDiedError`
  naming it. A store that stops answering means its host is gone: rank 0 when the job was started
  without torchrun's agent, which then hosts the store.

Every rank makes the same sequence of calls, so the call counter ``<n>`` names the same wait on
every rank. A rank that is alive but never arrives (a deadlock) is waited for indefinitely: only
death ends a wait.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterable

import torch.distributed as dist

HEARTBEAT_S = 0.5  # seconds between two increments of a rank's heartbeat counter
DEFAULT_LIVENESS_S = 60.0
_PREFIX = "mtlue"


class RankDiedError(RuntimeError):
    """Another rank of the job stopped: its heartbeat stopped, or the store it hosted is gone."""

    def __init__(self, message: str, ranks: Iterable[int]) -> None:
        super().__init__(message)
        self.ranks = sorted(ranks)


class _State:
    """This process's store handle, heartbeat thread and call counter (one per process group)."""

    def __init__(self, store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.calls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"mtlue-heartbeat-{rank}", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        # A store client of its own: the main thread's may be blocked in a call of its own.
        store = _clone(self.store)
        key = f"{_PREFIX}/alive/{self.rank}"
        while not self.stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone; the waits report it
                return
            self.stop.wait(HEARTBEAT_S)

    def next_key(self, kind: str) -> str:
        self.calls += 1
        return f"{_PREFIX}/{kind}/{self.calls}"


_STATE: _State | None = None


def _clone(store):
    try:
        return store.clone()
    except Exception:  # noqa: BLE001 - stores without clone(): share the handle (thread-safe in c10d)
        return store


def liveness_timeout() -> float:
    """Seconds without a heartbeat after which a rank counts as dead (``MTLUE_DIST_LIVENESS``,
    default 60, capped at the collective timeout ``MTLUE_DIST_TIMEOUT`` when that is smaller)."""
    value = float(os.environ.get("MTLUE_DIST_LIVENESS", DEFAULT_LIVENESS_S))
    collective = os.environ.get("MTLUE_DIST_TIMEOUT")
    if collective is not None:
        value = min(value, float(collective))
    return max(value, 4 * HEARTBEAT_S)


def start(rank: int, world: int) -> None:
    """Start this rank's heartbeat on the default group's store (after ``init_process_group``)."""
    global _STATE
    stop()
    from torch.distributed import distributed_c10d

    _STATE = _State(distributed_c10d._get_default_store(), rank, world)


def stop() -> None:
    """Stop the heartbeat (the other ranks then see this rank as ended after the liveness timeout)."""
    global _STATE
    if _STATE is not None:
        _STATE.stop.set()
        _STATE.thread.join(timeout=5)
        _STATE = None


def _state() -> _State:
    if _STATE is None:
        if dist.is_available() and dist.is_initialized():  # a group made without dist.setup()
            start(dist.get_rank(), dist.get_world_size())
        else:
            raise RuntimeError("no process group: call mtlue_fast.dist.setup() first")
    return _STATE


class _Watch:
    """The heartbeat counters of some ranks, and when each last moved (this process's clock)."""

    def __init__(self, state: _State, ranks: Iterable[int]) -> None:
        self.state = state
        now = time.monotonic()
        self.seen = {r: (self._read(r), now) for r in ranks}

    def _read(self, rank: int) -> int:
        return int(self.state.store.add(f"{_PREFIX}/alive/{rank}", 0))

    def dead(self, ranks: Iterable[int]) -> list[int]:
        """The ranks among ``ranks`` whose counter has not moved for the liveness timeout."""
        now, limit, gone = time.monotonic(), liveness_timeout(), []
        for rank in ranks:
            count = self._read(rank)
            last, since = self.seen.get(rank, (None, now))
            if count != last:
                self.seen[rank] = (count, now)
            elif now - since > limit:
                gone.append(rank)
        return gone


def _lost_store(what: str, err: Exception) -> RankDiedError:
    return RankDiedError(
        f"rank {_state().rank}: lost the job's store while {what} ({type(err).__name__}: {err}); the process "
        "hosting it has ended: rank 0, when the job was started without torchrun",
        [0],
    )


def _dead_message(gone: list[int], what: str) -> str:
    names = ", ".join(str(r) for r in gone)
    state = _state()
    return (f"rank {state.rank} of {state.world}: rank {names} stopped while {what} (no heartbeat for "
            f"{liveness_timeout():.0f} s, MTLUE_DIST_LIVENESS); ending this rank too")


def _poll(ready, waited_for, what: str):
    """Poll ``ready()`` (returns None until done) while watching the ranks ``waited_for()`` names."""
    state = _state()
    try:
        watch = _Watch(state, range(state.world))
        pause = 0.001
        while True:
            result = ready()
            if result is not None:
                return result
            gone = watch.dead(waited_for())
            if gone:
                raise RankDiedError(_dead_message(gone, what), gone)
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
    except RankDiedError:
        raise
    except (RuntimeError, OSError, ConnectionError) as err:  # the store's host ended
        raise _lost_store(what, err) from err


def barrier(what: str = "waiting for the other ranks") -> None:
    """Wait until every rank has called this barrier, however long that takes; raise
    :class:`RankDiedError` when a rank that has not arrived stops its heartbeat."""
    state = _state()
    key = state.next_key("barrier")
    try:
        state.store.set(f"{key}/{state.rank}", b"1")
    except (RuntimeError, OSError, ConnectionError) as err:
        raise _lost_store(what, err) from err
    missing = [r for r in range(state.world) if r != state.rank]

    def ready():
        nonlocal missing
        missing = [r for r in missing if not state.store.check([f"{key}/{r}"])]
        return True if not missing else None

    _poll(ready, lambda: missing, what)


def broadcast_object(obj, what: str = "waiting for rank 0"):
    """Rank 0's picklable ``obj`` on every rank, however late rank 0 arrives (small objects: the
    store holds it)."""
    state = _state()
    key = state.next_key("object")
    if state.rank == 0:
        try:
            state.store.set(key, pickle.dumps(obj))
        except (RuntimeError, OSError, ConnectionError) as err:
            raise _lost_store(what, err) from err
        return obj
    payload = _poll(lambda: state.store.get(key) if state.store.check([key]) else None, lambda: [0], what)
    return pickle.loads(payload)


def dead_ranks(grace_s: float | None = None) -> list[int]:
    """The ranks whose heartbeat stops within ``grace_s`` seconds (default: the liveness timeout),
    checked after a collective failed, to say which rank ended the job. Returns ``[0]`` when the
    store is gone (its host, rank 0 without torchrun, ended), ``[]`` when every rank is alive."""
    if _STATE is None:
        return []
    state = _STATE
    others = [r for r in range(state.world) if r != state.rank]
    deadline = time.monotonic() + (liveness_timeout() if grace_s is None else grace_s) + 2 * HEARTBEAT_S
    try:
        watch = _Watch(state, others)
        while time.monotonic() < deadline:
            gone = watch.dead(others)
            if gone:
                return gone
            time.sleep(HEARTBEAT_S)
    except (RuntimeError, OSError, ConnectionError):
        return [0]
    return []


def is_collective_error(err: BaseException) -> bool:
    """Whether ``err`` came from a collective of the process group (gloo or NCCL)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(word in text for word in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def explain(err: BaseException, what: str = "in a collective") -> BaseException:
    """``err`` (a failed collective's error) as a :class:`RankDiedError` naming the ranks that died,
    when some did within the liveness timeout; ``err`` itself otherwise (and for one process)."""
    if isinstance(err, RankDiedError) or _STATE is None:
        return err
    gone = dead_ranks()
    if not gone:
        return err
    explained = RankDiedError(f"{_dead_message(gone, what)}: {type(err).__name__}: {err}", gone)
    explained.__cause__ = err
    return explained
