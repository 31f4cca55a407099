"""LM-bound serving: ``dspy.ChainOfThought`` through the real ``dspy.LM`` HTTP path (issue 14).

A local OpenAI-compatible server (``bench.lmserver``, its own process) answers every chat
completion after a fixed latency. N concurrent sessions each run ``ChainOfThought("question ->
answer")`` back to back (LM cache off), so the ideal rate is N ÷ latency. Systems, measured in the
same run, alternating round by round, each round a fresh driver process:

* **dspex**: an ``AsyncClient`` driver with N sessions on a ``strict_queue`` pool of worker
  processes with capacity threads; each session configures its LM and ``put``\\ s its program once,
  then calls the ref (``s.method(prog, "__call__")``).
* **asyncify**: the program in-process under asyncio, ``dspy.asyncify`` (DSPy's documented
  FastAPI serving path) with ``async_max_workers`` = N, N tasks.
* **Ray** actors when ``ray`` is importable (skipped otherwise).

``python -m bench.serving drive --mode dspex|asyncify ...`` is the driver; it writes one JSON
line (calls, rate, p50, p99, errors, its own RSS) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.common import (
    PY,
    Row,
    Stack,
    Workspace,
    base_env,
    cpu_seconds,
    iter_rotated,
    median,
    quantile,
    rss_bytes,
    verdict,
    wait_for,
)

MODEL = "openai/loopback"
QUESTION = "What is six times seven?"


def _configure_lm(base: str) -> None:
    """Runs on the worker (sent by value): this session's LM, cache off."""
    import dspy

    dspy.configure(lm=dspy.LM(MODEL, api_base=base, api_key="x", cache=False))


def _self_rss() -> int:
    return rss_bytes(os.getpid())


def _cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds (all threads) of this process and of ``pids``."""
    out = {"self": time.process_time()}
    out.update({str(p): cpu_seconds(p) for p in pids})
    return out


async def _loop(n: int, duration: float, warmup: float, call: Any, cpu_pids: list[int]) -> dict[str, Any]:
    """``n`` tasks call ``call(i)`` back to back; count what completes inside the window."""
    lat: list[float] = []
    errors: list[str] = []
    state = {"count": False, "stop": False, "calls": 0}

    async def one(i: int) -> None:
        while not state["stop"]:
            t = time.perf_counter()
            try:
                ok = await call(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            if not ok:
                errors.append("wrong answer")
            elif state["count"]:
                state["calls"] += 1
                lat.append(time.perf_counter() - t)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(warmup)
    state["count"] = True
    cpu0 = _cpu(cpu_pids)
    t0 = time.monotonic()
    await asyncio.sleep(duration)
    state["count"] = False
    elapsed = time.monotonic() - t0
    cpu1 = _cpu(cpu_pids)
    calls = state["calls"]
    rss = _self_rss()
    state["stop"] = True
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    return {"calls": calls, "elapsed": elapsed, "rate": calls / elapsed, "p50": quantile(lat, 0.5) if lat else 0.0,
            "p99": quantile(lat, 0.99) if lat else 0.0, "errors": len(errors), "error_kinds": sorted(set(errors)),
            "rss": rss, "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0}}


async def _drive_asyncify(a: argparse.Namespace) -> dict[str, Any]:
    import dspy

    dspy.configure(lm=dspy.LM(MODEL, api_base=a.base, api_key="x", cache=False), async_max_workers=a.concurrency)
    program = dspy.asyncify(dspy.ChainOfThought("question -> answer"))

    async def call(i: int) -> bool:
        pred = await program(question=QUESTION)
        return bool(pred.answer == "42")

    return await _loop(a.concurrency, a.duration, a.warmup, call, [])


async def _drive_dspex(a: argparse.Namespace) -> dict[str, Any]:
    import dspy

    import dspex.aio

    client = dspex.aio.connect(a.endpoint, timeout=120)
    try:
        sessions = [client.session(a.pool) for _ in range(a.concurrency)]

        async def setup(s: Any) -> Any:
            await s.run(_configure_lm, a.base)
            return await s.put(dspy.ChainOfThought("question -> answer"))

        progs = await asyncio.gather(*(setup(s) for s in sessions))

        async def call(i: int) -> bool:
            pred = await sessions[i].method(progs[i], "__call__", [], {"question": QUESTION}, timeout=60)
            return bool(pred.answer == "42")

        out = await _loop(a.concurrency, a.duration, a.warmup, call, a.cpu_pid)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        return out
    finally:
        await client.close()


def drive(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving drive")
    p.add_argument("--mode", choices=("dspex", "asyncify"), required=True)
    p.add_argument("--base", required=True, help="the LM server's api_base")
    p.add_argument("--endpoint", default="")
    p.add_argument("--pool", default="lm")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-pid", type=int, action="append", default=[], help="also measure these processes' CPU")
    a = p.parse_args(argv)
    fn = _drive_dspex if a.mode == "dspex" else _drive_asyncify
    res = asyncio.run(fn(a))
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


# -- the figure ------------------------------------------------------------------------------

def _start_lm_server(ws: Workspace, latency: float) -> str:
    proc = ws.procs.spawn([PY, "-m", "bench.lmserver", "--latency", str(latency)], "lmserver.log", base_env())
    log = ws.path("lmserver.log")

    def port() -> int | None:
        for line in open(log).read().splitlines():
            if line.startswith("{"):
                return int(json.loads(line)["port"])
        if proc.poll() is not None:
            raise RuntimeError("LM server exited: " + ws.procs.log_tail("lmserver.log"))
        return None

    return f"http://127.0.0.1:{wait_for(port, what='LM server port')}/v1"


def _run_driver(ws: Workspace, mode: str, base: str, n: int, duration: float, warmup: float, name: str,
                endpoint: str = "", run_dir: str | None = None, cpu_pids: list[int] | None = None) -> dict[str, Any]:
    out = ws.path(f"{name}.json")
    args = [PY, "-m", "bench.serving", "drive", "--mode", mode, "--base", base, "--concurrency", str(n),
            "--duration", str(duration), "--warmup", str(warmup), "--out", out]
    if endpoint:
        args += ["--endpoint", endpoint]
    for pid in cpu_pids or []:
        args += ["--cpu-pid", str(pid)]
    proc = ws.procs.spawn(args, f"{name}.log", base_env(run_dir))
    try:
        proc.wait(timeout=duration + warmup + 180)
    except Exception:
        ws.procs.stop(proc)
        raise
    if proc.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{mode} driver failed: " + ws.procs.log_tail(f"{name}.log"))
    with open(out) as f:
        return dict(json.load(f))


def serving(cfg: Any) -> list[Row]:
    latency = 0.3
    if cfg.smoke:
        n, n_workers, capacity, duration, warmup = 8, 1, 8, 1.5, 1.0
    else:
        n, n_workers, capacity, duration, warmup = 200, 2, 100, 10.0, 3.0
    rounds = cfg.n_rounds(3, 1)
    ideal = n / latency
    layout = f"{n_workers} process{'es' if n_workers > 1 else ''} × capacity {capacity}"
    ws = Workspace()
    client: Any = None
    try:
        base = _start_lm_server(ws, latency)
        st = Stack(ws, "sv")
        st.start_broker("lm:strict_queue")
        for _ in range(n_workers):
            st.start_worker("lm", "--capacity", str(capacity))
        client = st.client(timeout=30)
        st.wait_workers("lm", n_workers, 90, client=client)
        stack_pids = [p.pid for p in ([st.broker] if st.broker else []) + st.worker_procs]
        res: dict[str, list[dict[str, Any]]] = {"dspex": [], "asyncify": []}
        for r in range(rounds):
            for mode in iter_rotated(list(res), r):
                x = _run_driver(ws, mode, base, n, duration, warmup, f"{mode}-{r}", st.frontend, st.env["DSPEX_RUN_DIR"],
                                stack_pids)
                x["cpu_ms_per_call"] = {k: v / x["calls"] * 1e3 if x["calls"] else 0.0 for k, v in x["cpu_s"].items()}
                if mode == "dspex":
                    x["stack_rss"] = x["rss"] + sum(rss_bytes(pid) for pid in stack_pids)
                else:
                    x["stack_rss"] = x["rss"]
                res[mode].append(x)
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]['rate']:.0f}/s p50 {v[-1]['p50'] * 1e3:.0f} ms ({v[-1]['errors']} errors)" for k, v in res.items()))
        med: dict[str, dict[str, float]] = {
            k: {f: median([x[f] for x in v]) for f in ("rate", "p50", "p99", "stack_rss")} for k, v in res.items()}
        for k, v in res.items():  # CPU ms per call of the whole stack (driver + broker + workers)
            med[k]["cpu_ms"] = median([sum(x["cpu_ms_per_call"].values()) for x in v])
        vs = median([a["rate"] / b["rate"] if b["rate"] else float("nan") for a, b in zip(res["dspex"], res["asyncify"])])
        errors = sum(x["errors"] for v in res.values() for x in v)
        data = {"latency_s": latency, "concurrency": n, "layout": layout, "ideal": ideal, "rounds": rounds,
                "duration_s": duration, "medians": med, "dspex_vs_asyncify": vs, "errors": errors, "raw": res}

        def ours(k: str) -> str:
            m = med[k]
            return (f"{m['rate']:.0f} calls/s, p50 {m['p50'] * 1e3:.0f} ms, p99 {m['p99'] * 1e3:.0f} ms, "
                    f"RSS {m['stack_rss'] / 2**20:.0f} MB, CPU {m['cpu_ms']:.1f} ms/call")

        ok = med["dspex"]["rate"] >= 0.9 * ideal and vs >= 1.0 and errors == 0
        rows = [
            Row("serving.dspex", f"LM-bound serving: ChainOfThought, dspy.LM HTTP ({latency * 1e3:.0f} ms), {n} sessions, "
                f"dspex {layout}", ours("dspex"), f"ideal {ideal:.0f}/s (concurrency ÷ latency); asyncify "
                f"{med['asyncify']['rate']:.0f}/s", f"{med['dspex']['rate'] / ideal:.2f}× ideal, {vs:.2f}× asyncify",
                "≥ 0.9× ideal, ≥ 1× asyncify", "" if cfg.smoke else verdict(ok), data=data),
            Row("serving.asyncify", f"same, in-process dspy.asyncify under asyncio (async_max_workers={n})",
                ours("asyncify"), f"ideal {ideal:.0f}/s", f"{med['asyncify']['rate'] / ideal:.2f}× ideal", "(info)"),
        ]
        try:
            import ray  # noqa: F401
        except ImportError:
            rows.append(Row.skipped("serving.ray", "same, Ray actors", "(info)", "ray is not installed"))
        else:
            rows.append(Row.skipped("serving.ray", "same, Ray actors", "(info)", "Ray driver not written yet"))
        return rows
    finally:
        if client is not None:
            client.close()
        ws.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        sys.exit(drive(sys.argv[2:]))
    print("usage: python -m bench.serving drive --mode dspex|asyncify ...", file=sys.stderr)
    sys.exit(2)
