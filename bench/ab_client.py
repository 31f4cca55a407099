"""``python -m bench.ab_client [--rounds N]``: A/B of a client-side change in one process.

Sequential no-op pinned calls (``s.call("builtins", "len", [[]])``) through one broker and one
``--no-dspy`` worker, in blocks that alternate between the current ``_Channel.disconnected``
(checks ZMQ_EVENTS before draining the monitor) and the previous one (a NOBLOCK recv that raises
``zmq.Again`` on every call). Per block: p50 latency and the client's CPU per call
(``time.process_time``); the figures are medians of the neighbouring-block ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from bench.common import Stack, Workspace, median, quantile
from dspex import client as client_mod


def _old_disconnected(self: Any) -> str:
    why = ""
    while True:
        try:
            event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return why
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = "the broker refused this client's CURVE key"
            self.refused = True
        elif not why:
            why = "lost the connection to the broker"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_client")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args(argv)
    new = client_mod._Channel.disconnected
    variants = {"new": new, "old": _old_disconnected}
    ws = Workspace()
    try:
        st = Stack(ws, "c")
        st.start_broker("p:strict_queue")
        st.start_worker("p", "--no-dspy")
        dx = st.client()
        st.wait_workers("p", 1, client=dx)
        s = dx.session("p")
        for _ in range(200):
            s.call("builtins", "len", [[]])
        res: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for r in range(a.rounds):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                client_mod._Channel.disconnected = variants[name]  # type: ignore[method-assign]
                lat = []
                c0 = time.process_time()
                for _ in range(a.calls):
                    t = time.perf_counter()
                    s.call("builtins", "len", [[]])
                    lat.append(time.perf_counter() - t)
                res[name].append({"p50": quantile(lat, 0.5), "cpu": (time.process_time() - c0) / a.calls})
        client_mod._Channel.disconnected = new  # type: ignore[method-assign]
        out = {"rounds": a.rounds, "calls_per_block": a.calls,
               "p50_us": {k: median([x["p50"] for x in v]) * 1e6 for k, v in res.items()},
               "client_cpu_us": {k: median([x["cpu"] for x in v]) * 1e6 for k, v in res.items()},
               "p50_new_vs_old": median([n["p50"] / o["p50"] for n, o in zip(res["new"], res["old"])]),
               "cpu_new_vs_old": median([n["cpu"] / o["cpu"] for n, o in zip(res["new"], res["old"])])}
        print(json.dumps(out, indent=1))
        dx.close()
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
