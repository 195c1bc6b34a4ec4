"""The Markdown summary of a check (``summary.md``), from the record written as ``summary.json``."""

from __future__ import annotations

import shlex

from . import PARTS
from .targets import judge

VERDICT = {True: "met", False: "NOT met", None: "not judged off a GPU"}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _cell(text) -> str:
    return str(text or "").replace("|", "/").replace("\n", " ")


def header(record: dict) -> list[str]:
    dev, ver, git = record["device"], record["versions"], record["git"]
    gpu = dev["type"] == "cuda"
    device = f"- device: {dev.get('name')}"
    if gpu:
        device += f", capability {dev.get('capability')}, {dev.get('memory_gib')} GiB, {dev.get('gpus')} GPU(s)"
    device += f"; CPU {dev.get('cpu')}, {dev.get('cores')} cores"
    software = f"- mtlue_fast {ver.get('mtlue_fast')}, torch {ver.get('torch')} (CUDA {ver.get('cuda') or 'none'}"
    software += f", cuDNN {ver.get('cudnn')}, driver {ver.get('driver')})" if gpu else ")"
    software += f", Python {ver.get('python')}, pytest-benchmark {ver.get('pytest_benchmark')}"
    commit = f"- commit {git.get('commit') or 'unknown (not a git checkout)'}" + (" with uncommitted changes" if git.get("dirty") else "")
    if git.get("commit") and git.get("checkout_commit") not in (None, git["commit"]):
        commit += f" (given; the folder's .git names {git['checkout_commit']})"
    lines = [f"# Device check: {dev.get('name')} ({record['date']})", "",
             f"`{record['command']}`: {record['seconds']:.0f} s, exit status {record['exit_status']}.", "",
             device, software, commit, "", "| part | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]  # fmt: skip
    for name in PARTS:
        p = record["parts"].get(name, {"status": "pending"})
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('seconds'), 0)} | {_fmt(p.get('budget_s'), 0)} | {_cell(p.get('reason'))} |")
    return lines


def build_lines(r: dict) -> list[str]:
    if not r.get("ops"):
        return []
    text = "; ".join(f"{op}: " + ", ".join(f"{d} {how}" for d, how in t.items()) for op, t in r["ops"].items())
    library = f" (library: {(r.get('library') or {}).get('source')})" if r.get("library") else ""
    return ["", "## Build", "", f"Backends: {text}{library}"] + ([f"- {r['note']}"] if r.get("note") else [])


def tests_lines(r: dict) -> list[str]:
    if not r.get("counts"):
        return []
    lines = ["", "## Tests", "", "Tests: " + ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items())), ""]
    lines += ["| module | passed | failed | error | skipped |", "|---|---:|---:|---:|---:|"]
    for module, c in (r.get("modules") or {}).items():
        lines.append(f"| {module} | " + " | ".join(str(c.get(s, 0)) for s in ("passed", "failed", "error", "skipped")) + " |")
    lines += [f"- FAILED {t}: {_cell(m)[:200]}" for t, m in (r.get("failed") or {}).items()]
    return lines


def ops_lines(ops: dict) -> list[str]:
    if not ops.get("rows"):
        return []
    copy = ops["copy"]
    mib = copy["buffer_bytes"] // 2**20
    lines = ["", f"Op benchmarks (copy bandwidth {copy['gb_per_s']:,.0f} GB/s over a {mib} MiB buffer, bytes read + written):", "",
             "| op | size | impl | raw | passes | median ms | GB/s | % of copy | time / compiled |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in ops["rows"]:
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r.get("fraction_of_copy") is not None else "-"
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r.get('raw') or '-'} | {r.get('passes') or '-'} | {r['median_ms']:.3f} | "
                     f"{_fmt(r.get('gb_per_s'), 0)} | {frac} | {_fmt(r.get('time_vs_compiled'), 1)} |")  # fmt: skip
    return lines


def _ratio(row: dict) -> str:
    for k, val in row.items():
        if k.startswith("vs_"):
            return f"{val:.2f}x {k[3:]}"
        if k == "step_time_vs_ew":
            return f"{val:.2f}x ew step time"
    return "-"


def throughput_lines(summary: dict) -> list[str]:
    lines = []
    for group, rows in (summary.get("groups") or {}).items():
        lines += ["", f"{group}:", "", "| variant | images/s | ratio | images/s per round | CUDA graph |", "|---|---:|---:|---|---|"]
        for v, r in sorted(rows.items(), key=lambda kv: -kv[1]["images_per_second"]):
            per_round = ", ".join(f"{x:,.0f}" for x in r.get("round_images_per_second", [])) or "-"
            lines.append(f"| {v} | {r['images_per_second']:,.0f} | {_ratio(r)} | {per_round} | {_cell(r.get('graph')) or '-'} |")
    return lines


def bench_lines(r: dict) -> list[str]:
    if not any(k in r for k in ("ops", "victim", "generator", "data")):
        return []
    extra = f"; extra pytest arguments `{shlex.join(r['bench_args'])}`" if r.get("bench_args") else ""
    lines = ["", "## Benchmarks", "", f"Rounds: {r.get('rounds', 1)}{extra}"]
    lines += ops_lines(r.get("ops") or {})
    for name in ("victim", "generator", "data"):
        lines += throughput_lines(r.get(name) or {})
    return lines + [f"- {n}" for n in r.get("notes", [])]


def paper_scale_lines(r: dict) -> list[str]:
    if not r.get("summary"):
        return []
    lines = ["", "## Paper scale", "", f"`{r['json']}`:", ""] + [f"- {k}: {_fmt(v, 3)}" for k, v in r["summary"].items()]
    rates = r.get("stage_images_per_second") or {}
    if rates:
        lines.append("- images/s per stage: " + ", ".join(f"{name} {_fmt(v, 0)}" for name, v in rates.items()))
    graphs = r.get("stage_cuda_graph") or {}
    if graphs:
        lines.append("- CUDA graph per stage: " + ", ".join(f"{name} {status}" for name, status in graphs.items()))
    return lines


def pipeline_lines(r: dict) -> list[str]:
    lines = []
    for name, run in r.items():
        if not isinstance(run, dict) or "run" not in run:
            continue
        sets = " ".join(f"--set {s}" for s in run.get("settings", []))
        lines += ["", f"{name} (preset {run.get('preset')}{', ' + sets if sets else ''}): {run.get('metric') or 'metric'} clean "
                  f"{_fmt(run.get('clean_mean'), 3)}, protected {_fmt(run.get('protected_mean'), 3)}, drop {_fmt(run.get('drop'), 3)}"
                  + (f" +- {_fmt(run.get('drop_std'), 3)}" if run.get("drop_std") is not None else "")
                  + f"; {run['run']['seconds']:.0f} s"]  # fmt: skip
        if run.get("timings"):
            lines.append("Stage seconds: " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in run["timings"].items()))
    return ["", "## Pipeline"] + lines if lines else []


def _target_value(row: dict) -> str:
    value, unit = row["value"], row["unit"]
    if value is None:
        return "-"
    if unit == "of copy":
        return f"{100 * value:.0f}%"
    if unit == "images/s":
        return f"{value:,.0f} images/s"
    if unit == "s":
        return f"{value:,.0f} s ({value / 60:.1f} min)"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}"


def targets_lines(record: dict) -> list[str]:
    """The targets table (:func:`.targets.judge`): measured value, target, verdict."""
    gpu = record["device"].get("type") == "cuda"
    lines = ["", "## Targets", "", "| target | measured | target | verdict | from |", "|---|---:|---:|---|---|"]
    for row in judge(record):
        limit = _target_value({**row, "value": row["threshold"]})
        if row["value"] is None:
            verdict = "not measured"
        elif row["met"] is None:
            verdict = "not judged" + ("" if gpu else " off a GPU")
        else:
            verdict = VERDICT[row["met"]]
        lines.append(f"| {row['what']} | {_target_value(row)} | {'<=' if row['at_most'] else '>='} {limit} | {verdict} | {_cell(row['detail'])} |")
    return lines


def brief(record: dict) -> str:
    """The header, the parts' table and the targets: what a terminal should show last."""
    return "\n".join(header(record) + targets_lines(record)) + "\n"


def markdown(record: dict) -> str:
    """The summary as Markdown: the header, the parts' table and a section per part with results."""
    parts = record["parts"]

    def results(name: str) -> dict:
        return parts.get(name, {}).get("results") or {}

    lines = header(record) + targets_lines(record)
    lines += build_lines(results("build"))
    lines += tests_lines(results("tests"))
    lines += bench_lines(results("bench"))
    lines += paper_scale_lines(results("paper-scale"))
    lines += pipeline_lines(results("pipeline"))
    if record.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"
