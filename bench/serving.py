"""LM-bound serving: ``dspy.ChainOfThought`` through the real ``dspy.LM`` HTTP path.

A local OpenAI-compatible server (``bench.lmserver``, its own process) answers every chat
completion after a fixed latency. N concurrent sessions each run ``ChainOfThought("question ->
answer")`` back to back (LM cache off), so the ideal rate is N ÷ latency. Systems, measured in the
same run, alternating round by round, each round a fresh driver process:

* **dspex**: an ``AsyncClient`` driver with N sessions on a ``strict_queue`` pool of worker
  processes with capacity threads; each session configures its LM and ``put``\\ s its program once,
  then calls the ref (``s.method(prog, "__call__")``).
* **asyncify**: the program in-process under asyncio, ``dspy.asyncify`` (DSPy's documented
  FastAPI serving path) with ``async_max_workers`` = N, N tasks.
* **Ray** when ``ray`` is importable (skipped otherwise, and in ``--smoke``): an actor pool of as
  many actors as dspex has worker processes, ``max_concurrency`` = the dspex capacity, N callers
  round-robin; async actors awaiting ``program.acall`` (``ray``) and threaded actors running the
  sync program (``ray_threads``), on a private Ray (:mod:`bench.rayhead`) that stays up during
  the whole group, so every system runs beside the same idle Ray daemons. The driver is in
  :mod:`bench.serving_ray`.

The goal is the machine's own limit: DSPy is CPU-bound per process, so dspex calls/s against
min(ideal, asyncify calls/s × worker processes); CPU per call is split by process (driver, broker,
workers) and memory per concurrent session is the RSS the N sessions added to every process.

``python -m bench.serving drive --mode dspex|asyncify|ray ...`` is the driver; it writes one JSON
line (calls, rate, p50, p99, errors, its own RSS before its sessions and at the end) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from bench.common import (
    PY,
    Config,
    Row,
    Stack,
    Workspace,
    base_env,
    cpu_seconds,
    iter_rotated,
    median,
    quantile,
    rss_bytes,
    rss_total,
    verdict,
    wait_for,
)
from bench.rayhead import local_ray, ray_missing

MODEL = "openai/loopback"
QUESTION = "What is six times seven?"


def configure_lm(base: str, model: str) -> None:
    """Runs in a session (``s.run``): its LM, cache off."""
    import dspy

    dspy.configure(lm=dspy.LM(model, api_base=base, api_key="x", cache=False))


def _self_rss() -> int:
    return rss_bytes(os.getpid())


def _cpu(pids: list[int] | Callable[[], list[int]]) -> dict[str, float]:
    """CPU seconds (all threads) of this process and of ``pids`` (or of the pids it returns now:
    Ray's processes come and go)."""
    out = {"self": time.process_time()}
    for p in pids() if callable(pids) else pids:
        try:
            out[str(p)] = cpu_seconds(p)
        except OSError:  # exited meanwhile (an idle Ray worker)
            pass
    return out


async def _loop(n: int, duration: float, warmup: float, call: Any,
                cpu_pids: list[int] | Callable[[], list[int]], rss_before: int = 0) -> dict[str, Any]:
    """``n`` tasks call ``call(i)`` back to back; count what completes inside the window.
    ``rss_before``: this process's RSS before its sessions existed (default: now)."""
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

    rss_before = rss_before or _self_rss()  # the driver before its callers: what they add is per session
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
            "rss": rss, "rss_before": rss_before, "cpu_s": {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}}


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
    rss_before = _self_rss()
    try:
        sessions = [client.session(a.pool) for _ in range(a.concurrency)]

        async def setup(s: Any) -> Any:
            await s.run(configure_lm, a.base, MODEL)
            return await s.put(dspy.ChainOfThought("question -> answer"))

        progs = await asyncio.gather(*(setup(s) for s in sessions))

        async def call(i: int) -> bool:
            pred = await sessions[i].method(progs[i], "__call__", [], {"question": QUESTION}, timeout=60)
            return bool(pred.answer == "42")

        out = await _loop(a.concurrency, a.duration, a.warmup, call, a.cpu_pid, rss_before)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        return out
    finally:
        await client.close()


def drive(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving drive")
    p.add_argument("--mode", choices=("dspex", "asyncify", "ray"), required=True)
    p.add_argument("--base", required=True, help="the LM server's api_base")
    p.add_argument("--endpoint", default="")
    p.add_argument("--pool", default="lm")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-pid", type=int, action="append", default=[], help="also measure these processes' CPU")
    p.add_argument("--ray-address", default="", help="ray: the GCS address of the bench's private Ray")
    p.add_argument("--ray-pid", type=int, action="append", default=[],
                   help="ray: its daemons' pids (CPU and RSS: these and their descendants)")
    p.add_argument("--ray-layout", choices=("async", "threads"), default="async")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--capacity", type=int, default=100, help="ray: max_concurrency of each actor")
    a = p.parse_args(argv)
    if a.mode == "ray":
        from bench.serving_ray import drive_ray

        res = asyncio.run(drive_ray(a, _loop, QUESTION))
    else:
        res = asyncio.run(_drive_dspex(a) if a.mode == "dspex" else _drive_asyncify(a))
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


# -- the figure ------------------------------------------------------------------------------

def start_lm_server(ws: Workspace, *args: str) -> str:
    """``bench.lmserver ARGS`` in its own process; its ``api_base`` once it listens."""
    proc = ws.procs.spawn([PY, "-m", "bench.lmserver", *args], "lmserver.log", base_env())
    log = ws.path("lmserver.log")

    def port() -> int | None:
        with open(log) as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith("{"):
                return int(json.loads(line)["port"])
        if proc.poll() is not None:
            raise RuntimeError("LM server exited: " + ws.procs.log_tail("lmserver.log"))
        return None

    return f"http://127.0.0.1:{wait_for(port, what='LM server port')}/v1"


def _run_driver(ws: Workspace, mode: str, base: str, n: int, duration: float, warmup: float, name: str,
                endpoint: str = "", run_dir: str | None = None, cpu_pids: list[int] | None = None,
                extra: list[str] | None = None) -> dict[str, Any]:
    out = ws.path(f"{name}.json")
    args = [PY, "-m", "bench.serving", "drive", "--mode", mode, "--base", base, "--concurrency", str(n),
            "--duration", str(duration), "--warmup", str(warmup), "--out", out]
    if endpoint:
        args += ["--endpoint", endpoint]
    for pid in cpu_pids or []:
        args += ["--cpu-pid", str(pid)]
    args += extra or []
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


RAY_LAYOUTS = {"ray": "async", "ray_threads": "threads"}


def serving(cfg: Config) -> list[Row]:
    latency = 0.3
    if cfg.smoke:
        n, n_workers, capacity, duration, warmup = 8, 1, 8, 1.5, 1.0
    else:
        n, n_workers, capacity, duration, warmup = 200, 2, 100, 10.0, 3.0
    rounds = cfg.n_rounds(3, 1)
    layout = f"{n_workers} process{'es' if n_workers > 1 else ''} × capacity {capacity}"
    ray_layout = f"{n_workers} actor{'s' if n_workers > 1 else ''} × max_concurrency {capacity}"
    no_ray = ray_missing() or ("smoke mode (ray.init alone takes seconds); run the full bench" if cfg.smoke else None)
    ws = Workspace()
    client: Any = None
    try:
        with ExitStack() as on_exit:
            base = start_lm_server(ws, "--latency", str(latency))
            st = Stack(ws, "sv")
            st.start_broker("lm:strict_queue")
            for _ in range(n_workers):
                st.start_worker("lm", "--capacity", str(capacity))
            client = st.client(timeout=30)
            st.wait_workers("lm", n_workers, 90, client=client)
            stack_pids = [p.pid for p in ([st.broker] if st.broker else []) + st.worker_procs]
            stack_idle_rss = rss_total(stack_pids)  # before any session existed
            res: dict[str, list[dict[str, Any]]] = {"dspex": [], "asyncify": []}
            ray_args: list[str] = []
            if no_ray is None:
                head = on_exit.enter_context(local_ray())
                ray_args = ["--ray-address", head.address, "--actors", str(n_workers), "--capacity", str(capacity)]
                for pid in head.pids():  # its daemons (and idle workers); actor workers descend from the raylet
                    ray_args += ["--ray-pid", str(pid)]
                res.update({k: [] for k in RAY_LAYOUTS})
            for r in range(rounds):
                for mode in iter_rotated(list(res), r):
                    if mode in RAY_LAYOUTS:
                        x = _run_driver(ws, "ray", base, n, duration, warmup, f"{mode}-{r}",
                                        extra=[*ray_args, "--ray-layout", RAY_LAYOUTS[mode]])
                        x["stack_rss"] = x["rss"] + sum(x["ray_rss"].values())
                    else:
                        x = _run_driver(ws, mode, base, n, duration, warmup, f"{mode}-{r}", st.frontend,
                                        st.env["DSPEX_RUN_DIR"], stack_pids)
                        x["stack_rss"] = x["rss"] + (rss_total(stack_pids) if mode == "dspex" else 0)
                        x["rss_added"] = x["rss"] - x["rss_before"]
                        if mode == "dspex":
                            x["rss_added"] += x["stack_rss"] - x["rss"] - stack_idle_rss
                        x["kb_per_session"] = x["rss_added"] / n / 1024
                    x["cpu_ms_per_call"] = {k: v / x["calls"] * 1e3 if x["calls"] else 0.0 for k, v in x["cpu_s"].items()}
                    if mode == "dspex":  # by process: the driver, the broker, the workers
                        cpu = x["cpu_ms_per_call"]
                        x["cpu_ms_by_process"] = {"driver": cpu.get("self", 0.0), "broker": cpu.get(str(stack_pids[0]), 0.0),
                                                  "workers": sum(cpu.get(str(p), 0.0) for p in stack_pids[1:])}
                    elif mode == "asyncify":
                        x["cpu_ms_by_process"] = {"driver": x["cpu_ms_per_call"].get("self", 0.0)}
                    res[mode].append(x)
                cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                    f"{k} {v[-1]['rate']:.0f}/s p50 {v[-1]['p50'] * 1e3:.0f} ms ({v[-1]['errors']} errors)"
                    for k, v in res.items()))
        return _rows(cfg, res, n=n, latency=latency, rounds=rounds, duration=duration, layout=layout,
                     ray_layout=ray_layout, no_ray=no_ray, n_workers=n_workers)
    finally:
        if client is not None:
            client.close()
        ws.close()


def _rows(cfg: Config, res: dict[str, list[dict[str, Any]]], *, n: int, latency: float, rounds: int,
          duration: float, layout: str, ray_layout: str, no_ray: str | None, n_workers: int) -> list[Row]:
    ideal = n / latency
    med: dict[str, dict[str, float]] = {
        k: {f: median([x[f] for x in v]) for f in ("rate", "p50", "p99", "stack_rss")} for k, v in res.items()}
    for k, v in res.items():  # CPU ms per call of the whole stack (driver + broker + workers, or + Ray)
        med[k]["cpu_ms"] = median([sum(x["cpu_ms_per_call"].values()) for x in v])
        if "kb_per_session" in v[0]:
            med[k]["kb_per_session"] = median([x["kb_per_session"] for x in v])
    by_process = {k: {p: median([x["cpu_ms_by_process"][p] for x in res[k]]) for p in res[k][0]["cpu_ms_by_process"]}
                  for k in ("dspex", "asyncify")}
    # the machine's own limit: DSPy is CPU-bound per process, so linear scaling of the in-process
    # rate over the worker processes is what dspex can reach when the ideal is out of reach
    linear = [min(ideal, y["rate"] * n_workers) for y in res["asyncify"]]
    x_linear = median([x["rate"] / lim if lim else float("nan") for x, lim in zip(res["dspex"], linear)])

    def vs(a: str, b: str) -> float:
        """Median over rounds of a's rate over b's (neighbouring blocks of the same round)."""
        return median([x["rate"] / y["rate"] if y["rate"] else float("nan") for x, y in zip(res[a], res[b])])

    errors = {k: sum(x["errors"] for x in v) for k, v in res.items()}
    ratios = {f"dspex_vs_{k}": vs("dspex", k) for k in res if k != "dspex"}
    data = {"latency_s": latency, "concurrency": n, "layout": layout, "ideal": ideal, "rounds": rounds,
            "duration_s": duration, "medians": med, "dspex_vs_asyncify": ratios["dspex_vs_asyncify"], "ratios": ratios,
            "x_ideal": {k: m["rate"] / ideal for k, m in med.items()}, "errors": errors,
            "worker_processes": n_workers, "linear_limit": median(linear), "x_linear": x_linear,
            "cpu_ms_by_process": by_process, "raw": res}
    if no_ray is None:
        data["ray_layout"] = ray_layout

    def ours(k: str) -> str:
        m = med[k]
        split = by_process.get(k)
        cpu = (" (" + ", ".join(f"{p} {v:.2f}" for p, v in split.items()) + ")") if split and len(split) > 1 else ""
        mem = f", {m['kb_per_session']:.0f} KB per session" if "kb_per_session" in m else ""
        return (f"{m['rate']:.0f} calls/s, p50 {m['p50'] * 1e3:.0f} ms, p99 {m['p99'] * 1e3:.0f} ms, "
                f"RSS {m['stack_rss'] / 2**20:.0f} MB{mem}, CPU {m['cpu_ms']:.2f} ms/call{cpu}")

    vs_all = ", ".join(f"{v:.2f}× {k[9:]}" for k, v in ratios.items())
    ok = x_linear >= 0.9 and errors["dspex"] == 0
    rows = [
        Row("serving.dspex", f"LM-bound serving: ChainOfThought, dspy.LM HTTP ({latency * 1e3:.0f} ms), {n} sessions, "
            f"dspex {layout}", ours("dspex"), f"min(ideal {ideal:.0f}/s, asyncify × {n_workers} processes) = "
            f"{median(linear):.0f}/s; asyncify {med['asyncify']['rate']:.0f}/s"
            + (f"; Ray {med['ray']['rate']:.0f}/s" if "ray" in med else ""),
            f"{x_linear:.2f}× that limit, {med['dspex']['rate'] / ideal:.2f}× ideal, {vs_all}",
            "≥ 0.9× min(ideal, asyncify × processes)", "" if cfg.smoke else verdict(ok), data=data),
        Row("serving.asyncify", f"same, in-process dspy.asyncify under asyncio (async_max_workers={n})",
            ours("asyncify"), f"ideal {ideal:.0f}/s", f"{med['asyncify']['rate'] / ideal:.2f}× ideal", "(info)"),
    ]
    labels = {"ray": f"same, Ray: {ray_layout}, async actors awaiting program.acall, {n} callers",
              "ray_threads": f"same, Ray: {ray_layout}, threaded actors running the sync program, {n} callers"}
    for k, label in labels.items():
        if no_ray is not None:
            rows.append(Row.skipped(f"serving.{k}", label, "(info)", no_ray))
        else:
            rows.append(Row(f"serving.{k}", label, ours(k), f"ideal {ideal:.0f}/s; dspex {med['dspex']['rate']:.0f}/s",
                            f"{med[k]['rate'] / ideal:.2f}× ideal; dspex {ratios[f'dspex_vs_{k}']:.2f}× this", "(info)",
                            data={"errors": errors[k]}))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        sys.exit(drive(sys.argv[2:]))
    print("usage: python -m bench.serving drive --mode dspex|asyncify|ray ...", file=sys.stderr)
    sys.exit(2)
