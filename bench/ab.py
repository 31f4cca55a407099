"""``python -m bench.ab --what tree|core|shell|executor|codec|exchange|client|durable|idle|output [--a REV] [--b REV] [--rounds N]``: A/B of two
trees in one run.

``--a`` and ``--b`` are git revisions of this repository (archived into a temp dir) or directories
holding a source tree; ``.`` is this checkout as it is, uncommitted changes included (the default
of ``--a``; ``--b`` defaults to ``HEAD``). Each side runs its own tree's code; the two sides take
the same work in short blocks that alternate, the order rotating each round, so the bursts of
load of a shared machine hit both alike. Prints, for every figure, the median of each side and
the **median over rounds of the ratio a/b of neighbouring blocks** (JSON; ``--json`` also keeps
the raw blocks).

* ``tree``: each tree's broker and 2 capacity-1 ``--no-dspy`` workers (``--pool`` spec, or
  ``--pool-a``/``--pool-b`` to compare settings, e.g. prefetch depths, in one tree) under the
  pipelined load of ``bench.servers loadgen`` (``--sessions`` calls in flight; 1: sequential round
  trips): calls/s, p50/p99, broker and worker CPU per call, the broker's split into main thread /
  zmq threads × user / system (``/proc``).
* ``core``: the routing core alone, no sockets: thread CPU per request + reply (resolves ±2%
  where ``tree`` resolves ±10%). ``--profile``: this checkout's core under cProfile instead.
* ``shell``: the broker's main thread alone: its zmq shell (``Broker.turn``) and core in one
  thread over inproc sockets, fed the pipelined load of ``tree`` by protocol-echo workers and
  clients that are sockets of the same thread; thread CPU per request + reply, with the same
  messages reaching every turn of both sides (needs trees whose ``Broker`` has ``turn``);
  ``--sessions 1``: sequential round trips (two turns per call: the cost of a wake-up).
* ``executor``: the worker's executor alone: CPU per no-op execute and per ``dspy.Predict`` call (and its ``acall``), each
  as a session's client sends it, and the same Predict in-process (the noise floor of the ratios).
* ``codec``: the codec alone on plain data (a request body, a small result, 200 rows, 10 000 floats; rows and floats as a
  call's argument too): CPU per
  encode + decode; the common case must stay one pass of msgpack's C packer.
* ``exchange``: the client's own Python per call alone, no sockets (``Exchange`` of a session's
  request, its frames, ``feed`` of the reply): thread CPU per ``s.run`` of a held function
  (without and with a ``dspy.LM`` configured on the client), per no-op ``s.call`` and per
  ``dspy.Predict`` ref call, without and with the call's history entry to record (``ref_hist``)
  (resolves a few µs where ``client``'s process CPU resolves ±10%).
* ``client``: each tree's stack (broker + one capacity-1 worker with dspy) and client: sequential
  no-op calls in and outside a session (p50), sequential Predict through a session (a ref call and
  ``s.run`` of the user's function) vs in-process (p50), the client's CPU per no-op and per ref
  call, the asyncio driver's CPU per call with ``--sessions`` sessions, the worker's CPU per call.
* ``durable``: each tree's stack (broker + one capacity-1 worker with dspy) and client: the
  ``durable.call`` row (a ChainOfThought with 4 demos, DummyLM) in a durable and in a plain
  session, ``--calls`` (150) of each per block: p50s, their ratio, broker and worker CPU per call.
* ``idle``: each tree's shipped stack (its ``supervisor.conf``: broker + 6 workers under
  supervisord, ``bench/idle.py``), both up and idle throughout; a block is one ``--duration``
  seconds window (give 20) of one side: CPU share of a core and wake-ups per second (and the
  preemptions among them) in all, and of supervisord, the broker and the six workers.
* ``output``: each tree's stack (broker + one capacity-1 ``--no-dspy`` worker) and client: a burst
  of ``--calls`` (100,000) separate prints, 1,000 prints 1 ms apart, one print before a 2 s sleep
  (bench/ab_drivers.py, ``output``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    REPO,
    Stack,
    Workspace,
    base_env,
    cpu_seconds,
    iter_rotated,
    median,
    wait_for,
)
from bench.hop import loadgen

DRIVERS = str(Path(__file__).resolve().with_name("ab_drivers.py"))
SHELL_DRIVER = str(Path(__file__).resolve().with_name("ab_shell.py"))


def tree_of(rev: str, tmp: str) -> str:
    """A directory with the source tree of ``rev`` (``.``: this checkout; a directory: itself)."""
    if rev == ".":
        return str(REPO)
    if os.path.isdir(rev):
        return os.path.abspath(rev)
    out = tempfile.mkdtemp(prefix="ab-", dir=tmp)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out


def _stack(ws: Workspace, name: str, tree: str, pool: str, workers: int, dspy: bool) -> tuple[Stack, list[int]]:
    """A broker and workers run from ``tree`` (first on their sys.path, and their working dir)."""
    st = Stack(ws, name)
    st.env["PYTHONPATH"] = tree + os.pathsep + st.env.get("PYTHONPATH", "")
    common = ["--heartbeat", str(st.heartbeat), "--liveness", str(st.liveness), "--log-level", "WARNING"]
    broker = ws.procs.spawn([PY, "-m", "broker", "--frontend", st.frontend, "--backend", st.backend, *common,
                             "--pool", pool], f"{name}-broker.log", st.env, cwd=tree)
    wait_for(lambda: os.path.exists(st.frontend[6:]) or broker.poll() is not None, what=f"{name} broker socket")
    procs = [ws.procs.spawn([PY, "-m", "worker", "--pool", pool.split(":")[0], "--backend", st.backend, *common,
                             *([] if dspy else ["--no-dspy"])], f"{name}-worker.log", st.env, cwd=tree)
             for _ in range(workers)]
    st.wait_workers(pool.split(":")[0], workers, 90)
    return st, [broker.pid, *(p.pid for p in procs)]


class TreeSide:
    def __init__(self, ws: Workspace, name: str, tree: str, a: argparse.Namespace, pool: str) -> None:
        self.st, self.pids = _stack(ws, name, tree, pool, 2, dspy=False)
        self.ws, self.a, self.pool = ws, a, pool.split(":")[0]

    def block(self) -> dict[str, float]:
        x = loadgen(self.ws, "loadgen", self.st.frontend, self.a.duration, 0.3, self.pids,
                    ["--pool", self.pool, "--sessions", str(self.a.sessions), "--sockets", str(min(4, self.a.sessions))])
        calls = max(1, x["calls"])
        cpu = x["cpu"]
        out = {"calls_per_s": x["rate"], "p50_us": x["p50"] * 1e6, "p99_us": x["p99"] * 1e6,
               "broker_us": cpu[str(self.pids[0])] / calls * 1e6,
               "workers_us": sum(cpu[str(p)] for p in self.pids[1:]) / calls * 1e6, "errors": x["errors"]}
        for k in ("main_user", "main_sys", "threads_user", "threads_sys"):
            out[f"broker_{k}_us"] = cpu[f"hub_{k}"] / calls * 1e6
        return out

    def close(self) -> None:
        pass


class DriverSide:
    """A long-lived ``ab_drivers.py`` process of one tree, asked for one block at a time."""

    def __init__(self, tree: str, args: list[str], command: dict[str, Any], worker: int = 0,
                 script: str = DRIVERS) -> None:
        env = base_env()
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([PY, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=tree, start_new_session=True)
        self.command, self.worker = command, worker
        if not json.loads(self._line()).get("ready"):
            raise RuntimeError(f"the {args[0]} driver of {tree} did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a driver exited ({self.proc.wait()})")
        return line

    def block(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        c0 = cpu_seconds(self.worker) if self.worker else 0.0
        self.proc.stdin.write(json.dumps(self.command) + "\n")
        self.proc.stdin.flush()
        out: dict[str, float] = json.loads(self._line())
        if self.worker:
            out["worker_us_per_call"] = (cpu_seconds(self.worker) - c0) / out.pop("calls") * 1e6
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class IdleSide:
    """A tree's shipped stack, idle; a block measures it over ``seconds`` (bench.idle's figures)."""

    def __init__(self, name: str, tree: str, seconds: float) -> None:
        from bench.idle import settle
        from bench.shipped import ShippedStack

        self.ws = Workspace(f"dxi{name}")
        self.stack = ShippedStack(self.ws, tree=Path(tree))
        self.seconds = seconds
        try:
            self.pids = self.stack.start()
            settle(self.pids, 60)
        except BaseException:
            self.close()
            raise

    def block(self) -> dict[str, float]:
        from bench.idle import measure

        m = measure(self.pids, self.seconds)
        roles = {"supervisord": ["supervisord"], "broker": ["broker"],
                 "workers": [k for k in m if k not in ("supervisord", "broker")]}
        out = {"cpu_pct": sum(r["cpu"] for r in m.values()) * 100, "wakeups": sum(r["wakeups"] for r in m.values()),
               "preempted": sum(r["preempted"] for r in m.values())}
        for role, procs in roles.items():
            out[f"{role}_cpu_pct"] = sum(m[k]["cpu"] for k in procs) * 100
            out[f"{role}_wakeups"] = sum(m[k]["wakeups"] for k in procs)
        return out

    def close(self) -> None:
        self.stack.stop()
        self.ws.close()


def _side(what: str, ws: Workspace, name: str, tree: str, a: argparse.Namespace, pool: str) -> Any:
    if what == "idle":
        return IdleSide(name, tree, a.duration)
    if what == "tree":
        return TreeSide(ws, name, tree, a, pool)
    if what == "core":
        return DriverSide(tree, ["core"], {"n": a.calls or 20_000})
    if what == "shell":
        return DriverSide(tree, [str(a.sessions)], {"n": a.calls or 20_000}, script=SHELL_DRIVER)
    if what == "executor":
        return DriverSide(tree, ["executor"], {"n": a.calls or 3000})
    if what == "codec":
        return DriverSide(tree, ["codec"], {"n": a.calls or 20_000})
    if what == "exchange":
        return DriverSide(tree, ["exchange"], {"n": a.calls or 3000})
    st, pids = _stack(ws, name, tree, "p:strict_queue", 1, dspy=what != "output")
    if what == "output":
        return DriverSide(tree, ["output", st.frontend, str(pids[0]), str(pids[1])], {"n": a.calls or 100_000})
    if what == "durable":
        return DriverSide(tree, ["durable", st.frontend, str(pids[0]), str(pids[1])], {"n": a.calls or 150})
    return DriverSide(tree, ["client", st.frontend, str(a.sessions)],
                      {"n": a.calls or 150, "seconds": a.duration}, worker=pids[1])


def _profile_core(top: int) -> int:
    import cProfile
    import pstats

    from bench.ab_drivers import CoreLoad

    load, calls = CoreLoad(), 20_000
    load.block(calls)
    prof = cProfile.Profile()
    prof.enable()
    load.block(calls)
    prof.disable()
    table: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    print(f"per request + reply (own time / {calls}, under cProfile):")
    mine = [kv for kv in table.items() if not kv[0][0].endswith("ab_drivers.py")]  # the core's, not the load's
    for func, (_, nc, tt, ct, _) in sorted(mine, key=lambda kv: -kv[1][2])[:top]:
        print(f"  {tt / calls * 1e6:7.2f} µs own  {ct / calls * 1e6:7.2f} µs cum  {nc / calls:5.2f}/call  "
              f"{func[0].split('/site-packages/')[-1]}:{func[1]}({func[2]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("tree", "core", "shell", "executor", "codec", "exchange", "client",
                                      "durable", "idle", "output"), required=True)
    p.add_argument("--a", default=".", help="git revision or directory (default: this checkout as it is)")
    p.add_argument("--b", default="HEAD", help="git revision or directory (default: HEAD)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--duration", type=float, default=1.5, help="tree/client: seconds per load block; idle: per window")
    p.add_argument("--sessions", type=int, default=0, help="tree/shell: calls in flight (100); client: aio sessions (8)")
    p.add_argument("--calls", type=int, default=0, help="core/shell/executor/codec/exchange/client: calls per block")
    p.add_argument("--pool", default="p:strict_queue", help="tree: the pool spec of both sides")
    p.add_argument("--pool-a", default="", help="tree: side a's pool spec (e.g. p:strict_queue:prefetch=1)")
    p.add_argument("--pool-b", default="")
    p.add_argument("--profile", action="store_true", help="core: cProfile of this checkout's core instead")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", metavar="PATH", help="also write the figures and the raw blocks here")
    a = p.parse_args(argv)
    if a.profile:
        return _profile_core(a.top)
    a.sessions = a.sessions or (100 if a.what in ("tree", "shell") else 8)
    ws = Workspace("dxab")
    tmp = tempfile.mkdtemp(prefix="dxab-trees-")
    sides: dict[str, Any] = {}
    try:
        trees = {"a": tree_of(a.a, tmp), "b": tree_of(a.b, tmp)}
        pools = {"a": a.pool_a or a.pool, "b": a.pool_b or a.pool}
        sides = {k: _side(a.what, ws, k, trees[k], a, pools[k]) for k in ("a", "b")}
        for side in sides.values():  # warm-up: imports, connections, caches
            side.block()
        res: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for r in range(a.rounds):
            for k in iter_rotated(list(sides), r):
                res[k].append(sides[k].block())
            print(f"round {r + 1}/{a.rounds}: " + "; ".join(
                f"{k} " + ", ".join(f"{f} {v:.4g}" for f, v in list(x[-1].items())[:3]) for k, x in res.items()),
                file=sys.stderr, flush=True)
        out: dict[str, Any] = {"what": a.what, "a": a.a, "b": a.b, "rounds": a.rounds, "figures": {}}
        if a.what == "tree":
            out.update(sessions=a.sessions, pools=pools)
        for f in res["a"][0]:
            xs, ys = [x[f] for x in res["a"]], [y[f] for y in res["b"]]
            ratios = [x / y for x, y in zip(xs, ys) if y]
            out["figures"][f] = {"a": median(xs), "b": median(ys), "a_vs_b": median(ratios) if ratios else None}
        print(json.dumps(out, indent=1))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({**out, "raw": res}, fh, indent=1)
        return 0
    finally:
        for side in sides.values():
            side.close()
        ws.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
