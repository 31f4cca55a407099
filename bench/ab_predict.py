"""``python -m bench.ab_predict --base DIR [--rounds N]``: A/B of the Predict-through-a-session path.

``DIR`` holds the baseline source tree (``git archive <commit> | tar -x -C DIR``). Each tree gets
its own stack (broker + one capacity-1 worker with dspy, from that tree) and its own long-lived
driver process (that tree's client); blocks alternate between the trees, order rotating. Per block:

* ``seq``: sequential ``prog(question=...)`` ref calls of ``dspy.Predict`` (DummyLM) and the same
  program in-process in the driver: p50 of each, and their ratio;
* ``aio``: an ``AsyncClient`` with ``--sessions`` sessions calling a ``ChainOfThought`` ref back to
  back (the serving driver's path): the driver's CPU per call (``time.process_time``);
* ``noop``: sequential no-op pinned calls (``s.call("builtins", "len", [[]])``): p50 and the
  driver's CPU per call.

Prints medians over rounds and the medians of the neighbouring-block ratios new/base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

# The driver runs as a script with the tested tree first on sys.path, so that tree's dspex is the
# client; it imports nothing from bench/ (the baseline tree's bench/ may not have this module).
QUESTION = "What is the capital of France?"
ANSWERS = {"predict": {"answer": "Paris"}, "cot": {"reasoning": "France's capital city is Paris.", "answer": "Paris"}}
_CONFIGURE = """
import dspy
from dspy.utils import DummyLM
dspy.configure(lm=DummyLM({{{question!r}: {answers!r}}}))
"""


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


# -- the driver (one process per tree) ---------------------------------------------------------

def _drive(endpoint: str, sessions: int) -> None:
    import dspy
    from dspy.utils import DummyLM

    import dspex
    import dspex.aio

    progs = {"predict": dspy.Predict("question -> answer"), "cot": dspy.ChainOfThought("question -> answer")}
    client = dspex.connect(endpoint, timeout=60)
    s = client.session("p")
    s.exec(_CONFIGURE.format(question=QUESTION, answers=ANSWERS["predict"]))
    ref = s.put(progs["predict"])
    lm = DummyLM({QUESTION: ANSWERS["predict"]})

    def noop(n: int) -> dict[str, float]:
        lat = []
        c0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            s.call("builtins", "len", [[]])
            lat.append(time.perf_counter() - t)
        return {"session": _median(lat), "cpu_per_call": (time.process_time() - c0) / n}

    def seq(n: int) -> dict[str, float]:
        lat_s, lat_l = [], []
        for _ in range(n):
            t = time.perf_counter()
            ref(question=QUESTION)
            lat_s.append(time.perf_counter() - t)
        with dspy.context(lm=lm):
            for _ in range(n):
                t = time.perf_counter()
                progs["predict"](question=QUESTION)
                lat_l.append(time.perf_counter() - t)
        return {"session": _median(lat_s), "inprocess": _median(lat_l)}

    async def aio_setup() -> tuple[Any, list[Any], list[Any]]:
        ac = dspex.aio.connect(endpoint, timeout=60)
        ss = [ac.session("p") for _ in range(sessions)]
        for x in ss:
            await x.exec(_CONFIGURE.format(question=QUESTION, answers=ANSWERS["cot"]))
        rs = [await x.put(progs["cot"]) for x in ss]
        return ac, ss, rs

    loop = asyncio.new_event_loop()
    ac, ss, rs = loop.run_until_complete(aio_setup())

    async def aio(duration: float) -> dict[str, float]:
        stop = time.monotonic() + duration
        calls = 0

        async def one(i: int) -> None:
            nonlocal calls
            while time.monotonic() < stop:
                pred = await rs[i](question=QUESTION)
                assert pred.answer == "Paris"
                calls += 1

        c0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(len(ss))))
        return {"calls": calls, "cpu_per_call": (time.process_time() - c0) / calls}

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "seq":
            out = seq(cmd["n"])
        elif cmd["op"] == "noop":
            out = noop(cmd["n"])
        elif cmd["op"] == "aio":
            out = loop.run_until_complete(aio(cmd["duration"]))
        else:
            break
        print(json.dumps(out), flush=True)
    loop.run_until_complete(ac.close())
    client.close()


# -- the orchestrator -------------------------------------------------------------------------

def _start(ws: Any, name: str, tree: str, sessions: int) -> tuple[subprocess.Popen[str], int]:
    from bench.common import PY, Stack, wait_for

    st = Stack(ws, name)
    st.env["PYTHONPATH"] = tree + os.pathsep + st.env.get("PYTHONPATH", "")
    common = ["--heartbeat", str(st.heartbeat), "--liveness", str(st.liveness), "--log-level", "WARNING"]
    ws.procs.spawn([PY, "-m", "broker", "--frontend", st.frontend, "--backend", st.backend, *common,
                    "--pool", "p:strict_queue"], f"{name}-broker.log", st.env, cwd=tree)
    wait_for(lambda: os.path.exists(st.frontend[6:]), what=f"{name} broker socket")
    worker = ws.procs.spawn([PY, "-m", "worker", "--pool", "p", "--backend", st.backend, *common],
                            f"{name}-worker.log", st.env, cwd=tree)
    c = st.client(timeout=60)
    st.wait_workers("p", 1, 90, client=c)
    c.close()
    # the driver: this script, with the tree's dspex as its client
    proc = subprocess.Popen([PY, os.path.abspath(__file__), "drive", st.frontend, str(sessions)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=st.env, cwd=tree,
                            start_new_session=True)
    assert proc.stdout is not None
    if not json.loads(proc.stdout.readline()).get("ready"):
        raise RuntimeError(f"{name} driver did not start")
    return proc, worker.pid


def _ask(driver: tuple[subprocess.Popen[str], int], cmd: dict[str, Any]) -> dict[str, Any]:
    """One block on a driver; adds the worker's CPU per session call (its whole process, /proc)."""
    from bench.common import cpu_seconds

    proc, worker = driver
    assert proc.stdin is not None and proc.stdout is not None
    c0 = cpu_seconds(worker)
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("driver exited")
    out = dict(json.loads(line))
    out["worker_cpu"] = (cpu_seconds(worker) - c0) / (out["calls"] if "calls" in out else cmd["n"])
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.common import Workspace, iter_rotated, median

    p = argparse.ArgumentParser(prog="python -m bench.ab_predict")
    p.add_argument("--base", required=True, help="directory with the baseline source tree")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=150, help="sequential calls per seq block")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per aio block")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--only", choices=("seq", "aio", "noop"), default=None)
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ws = Workspace()
    drivers: dict[str, tuple[subprocess.Popen[str], int]] = {}
    try:
        drivers = {"new": _start(ws, "n", here, a.sessions),
                   "base": _start(ws, "b", os.path.abspath(a.base), a.sessions)}
        kinds = [a.only] if a.only else ["seq", "aio", "noop"]
        for d in drivers.values():  # warm up
            if "seq" in kinds:
                _ask(d, {"op": "seq", "n": 100})
            if "aio" in kinds:
                _ask(d, {"op": "aio", "duration": 0.5})
            if "noop" in kinds:
                _ask(d, {"op": "noop", "n": 300})
        res: dict[str, dict[str, list[dict[str, float]]]] = {k: {n: [] for n in drivers} for k in kinds}
        for r in range(a.rounds):
            for kind in kinds:
                for name in iter_rotated(list(drivers), r):
                    cmd = ({"op": "aio", "duration": a.duration} if kind == "aio"
                           else {"op": kind, "n": a.calls * (4 if kind == "noop" else 1)})
                    res[kind][name].append(_ask(drivers[name], cmd))
            def last(x: dict[str, float]) -> str:
                return json.dumps({k: round(v * 1e6) if v < 1 else v for k, v in x.items()})

            print(f"round {r + 1}/{a.rounds}: " + "; ".join(
                f"{kind} " + ", ".join(f"{n} {last(x[-1])}" for n, x in res[kind].items()) for kind in kinds),
                file=sys.stderr, flush=True)
        out: dict[str, Any] = {"rounds": a.rounds}
        if "seq" in res:
            s = res["seq"]
            out["seq_p50_us"] = {n: {k: median([x[k] for x in v]) * 1e6 for k in ("session", "inprocess")}
                                 for n, v in s.items()}
            out["seq_ratio_session_vs_inprocess"] = {
                n: median([x["session"] / x["inprocess"] for x in v]) for n, v in s.items()}
            out["seq_session_new_vs_base"] = median([x["session"] / y["session"] for x, y in zip(s["new"], s["base"])])
            out["seq_worker_cpu_us_per_call"] = {n: median([x["worker_cpu"] for x in v]) * 1e6 for n, v in s.items()}
            out["seq_worker_cpu_new_vs_base"] = median([x["worker_cpu"] / y["worker_cpu"]
                                                        for x, y in zip(s["new"], s["base"])])
        if "aio" in res:
            s = res["aio"]
            out["aio_driver_cpu_us_per_call"] = {n: median([x["cpu_per_call"] for x in v]) * 1e6 for n, v in s.items()}
            out["aio_calls_per_s"] = {n: median([x["calls"] / a.duration for x in v]) for n, v in s.items()}
            out["aio_cpu_new_vs_base"] = median([x["cpu_per_call"] / y["cpu_per_call"]
                                                 for x, y in zip(s["new"], s["base"])])
            out["aio_worker_cpu_us_per_call"] = {n: median([x["worker_cpu"] for x in v]) * 1e6 for n, v in s.items()}
        if "noop" in res:
            s = res["noop"]
            out["noop_p50_us"] = {n: median([x["session"] for x in v]) * 1e6 for n, v in s.items()}
            out["noop_new_vs_base"] = median([x["session"] / y["session"] for x, y in zip(s["new"], s["base"])])
            out["noop_driver_cpu_us_per_call"] = {n: median([x["cpu_per_call"] for x in v]) * 1e6 for n, v in s.items()}
            out["noop_worker_cpu_us_per_call"] = {n: median([x["worker_cpu"] for x in v]) * 1e6 for n, v in s.items()}
            out["noop_worker_cpu_new_vs_base"] = median([x["worker_cpu"] / y["worker_cpu"]
                                                         for x, y in zip(s["new"], s["base"])])
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for d, _ in drivers.values():
            try:
                if d.stdin is not None:
                    d.stdin.close()
                d.wait(timeout=20)
            except Exception:  # noqa: BLE001 - cleanup: killed below by pid
                d.kill()
                d.wait()
        ws.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        sys.path.pop(0)  # this script's directory (bench/) must not shadow anything
        _drive(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
