"""Find and load the compiled ``mtlue`` operator library.

Order: the library built at install time (``mtlue_fast/_C*.so``); if it is missing or fails to load
against the running torch (ABI mismatch), a one-time JIT build of the shipped sources with
``torch.utils.cpp_extension.load``, cached per torch version and source digest; if that fails too
(no compiler), no library, and every op runs its pure-PyTorch reference with a warning.

Environment:
    MTLUE_BACKEND=reference   never load the compiled library (for comparisons and debugging).
    MTLUE_LIBRARY=path        load this library instead of the one built at install time.
    MTLUE_NO_JIT=1            do not try the JIT build.
    MTLUE_SKIP_CUDA=1         JIT-build the C++ ops only, even where CUDA is available.
    MTLUE_JIT_DIR             where JIT builds are cached (default ~/.cache/mtlue_fast/jit).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Every op a library must serve for a device; one built from older sources (no take_pending_errors,
# so its CUDA kernels would not record value errors) is not used.
OP_NAMES = (
    "perturb_apply",
    "perturb_apply_backward",
    "embedding_reg",
    "embedding_reg_backward",
    "quantize_export",
    "take_pending_errors",
)
PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass
class BackendState:
    """What was loaded. ``source`` is "prebuilt", "jit" or None (reference only)."""

    source: str | None = None
    library_path: str | None = None
    kernel_devices: frozenset[str] = frozenset()
    errors: list[str] = field(default_factory=list)


_state: BackendState | None = None
_lock = threading.Lock()


def state() -> BackendState:
    """Load the library once per process and return what was found."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
        return _state


def _load() -> BackendState:
    st = BackendState()
    if os.environ.get("MTLUE_BACKEND", "").lower() == "reference":
        st.errors.append("MTLUE_BACKEND=reference: compiled library not loaded on request")
        return st
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            st.source, st.library_path = "prebuilt", str(prebuilt)
        except (OSError, RuntimeError) as err:
            st.errors.append(f"prebuilt library {prebuilt.name} failed to load: {err}")
    if st.source is None and os.environ.get("MTLUE_NO_JIT") != "1":
        try:
            st.library_path = _jit_build_and_load()
            st.source = "jit"
        except Exception as err:  # any build failure falls back to the reference
            st.errors.append(f"JIT build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
    if st.source is None:
        warnings.warn(
            "mtlue_fast: no compiled ops available ("
            + "; ".join(st.errors or ["no library or sources found"])
            + "); using the pure-PyTorch reference implementations, which are slower.",
            RuntimeWarning,
            stacklevel=2,
        )
        return st
    st.kernel_devices = frozenset(
        key.lower()
        for key in ("CPU", "CUDA")
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mtlue::{op}", key) for op in OP_NAMES)
    )
    return st


def _prebuilt_library() -> Path | None:
    """The install-time library: ``MTLUE_LIBRARY``, else ``_C*.so`` beside this package, else the one
    an installed copy of the package carries (see :func:`_installed_library`)."""
    override = os.environ.get("MTLUE_LIBRARY")
    if override:
        return Path(override)
    matches = sorted(PACKAGE_DIR.glob("_C*.so")) + sorted(PACKAGE_DIR.glob("_C*.pyd"))
    return matches[0] if matches else _installed_library()


def _installed_library() -> Path | None:
    """The ``_C`` library of the installed distribution, when this package was imported from another
    folder (a source checkout shadows the installed package when Python starts in the repository
    root) and both were built from the same C++/CUDA sources.

    The installed wheel carries its sources as ``mtlue_fast/_csrc``; the library is used only when
    their digest equals that of the sources this package would JIT-compile, so an edited checkout
    never runs a stale build.
    """
    # Every distribution of that name on sys.path: from the repository root the first one found is
    # the build's own ``mtlue_fast.egg-info`` in the checkout, which lists sources, not the library.
    libraries = [
        Path(installed.locate_file(f))
        for installed in importlib.metadata.distributions(name="mtlue_fast")
        for f in installed.files or []
        if len(f.parts) == 2 and f.parts[0] == "mtlue_fast" and f.name.startswith("_C") and f.suffix in (".so", ".pyd")
    ]
    libraries = [p for p in libraries if p.is_file()]
    if not libraries:
        return None
    library = libraries[0]
    here = source_dir()
    shipped = library.parent / "_csrc"
    if here is None or not (shipped / "ops.cpp").is_file() or here.resolve() == shipped.resolve():
        return None
    return library if sources_digest(here) == sources_digest(shipped) else None


def sources_digest(src: Path) -> str:
    """SHA-256 over the relative names and bytes of the C++/CUDA sources under ``src``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh"}):
        digest.update(path.relative_to(src).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def source_dir() -> Path | None:
    """The C++/CUDA sources: installed as package data (``mtlue_fast._csrc``) or the repo's csrc/."""
    spec = importlib.util.find_spec("mtlue_fast._csrc")
    candidates = list(spec.submodule_search_locations or []) if spec else []
    candidates.append(str(PACKAGE_DIR.parent / "csrc"))
    for cand in candidates:
        if (Path(cand) / "ops.cpp").is_file():
            return Path(cand)
    return None


def jit_sources(src: Path, with_cuda: bool) -> list[Path]:
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += [src / "cuda" / "bindings.cpp", *sorted((src / "cuda").glob("*.cu"))]
    return sources


def _jit_wants_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return (
        os.environ.get("MTLUE_SKIP_CUDA") != "1"
        and torch.version.cuda is not None
        and torch.cuda.is_available()
        and CUDA_HOME is not None
    )


def _jit_build_and_load() -> str:
    src = source_dir()
    if src is None:
        raise FileNotFoundError("C++ sources not found (neither mtlue_fast/_csrc nor csrc/)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise FileNotFoundError("no C++ compiler on PATH (set CXX)")
    with_cuda = _jit_wants_cuda()
    digest = sources_digest(src)
    tag = f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest[:12]}"
    name = "mtlue_fast_C_" + digest[:12]
    root = Path(os.environ.get("MTLUE_JIT_DIR", Path.home() / ".cache" / "mtlue_fast" / "jit"))
    build_dir = root / tag.replace("+", "_")
    built = build_dir / f"{name}.so"
    if built.is_file():
        try:
            torch.ops.load_library(str(built))
            return str(built)
        except OSError:  # a half-written or stale build: rebuild it below
            built.unlink()
    build_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"mtlue_fast: no install-time build of the ops for this torch and these sources; compiling the "
        f"C++{'/CUDA' if with_cuda else ''} ops once into {build_dir} (cached for later runs) ...",
        file=sys.stderr,
        flush=True,
    )
    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    load(
        name=name,
        sources=[str(p) for p in jit_sources(src, with_cuda)],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],  # as setup.py
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        build_directory=str(build_dir),
        is_python_module=False,
        with_cuda=with_cuda,
        verbose=False,
    )
    print(f"mtlue_fast: compiled the ops in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return str(built)


def has_kernel(device: torch.device) -> bool:
    """True when the compiled library has kernels for every op on ``device``'s type.

    Lock-free after the first call so that torch.compile traces it as a constant.
    """
    loaded = _state if _state is not None else state()
    return device.type in loaded.kernel_devices
