"""Build script: compiles mtlue_fast._C against the torch installed in the build environment.

- torch importable (``pip install --no-build-isolation .``): C++ ops always; CUDA ops too when torch
  has CUDA and nvcc is found (``TORCH_CUDA_ARCH_LIST``, default 9.0). ``MTLUE_SKIP_CUDA=1`` builds
  the C++ ops only; ``MAX_JOBS`` bounds parallel compilation.
- torch not importable (plain ``pip install .`` in an isolated environment): nothing is compiled;
  the sources under csrc/ ship as package data (``mtlue_fast._csrc``) and are compiled once at first
  import (see mtlue_fast/ops/_backend.py).
"""

import os
from glob import glob

from setuptools import find_packages, setup

CSRC_PACKAGES = {
    "mtlue_fast._csrc": "csrc",
    "mtlue_fast._csrc.common": "csrc/common",
    "mtlue_fast._csrc.cpu": "csrc/cpu",
    "mtlue_fast._csrc.cuda": "csrc/cuda",
}
SOURCE_PATTERNS = ["*.cpp", "*.cu", "*.h", "*.cuh"]
# The run configs (configs/*.yaml) ship inside the package too, so an installed package finds them.
CONFIG_PACKAGES = {"mtlue_fast._configs": "configs", "mtlue_fast._configs.overlays": "configs/overlays"}


def extension_build():
    """(ext_modules, cmdclass) for the installed torch, or empty when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mtlue_fast: torch not importable at build time; the ops will be compiled at first import")
        return [], {}
    sources = ["csrc/ops.cpp", *sorted(glob("csrc/cpu/*.cpp"))]
    with_cuda = os.environ.get("MTLUE_SKIP_CUDA") != "1" and torch.version.cuda is not None and CUDA_HOME is not None
    # -fopenmp: at::parallel_for is header-inline and runs serially unless OpenMP is on.
    # -ffp-contract=off: no FMA contraction, so kernels round like the reference.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension(
            "mtlue_fast._C",
            sources + ["csrc/cuda/bindings.cpp", *sorted(glob("csrc/cuda/*.cu"))],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("mtlue_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    print(f"mtlue_fast: building C++{' + CUDA' if with_cuda else ''} ops against torch {torch.__version__}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    packages=find_packages(include=["mtlue_fast", "mtlue_fast.*"]) + list(CSRC_PACKAGES) + list(CONFIG_PACKAGES),
    package_dir={**CSRC_PACKAGES, **CONFIG_PACKAGES},
    package_data={**{name: SOURCE_PATTERNS for name in CSRC_PACKAGES}, **{name: ["*.yaml"] for name in CONFIG_PACKAGES}},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
