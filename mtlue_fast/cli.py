"""What the package's commands (``run``, ``sweep``, ``protect``) share at their top level: the
one-line errors and exit statuses a user sees instead of a traceback, and the ``--device`` choice.

- a problem with what the user asked for (:class:`UserError`, a config or dataset-format error, a
  ``ValueError`` naming the argument, file or field, a missing file): ``error: ...``, status 2;
- a full disk: ``error: no space left on device while writing ...``, status 1;
- a rank of a torchrun job that died (or a collective that failed because one did): the rank named,
  status 1;
- Ctrl-C: what rerunning does, status 130.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import torch

from . import dist, startup_interrupt
from .config import ConfigError
from .data.records import DatasetFormatError


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


USER_ERRORS = (UserError, ConfigError, DatasetFormatError, ValueError, FileNotFoundError)


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` (``auto``: CUDA when this torch sees a GPU, else the CPU); asking
    for ``cuda`` without one is the user's error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available to this torch")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_command(body: Callable[[], int], *, interrupted: str) -> int:
    """``body()``'s exit status, with the package's errors printed as one line (see the module
    docstring); ``interrupted`` is printed after Ctrl-C. The process group is torn down at the end
    (aborted under NCCL when the command fails: :func:`mtlue_fast.dist.teardown`)."""
    startup_interrupt.started()
    status = 1  # unless body returns: every exception below ends the process with an error
    try:
        status = body()
        return status
    except USER_ERRORS as err:
        rank = f"rank {dist.info().rank}: " if dist.info().distributed else ""
        print(f"{rank}error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"error: no space left on device while writing {err.filename or 'the output'}", file=sys.stderr)
            return 1
        raise
    except dist.RankDiedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        explained = dist.liveness.explain(err) if dist.liveness.is_collective_error(err) else err
        if explained is err:
            raise
        print(f"error: {explained}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    finally:
        dist.teardown(failed=status != 0)
