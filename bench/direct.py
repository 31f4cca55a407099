"""Issue 14 prototype: a ``direct`` pool's pinned calls straight to the worker vs through the
broker vs the C ``zmq.proxy`` hop (``python -m bench --only direct``).

Same run, the systems alternating block by block (the order rotates each round), medians over
rounds, as bench/figures.py does:

- ``direct.noop``: sequential no-op pinned call p50 through ``dspex.Client``: a ``direct`` pool
  (after the first call, client DEALER -> worker ROUTER) vs the same pool brokered vs raw frames
  through a C proxy to an echo DEALER; plus raw frames straight to the worker's direct socket
  (what the Client itself adds).
- ``direct.crash``: SIGKILL of a worker running a session's call: time until that call raises
  ``WorkerCrashed`` and the session's next call ``SessionWorkerUnavailable``, direct vs brokered
  (the client's socket monitor vs the broker's).
- ``direct.throughput``: pipelined calls/s, 100 sessions, 2 capacity-1 workers: a raw-DEALER load
  generator pinning each session through the broker, then sending straight to its worker
  (``python -m bench.direct loadgen``) vs the broker load generator (bench/servers.py) vs the C
  proxy with 2 echo workers.

Not in ``--smoke``: it starts three stacks and the proxy (seconds on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from typing import Any, Callable

import zmq

from bench.common import PY, Row, Stack, Workspace, iter_rotated, median, quantile, us, verdict
from bench.common import alternate as _alternate
from bench.common import pooled as _pooled
from bench.common import ratio_of as _ratio
from bench.common import ratio_p50 as _ratio_p50
from bench.common import spawn_server as _spawn_server
from bench.common import wait_echo as _wait_echo
from bench.hop import loadgen as _loadgen

ROWS = ["direct.noop", "direct.noop_raw", "direct.throughput", "direct.crash"]


def direct(cfg: Any) -> list[Row]:

    if cfg.smoke:
        why = "smoke mode (three stacks and a proxy); run python -m bench --only direct"
        return [Row.skipped(n, n, "(info: issue 14 prototype)", why) for n in ROWS]
    from dspex import codec
    from dspex.protocol import RequestHeader

    rounds = cfg.n_rounds(30, 2)
    per_round = 250
    rows: list[Row] = []
    ws = Workspace()
    ctx = zmq.Context()
    socks: list[Any] = []
    clients: dict[str, Any] = {}
    try:
        stacks: dict[str, Stack] = {}
        for name, spec in (("direct", "p:strict_queue:direct=true"), ("brokered", "p:strict_queue")):
            st = stacks[name] = Stack(ws, name[0])
            st.start_broker(spec)
            for _ in range(2):
                st.start_worker("p", "--no-dspy")
        pf_ep, pb_ep = ws.ipc("pf.sock"), ws.ipc("pb.sock")
        proxy = _spawn_server(ws, "proxy.log", "proxy", "--frontend", pf_ep, "--backend", pb_ep)
        echoes = [_spawn_server(ws, "proxy-echo.log", "echo-dealer", "--connect", pb_ep) for _ in range(2)]
        clients.update({k: st.client() for k, st in stacks.items()})
        for k, st in stacks.items():
            st.wait_workers("p", 2, 30, client=clients[k])
        sess = {k: c.session("p") for k, c in clients.items()}
        for s in sess.values():
            s.call("builtins", "len", [[]])  # pinned; the direct client has learnt the endpoint
        d = sess["direct"]
        endpoint = clients["direct"]._direct.endpoints.get(d.worker, "")
        if not endpoint:
            raise RuntimeError("the direct pool's reply carried no direct endpoint")
        body = codec.encode(["builtins", "len", [[]], {}])[0]
        frames: list[Any] = [RequestHeader("call", 1, "p", d.id, d.worker, 60000).pack(), body]
        raw, prox = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        socks += [raw, prox]
        for sock, ep in ((raw, endpoint), (prox, pf_ep)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ep)
            _wait_echo(sock, frames)

        def call(s: Any) -> Callable[[], None]:
            def f() -> None:
                s.call("builtins", "len", [[]])
            return f

        def rawcall(sock: Any) -> Callable[[], None]:
            send, recv = sock.send_multipart, sock.recv_multipart

            def f() -> None:
                send(frames)
                recv()
            return f

        systems = {"direct": call(d), "brokered": call(sess["brokered"]), "direct_raw": rawcall(raw),
                   "cproxy": rawcall(prox)}
        lat = _alternate(systems, rounds, per_round, cfg)
        p50 = {k: quantile(_pooled(v), 0.5) for k, v in lat.items()}
        r = {k: _ratio_p50(lat, k, "cproxy") for k in lat}
        gain = _ratio_p50(lat, "brokered", "direct")
        data = {"rounds": rounds, "calls_per_round": per_round, "p50_us": {k: v * 1e6 for k, v in p50.items()},
                "p99_us": {k: quantile(_pooled(v), 0.99) * 1e6 for k, v in lat.items()},
                "ratio_p50_vs_cproxy": r, "brokered_over_direct": gain}
        rows.append(Row("direct.noop", "no-op pinned call p50, direct pool (Client)", us(p50["direct"]),
                        f"brokered {us(p50['brokered'])}; C proxy {us(p50['cproxy'])}",
                        f"{r['direct']:.2f}× C proxy (brokered {r['brokered']:.2f}×; gain {gain:.2f}×)",
                        "≤ 1.25× C proxy", verdict(r["direct"] <= 1.25), data=data))
        rows.append(Row("direct.noop_raw", "  raw DEALER frames to the worker's direct socket", us(p50["direct_raw"]),
                        f"C proxy {us(p50['cproxy'])}", f"{r['direct_raw']:.2f}× C proxy", "(info: no Client)"))

        # pipelined: fresh sessions (100), the two stacks' 2 workers each, the proxy's 2 echoes
        t_rounds = cfg.n_rounds(5, 1)
        duration, warmup = 3.0, 0.5
        tsys: dict[str, tuple[str, list[int], str, list[str]]] = {
            "direct": (stacks["direct"].frontend, [st_pid(stacks["direct"]), *worker_pids(stacks["direct"])],
                       "direct", []),
            "brokered": (stacks["brokered"].frontend,
                         [st_pid(stacks["brokered"]), *worker_pids(stacks["brokered"])], "loadgen", []),
            "cproxy": (pf_ep, [proxy.pid, *(e.pid for e in echoes)], "loadgen", []),
        }
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in tsys}
        for rnd in range(t_rounds):
            for name in iter_rotated(list(tsys), rnd):
                ep, pids, mode, extra = tsys[name]
                if mode == "direct":
                    res[name].append(_run_direct_loadgen(ws, ep, duration, warmup, pids))
                else:
                    res[name].append(_loadgen(ws, mode, ep, duration, warmup, pids, extra))
            cfg.log(f"  round {rnd + 1}/{t_rounds}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in res.items()))
        rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
        tr = {k: median([_ratio(a["rate"], b["rate"]) for a, b in zip(res[k], res["cproxy"])]) for k in res}
        tgain = median([_ratio(a["rate"], b["rate"]) for a, b in zip(res["direct"], res["brokered"])])

        def cpu_us(name: str, hub: bool) -> float:
            vals = []
            for x in res[name]:
                if x["calls"]:
                    keys = [str(p) for p in (tsys[name][1][:1] if hub else tsys[name][1][1:])]
                    vals.append(sum(x["cpu"][k] for k in keys) / x["calls"] * 1e6)
            return median(vals)

        cpu = {k: {"hub_us": cpu_us(k, True), "workers_us": cpu_us(k, False)} for k in res}
        errors = {k: sum(x["errors"] for x in v) for k, v in res.items()}
        rows.append(Row("direct.throughput", "pipelined calls/s, 100 sessions, 2 workers, direct pool",
                        f"{rate['direct']:.0f}/s", f"brokered {rate['brokered']:.0f}/s; C proxy {rate['cproxy']:.0f}/s",
                        f"{tr['direct']:.2f}× C proxy (brokered {tr['brokered']:.2f}×; gain {tgain:.2f}×)",
                        "≥ 0.35× C proxy", verdict(tr["direct"] >= 0.35),
                        data={"rounds": t_rounds, "duration_s": duration, "rates": rate, "ratio_vs_cproxy": tr,
                              "direct_over_brokered": tgain, "cpu_us_per_call": cpu, "errors": errors, "raw": res}))
        rows.append(_crash(stacks, clients, cfg.n_rounds(5, 1), cfg))
    finally:
        for sock in socks:
            sock.close(0)
        for c in clients.values():
            c.close()
        ctx.term()
        ws.close()
    return rows


def _crash(stacks: dict[str, Stack], clients: dict[str, Any], rounds: int, cfg: Any) -> Row:
    import threading

    import dspex
    from bench.common import wait_for

    res: dict[str, list[tuple[float, float]]] = {k: [] for k in stacks}
    for rnd in range(rounds):
        for name in iter_rotated(list(stacks), rnd):
            st, client = stacks[name], clients[name]
            proc = st.start_worker("p", "--no-dspy")
            wait_for(lambda: any(w["pid"] == proc.pid for w in st.workers("p", client)), 30, 0.02, "the new worker")
            s = None
            for _ in range(50):  # a session pinned to the new worker (least loaded: usually the first)
                s = client.session("p")
                if int(s.call("os", "getpid")) == proc.pid:
                    break
            assert s is not None
            s.call("builtins", "len", [[]])  # direct pools: the first direct call
            out: list[Any] = []

            def long_call(sess: Any = s) -> None:
                try:
                    sess.call("time", "sleep", [30], timeout=20)
                except dspex.DspexError as err:
                    out.append((time.perf_counter(), err))

            t = threading.Thread(target=long_call, daemon=True)
            t.start()
            time.sleep(0.3)  # the call is running
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            t.join(25)
            crashed = out[0][0] - t0 if out and isinstance(out[0][1], dspex.WorkerCrashed) else float("nan")
            while True:
                try:
                    s.call("builtins", "len", [[]], timeout=5)
                except dspex.SessionWorkerUnavailable:
                    break
                except dspex.DspexError:
                    if time.perf_counter() - t0 > 10:
                        raise
            res[name].append((crashed, time.perf_counter() - t0))
            proc.wait(timeout=10)
        cfg.log(f"  crash round {rnd + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1][0] * 1e3:.1f}/{v[-1][1] * 1e3:.1f} ms" for k, v in res.items()))
    med = {k: (median([x[0] for x in v]), median([x[1] for x in v])) for k, v in res.items()}
    return Row("direct.crash", "SIGKILL during a call → WorkerCrashed / next call SessionWorkerUnavailable",
               f"direct {med['direct'][0] * 1e3:.1f} / {med['direct'][1] * 1e3:.1f} ms",
               f"brokered {med['brokered'][0] * 1e3:.1f} / {med['brokered'][1] * 1e3:.1f} ms", "", "(info: crash detection)",
               data={"rounds": rounds, "ms": {k: [(a * 1e3, b * 1e3) for a, b in v] for k, v in res.items()}})


def st_pid(st: Stack) -> int:
    assert st.broker is not None
    return st.broker.pid


def worker_pids(st: Stack) -> list[int]:
    return [w.pid for w in st.worker_procs]


def _run_direct_loadgen(ws: Workspace, endpoint: str, duration: float, warmup: float, pids: list[int]) -> dict[str, Any]:
    import subprocess

    from bench.common import REPO, base_env

    args = [PY, "-m", "bench.direct", "loadgen", "--endpoint", endpoint, "--duration", str(duration),
            "--warmup", str(warmup), *[x for p in pids for x in ("--cpu-pid", str(p))]]
    proc = subprocess.run(args, env=base_env(), cwd=REPO, capture_output=True, timeout=duration + warmup + 60,
                          start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"direct loadgen failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def loadgen(a: argparse.Namespace) -> dict[str, Any]:
    """Pin ``--sessions`` sessions with one brokered call each, then keep one call per session in
    flight straight to its worker (``--sockets`` DEALERs per worker endpoint)."""
    from bench.servers import drive
    from dspex import codec
    from dspex.protocol import RequestHeader, unpack_reply

    ctx = zmq.Context()
    body = codec.encode(["builtins", "len", [[]], {}])[0]
    sessions = [secrets.token_hex(16) for _ in range(a.sessions)]
    timeout_ms = int(a.timeout * 1000)
    front = ctx.socket(zmq.DEALER)
    front.setsockopt(zmq.LINGER, 0)
    front.connect(a.endpoint)
    pinned: list[tuple[str, str]] = []  # per session: (worker, direct endpoint)
    for i, sid in enumerate(sessions):
        front.send_multipart([RequestHeader("call", i + 1, "p", sid, "", timeout_ms).pack(), body])
        if not front.poll(int(a.timeout * 1000)):
            raise TimeoutError("the broker did not answer a pinning call")
        status, _, worker, _, ep = unpack_reply(front.recv_multipart()[0])
        if status != "ok" or not ep:
            raise RuntimeError(f"pinning call: status {status!r}, direct endpoint {ep!r}")
        pinned.append((worker, ep))
    front.close(0)
    links: dict[str, list[zmq.Socket[Any]]] = {}
    for ep in sorted({ep for _, ep in pinned}):
        links[ep] = []
        for _ in range(a.sockets // 2 or 1):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
            s.connect(ep)
            links[ep].append(s)
    owner = [links[ep][i % len(links[ep])] for i, (_, ep) in enumerate(pinned)]
    socks = [s for v in links.values() for s in v]
    return drive(ctx, socks, owner,
                 lambda rid, si: RequestHeader("call", rid, "p", sessions[si], pinned[si][0], timeout_ms).pack(), body, a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.direct")
    sub = p.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("loadgen")
    g.add_argument("--endpoint", required=True, help="the broker's frontend (sessions are pinned through it)")
    g.add_argument("--sessions", type=int, default=100)
    g.add_argument("--sockets", type=int, default=4)
    g.add_argument("--duration", type=float, default=3.0)
    g.add_argument("--warmup", type=float, default=0.5)
    g.add_argument("--timeout", type=float, default=30.0)
    g.add_argument("--cpu-pid", type=int, action="append", default=[])
    a = p.parse_args(argv)
    print(json.dumps(loadgen(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
