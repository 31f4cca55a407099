"""Summarise py-spy raw (collapsed-stack) profiles: ``python -m bench.profiling FILE [FILE ...]``.

Prints, per file, the share of samples by self function (the innermost frame) and by inclusive
function (anywhere on the stack), line numbers folded, so hot spots read at a glance.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _fold(frame: str, keep_line: bool) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['fn']} ({path}:{m['line']})" if keep_line and m["line"] else f"{m['fn']} ({path})"


def summarize(path: str, top: int = 20, lines: bool = False, thread: str | None = None) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for raw in Path(path).read_text().splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        stack, n = m[1], int(m[2])
        frames = stack.split(";")
        if thread is not None and not frames[0].startswith(thread):
            continue
        if frames and frames[0].startswith("thread ("):
            frames = frames[1:]  # py-spy --threads puts the thread first
        folded = [_fold(f, lines) for f in frames if f]
        if not folded:
            continue
        total += n
        self_c[folded[-1]] += n
        for f in set(folded):
            incl[f] += n
    out = [f"== {path}: {total} samples"]
    if not total:
        return "\n".join(out)
    out.append("  self%   function")
    for f, n in self_c.most_common(top):
        out.append(f"  {100 * n / total:5.1f}   {f}")
    out.append("  incl%   function")
    for f, n in incl.most_common(top):
        out.append(f"  {100 * n / total:5.1f}   {f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profiling")
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--lines", action="store_true", help="keep line numbers")
    a = p.parse_args(argv)
    for f in a.files:
        print(summarize(f, a.top, a.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
