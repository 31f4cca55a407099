"""``python -m bench.ab_aio [--rounds N]``: A/B of the asyncio client's send/wait path in one process.

Sequential awaited no-op pinned calls (``await s.call("builtins", "len", [[]])``) through one
broker and one ``--no-dspy`` worker, in blocks that alternate between the current
``AsyncClient._send_raw``/``_next`` (a send that completed at once is not awaited; the reply is
awaited under ``asyncio.timeout``) and the previous ones (both under ``asyncio.wait_for``, which
on Python 3.11 wraps the reply wait in a task and may swallow a cancellation). Per block: p50
latency and the client's CPU per call (``time.process_time``); the figures are medians of the
neighbouring-block ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import zmq

from bench.common import Stack, Workspace, median, quantile
from dspex import aio
from dspex.errors import BrokerUnreachable, Refused


async def _old_send_raw(self: Any, frames: list[Any], timeout: float) -> None:
    try:
        await asyncio.wait_for(self._sock.send_multipart(frames, copy=len(frames) <= 2),
                               timeout if timeout > 0 else None)
    except asyncio.TimeoutError:
        raise BrokerUnreachable("could not send") from None
    except zmq.ZMQError as exc:
        self._broken = True
        raise BrokerUnreachable(f"cannot send: {exc}") from None


async def _old_next(self: Any, queue: Any, ex: Any) -> Any:
    try:
        reply = await asyncio.wait_for(queue.get(), ex.wait)
    except asyncio.TimeoutError:
        raise ex.timed_out() from None
    if reply[0] == aio._LOST:
        raise ex.lost("lost the connection to the broker")
    if reply[0] == aio._REFUSED:
        raise Refused(f"{reply[1]}; the {ex.op} did not run", op=ex.op)
    return reply


async def _blocks(frontend: str, rounds: int, calls: int) -> dict[str, list[dict[str, float]]]:
    variants = {"new": (aio.AsyncClient._send_raw, aio.AsyncClient._next), "old": (_old_send_raw, _old_next)}
    res: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    async with aio.connect(frontend, timeout=30) as dx:
        s = dx.session("p")
        for _ in range(200):
            await s.call("builtins", "len", [[]])
        try:
            for r in range(rounds):
                for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                    aio.AsyncClient._send_raw, aio.AsyncClient._next = variants[name]  # type: ignore[method-assign]
                    lat = []
                    c0 = time.process_time()
                    for _ in range(calls):
                        t = time.perf_counter()
                        await s.call("builtins", "len", [[]])
                        lat.append(time.perf_counter() - t)
                    res[name].append({"p50": quantile(lat, 0.5), "cpu": (time.process_time() - c0) / calls})
        finally:
            aio.AsyncClient._send_raw, aio.AsyncClient._next = variants["new"]  # type: ignore[method-assign]
        await s.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_aio")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args(argv)
    ws = Workspace()
    try:
        st = Stack(ws, "a")
        st.start_broker("p:strict_queue")
        st.start_worker("p", "--no-dspy")
        st.wait_workers("p", 1)
        res = asyncio.run(_blocks(st.frontend, a.rounds, a.calls))
        out = {"rounds": a.rounds, "calls_per_block": a.calls,
               "p50_us": {k: median([x["p50"] for x in v]) * 1e6 for k, v in res.items()},
               "client_cpu_us": {k: median([x["cpu"] for x in v]) * 1e6 for k, v in res.items()},
               "p50_new_vs_old": median([n["p50"] / o["p50"] for n, o in zip(res["new"], res["old"])]),
               "cpu_new_vs_old": median([n["cpu"] / o["cpu"] for n, o in zip(res["new"], res["old"])])}
        print(json.dumps(out, indent=1))
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
