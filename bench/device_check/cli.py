"""The options, and the loop that runs the parts and writes their JSON and the summary.

The parts run in the order ``--parts`` names them (``build`` always first). Each runs under its own
time budget (``--budget-<part>`` seconds): a child still running when its part's budget is spent
gets SIGINT, then SIGKILL, and the part records what finished. ``--within SECONDS`` bounds the whole
check: each part then gets its weight's share (:data:`WITHIN_WEIGHTS`) of the time left when it
starts, at most its budget, so time an early part did not use goes to the later ones. Each part's
results go to ``<out>/<part>.json`` (``paper-scale``: the script's own ``<out>/paper_scale.json``);
``<out>/summary.json`` and ``<out>/summary.md`` are rewritten after every part, and with
``--archive FILE`` so is one ``.tar.gz`` of the whole results folder (the results as one file to
copy off a remote GPU host), so a check stopped from outside still leaves what it did. Logs:
``<out>/logs/``. The header, the parts and the targets are printed last.

Exit status: 0 when every selected part finished ok (or had nothing to run here), 1 when one
failed, 2 for bad options or no CUDA device without ``--cpu``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

from . import PARTS, record
from .benchmarks import BENCHES, part_bench
from .build import part_build
from .cuda_tests import part_tests
from .paper_scale import part_paper_scale
from .pipeline import RUNS, part_pipeline
from .runner import Context, PartFailed, PartSkipped, progress, write_json
from .summary import brief, markdown

PART_FUNCTIONS = {"build": part_build, "tests": part_tests, "bench": part_bench,
                  "paper-scale": part_paper_scale, "pipeline": part_pipeline}  # fmt: skip
#: The part's JSON under --out (None: the part's script writes its own).
PART_FILES = {"build": "build.json", "tests": "tests.json", "bench": "bench.json", "paper-scale": None, "pipeline": "pipeline.json"}
#: Seconds per part: caps that a healthy run stays well inside, so a hung child cannot hold the check.
GPU_BUDGETS = {"build": 1800, "tests": 1800, "bench": 3600, "paper-scale": 3600, "pipeline": 1800}
CPU_BUDGETS = {"build": 900, "tests": 300, "bench": 300, "paper-scale": 300, "pipeline": 300}
#: ``--within``: each part's weight in the split of the time left (a part that ends early leaves the
#: rest to the later ones; the build is weighted for its worst case, since nothing runs without it).
WITHIN_WEIGHTS = {"build": 3.0, "tests": 2.0, "bench": 4.0, "paper-scale": 2.5, "pipeline": 2.0}
#: ``--within``: seconds kept for the summary and the archive after the last part.
WITHIN_RESERVE = 10.0
#: ``--within``: a part that would get less than this is skipped.
WITHIN_MIN_PART = 15.0
#: Bulky results kept in the part's JSON but not in the summary.
NOT_IN_SUMMARY = {"tests": ("tests",)}


def comma_list(choices, flag: str):
    """An argparse type: a comma-separated subset of ``choices``, in the order given."""

    def parse(text: str) -> list[str]:
        items = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in items if p not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items

    return parse


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description="Build, test and measure the package on a CUDA device; "
                                "results as JSON and a Markdown summary under --out.")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="folder for every part's JSON, the summary and the logs")
    p.add_argument("--parts", type=comma_list(PARTS, "--parts"), default=list(PARTS),
                   help=f"subset of {','.join(PARTS)}, run in this order, build first (default all)")
    p.add_argument("--cpu", action="store_true", help="no GPU: the same parts on the CPU at tiny sizes (a few minutes)")
    p.add_argument("--within", type=positive, metavar="SECONDS",
                   help="time limit of the whole check: each part gets its share of the time left (see WITHIN_WEIGHTS)")
    p.add_argument("--archive", type=Path, metavar="FILE",
                   help="also write the whole results folder as one .tar.gz FILE, rewritten after every part")
    for name in PARTS:
        p.add_argument(f"--budget-{name}", type=positive, metavar="SECONDS",
                       help=f"time limit of part {name} (default {GPU_BUDGETS[name]}, with --cpu {CPU_BUDGETS[name]})")  # fmt: skip
    p.add_argument("--commit", metavar="SHA", help="the commit of the tree being checked, recorded as given (for a copy of a "
                   "checkout whose .git is missing or stale; default the checkout's HEAD)")
    p.add_argument("--no-build", action="store_true", help="part build: probe the installed package, do not build")
    p.add_argument("--arch-list", help="part build: TORCH_CUDA_ARCH_LIST (default the GPU's capability, e.g. 9.0)")
    p.add_argument("--benches", type=comma_list(BENCHES, "--benches"), default=list(BENCHES), help=f"part bench: subset of {','.join(BENCHES)}")
    p.add_argument("--rounds", type=int, default=1, help="part bench: run every benchmark this many times, alternating (default 1)")
    p.add_argument("--bench-args", default="", help="part bench: extra pytest arguments, e.g. \"-k 'straightforward or graph'\"")
    p.add_argument("--paper-scale-steps", type=int, help="part paper-scale: --steps for bench/paper_scale.py")
    p.add_argument("--pipeline-runs", type=comma_list(tuple(RUNS), "--pipeline-runs"),
                   help=f"part pipeline: subset of {','.join(RUNS)} (default all)")  # fmt: skip
    p.add_argument("--pipeline-set", action="append", metavar="KEY=VALUE", help="part pipeline: an extra --set for every run")
    return p


def budgets(args: argparse.Namespace) -> dict[str, float]:
    base = CPU_BUDGETS if args.cpu else GPU_BUDGETS
    return {name: getattr(args, f"budget_{name.replace('-', '_')}") or float(base[name]) for name in PARTS}


def part_order(parts: list[str]) -> list[str]:
    """``--parts`` in the order given, without repeats, ``build`` first."""
    unique = list(dict.fromkeys(parts))
    return (["build"] if "build" in unique else []) + [p for p in unique if p != "build"]


def part_budget(cap: float, name: str, later: list[str], deadline: float | None) -> float:
    """Seconds for part ``name``: ``cap``, or under ``--within`` (``deadline``, a monotonic time) at
    most its weight's share of the time left among ``name`` and the ``later`` parts."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic() - WITHIN_RESERVE
    weights = [WITHIN_WEIGHTS[n] for n in [name, *later]]
    return min(cap, max(0.0, left) * weights[0] / sum(weights))


def write_archive(out: Path, archive: Path) -> None:
    """``out`` as a gzipped tar (members under ``out.name/``), written through a temporary file;
    the archive itself is left out when it lies inside ``out``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    skip = {archive.resolve(), tmp.resolve()}
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=lambda info: None if (out.parent / info.name).resolve() in skip else info)
    tmp.replace(archive)


def new_record(args: argparse.Namespace, argv: list[str], device: str, dev: dict) -> dict:
    return {
        "schema": 2,
        "command": shlex.join(["python", "bench/gpu_check.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": device,
        "device": dev,
        "versions": record.versions(device),
        "git": record.git_revision(args.commit),
        "budgets": budgets(args),
        "within_s": args.within,
        "parts": {name: {"status": "pending"} for name in PARTS},
        "seconds": 0.0,
        "exit_status": None,
        "notes": [],
    }


def run_part(ctx: Context, name: str, seconds: float) -> dict:
    """Run one part; its entry for the record (status ok, failed or skipped)."""
    progress(f"{name}: start (budget {seconds:.0f} s)")
    start = time.monotonic()
    entry: dict = {"status": "ok", "reason": None, "budget_s": seconds}
    try:
        entry["results"] = PART_FUNCTIONS[name](ctx, start + seconds)
    except PartSkipped as err:
        entry.update(status="skipped", reason=str(err))
    except PartFailed as err:
        entry.update(status="failed", reason=err.reason, results=err.results)
    except (KeyboardInterrupt, SystemExit) as err:
        entry.update(status="failed", reason=f"interrupted ({type(err).__name__})", seconds=round(time.monotonic() - start, 1))
        raise Interrupted(entry, err) from err
    except Exception as err:  # a bug here must not lose the other parts
        entry.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    entry["seconds"] = round(time.monotonic() - start, 1)
    progress(f"{name}: {entry['status']} in {entry['seconds']:.0f} s" + (f" ({entry['reason']})" if entry.get("reason") else ""))
    return entry


class Interrupted(Exception):
    def __init__(self, entry: dict, cause: BaseException):
        super().__init__(entry["reason"])
        self.entry, self.cause = entry, cause


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.rounds < 1:
        parser().error(f"--rounds takes a positive count, got {args.rounds}")

    def terminated(signum, frame):  # stop the children, keep the record
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    # Started with SIGINT ignored (a background job), the children would inherit that and ignore the
    # SIGINT that ends them at their time limit, then die of SIGKILL without writing their results.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); use --cpu for the CPU run", file=sys.stderr)
        return 2
    start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = record.device_record(device)
    rec = new_record(args, argv, device, dev)

    deadline = start + args.within if args.within else None
    order = part_order(args.parts)

    def save() -> None:
        rec["seconds"] = round(time.monotonic() - start, 1)
        rec["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json(out / "summary.json", rec)
        try:  # a bug in the rendering must not cost the results or the archive
            text = markdown(rec)
        except Exception as err:  # noqa: BLE001
            text = f"# summary not rendered\n\n{type(err).__name__}: {err}\n\nThe results are in summary.json.\n"
        (out / "summary.md").write_text(text)
        if args.archive:
            write_archive(out, args.archive.resolve())

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(args, device, Path(tmp), out / "logs", out=out, capability=dev.get("capability"))
        progress(f"{dev['name']} ({device}); results in {out}" + (f"; the whole check within {args.within:.0f} s" if deadline else ""))
        for name in PARTS:
            if name not in order:
                rec["parts"][name] = {"status": "skipped", "reason": "not in --parts"}
        for i, name in enumerate(order):
            seconds = part_budget(rec["budgets"][name], name, order[i + 1 :], deadline)
            if deadline is not None and seconds < WITHIN_MIN_PART:
                rec["parts"][name] = {"status": "skipped", "reason": f"--within: {seconds:.0f} s would be left for it"}
                progress(f"{name}: skipped, {seconds:.0f} s would be left for it")
                save()
                continue
            try:
                entry = run_part(ctx, name, seconds)
            except Interrupted as stop:
                rec["parts"][name] = stop.entry
                rec["exit_status"] = 130 if isinstance(stop.cause, KeyboardInterrupt) else stop.cause.code
                save()
                raise stop.cause from None
            if PART_FILES[name] and "results" in entry:
                write_json(out / PART_FILES[name], {"part": name, "device": dev.get("name"), "date": rec["date"], **entry})
                entry["file"] = str(out / PART_FILES[name])
            hidden = NOT_IN_SUMMARY.get(name, ())
            if entry.get("results"):
                entry["results"] = {k: v for k, v in entry["results"].items() if k not in hidden}
            rec["parts"][name] = entry
            rec["notes"] = list(ctx.notes)
            save()
        failed = [n for n in PARTS if rec["parts"][n]["status"] == "failed"]
        rec["exit_status"] = 1 if failed else 0
        save()
    print(brief(rec), flush=True)
    progress(f"done in {rec['seconds']:.0f} s: {out / 'summary.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return rec["exit_status"]
