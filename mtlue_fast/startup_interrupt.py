"""Ctrl-C while a command is still starting: one line, not a traceback through the import machinery.

The package's commands (``python -m mtlue_fast.run``, ``.sweep``, ``.protect``, ``.info``) import
this module before torch, which takes seconds to load; until :func:`mtlue_fast.cli.run_command`
takes over, an interruption would otherwise print dozens of frames from torch, torchvision and
numpy. Importing it, when the program's main module is one of the package's own (importing the
package from a user's program changes nothing):

- replaces ``sys.excepthook`` with one that prints :data:`MESSAGE` for an uncaught
  ``KeyboardInterrupt``, and hands every other exception to the hook it replaced; Python still exits
  as killed by SIGINT (status 130 in a shell);
- notes a SIGINT that arrives before :func:`started` (the handler still raises
  ``KeyboardInterrupt``): a library interrupted in the middle of its import may turn the interruption
  into another error (numpy: ``ImportError: cannot load module more than once per process``), which
  then gets the same line and status 130, or may swallow it and go on, in which case the command
  stops before it starts (:func:`started`).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType, TracebackType

MESSAGE = "interrupted while starting: nothing was written"
_interrupted = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt


def _is_package_command() -> bool:
    """Whether the running program is ``python -m mtlue_fast.<module>``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and (spec.name or "").startswith(f"{__package__}.")


def install() -> None:
    """Replace ``sys.excepthook`` (once) and, where Python's own handler is in place, the SIGINT handler."""
    previous = sys.excepthook
    if getattr(previous, "_mtlue_startup", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{MESSAGE}", file=sys.stderr)
        elif _interrupted:
            print(f"\n{MESSAGE}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)
        else:
            previous(kind, value, tb)

    hook._mtlue_startup = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def started() -> None:
    """The command is about to start (its own handling of Ctrl-C in place): Python's SIGINT handler
    again. Raises ``KeyboardInterrupt`` if a Ctrl-C during startup was swallowed by a library."""
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        raise KeyboardInterrupt


if _is_package_command():
    install()
