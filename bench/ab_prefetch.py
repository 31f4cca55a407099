"""``python -m bench.ab_prefetch [--depths 1,0] [--rounds N] [--duration S]``: the prefetch A/B alone.

Pipelined calls/s (100 sessions, one call each in flight, 2 capacity-1 ``--no-dspy`` workers of a
``strict_queue`` pool), one stack per ``prefetch`` depth in ``--depths`` (first one is the
reference of the ratios), and the C ``zmq.proxy`` baseline, in short blocks alternating round by
round (order rotating), so bursts of load on a shared machine hit all alike. Prints the per-round
rates, the medians of the neighbouring-block ratios and the broker and workers' CPU per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.common import Stack, Workspace, iter_rotated, median
from bench.common import spawn_server as _spawn_server
from bench.hop import loadgen as _loadgen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_prefetch")
    p.add_argument("--depths", default="1,0", help="comma-separated prefetch depths; the first is the reference")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--duration", type=float, default=1.5)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    depths = [int(d) for d in a.depths.split(",")]
    names = [f"prefetch{d}" for d in depths]
    ws = Workspace()
    try:
        systems: dict[str, tuple[str, list[int]]] = {}
        stacks = []
        for d, name in zip(depths, names):
            st = Stack(ws, f"{d}s")
            broker = st.start_broker(f"p:strict_queue:prefetch={d}")
            for _ in range(2):
                st.start_worker("p", "--no-dspy")
            stacks.append(st)
            systems[name] = (st.frontend, [broker.pid, *(w.pid for w in st.worker_procs)])
        pf_ep, pb_ep = ws.ipc("pf.sock"), ws.ipc("pb.sock")
        proxy = _spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        echoes = [_spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep) for _ in range(2)]
        systems["cproxy"] = (pf_ep, [proxy.pid, *(e.pid for e in echoes)])
        for st in stacks:
            c = st.client()
            st.wait_workers("p", 2, client=c)
            c.close()
        time.sleep(0.3)
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
        for r in range(a.rounds):
            for name in iter_rotated(list(systems), r):
                ep, pids = systems[name]
                res[name].append(_loadgen(ws, "loadgen", ep, a.duration, 0.3, pids))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in res.items()),
                  file=sys.stderr, flush=True)

        def ratio(x: str, y: str) -> float:
            return median([u["rate"] / v["rate"] for u, v in zip(res[x], res[y]) if v["rate"]])

        def cpu_us(name: str, which: str) -> float:
            pids = systems[name][1]
            keys = [str(pids[0])] if which == "broker" else [str(q) for q in pids[1:]]
            return median([sum(x["cpu"][k] for k in keys) / x["calls"] * 1e6 for x in res[name] if x["calls"]])

        ref = names[0]
        out = {"rounds": a.rounds, "duration_s": a.duration, "depths": depths,
               "rate": {k: median([x["rate"] for x in v]) for k, v in res.items()},
               "vs_" + ref: {k: ratio(k, ref) for k in names[1:]},
               "vs_cproxy": {k: ratio(k, "cproxy") for k in names},
               "broker_us": {k: cpu_us(k, "broker") for k in names},
               "workers_us": {k: cpu_us(k, "workers") for k in names},
               "errors": sum(x["errors"] for v in res.values() for x in v)}
        print(json.dumps(out, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({**out, "raw": res}, f, indent=1, default=str)
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
