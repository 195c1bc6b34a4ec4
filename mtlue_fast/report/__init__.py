"""The run's last stage: perturbation statistics, ``report.json`` / ``report.md`` / figures, a terminal table.

Everything here takes plain Python data (numbers, dicts, numpy arrays or memory maps) so that the
report can be rebuilt from a finished run's files. The report dict's field names are a contract with
other programs (see :func:`build_report`); ``report.json`` is strict JSON (NaN and infinities are written
as ``null``). Scores come per victim seed (``victims``: one clean and one protected victim per seed);
the top-level ``clean`` / ``protected`` / ``drop`` / ``drop_std`` are computed from them. Figures are
drawn with matplotlib (its Agg renderer, without pyplot's global state), imported on first use.

Units: images are uint8 pixel values (0..255); perturbation statistics are in those units;
``eps`` is on the [0, 1] scale (shown as ``k/255`` in the Markdown); timings are seconds and
throughputs images per second; scores are in the metric's own units (accuracy / ROC-AUC in [0, 1];
dense NYUv2 metrics as described by the ``metric`` dict).

One module per job, all re-exported here:

- :mod:`.stats`: perturbation statistics and the means / std / drop over victim seeds;
- :mod:`.schema`: the checks of the report dict's fields and the strict-JSON conversion;
- :mod:`.text`: ``report.md`` and the terminal table;
- :mod:`.figures`: ``metrics.png`` and ``samples.png``;
- :mod:`.files`: writing them all to a run folder.

The machine and version probes (``cpu_model``, ``versions``, ``git_revision``) live in
:mod:`mtlue_fast.machine` and are re-exported here.
"""

from __future__ import annotations

from ..machine import cpu_model, git_revision, versions
from .figures import COLORS, DPI, INCHES_PER_TASK, METRIC_LABELS, MIN_FIGURE_INCHES, TILE_INCHES, metrics_figure, samples_figure
from .files import write_report
from .schema import CLASSIFICATION_METRICS, STATS_KEYS, STRING_FIELDS, build_report, summarize_cell, to_json_safe
from .stats import CHUNK_BYTES, SIDES, aggregate_victims, perturbation_stats, sample_rows
from .text import render_markdown, summary_table

__all__ = [
    "CHUNK_BYTES", "CLASSIFICATION_METRICS", "COLORS", "DPI", "INCHES_PER_TASK", "METRIC_LABELS", "MIN_FIGURE_INCHES",
    "SIDES", "STATS_KEYS", "STRING_FIELDS", "TILE_INCHES", "aggregate_victims", "build_report", "cpu_model",
    "git_revision", "metrics_figure", "perturbation_stats", "render_markdown", "sample_rows", "samples_figure",
    "summarize_cell", "summary_table", "to_json_safe", "versions", "write_report",
]  # fmt: skip
