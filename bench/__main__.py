"""``python -m bench [--smoke] [--only NAME ...] [--json PATH] [--rounds N] [--profile DIR]``.

Prints the table of figures (ours, the baselines measured in the same run, the ratio and the
target), then the performance goals with this run's figures and verdicts, and optionally writes
everything, raw per-round numbers included, as JSON (the goals under ``"goals"``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import traceback
from typing import Any

from bench.common import Row, loadavg, machine_info
from bench.figures import GROUPS, ROWS, Config, goals


def _select(only: list[str]) -> list[str]:
    if not only:
        return list(GROUPS)
    wanted: list[str] = []
    for item in only:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            group = name if name in GROUPS else next((g for g, rows in ROWS.items() if name in rows), None)
            if group is None:
                raise SystemExit(f"--only: unknown figure {name!r}; choose from: "
                                 + ", ".join(sorted(set(GROUPS) | {r for v in ROWS.values() for r in v})))
            if group not in wanted:
                wanted.append(group)
    return wanted


def render(rows: list[Row]) -> str:
    head = ("figure", "ours", "baseline (same run)", "ratio", "target", "")
    return _table(head, [(r.figure, r.ours, r.baseline, r.ratio, r.target, r.verdict) for r in rows])


def render_goals(results: list[dict[str, Any]]) -> str:
    def value(g: dict[str, Any]) -> str:
        if g["value"] is None:
            return str(g["status"])
        if g["unit"] == "×":
            return f"{g['value']:.2f}×"
        return f"{g['value']:.{0 if g['value'] >= 100 else 2}f} {g['unit']}"

    return _table(("goal figure", "this run", "goal", "", "row"),
                  [(g["figure"], value(g), g["goal"], g["verdict"], g["row"]) for g in results])


def _table(head: tuple[str, ...], lines: list[tuple[Any, ...]]) -> str:
    table = [head] + lines
    widths = [max(len(str(line[i])) for line in table) for i in range(len(head))]
    widths = [min(w, 70) for w in widths]
    out = []
    for n, line in enumerate(table):
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds per figure: checks the harness, not speed")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these figure groups or rows (repeatable or comma-separated): " + ", ".join(GROUPS))
    p.add_argument("--json", metavar="PATH", help="write all results (raw rounds included) as JSON")
    p.add_argument("--rounds", type=int, default=0, help="rounds per comparison (default: 7 full, 2 smoke)")
    p.add_argument("--profile", metavar="DIR", help="also record py-spy/cProfile profiles into DIR")
    p.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    a = p.parse_args(argv)
    groups = _select(a.only)

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every group's finally: block cleans up its processes
    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    cfg = Config(smoke=a.smoke, rounds=a.rounds, profile_dir=a.profile, log=log)
    info = machine_info()
    started = time.time()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    loads: dict[str, list[str]] = {}
    for g in groups:
        loads[g] = loadavg()
        log(f"== {g} (load average {' '.join(loads[g])})")
        t0 = time.perf_counter()
        try:
            rows.extend(GROUPS[g](cfg))
        except KeyboardInterrupt:
            log("interrupted; processes cleaned up")
            return 130
        except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
            log(traceback.format_exc())
            for name in ROWS[g]:
                rows.append(Row.error(name, name, "", f"{type(exc).__name__}: {exc}"))
        timings[g] = time.perf_counter() - t0
        loads[g] += loadavg()
        log(f"   {g}: {timings[g]:.1f}s (load average at its end {' '.join(loads[g][3:])})")
    command = "python -m bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    results = goals(rows, smoke=a.smoke)
    load = loadavg()
    print(render(rows))
    print("\n" + render_goals(results))
    print(f"\n{command}  ·  commit {info['commit']}  ·  {info['nproc']}× {info['cpu_model']}  ·  python {info['python']}, "
          f"pyzmq {info['pyzmq']}, libzmq {info['libzmq']}  ·  {time.time() - started:.0f}s  ·  load average "
          f"{' '.join(info.get('loadavg_start', []))} at the start, {' '.join(load)} at the end")
    if a.json:
        doc = {"command": command, "commit": info["commit"], "smoke": a.smoke, "started": started, "wall_s": time.time() - started,
               "machine": info, "group_seconds": timings,
               "group_loadavg": loads,
               "loadavg_end": load, "goals": results, "rows": [r.__dict__ for r in rows]}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
