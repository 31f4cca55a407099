"""``python -m bench.ab_core --base DIR [--rounds N]``: A/B of the broker's routing core alone.

The broker's Python cost per call without sockets, processes or the machine's other load in the
figure: ``broker.core.Core`` of this checkout and of ``DIR`` (``git archive <commit> | tar -x -C
DIR``), each in its own process behind a null shell, take the pipelined load of
``bench.ab_tree`` (a ``strict_queue`` pool of 2 capacity-1 workers, 100 sessions with one call
each in flight, 4 client identities) in blocks, alternating with the order rotating. Per call
the block times the core's handling of the request (``_on_frontend``) and of its reply
(``_on_backend``, which forwards it and dispatches the next request), from the frames a socket
would deliver; building those frames is not timed. Prints the medians of neighbouring-block
ratios. Times are the thread's CPU time (``time.thread_time``, whose own cost, ~0.3 µs per
reading, is in both figures alike), so the machine's other load barely moves them. The zmq shell's costs (send/recv, poll) are what ``bench.ab_tree`` adds.

``--profile`` runs this tree's core once under cProfile and prints its functions by own time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any

_SESSIONS = 100
_CLIENTS = 4


class _Load:
    """The core of whichever tree is first on sys.path, a null shell, and the pipelined load."""

    def __init__(self) -> None:
        import msgpack  # noqa: I001 - imported here: the tree under test is first on sys.path
        import zmq

        import dspex.protocol as wire
        from broker.core import Core
        from dspex.pools import parse_pool_spec

        self.zmq, self.msgpack, self.wire = zmq, msgpack, wire
        self.v2 = hasattr(wire, "pack_reply_head")  # the folded backend wire (protocol version 2)
        sent: deque[tuple[bytes, list[Any]]] = deque()

        class Null(Core):
            def _to_client(self, frames: list[Any]) -> None:
                pass

            def _send_worker(self, wid: bytes, frames: list[Any]) -> None:
                sent.append((wid, frames))

        self.sent = sent
        self.core = Null([parse_pool_spec("p:strict_queue")], heartbeat_interval=1.0, heartbeat_liveness=3)
        info = {"pool": "p", "pid": 1, "host": "h", "capacity": 1, "running": 0,
                "version": getattr(wire, "PROTOCOL_VERSION", 1)}
        for wid in (b"w" * 32, b"v" * 32):
            self.core._on_backend([zmq.Frame(wid), zmq.Frame(wire.W_READY), zmq.Frame(msgpack.packb(info))])
        sent.clear()
        self.next_id = 0
        self.body = msgpack.packb(["os", "getpid", [], {}])
        self.result = msgpack.packb(0)
        self.session_of: dict[tuple[bytes, int], str] = {}

    def _request(self, client: bytes, session: str) -> list[Any]:
        self.next_id += 1
        self.session_of[(client, self.next_id)] = session
        header = self.wire.RequestHeader("call", self.next_id, "p", session).pack()
        z = self.zmq.Frame
        return [z(client), z(header), z(self.body)]

    def _reply(self, wid: bytes, frames: list[Any]) -> tuple[list[Any], bytes, int]:
        """The worker's reply to a request the core sent (frames as the backend would deliver)."""
        z, w = self.zmq.Frame, self.wire
        if self.v2:
            client = bytes(frames[0])[w.REQUEST_HEAD_SIZE:]
            req_id = self.msgpack.unpackb(bytes(frames[1]))[1]
            out = [z(wid), z(w.pack_reply_head(w.W_REPLY, "ok", req_id, client)),
                   z(w.pack_reply_header("ok", req_id, wid.decode(), "p")), z(self.result)]
        else:
            client = bytes(frames[1])
            req_id = self.msgpack.unpackb(bytes(frames[2]))[1]
            out = [z(wid), z(w.W_REPLY), z(client), z(w.pack_reply_header("ok", req_id, wid.decode(), "p")),
                   z(self.result)]
        return out, client, req_id

    def block(self, calls: int) -> float:
        """Seconds of core time per call over ``calls`` request+reply pairs."""
        core, sent, clock = self.core, self.sent, time.thread_time  # CPU: preemption is not counted
        spent = 0.0
        if not core.pools["p"].workers or not any(w.inflight for w in core.pools["p"].workers.values()):
            for i in range(_SESSIONS):  # every session's first call
                frames = self._request(b"c%d" % (i % _CLIENTS), f"s{i:031d}")
                t = clock()
                core._on_frontend(frames)
                spent += clock() - t
        for _ in range(calls):
            wid, req = sent.popleft()
            reply, client, req_id = self._reply(wid, req)
            t = clock()
            core._on_backend(reply)
            spent += clock() - t
            nxt = self._request(client, self.session_of.pop((client, req_id)))  # that session's next call
            t = clock()
            core._on_frontend(nxt)
            spent += clock() - t
        return spent / calls


def _inner(calls: int) -> int:
    load = _Load()
    load.block(calls)  # warm-up
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(json.dumps({"us": load.block(calls) * 1e6}), flush=True)
    return 0


def _profile(calls: int, top: int) -> int:
    import cProfile
    import pstats

    load = _Load()
    load.block(calls)
    prof = cProfile.Profile()
    prof.enable()
    load.block(calls)
    prof.disable()
    table: dict[Any, Any] = getattr(pstats.Stats(prof), "stats")
    print(f"per call (tottime / {calls} request+reply pairs, under cProfile):")
    for func, (_, nc, tt, ct, _) in sorted(table.items(), key=lambda kv: -kv[1][2])[:top]:
        fn = f"{func[0].split('/site-packages/')[-1].split('/bench/../')[-1]}:{func[1]}({func[2]})"
        print(f"  {tt / calls * 1e6:7.2f} µs own  {ct / calls * 1e6:7.2f} µs cum  {nc / calls:5.2f}/call  {fn}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_core")
    p.add_argument("--base", help="directory with the baseline source tree")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20_000, help="request+reply pairs per block")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="profile this tree's core instead")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    if a.inner:
        return _inner(a.calls)
    if a.profile:
        return _profile(a.calls, a.top)
    from bench.common import PY, REPO, base_env, iter_rotated, median

    if not a.base:
        p.error("--base DIR (or --profile)")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, tree in (("new", str(REPO)), ("base", os.path.abspath(a.base))):
            env = base_env()
            env["PYTHONPATH"] = str(tree)  # the tree's broker and dspex (this file runs as a script: not -m)
            procs[name] = subprocess.Popen([PY, __file__, "--inner", "--calls", str(a.calls)], cwd=tree,
                                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                           start_new_session=True)
        res: dict[str, list[float]] = {k: [] for k in procs}
        for r in range(a.rounds):
            for name in iter_rotated(list(procs), r):
                proc = procs[name]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {name} core process ended (exit {proc.wait()})")
                res[name].append(json.loads(line)["us"])
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} µs" for k, v in res.items()),
                  file=sys.stderr, flush=True)
        out = {"rounds": a.rounds, "calls_per_block": a.calls,
               "core_us": {k: median(v) for k, v in res.items()},
               "core_us_new_vs_base": median([n / b for n, b in zip(res["new"], res["base"])])}
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
