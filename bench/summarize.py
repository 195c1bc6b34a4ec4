"""Turn a pytest-benchmark JSON from bench_ops.py into the Markdown table of the README.

    python bench/summarize.py bench/results/<name>.json

For each group: the median time of every implementation, the compiled op's speed-up over it
(ratios from one run), and on GPUs the achieved bandwidth as a fraction of device copy bandwidth.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    with open(path) as fh:
        data = json.load(fh)
    info = data["machine_info"].get("mtlue") or {}
    device = info.get("bench_device", "?")
    gpu = device.startswith("cuda")
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    copy_gbps = None
    if all(b["extra_info"].get("kind") in ("victim", "weighting", "generator") for b in data["benchmarks"]):
        return summarize_victim(data, device=info.get("bench_device", "?"))
    if all("images" in b["extra_info"] for b in data["benchmarks"]):
        return summarize_throughput(data, device=info.get("bench_device", "?"))
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        median = bench["stats"]["median"]
        if extra["op"] == "copy":
            copy_gbps = extra["bytes"] / median / 1e9
            continue
        groups[bench["group"]][extra["impl"]] = {"median": median, "bytes": extra.get("bytes")}

    machine = info.get("gpu") if gpu else f"{data['machine_info'].get('cpu', {}).get('brand_raw', 'CPU')}"
    # Absolute times are quoted from GPUs only; on a CPU the table gives ratios within the run.
    header = "| op, size | implementation | median ms | compiled speed-up | GB/s (% of copy) |"
    if not gpu:
        header = "| op, size | implementation | compiled speed-up (time / compiled time) |"
    lines = [
        f"Device: {device} ({machine}); torch {info.get('torch')}; {data['datetime'][:10]}",
        "",
        header,
        "|---|---|---:|" + ("---:|---:|" if gpu else ""),
    ]
    for group, impls in groups.items():
        compiled = impls.get("compiled", {}).get("median")
        for impl, stats in sorted(impls.items(), key=lambda kv: kv[1]["median"]):
            speedup = f"{stats['median'] / compiled:.1f}x" if compiled else "-"
            bandwidth = "-"
            if gpu and stats["bytes"]:
                gbps = stats["bytes"] / stats["median"] / 1e9
                bandwidth = f"{gbps:.0f}" + (f" ({100 * gbps / copy_gbps:.0f}%)" if copy_gbps else "")
            if gpu:
                lines.append(f"| {group} | {impl} | {1e3 * stats['median']:.3f} | {speedup} | {bandwidth} |")
            else:
                lines.append(f"| {group} | {impl} | {speedup} |")
    if gpu and copy_gbps:
        lines.append(f"\nDevice copy: {copy_gbps:.0f} GB/s (bytes read + written).")
    return "\n".join(lines)


def summarize_throughput(data: dict, device: str) -> str:
    """Data benchmarks (bench_data.py): images/s per variant and the ratio to the slowest in its group."""
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        variant = extra.get("decoder") or extra.get("impl") or extra.get("device") or bench["name"]
        groups[bench["group"]].append((str(variant), extra["images"] / bench["stats"]["median"]))
    lines = [f"Device: {device}; {data['datetime'][:10]}", "", "| benchmark | variant | images/s | vs slowest |", "|---|---|---:|---:|"]
    for group, rows in groups.items():
        slowest = min(rate for _, rate in rows)
        for variant, rate in sorted(rows, key=lambda r: -r[1]):
            lines.append(f"| {group} | {variant} | {rate:,.0f} | {rate / slowest:.1f}x |")
    return "\n".join(lines)


def summarize_victim(data: dict, device: str) -> str:
    """bench_victim.py / bench_generator.py: images/s per path with the ratio to the straightforward
    path (SEP: to one generator pass per checkpoint), and each weighting strategy's step time
    relative to equal weighting (``ew``)."""
    lines = [f"Device: {device}; {data['datetime'][:10]}", ""]
    by_kind: dict[str, dict[str, list[tuple[str, float, float]]]] = defaultdict(lambda: defaultdict(list))
    for bench in data["benchmarks"]:
        extra, median = bench["extra_info"], bench["stats"]["median"]
        by_kind[extra["kind"]][bench["group"]].append((extra["variant"], extra["images"] / median, median))
    groups = {**by_kind["victim"], **by_kind["generator"]}
    for group, rows in groups.items():
        rates = dict((v, rate) for v, rate, _ in rows)
        baseline = "straightforward" if "straightforward" in rates else "pass per checkpoint"
        base = rates.get(baseline)
        lines += [f"{group}:", "", f"| path | images/s | vs {baseline} |", "|---|---:|---:|"]
        for variant, rate, _ in sorted(rows, key=lambda r: -r[1]):
            ratio = f"{rate / base:.2f}x" if base else "-"
            lines.append(f"| {variant} | {rate:,.0f} | {ratio} |")
        lines.append("")
    for group, rows in by_kind["weighting"].items():
        base = dict((v, t) for v, _, t in rows).get("ew")
        lines += [f"{group}:", "", "| strategy | images/s | step time / ew |", "|---|---:|---:|"]
        for variant, rate, median in sorted(rows, key=lambda r: r[2]):
            ratio = f"{median / base:.2f}x" if base else "-"
            lines.append(f"| {variant} | {rate:,.0f} | {ratio} |")
        lines.append("")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(arg))
