"""Check the package on a CUDA machine: build it, run its CUDA tests, measure it, run the pipeline.

    python bench/gpu_check.py --out DIR                         # every part
    python bench/gpu_check.py --out DIR --parts tests,bench --rounds 3
    python bench/gpu_check.py --out DIR --parts bench --benches victim --bench-args "-k graph"
    python bench/gpu_check.py --out DIR --cpu                   # no GPU: the same parts at tiny sizes

Parts, in order (``--parts``, each limited by ``--budget-<part> SECONDS``):

1. ``build``: ``TORCH_CUDA_ARCH_LIST=<capability> pip install --no-build-isolation --no-deps -v -e .``
   (``--no-build``: use the installed package), then which backend serves each op on each device.
2. ``tests``: ``pytest -m cuda tests`` with an outcome per test, even when a test crashes pytest
   (it is named, recorded as failed and the run repeated without it); then the torch.compile tests.
3. ``bench``: bench/bench_ops.py (against the measured copy bandwidth), bench_victim.py,
   bench_generator.py, bench_data.py through pytest-benchmark, the compiled variants last;
   ``--rounds N`` alternates N rounds, ``--bench-args`` passes pytest arguments through.
4. ``paper-scale``: ``python bench/paper_scale.py --out DIR/paper_scale.json``.
5. ``pipeline``: ``python -m mtlue_fast.run`` on the synthetic CelebA and ChestX-ray samples.

Under DIR: ``build.json``, ``tests.json`` (and each run's JUnit XML in ``tests/``), ``bench.json``
(and each run's pytest-benchmark JSON in ``bench/``), ``paper_scale.json``, ``pipeline.json`` (and
each run's report in ``pipeline/``), ``logs/``, and ``summary.json`` + ``summary.md`` with the
device, the versions (torch, CUDA, cuDNN, driver, Python, the package), the git commit and the date.
See ``python bench/gpu_check.py --help`` for every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
