"""Groups ``lmlike``, ``crash``, ``coldstart`` and ``recycle``: workers' capacity and lifecycle.

``lmlike``: I/O-bound calls (a 200 ms sleep, like an LM request) at capacity 1 vs 8.
``crash``: SIGKILL of a pinned worker to the typed error, against heartbeat expiry. ``coldstart``:
a private copy of ``supervisor.conf`` under supervisord until every worker is ready.
``recycle``: a graceful recycle until the new incarnation is ready and serving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CLK_TCK,
    PY,
    REPO,
    Config,
    Row,
    Stack,
    Workspace,
    base_env,
    iter_rotated,
    median,
    ms,
    ratio_of,
    secs,
    starttime,
    verdict,
    wait_for,
)
from bench.shipped import ShippedStack, supervisord_bin

# ==========================================================================================
# LM-like I/O-bound calls: worker capacity
# ==========================================================================================

LM_SLEEP = 0.2  # one "LM call": the worker's thread sleeps, the GIL is free


def _lm_round(client: Any, pool: str, sessions: int, duration: float, warmup: float) -> dict[str, Any]:
    """``sessions`` threads, one session each, calling ``time.sleep(0.2)`` back to back."""
    import threading

    import dspex

    counts = [0] * sessions
    errors: list[str] = []
    state = {"counting": False, "stop": False}
    mine = [client.session(pool) for _ in range(sessions)]
    start = threading.Barrier(sessions + 1)

    def run(i: int) -> None:
        s = mine[i]
        start.wait()
        while not state["stop"]:
            try:
                s.call("time", "sleep", [LM_SLEEP], timeout=30)
                if state["counting"]:
                    counts[i] += 1
            except dspex.DspexError as err:
                errors.append(err.code)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"lm-{i}") for i in range(sessions)]
    for th in threads:
        th.start()
    start.wait()
    time.sleep(warmup)
    state["counting"] = True
    t0 = time.monotonic()
    time.sleep(duration)
    calls = sum(counts)  # calls completed inside the window
    t1 = time.monotonic()
    state["stop"] = True
    for th in threads:
        th.join(timeout=35)
    for s in mine:
        with contextlib.suppress(Exception):  # closing is best effort
            s.close()
    return {"calls": calls, "elapsed": t1 - t0, "rate": calls / (t1 - t0), "errors": len(errors),
            "error_codes": sorted(set(errors))}


def lmlike(cfg: Config) -> list[Row]:
    rounds = cfg.n_rounds(3, 1)
    duration, warmup = (1.2, 0.4) if cfg.smoke else (6.0, 1.0)
    sessions, n_workers = 32, 2
    ws = Workspace()
    clients: list[Any] = []
    try:
        stacks: dict[int, tuple[Stack, Any]] = {}
        for cap in (1, 8):
            st = Stack(ws, f"l{cap}")
            st.start_broker("p:strict_queue")
            for _ in range(n_workers):
                st.start_worker("p", "--no-dspy", "--capacity", str(cap))
            client = st.client(timeout=30)
            clients.append(client)
            stacks[cap] = (st, client)
        for st, client in stacks.values():
            st.wait_workers("p", n_workers, 30, client=client)
        res: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
        order = [1, 8]
        for r in range(rounds):
            for cap in iter_rotated(order, r):
                res[cap].append(_lm_round(stacks[cap][1], "p", sessions, duration, warmup))
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(f"capacity {k} {v[-1]['rate']:.1f}/s" for k, v in res.items()))
        rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
        ratio = median([ratio_of(b["rate"], a["rate"]) for a, b in zip(res[1], res[8])])
        ideal = {k: n_workers * min(k, sessions // n_workers) / LM_SLEEP for k in (1, 8)}
        errors = sum(x["errors"] for v in res.values() for x in v)
        data = {"rounds": rounds, "duration_s": duration, "sessions": sessions, "workers": n_workers,
                "call": f"time.sleep({LM_SLEEP})", "rates": rate, "ideal": ideal, "ratio": ratio, "errors": errors,
                "raw": res}
        return [
            Row("lmlike.cap1", f"LM-like call (sleep {LM_SLEEP * 1e3:.0f} ms), {sessions} sessions, {n_workers} workers --capacity 1",
                f"{rate[1]:.1f} calls/s", f"ideal {ideal[1]:.0f}/s (workers × capacity ÷ 0.2 s)",
                f"{ratio_of(rate[1], ideal[1]):.2f}× ideal", "(info)", data=data),
            Row("lmlike.cap8", f"same, {n_workers} workers --capacity 8 (same process count)",
                f"{rate[8]:.1f} calls/s", f"capacity 1 {rate[1]:.1f}/s; ideal {ideal[8]:.0f}/s",
                f"{ratio:.2f}× capacity 1", "≈ 8× capacity 1 (≥ 7×)",
                "" if cfg.smoke else verdict(ratio >= 7.0 and errors == 0), data={}),
        ]
    finally:
        for c in clients:
            c.close()
        ws.close()


# ==========================================================================================
# crash to typed error
# ==========================================================================================

def crash(cfg: Config) -> list[Row]:
    import dspex

    rounds = cfg.n_rounds(7, 2)
    ws = Workspace()
    client = None
    rows: list[Row] = []
    name, label, target = "crash", "SIGKILL pinned worker → SessionWorkerUnavailable", "≤ 20 ms"
    try:
        st = Stack(ws, "c", heartbeat=1.0, liveness=3)
        st.start_broker("p:strict_queue")
        client = st.client(timeout=10)
        times: list[float] = []
        polls: list[int] = []
        first_errors: list[str] = []
        for r in range(rounds):
            proc = st.start_worker("p", "--no-dspy")

            def registered(pid: int = proc.pid) -> bool:
                return any(w["pid"] == pid for w in st.workers("p", client))

            wait_for(registered, 30, 0.02, "the new worker")
            s = client.session("p")
            assert int(s.call("os", "getpid")) == proc.pid
            s.call("builtins", "len", [[]])
            n = 0
            first = ""
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            while True:
                n += 1
                try:
                    s.call("builtins", "len", [[]], timeout=5)
                except dspex.SessionWorkerUnavailable:
                    break
                except dspex.DspexError as err:  # e.g. worker_crashed if a call raced the kill
                    first = first or err.code
                    if time.perf_counter() - t0 > 10:
                        raise
            times.append(time.perf_counter() - t0)
            polls.append(n)
            first_errors.append(first)
            proc.wait(timeout=10)
        t = median(times)
        data: dict[str, Any] = {"rounds": rounds, "times_ms": [x * 1e3 for x in times], "polls": polls,
                                "other_errors_first": first_errors, "heartbeat_interval": 1.0, "liveness": 3}
        if cfg.smoke:
            base = "heartbeat expiry 3000 ms (1.0 s × 3, configured; measured in the full run)"
        else:
            frozen = _frozen_worker(st, client)
            data["frozen_worker_ms"] = frozen * 1e3
            base = f"heartbeat expiry (SIGSTOPped worker, measured) {ms(frozen)}; configured 1.0 s × 3"
        rows.append(Row(name, label, ms(t), base, f"{median(polls):.0f} calls polled", target,
                        verdict(t <= 0.020), data=data))
    finally:
        if client is not None:
            client.close()
        ws.close()
    return rows


def _frozen_worker(st: Stack, client: Any) -> float:
    """A worker that stops without closing its connection is caught only by heartbeat expiry."""
    import dspex

    proc = st.start_worker("p", "--no-dspy")
    wait_for(lambda: any(w["pid"] == proc.pid for w in st.workers("p", client)), 30, 0.02, "the new worker")
    s = client.session("p")
    s.call("os", "getpid")
    time.sleep(0.2)
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        while True:
            try:
                s.call("builtins", "len", [[]], timeout=15)
            except (dspex.WorkerCrashed, dspex.SessionWorkerUnavailable):
                return time.perf_counter() - t0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=10)


# ==========================================================================================
# cold start, recycle, flagship (need supervisord; the first and last need colleagues' files)
# ==========================================================================================

def coldstart(cfg: Config) -> list[Row]:
    name, label, target = "coldstart", "supervisord -c supervisor.conf → all 6 workers ready", "≤ 3 s"
    rounds = cfg.n_rounds(5, 1)
    dspy_times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "import dspy"], env=base_env(), check=True, capture_output=True, timeout=120)
        dspy_times.append(time.perf_counter() - t0)
    dspy_t = median(dspy_times)
    conf = REPO / "supervisor.conf"
    if not conf.exists():
        row = Row.pending(name, label, target, "no supervisor.conf at the repo root yet")
        row.baseline = f"python -c 'import dspy' {secs(dspy_t)}"
        row.data = {"import_dspy_s": dspy_times}
        return [row]
    times: list[float] = []
    try:
        for _ in range(rounds):
            times.append(_one_cold_start())
    except Exception as exc:  # noqa: BLE001 - colleagues' conf may be mid-change
        row = Row.error(name, label, target, f"{type(exc).__name__}: {exc}")
        row.baseline = f"python -c 'import dspy' {secs(dspy_t)}"
        return [row]
    t = median(times)
    return [Row(name, label, secs(t), f"python -c 'import dspy' {secs(dspy_t)}", f"{ratio_of(t, dspy_t):.1f}× import dspy",
                target, verdict(t <= 3.0), data={"times_s": times, "import_dspy_s": dspy_times})]


def _one_cold_start() -> float:
    with Workspace("dxc") as ws:
        stack = ShippedStack(ws, metrics=False)
        t0 = time.perf_counter()
        try:
            stack.start(60, interval=0.01)
            return time.perf_counter() - t0
        finally:
            stack.stop()


_RECYCLE_CONF = """\
[unix_http_server]
file={root}/supervisor.sock

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
nodaemon=true
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}
loglevel=warn

[program:broker]
command={py} -m broker --config {root}/supervisord.conf --frontend {fe} --backend {be} --pool pd:strict_queue --pool pn:strict_queue --log-level WARNING
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=10
stdout_logfile={root}/broker.log
redirect_stderr=true

[program:wd]
command={py} -m worker --pool pd --backend {be} --log-level WARNING
process_name=%(program_name)s_%(process_num)d
numprocs=2
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=20
stdout_logfile={root}/%(program_name)s_%(process_num)d.log
redirect_stderr=true

[program:wn]
command={py} -m worker --pool pn --backend {be} --no-dspy --log-level WARNING
process_name=%(program_name)s_%(process_num)d
numprocs=2
directory={repo}
environment={env}
autorestart=true
startsecs=0
priority=20
stdout_logfile={root}/%(program_name)s_%(process_num)d.log
redirect_stderr=true
"""



def recycle(cfg: Config) -> list[Row]:
    name, label, target = "recycle", "graceful recycle → new incarnation ready", "≤ 1 s"
    rounds = cfg.n_rounds(5, 1)
    try:
        supervisord = supervisord_bin()
    except FileNotFoundError as exc:
        return [Row.skipped(name, label, target, str(exc))]
    ws = Workspace("dxr")
    client = None
    try:
        fe, be = ws.ipc("f.sock"), ws.ipc("b.sock")
        env = base_env(ws.path("run"))
        env_s = ",".join(f'{k}="{env[k]}"' for k in ("DSPEX_RUN_DIR", "LITELLM_LOCAL_MODEL_COST_MAP", "PYTHONPATH",
                                                       "PYTHONUNBUFFERED"))
        conf = Path(ws.path("supervisord.conf"))
        conf.write_text(_RECYCLE_CONF.format(root=ws.root, py=PY, fe=fe, be=be, repo=REPO, env=env_s))
        sup = ws.procs.spawn([supervisord, "-n", "-c", str(conf)], "supervisord.out", env, cwd=REPO)
        import dspex

        wait_for(lambda: os.path.exists(fe[6:]), 30, 0.02, "broker of the recycle stack")
        client = dspex.connect(fe, timeout=10)
        st = Stack(ws, "unused")
        pools = ["pd", "pn"]
        for pool in pools:
            st.wait_workers(pool, 2, 60, client=client)
        ws.procs.remember_tree(sup)
        res: dict[str, list[dict[str, float]]] = {k: [] for k in pools}
        for r in range(rounds):
            for pool in iter_rotated(pools, r):
                res[pool].append(_one_recycle(client, st, pool))
                ws.procs.remember_tree(sup)
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} ready {v[-1]['ready']:.3f}s serving {v[-1]['serving']:.3f}s" for k, v in res.items()))
        t = {k: median([x["ready"] for x in v]) for k, v in res.items()}
        serving = {k: median([x["serving"] for x in v]) for k, v in res.items()}
        gone = {k: median([x["gone"] for x in v]) for k, v in res.items()}
        exited = {k: median([x["exited"] for x in v]) for k, v in res.items()}
        # when supervisord started the new process: ready time minus the new process's age at ready
        spawned = {k: median([x["ready"] - x["new_pid_age"] for x in v]) for k, v in res.items()}
        spawn = {k: median([x["ready"] - x["gone"] for x in v]) for k, v in res.items()}
        data = {"rounds": rounds, "raw": res, "ready_s": t, "old_gone_s": gone, "old_exited_s": exited,
                "new_spawned_s": spawned, "gone_to_ready_s": spawn, "serving_s": serving}
        client.close()
        client = None
        ws.procs.stop(sup, signal.SIGTERM, wait=20)

        def detail(k: str) -> str:
            return (f"old unregistered {ms(gone[k])}, exited {ms(exited[k])}, new process spawned {ms(spawned[k])}, "
                    f"first call served {secs(serving[k])}")

        return [
            Row(name, label + " (worker imports dspy)", secs(t["pd"]), detail("pd"), "", target,
                verdict(t["pd"] <= 1.0), data=data),
            Row(name + ".nodspy", label + " (--no-dspy worker)", secs(t["pn"]), detail("pn"), "", "(info)", data={}),
        ]
    finally:
        if client is not None:
            client.close()
        ws.close()


def _one_recycle(client: Any, st: Stack, pool: str) -> dict[str, float]:
    before = st.workers(pool, client)
    old_ids = {w["incarnation"] for w in before}
    oldest = max(before, key=lambda w: w["uptime_s"])
    victim, vpid = oldest["incarnation"], int(oldest["pid"])
    vstart = starttime(vpid)
    t0 = time.perf_counter()
    client.recycle(pool, worker=victim)
    gone = exited = 0.0
    while True:
        ws_now = st.workers(pool, client)
        ids = {w["incarnation"] for w in ws_now}
        if not gone and victim not in ids:
            gone = time.perf_counter() - t0
        if not exited and starttime(vpid) != vstart:
            exited = time.perf_counter() - t0
        if ids - old_ids and len(ids) == len(old_ids) and victim not in ids:
            t = time.perf_counter() - t0
            new_pid = next(int(w["pid"]) for w in ws_now if w["incarnation"] not in old_ids)
            age = _age(new_pid)
            return {"ready": t, "gone": gone or t, "exited": exited or t, "new_pid_age": age, "same_pid": new_pid == vpid,
                    "serving": _first_call_on(client, pool, new_pid, t0)}
        if time.perf_counter() - t0 > 60:
            raise TimeoutError(f"no new incarnation in pool {pool} within 60 s")
        time.sleep(0.005)


def _first_call_on(client: Any, pool: str, pid: int, t0: float) -> float:
    """Seconds from ``t0`` until a call has run on worker ``pid`` (new sessions pin least-loaded first)."""
    sessions = []
    try:
        for _ in range(6):
            s = client.session(pool)
            sessions.append(s)
            if int(s.call("os", "getpid", timeout=30)) == pid:
                return time.perf_counter() - t0
        return float("nan")
    finally:
        for s in sessions:
            s.close()


def _age(pid: int) -> float:
    """Seconds since ``pid`` started (from /proc, clock ticks since boot)."""
    st = starttime(pid)
    if st is None:
        return float("nan")
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - st / CLK_TCK
