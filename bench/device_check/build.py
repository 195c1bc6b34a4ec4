"""Part ``build``: install the package with its compiled kernels, and record which backend serves
each op on each device.

``TORCH_CUDA_ARCH_LIST=<capability> pip install --no-build-isolation --no-deps -v -e .`` (``-v``: the
compile and link lines land in the log); where pip itself fails (an old setuptools, no pip) the same
extension is built in place with ``setup.py build_ext --inplace``. Then a fresh process probes
``mtlue_fast.info.collect()``, so the library it records is the one just built. ``--no-build``
only probes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from .runner import Context, PartFailed, progress, run_logged, time_left

PROBE = """
import json
try:
    import mtlue_fast.info as info
except ImportError as err:
    print("DEVICE_CHECK_INFO " + json.dumps({"import_error": str(err)}))
else:
    print("DEVICE_CHECK_INFO " + json.dumps(info.collect(), default=str))
"""
MARK = "DEVICE_CHECK_INFO "


def backends_complete(info: dict | None, device: str) -> bool:
    """Whether ``mtlue_fast.info.collect()``'s op table has compiled kernels for every op on ``device``."""
    if not info:
        return False
    want = f"compiled {device.upper()}"
    return bool(info.get("ops")) and all(table.get(device) == want for table in info["ops"].values())


def probe_backends(ctx: Context, name: str, timeout: float, no_jit: bool) -> dict:
    """``mtlue_fast.info.collect()`` in a fresh process (``{"import_error": ...}`` when the package
    does not import). ``no_jit``: the compiled library only, never a just-in-time build."""
    env = ctx.env(**({"MTLUE_NO_JIT": "1"} if no_jit else {}))
    proc = run_logged([sys.executable, "-c", PROBE], timeout, ctx.logs / f"{name}.log", env)
    for line in Path(proc.log).read_text(errors="replace").splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise PartFailed(f"backend probe {proc.why()}", {"probe": proc.brief(), "tail": proc.tail})


def _build(ctx: Context, deadline: float, env_extra: dict, results: dict) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."]
    progress(f"  build: {' '.join(f'{k}={v}' for k, v in env_extra.items())} {shlex.join(command[1:])}")
    proc = run_logged(command, time_left(deadline, reserve=20), ctx.logs / "build.log", ctx.env(**env_extra))
    results["build"] = {**proc.brief(), "env": env_extra, "log_tail": "\n".join(proc.tail.splitlines()[-40:])}
    if proc.rc != 0 and not proc.timed_out and time_left(deadline, reserve=20) > 30:
        command = [sys.executable, "setup.py", "build_ext", "--inplace"]
        progress(f"  build: pip {proc.why()}; trying {shlex.join(command[1:])}")
        proc = run_logged(command, time_left(deadline, reserve=20), ctx.logs / "build-inplace.log", ctx.env(**env_extra))
        results["build_inplace"] = {**proc.brief(), "log_tail": "\n".join(proc.tail.splitlines()[-40:])}
        ctx.repo_on_path = proc.rc == 0  # not installed: the children import it from the source tree
    if proc.rc != 0:
        ctx.no_jit = True  # the later parts' children would each spend a minute compiling the ops
        raise PartFailed(f"build {proc.why()}; see build.log_tail", results)


def part_build(ctx: Context, deadline: float) -> dict:
    """Build (unless ``--no-build``), then probe the backends; fails when the package does not
    import or the device has no compiled kernels after a build."""
    results: dict = {"built": False}
    if getattr(ctx.args, "no_build", False):
        info = probe_backends(ctx, "build-probe", max(5.0, time_left(deadline)), no_jit=True)
        results["note"] = "--no-build: the installed package as it is"
    else:
        env_extra = {"MAX_JOBS": str(os.cpu_count() or 2)}
        if ctx.gpu:
            chosen = getattr(ctx.args, "arch_list", None)
            env_extra["TORCH_CUDA_ARCH_LIST"] = chosen or ctx.capability or "9.0"
        _build(ctx, deadline, env_extra, results)
        results["built"] = True
        info = probe_backends(ctx, "build-probe", max(5.0, time_left(deadline)), no_jit=False)
    if "import_error" in info:
        raise PartFailed(f"mtlue_fast does not import: {info['import_error']}", results)
    ctx.info = info
    results.update(ops=info.get("ops"), library=info.get("library"), dali=info.get("dali"), mtlue_fast=info.get("mtlue_fast"))
    if not backends_complete(info, ctx.device):
        what = f"no compiled {ctx.device.upper()} kernels"
        if results["built"]:
            raise PartFailed(f"{what} after the build", results)
        results["note"] += f" ({what}: the ops run their PyTorch reference)"
    return results
