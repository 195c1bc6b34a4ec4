"""Op benchmarks against the device's copy bandwidth.

The copy bandwidth is measured here: ``y.copy_(x)`` into a preallocated ``y = torch.empty_like(x)``
(1 GiB float32 on CUDA, 64 MiB on the CPU), median of 5 after 2 warm-ups, counting bytes read plus
written. Each op's bytes per call come from the benchmark's ``extra_info["bytes"]`` or, where
absent, from its size name (:func:`op_bytes`); achieved bandwidth = bytes / median time. The
``perturb_apply`` targets are judged from these rows by :mod:`.targets`.
"""

from __future__ import annotations

import re
import statistics
import time

COPY_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def bandwidth_fraction(nbytes: float, seconds: float, copy_bytes_per_second: float) -> float:
    """Achieved bandwidth ``nbytes / seconds`` as a fraction of the copy bandwidth (both counting
    bytes read plus written)."""
    if seconds <= 0 or copy_bytes_per_second <= 0:
        raise ValueError(f"times and bandwidths must be positive, got {seconds!r} s and {copy_bytes_per_second!r} B/s")
    return nbytes / seconds / copy_bytes_per_second


def image_shape(size: str | None) -> tuple[int, int, int, int] | None:
    """(batch, channels, side, crop) of a bench_ops.py image size name
    (``celeba_2048x3x70_crop64`` -> (2048, 3, 70, 64)); None for other names."""
    m = re.search(r"(\d+)x(\d+)x(\d+)_crop(\d+)", size or "")
    return tuple(map(int, m.groups())) if m else None


def op_bytes(op: str, size: str) -> int | None:
    """Bytes one benchmark call must move, from bench_ops.py's size names (None when unknown).

    - ``perturb_apply`` forward + backward, float32 raw, size ``<name>_<B>x<C>x<H>_crop<c>``,
      window = B*C*c*c, full = B*C*H*H: the forward reads the x (uint8) and raw (float32) windows and
      writes the output (float32), 9 * window; the backward reads grad_out (4) and the x and raw
      windows again (5) and writes grad_raw in full (4 * full): 18 * window + 4 * full.
    - ``quantize_export`` forward, same size names: reads x (1) and delta (4), writes protected (1)
      and delta_q (1): 7 * B*C*H*H.
    - ``embedding_reg`` forward + backward, size ``<name>_R<R>_D<D>``: the table read in the forward
      (4*R*D) and again in the backward, which writes its gradient (8*R*D): 12 * R*D (two GEMMs:
      not bandwidth-bound at these sizes; for reference only).
    """
    if op in ("perturb_apply", "quantize_export"):
        shape = image_shape(size)
        if shape is None:
            return None
        batch, channels, side, crop = shape
        full = batch * channels * side * side
        if op == "quantize_export":
            return 7 * full
        return 18 * batch * channels * crop * crop + 4 * full
    if op == "embedding_reg":
        m = re.search(r"R(\d+)_D(\d+)", size)
        return 12 * int(m.group(1)) * int(m.group(2)) if m else None
    return None


def measure_copy(device: str, nbytes: int, reps: int = 5, warmup: int = 2) -> dict:
    """Device copy bandwidth: ``y.copy_(x)`` of ``nbytes`` float32, bytes read + written / median time."""
    import torch

    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    times = []
    for i in range(warmup + reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    moved = 2 * x.numel() * x.element_size()
    median = statistics.median(times)
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"buffer_bytes": nbytes, "bytes_moved": moved, "median_s": median, "reps": reps,
            "bytes_per_s": moved / median, "gb_per_s": moved / median / 1e9}  # fmt: skip


def summarize_ops(bench: dict, copy_bytes_per_second: float | None) -> dict:
    """Rows per benchmark of a bench_ops.py pytest-benchmark JSON (op, size, impl, raw dtype,
    passes), with achieved bandwidth, its fraction of copy and the time against the compiled op at
    the same size."""
    rows, bench_copy = [], None
    for b in bench.get("benchmarks", []):
        extra, median = b["extra_info"], b["stats"]["median"]
        nbytes = extra.get("bytes") or op_bytes(extra.get("op", ""), extra.get("size", ""))
        row = {"op": extra.get("op"), "size": extra.get("size"), "impl": extra.get("impl"), "raw": extra.get("raw"),
               "passes": extra.get("passes"), "group": b.get("group"), "median_ms": 1e3 * median, "bytes": nbytes}  # fmt: skip
        if "round_medians" in b:  # several --rounds: the median above is the median of these
            row["round_medians_ms"] = [1e3 * m for m in b["round_medians"]]
        if nbytes:
            row["gb_per_s"] = nbytes / median / 1e9
            if copy_bytes_per_second:
                row["fraction_of_copy"] = bandwidth_fraction(nbytes, median, copy_bytes_per_second)
        if extra.get("op") == "copy":
            bench_copy = row
            continue
        rows.append(row)

    def key(r: dict) -> tuple:
        return r["op"], r["size"], r["raw"], r["passes"]

    compiled = {key(r): r["median_ms"] for r in rows if r["impl"] == "compiled"}
    for r in rows:
        base = compiled.get(key(r))
        if base:
            r["time_vs_compiled"] = r["median_ms"] / base
    return {"rows": rows, "bench_copy": bench_copy}
