"""Reading what pytest leaves behind: its JUnit XML, and the faulthandler dump of a crash."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from .runner import REPO

STATUSES = ("passed", "failed", "error", "skipped")


def parse_junit(source: str | Path) -> dict:
    """``{"tests": {id: {"status", "seconds", "message"?}}, "counts": {status: n}}`` from a JUnit XML
    file (or its text). Status: passed, failed, error or skipped; ids are ``<classname>::<name>``."""
    text = Path(source).read_text() if not str(source).lstrip().startswith("<") else str(source)
    root = ET.fromstring(text)
    tests: dict[str, dict] = {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        entry: dict = {"status": "passed", "seconds": float(case.get("time") or 0)}
        for tag, status in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                entry["status"] = status
                message = (child.get("message") or child.text or "").strip()
                if message:
                    entry["message"] = message[:500]
                break
        if test_id in tests and tests[test_id]["status"] != "passed":
            continue  # a teardown error after a failure: keep the first
        tests[test_id] = entry
    return {"tests": tests, "counts": count(tests)}


def count(tests: dict[str, dict]) -> dict[str, int]:
    """``{status: number of tests}``."""
    counts: dict[str, int] = defaultdict(int)
    for entry in tests.values():
        counts[entry["status"]] += 1
    return dict(counts)


def module_of(test_id: str) -> str:
    """The module of a JUnit id or a node id: ``tests.test_x.TestY::test_z[a]`` and
    ``tests/test_x.py::test_z`` -> ``tests/test_x.py``."""
    head = test_id.split("::", 1)[0]
    if head.endswith(".py"):
        return head
    parts = head.split(".")
    for i, part in enumerate(parts):
        if part.startswith("test_") or part.endswith("_test"):
            return "/".join(parts[: i + 1]) + ".py"
    return head


def by_module(tests: dict[str, dict]) -> dict[str, dict[str, int]]:
    """``{module: {status: n}}``, modules sorted."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for test_id, entry in tests.items():
        out[module_of(test_id)][entry["status"]] += 1
    return {m: dict(c) for m, c in sorted(out.items())}


def crashed_test(log_text: str) -> str | None:
    """The test that crashed pytest, as a node id prefix ``tests/test_x.py::test_name`` (relative to
    the repository), read from the faulthandler dump in its output ("Fatal Python error: ..." then
    each thread's frames, most recent first); None without a dump or without a test frame in it."""
    start = log_text.rfind("Fatal Python error")
    if start < 0:
        return None
    for found in re.finditer(r'File "([^"]+)", line \d+ in (\w+)', log_text[start:]):
        path, function = Path(found.group(1)), found.group(2)
        if path.name.startswith("test_") and function.startswith("test_"):
            try:
                path = path.resolve().relative_to(REPO)
            except ValueError:
                pass
            return f"{path.as_posix()}::{function}"
    return None
