"""Two efficacy records side by side, stage by stage: where do two runs (two precisions, two CPUs,
two settings) part?

    python bench/efficacy_compare.py A.json B.json [--dataset celeba]

Reads two files written by ``bench/efficacy.py`` and prints, for the dataset: the surrogate's mean and
per-task metric (the tasks that differ most), the generator's stop error per pass, the perturbation
statistics, and per victim seed the clean and protected means, the drop, its split into erased and
inverted parts, and the tasks that are inverted in one run and not in the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _entry(path: str, dataset: str | None) -> tuple[str, dict]:
    results = json.loads(Path(path).read_text())["results"]
    name = dataset or next(iter(results))
    if name not in results:
        raise SystemExit(f"{path} has no results for {name!r} (it has {', '.join(results)})")
    return name, results[name]


def _fmt(values) -> str:
    return ", ".join("-" if v is None else f"{v:.3f}" for v in values)


def compare(a: dict, b: dict, top: int = 8) -> list[str]:
    """Lines comparing efficacy entries ``a`` and ``b`` stage by stage."""
    lines = []
    sa, sb = a.get("stages") or {}, b.get("stages") or {}
    sur_a, sur_b = sa.get("surrogate"), sb.get("surrogate")
    if sur_a and sur_b:
        diffs = sorted(((sur_b["per_task"][t] - v, t) for t, v in sur_a["per_task"].items() if t in sur_b["per_task"]),
                       key=lambda d: -abs(d[0]))
        lines.append(f"surrogate mean: A {sur_a['mean']:.4f}  B {sur_b['mean']:.4f}  (B - A {sur_b['mean'] - sur_a['mean']:+.4f}); "
                     f"largest per-task B - A: " + ", ".join(f"{t} {d:+.3f}" for d, t in diffs[:top]))
    gen_a, gen_b = sa.get("generator"), sb.get("generator")
    if gen_a and gen_b:
        lines.append(f"generator stop error per pass: A {_fmt(gen_a['stop_error'])}  B {_fmt(gen_b['stop_error'])}")
    per_a, per_b = sa.get("perturbation"), sb.get("perturbation")
    if per_a and per_b:
        def intra(p):
            values = [v["intra_class_std"] for v in (p.get("per_task") or {}).values() if v]
            return sum(values) / len(values) if values else float("nan")
        lines.append(f"perturbation mean |delta|: A {per_a['mean_abs_delta']:.3f}  B {per_b['mean_abs_delta']:.3f}; "
                     f"mean intra-class std: A {intra(per_a):.3f}  B {intra(per_b):.3f} (pixel units)")
    table_a, table_b = sa.get("per_task") or {}, sb.get("per_task") or {}
    dec_a = {d["seed"]: d for d in sa.get("decomposition") or []}
    dec_b = {d["seed"]: d for d in sb.get("decomposition") or []}
    for i, seed in enumerate(a.get("victim_seeds") or []):
        if seed not in (b.get("victim_seeds") or []):
            continue
        j = b["victim_seeds"].index(seed)
        va, vb = a["per_victim"][i], b["per_victim"][j]
        line = (f"victim seed {seed}: clean A {va['clean']['mean']:.4f} B {vb['clean']['mean']:.4f}; "
                f"protected A {va['protected']['mean']:.4f} B {vb['protected']['mean']:.4f}; "
                f"drop A {va['drop']:.3f} B {vb['drop']:.3f}")
        if seed in dec_a and seed in dec_b:
            da, db = dec_a[seed], dec_b[seed]
            line += (f"; erased A {da['erased']:.3f} B {db['erased']:.3f}, inverted A {da['inverted']:.3f} "
                     f"B {db['inverted']:.3f}; inverted only in A: {sorted(set(da['inverted_tasks']) - set(db['inverted_tasks']))}, "
                     f"only in B: {sorted(set(db['inverted_tasks']) - set(da['inverted_tasks']))}")
        lines.append(line)
        if table_a and table_b:
            moves = sorted(((table_b[t]["protected"][j] - r["protected"][i], t) for t, r in table_a.items()
                            if t in table_b and r["protected"][i] is not None and table_b[t]["protected"][j] is not None),
                           key=lambda d: -abs(d[0]))
            lines.append("  protected per-task B - A, largest: " + ", ".join(f"{t} {d:+.3f}" for d, t in moves[:top]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--dataset", help="default: the first dataset in A")
    parser.add_argument("--top", type=int, default=8, help="tasks listed per comparison (default 8)")
    args = parser.parse_args(argv)
    dataset, a = _entry(args.a, args.dataset)
    _, b = _entry(args.b, dataset)
    print(f"{dataset}: A = {args.a}, B = {args.b}")
    print("\n".join(compare(a, b, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
