"""Baseline servers and load generators, run as subprocesses: ``python -m bench.servers MODE ...``.

* ``echo-router --bind EP``: a ROUTER that sends every message straight back (the "no broker" hop).
* ``proxy --frontend EP --backend EP``: the C limit, ``zmq.proxy(ROUTER, DEALER)`` (libzmq's loop,
  no Python per message).
* ``echo-dealer --connect EP``: an echo worker behind the proxy.
* ``loadgen --endpoint EP ...``: pipelined load, many sessions each with one request in flight,
  over several DEALER sockets, from one thread, with the dspex wire format (the same frames for
  the dspex broker and the C proxy). Prints one JSON line with the calls of the measured window,
  their p50/p99 latency, the CPU seconds that the ``--cpu-pid`` processes used during it and the
  first one's RSS at its end.
* ``open-sessions --endpoint EP --sessions N``: opens N sessions (one call each, pipelined) and
  leaves them open and idle.
* ``loadgen-client --endpoint EP ...``: the same load through the public ``dspex.Client``, one
  thread per group of sessions (each thread gets its own socket from the Client).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from typing import Any

import msgpack
import zmq


def _socket(ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    """A socket with no queue bound and no linger: load, echo and proxy never block nor wait."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    for opt in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM):
        sock.setsockopt(opt, 0)
    return sock


def _drain_echo(sock: zmq.Socket[Any]) -> None:
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        sock.send_multipart(frames, copy=False)


def echo(sock_type: int, endpoint: str, bind: bool) -> None:
    sock = _socket(zmq.Context(), sock_type)
    (sock.bind if bind else sock.connect)(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        _drain_echo(sock)


def proxy(frontend: str, backend: str) -> None:
    ctx = zmq.Context()
    fe, be = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.DEALER)
    fe.bind(frontend)
    be.bind(backend)
    zmq.proxy(fe, be)


def fake_worker(backend: str, pool: str, capacity: int = 1) -> None:
    """A dspex worker reduced to the wire protocol: answers every request at once, single thread.

    Behind the dspex broker it isolates the broker's cost (no executor, no I/O-thread hop).
    """
    import os
    import socket as _socket

    from dspex.wire import codec
    from dspex.wire.headers import REQUEST_ENVELOPE_SIZE, pack_reply_envelope, pack_reply_header
    from dspex.wire.protocol import (
        B_DISCONNECT,
        B_HEARTBEAT,
        B_REQUEST,
        B_REREGISTER,
        PROTOCOL_VERSION,
        W_HEARTBEAT,
        W_READY,
        W_REPLY,
    )

    inc = secrets.token_hex(16)
    ready = msgpack.packb({"pool": pool, "pid": os.getpid(), "host": _socket.gethostname(), "incarnation": inc,
                           "capacity": capacity, "version": PROTOCOL_VERSION, "started": time.time()})
    body = codec.encode(0)[0]  # len([])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, inc.encode())
    sock.connect(backend)
    sock.send_multipart([W_READY, ready])
    unpack = msgpack.unpackb
    send = sock.send_multipart
    next_beat = time.monotonic() + 1.0
    while True:
        sock.poll(1000)
        if time.monotonic() >= next_beat:  # its own heartbeats: a restarted broker learns of it and asks for READY
            send([W_HEARTBEAT])
            next_beat = time.monotonic() + 1.0
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            cmd = frames[0][:1]
            if cmd == B_REQUEST:
                req_id = unpack(frames[1])[1]
                send([pack_reply_envelope(W_REPLY, "ok", req_id, frames[0][REQUEST_ENVELOPE_SIZE:]),
                      pack_reply_header("ok", req_id, inc, pool), body])
            elif cmd == B_HEARTBEAT:
                send([W_HEARTBEAT])
            elif cmd == B_REREGISTER:
                send([W_READY, ready])
            elif cmd == B_DISCONNECT:
                return


def _cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds per pid; for the first pid (the broker or proxy) also split by thread and user/sys."""
    from bench.common import cpu_breakdown, cpu_seconds

    out: dict[str, float] = {}
    for i, pid in enumerate(pids):
        try:
            out[str(pid)] = cpu_seconds(pid)
            if i == 0:
                out.update({f"hub_{k}": v for k, v in cpu_breakdown(pid).items()})
        except OSError:
            out[str(pid)] = float("nan")
    return out


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def loadgen(a: argparse.Namespace) -> dict[str, Any]:
    """Keep one call per session in flight (session ``si`` on socket ``owner[si]``): ``a.warmup``
    s, then ``a.duration`` s counted (CPU of ``a.cpu_pid`` over the same window), then drain what is
    in flight."""
    from bench.common import rss_total
    from dspex.wire import codec
    from dspex.wire.headers import RequestHeader

    ctx = zmq.Context()
    socks = []
    for _ in range(a.sockets):
        s = _socket(ctx, zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, b"c" + secrets.token_bytes(15))
        s.connect(a.endpoint)
        socks.append(s)
    body = bytes(codec.encode(["builtins", "len", [[]], {}])[0])  # what Session.call("builtins", "len", [[]]) sends
    sessions = [secrets.token_hex(16) for _ in range(a.sessions)]
    owner = [socks[i % len(socks)] for i in range(a.sessions)]
    timeout_ms = int(a.timeout * 1000)
    inflight: list[dict[int, int]] = [{} for _ in socks]  # per socket: req_id -> session index
    sent_at: list[dict[int, float]] = [{} for _ in socks]
    next_id = [1] * len(socks)
    sock_index = {s: i for i, s in enumerate(socks)}
    clock = time.perf_counter
    latencies: list[float] = []

    def send(si: int) -> None:
        s = owner[si]
        k = sock_index[s]
        rid = next_id[k]
        next_id[k] = rid + 1
        inflight[k][rid] = si
        sent_at[k][rid] = clock()
        s.send_multipart([RequestHeader("call", rid, a.pool, sessions[si], "", timeout_ms).pack(), body])

    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    done = errors = 0
    counting = True
    for si in range(len(owner)):
        send(si)

    def pump(until: float, resend: bool) -> None:
        nonlocal done, errors
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            if not resend and not any(inflight):
                return
            for s, _ in poller.poll(int(left * 1000) + 1):
                k = sock_index[s]
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    head = msgpack.unpackb(frames[0])
                    si = inflight[k].pop(head[1], None)
                    if si is None:
                        continue
                    t_sent = sent_at[k].pop(head[1])
                    if head[0] not in ("ok", "call"):  # "call": an echo server (the C proxy's) returns the request
                        errors += 1
                    elif counting:
                        done += 1
                        latencies.append(clock() - t_sent)
                    if resend:
                        send(si)

    pump(time.monotonic() + a.warmup, True)
    done = errors = 0
    latencies.clear()
    cpu0 = _cpu(a.cpu_pid)
    own0 = time.process_time()
    t0 = time.monotonic()
    pump(t0 + a.duration, True)
    t1 = time.monotonic()
    own1 = time.process_time()
    cpu1 = _cpu(a.cpu_pid)
    hub_rss = rss_total(a.cpu_pid[:1])
    calls = done
    counting = False
    pump(time.monotonic() + 10.0 + len(owner) / 1000, False)  # drain what is in flight so the next round starts clean
    left = sum(len(x) for x in inflight)
    for s in socks:
        s.close(0)
    ctx.term()
    latencies.sort()
    return {"calls": calls, "errors": errors, "elapsed": t1 - t0, "cpu": _delta(cpu0, cpu1), "loadgen_cpu": own1 - own0,
            "rate": calls / (t1 - t0), "left_in_flight": left, "hub_rss": hub_rss,
            "p50": _pick(latencies, 0.5), "p99": _pick(latencies, 0.99)}


def _pick(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def open_sessions(a: argparse.Namespace) -> dict[str, Any]:
    """One ``builtins.len`` call in each of ``a.sessions`` new sessions (at most ``a.window`` in
    flight), leaving them open: a broker that holds that many idle sessions."""
    from dspex.wire import codec
    from dspex.wire.headers import RequestHeader

    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(a.endpoint)
    body = codec.encode(["builtins", "len", [[]], {}])[0]
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    t0 = time.monotonic()
    ok = errors = sent = 0
    while ok + errors < a.sessions:
        while sent < a.sessions and sent - ok - errors < a.window:
            sent += 1
            sock.send_multipart([RequestHeader("call", sent, a.pool, secrets.token_hex(16), "",
                                               int(a.timeout * 1000)).pack(), body])
        if not poller.poll(int(a.timeout * 1000)):
            break
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msgpack.unpackb(frames[0])[0] == "ok":
                ok += 1
            else:
                errors += 1
    sock.close(0)
    ctx.term()
    return {"opened": ok, "errors": errors, "seconds": time.monotonic() - t0}


def loadgen_client(a: argparse.Namespace) -> dict[str, Any]:
    import dspex

    client = dspex.connect(a.endpoint, timeout=a.timeout)
    counts = [0] * a.threads
    errors = [0] * a.threads
    state = {"counting": False, "stop": False}
    start = threading.Barrier(a.threads + 1)

    def run(t: int) -> None:
        mine = [client.session(a.pool) for _ in range(t, a.sessions, a.threads)]
        start.wait()
        i = 0
        while not state["stop"]:
            try:
                mine[i % len(mine)].call("builtins", "len", [[]])
                if state["counting"]:
                    counts[t] += 1
            except dspex.DspexError:
                errors[t] += 1
            i += 1

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(a.threads)]
    for th in threads:
        th.start()
    start.wait()
    time.sleep(a.warmup)
    state["counting"] = True
    cpu0 = _cpu(a.cpu_pid)
    own0 = time.process_time()
    t0 = time.monotonic()
    time.sleep(a.duration)
    calls = sum(counts)
    t1 = time.monotonic()
    own1 = time.process_time()
    cpu1 = _cpu(a.cpu_pid)
    state["stop"] = True
    for th in threads:
        th.join(timeout=a.timeout + 1)
    client.close()
    return {"calls": calls, "errors": sum(errors), "elapsed": t1 - t0, "cpu": _delta(cpu0, cpu1),
            "loadgen_cpu": own1 - own0, "rate": calls / (t1 - t0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.servers")
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo-router")
    e.add_argument("--bind", required=True)
    d = sub.add_parser("echo-dealer")
    d.add_argument("--connect", required=True)
    f = sub.add_parser("fake-worker")
    f.add_argument("--backend", required=True)
    f.add_argument("--pool", default="p")
    f.add_argument("--capacity", type=int, default=1)
    x = sub.add_parser("proxy")
    x.add_argument("--frontend", required=True)
    x.add_argument("--backend", required=True)
    for name in ("loadgen", "loadgen-client", "open-sessions"):
        g = sub.add_parser(name)
        g.add_argument("--endpoint", required=True)
        g.add_argument("--pool", default="p")
        g.add_argument("--sessions", type=int, default=100)
        g.add_argument("--sockets", type=int, default=4)
        g.add_argument("--threads", type=int, default=8)
        g.add_argument("--duration", type=float, default=3.0)
        g.add_argument("--warmup", type=float, default=0.5)
        g.add_argument("--timeout", type=float, default=30.0)
        g.add_argument("--cpu-pid", type=int, action="append", default=[])
        g.add_argument("--window", type=int, default=2000, help="open-sessions: calls in flight at most")
    a = p.parse_args(argv)
    if a.mode == "echo-router":
        echo(zmq.ROUTER, a.bind, bind=True)
    elif a.mode == "echo-dealer":
        echo(zmq.DEALER, a.connect, bind=False)
    elif a.mode == "fake-worker":
        fake_worker(a.backend, a.pool, a.capacity)
    elif a.mode == "proxy":
        proxy(a.frontend, a.backend)
    elif a.mode == "loadgen":
        print(json.dumps(loadgen(a)), flush=True)
    elif a.mode == "open-sessions":
        print(json.dumps(open_sessions(a)), flush=True)
    else:
        print(json.dumps(loadgen_client(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
