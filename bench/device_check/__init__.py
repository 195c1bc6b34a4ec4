"""The device check behind ``bench/gpu_check.py``: one module per job.

- :mod:`.cli`: the options and the loop over the parts; writes each part's JSON and the summary.
- :mod:`.runner`: subprocesses with a time limit (SIGINT, then SIGKILL) and the shared context.
- :mod:`.record`: the device, the versions, the git commit and the date.
- :mod:`.build`: part ``build`` (which backend serves each op; ``pip install -e .``).
- :mod:`.junit`, :mod:`.cuda_tests`: part ``tests`` (per-test outcomes, surviving a crashing test).
- :mod:`.bandwidth`, :mod:`.throughput`, :mod:`.benchmarks`, :mod:`.bench_plugin`: part ``bench``.
- :mod:`.paper_scale`: part ``paper-scale``; :mod:`.pipeline`: part ``pipeline``.
- :mod:`.summary`: the Markdown summary.

Nothing here imports torch at import time: :mod:`.bench_plugin` is loaded into pytest processes and
the options must parse before the (possibly slow) torch import.
"""

PARTS = ("build", "tests", "bench", "paper-scale", "pipeline")
