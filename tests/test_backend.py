"""How the compiled library is found: prebuilt, JIT fallback, reference fallback; the info command;
the isolated (plain ``pip install .``) build. Each scenario runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs a small computation with the public API and prints the backend that served it.
PROBE = """
import sys, torch
from mtlue_fast import ops
from mtlue_fast.ops import _backend
x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
raw = torch.randn(2, 3, 8, 8, requires_grad=True)
y = ops.perturb_apply(x, raw, 0.1, out_size=(6, 6))
y.sum().backward()
intra, inter = ops.embedding_reg(torch.randn(4, 5), [0, 2, 4])
p, d = ops.quantize_export(x, raw.detach() * 0.01)
print("SOURCE", _backend.state().source, "CPU", ops.backend_for("cpu"))
"""


@pytest.fixture
def broken_library(tmp_path) -> str:
    """A file standing in for a prebuilt library that does not load (as after an ABI change)."""
    path = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    path.write_bytes(b"not a shared library")
    return str(path)


def run_probe(**env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env, timeout=600
    )


def test_info_reports_compiled_cpu_ops():
    out = subprocess.run([sys.executable, "-m", "mtlue_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "compiled library:" in out
    for op in ("perturb_apply", "embedding_reg", "quantize_export"):
        line = next(line for line in out.splitlines() if line.strip().startswith(op))
        assert "cpu: compiled CPU" in line, out


def test_reference_backend_on_request():
    result = run_probe(MTLUE_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert "SOURCE None CPU reference" in result.stdout


def test_broken_prebuilt_library_falls_back_to_jit(tmp_path, broken_library):
    """An ABI-mismatched (here: corrupt) prebuilt library triggers a one-time JIT build, cached."""
    result = run_probe(MTLUE_LIBRARY=broken_library, MTLUE_JIT_DIR=str(tmp_path / "jit"))
    assert result.returncode == 0, result.stderr
    assert "SOURCE jit CPU compiled" in result.stdout
    assert "compiling the C++" in result.stderr
    again = run_probe(MTLUE_LIBRARY=broken_library, MTLUE_JIT_DIR=str(tmp_path / "jit"))
    assert "SOURCE jit CPU compiled" in again.stdout
    assert "compiling" not in again.stderr  # cached: no second build


def test_no_compiler_falls_back_to_reference_with_a_warning(tmp_path, broken_library):
    result = run_probe(MTLUE_LIBRARY=broken_library, MTLUE_JIT_DIR=str(tmp_path / "jit"), CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert "SOURCE None CPU reference" in result.stdout
    assert "failed to load" in result.stderr
    assert "using the pure-PyTorch reference" in result.stderr and "no C++ compiler" in result.stderr


def test_isolated_build_ships_sources_and_needs_no_torch(tmp_path):
    """What plain ``pip install .`` builds: a pure wheel whose sources compile at first import."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("package index unreachable for the isolated build requirements")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("mtlue_fast-*.whl")
    assert wheel.name.endswith("py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    for src in ("ops.cpp", "cpu/perturb_apply.cpp", "cuda/perturb_apply.cu", "cuda/launchers.h", "common/checks.h"):
        assert f"mtlue_fast/_csrc/{src}" in names, names


class _FakeDistribution:
    """What ``importlib.metadata.distribution`` returns, for an installed copy under ``root``."""

    def __init__(self, root: Path, files: list[str]):
        from importlib.metadata import PackagePath

        self.root, self.files = root, [PackagePath(f) for f in files]

    def locate_file(self, path) -> Path:
        return self.root / path


def test_checkout_finds_the_installed_library_built_from_the_same_sources(tmp_path, monkeypatch):
    """From the repository root the source folder shadows the installed package; the loader then takes
    the installed ``_C`` library when the installed sources equal the checkout's, and not otherwise."""
    import importlib.metadata
    import shutil

    from mtlue_fast.ops import _backend

    site = tmp_path / "site-packages"
    shipped = site / "mtlue_fast" / "_csrc"
    shutil.copytree(REPO / "csrc", shipped)
    library = site / "mtlue_fast" / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not loaded here")
    files = ["mtlue_fast/__init__.py", f"mtlue_fast/{library.name}", "mtlue_fast/_csrc/ops.cpp"]
    # The checkout's own egg-info (listing sources only) comes first on sys.path from the repository root.
    egg_info = _FakeDistribution(REPO, ["mtlue_fast/__init__.py", "csrc/ops.cpp"])
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [egg_info, _FakeDistribution(site, files)])
    monkeypatch.setattr(_backend, "source_dir", lambda: REPO / "csrc")
    assert _backend._installed_library() == library
    (shipped / "ops.cpp").write_text((shipped / "ops.cpp").read_text() + "\n// edited\n")
    assert _backend._installed_library() is None  # the checkout's sources differ: never a stale build


def test_info_from_the_repository_root_uses_a_compiled_library_without_jit():
    """After the README's install, ``python -m mtlue_fast.info`` run in the repository root reports a
    library built at install time (in place, or the installed copy), never a JIT build."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTLUE_BACKEND", "MTLUE_LIBRARY")}
    env["MTLUE_NO_JIT"] = "1"
    probe = "from mtlue_fast.ops import _backend; print('SOURCE', _backend.state().source)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "SOURCE prebuilt" in done.stdout, done.stdout + done.stderr
