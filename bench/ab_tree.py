"""``python -m bench.ab_tree --base DIR [--rounds N]``: A/B of a broker/worker change in one run.

``DIR`` holds the baseline source tree (``git archive <commit> | tar -x -C DIR``). Two stacks, one
running this checkout's broker and workers and one running ``DIR``'s, each a ``strict_queue``
pool of 2 capacity-1 ``--no-dspy`` workers, take the pipelined load of ``bench.servers loadgen``
(100 sessions, one call each in flight) in short blocks, alternating with the order rotating.
Prints medians of the neighbouring-block ratios: calls/s, broker and worker CPU per call.
``--sessions 1`` makes it one call at a time from one socket: the no-op round trip (its mean
latency is 1 / calls/s, printed as ``latency_us``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bench.common import PY, Stack, Workspace, iter_rotated, median, wait_for
from bench.hop import loadgen as _loadgen


def _start(ws: Workspace, name: str, tree: str | None) -> tuple[Stack, list[int]]:
    st = Stack(ws, name)
    if tree is None:
        broker = st.start_broker("p:strict_queue")
        workers = [st.start_worker("p", "--no-dspy") for _ in range(2)]
    else:  # the baseline tree first on sys.path (``python -m`` puts the cwd there)
        st.env["PYTHONPATH"] = tree + os.pathsep + st.env.get("PYTHONPATH", "")
        broker = ws.procs.spawn([PY, "-m", "broker", "--frontend", st.frontend, "--backend", st.backend,
                                 "--heartbeat", str(st.heartbeat), "--liveness", str(st.liveness), "--log-level", "WARNING",
                                 "--pool", "p:strict_queue"], f"{name}-broker.log", st.env, cwd=tree)
        wait_for(lambda: os.path.exists(st.frontend[6:]), what="baseline broker socket")
        workers = [ws.procs.spawn([PY, "-m", "worker", "--pool", "p", "--backend", st.backend, "--heartbeat", str(st.heartbeat),
                                   "--liveness", str(st.liveness), "--log-level", "WARNING", "--no-dspy"], f"{name}-worker.log", st.env, cwd=tree) for _ in range(2)]
    return st, [broker.pid, *(w.pid for w in workers)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_tree")
    p.add_argument("--base", required=True, help="directory with the baseline source tree")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--duration", type=float, default=1.5)
    p.add_argument("--sessions", type=int, default=100, help="calls in flight (1: sequential round trips)")
    a = p.parse_args(argv)
    ws = Workspace()
    try:
        systems = {"new": _start(ws, "n", None), "base": _start(ws, "b", os.path.abspath(a.base))}
        for st, _ in systems.values():
            c = st.client()
            st.wait_workers("p", 2, client=c)
            c.close()
        time.sleep(0.3)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
        for r in range(a.rounds):
            for name in iter_rotated(list(systems), r):
                st, pids = systems[name]
                res[name].append(_loadgen(ws, "loadgen", st.frontend, a.duration, 0.3, pids,
                                          ["--sessions", str(a.sessions), "--sockets", str(min(4, a.sessions))]))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in res.items()),
                  file=sys.stderr, flush=True)

        def us(name: str, x: dict[str, Any], which: str) -> float:
            pids = systems[name][1]
            keys = [str(pids[0])] if which == "broker" else [str(q) for q in pids[1:]]
            return sum(x["cpu"][k] for k in keys) / x["calls"] * 1e6

        out: dict[str, Any] = {"rounds": a.rounds, "duration_s": a.duration, "sessions": a.sessions,
                               "rate": {k: median([x["rate"] for x in v]) for k, v in res.items()},
                               "rate_new_vs_base": median([n["rate"] / b["rate"] for n, b in zip(res["new"], res["base"])])}
        if a.sessions == 1:
            out["latency_us"] = {k: median([1e6 / x["rate"] for x in v]) for k, v in res.items()}
        for which in ("broker", "workers"):
            out[f"{which}_us"] = {k: median([us(k, x, which) for x in v]) for k, v in res.items()}
            out[f"{which}_us_new_vs_base"] = median([us("new", n, which) / us("base", b, which)
                                                     for n, b in zip(res["new"], res["base"])])
        # where the broker's CPU goes: its main thread and its zmq I/O threads, user and system
        split = ("hub_main_user", "hub_main_sys", "hub_threads_user", "hub_threads_sys")
        out["broker_split_us"] = {k: {s[4:]: round(median([x["cpu"][s] / x["calls"] * 1e6 for x in v]), 1) for s in split}
                                  for k, v in res.items()}
        out["errors"] = sum(x["errors"] for v in res.values() for x in v)
        print(json.dumps(out, indent=1))
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
