"""Check that perturb_apply's vectorised tiled kernels move 16 bytes per global load and store.

    python .ci/check_vector_access.py perturb_apply.ptx

Every PTX entry ``perturb_{forward,backward}_tiled<mode, E, x_t, raw_t>`` with a vector width
E > 1 must hold at least one 16-byte global load and one 16-byte global store (``.v4`` of 32-bit
or ``.v2`` of 64-bit elements). The compiler splits a plain struct store into element stores
without a word (it did, in these kernels), so this is checked rather than assumed. Exit status 1
names the kernels that miss one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ENTRY = re.compile(r"^(?:\.(?:visible|weak)\s+)?\.entry\s+(\S+)\(", re.MULTILINE)
TILED = re.compile(r"perturb_(forward|backward)_tiledILi[01]ELi(\d+)E")
WIDE = r"\.(?:v4\.(?:b32|u32|s32|f32)|v2\.(?:b64|u64|s64|f64))\s"
LOAD16 = re.compile(r"\bld\.global(?:\.nc)?" + WIDE)
STORE16 = re.compile(r"\bst\.global" + WIDE)


def missing(ptx: str) -> tuple[int, list[str]]:
    """(vectorised tiled kernels found, descriptions of those without a 16-byte load or store)."""
    starts = [(m.start(), m.group(1)) for m in ENTRY.finditer(ptx)]
    found, problems = 0, []
    for i, (start, name) in enumerate(starts):
        tiled = TILED.search(name)
        if not tiled or int(tiled.group(2)) <= 1:
            continue
        found += 1
        body = ptx[start : starts[i + 1][0] if i + 1 < len(starts) else len(ptx)]
        lacks = [what for what, pattern in (("load", LOAD16), ("store", STORE16)) if not pattern.search(body)]
        if lacks:
            problems.append(f"{name}: no 16-byte global {' or '.join(lacks)}")
    return found, problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/check_vector_access.py FILE.ptx", file=sys.stderr)
        return 2
    found, problems = missing(Path(argv[0]).read_text())
    if found == 0:
        print(f"check_vector_access: no vectorised tiled perturb_apply kernel in {argv[0]}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"check_vector_access: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_vector_access: {found} vectorised tiled kernels, each with 16-byte global loads and stores")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
