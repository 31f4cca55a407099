"""``python -m bench.ab_prefetch [--rounds N] [--duration S]``: the prefetch A/B alone.

Pipelined calls/s (100 sessions, one call each in flight, 2 capacity-1 ``--no-dspy`` workers of a
``strict_queue`` pool) with ``prefetch=1`` (the default) and ``prefetch=0``, and the C
``zmq.proxy`` baseline, in short blocks alternating round by round (order rotating), so bursts of
load on a shared machine hit all three alike. Prints the per-round rates, the medians of the
neighbouring-block ratios and the broker CPU per call.
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
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--duration", type=float, default=1.5)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    ws = Workspace()
    try:
        systems: dict[str, tuple[str, list[int]]] = {}
        stacks = []
        for name, spec in (("prefetch1", "p:strict_queue"), ("prefetch0", "p:strict_queue:prefetch=0")):
            st = Stack(ws, name[-1] + "s")
            broker = st.start_broker(spec)
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

        def broker_us(name: str) -> float:
            pid = str(systems[name][1][0])
            return median([x["cpu"][pid] / x["calls"] * 1e6 for x in res[name] if x["calls"]])

        out = {"rounds": a.rounds, "duration_s": a.duration,
               "rate": {k: median([x["rate"] for x in v]) for k, v in res.items()},
               "prefetch1_vs_prefetch0": ratio("prefetch1", "prefetch0"),
               "prefetch1_vs_cproxy": ratio("prefetch1", "cproxy"), "prefetch0_vs_cproxy": ratio("prefetch0", "cproxy"),
               "broker_us": {k: broker_us(k) for k in ("prefetch1", "prefetch0")},
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
