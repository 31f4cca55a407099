"""Groups ``numpy``, ``flagship`` and ``memory``: bulk data, the whole flow, footprint.

``numpy``: a float64[1M] array (8 MB) round trip through ``s.eval`` against a raw zmq echo of
the same bytes. ``flagship``: ``dspexctl flagship`` wall time on a private copy of
``supervisor.conf``. ``memory``: broker RSS with 10k open sessions, worker RSS growth over 10k
session cycles.
"""

from __future__ import annotations

import subprocess
import time

from bench.common import (
    PY,
    REPO,
    Config,
    Row,
    Workspace,
    alternate,
    base_env,
    median,
    ms,
    pool_stack,
    pooled,
    quantile,
    ratio_p50,
    rss_bytes,
    secs,
    spawn_server,
    venv_bin,
    verdict,
    wait_echo,
)
from bench.shipped import private_conf, stop_daemon

# ==========================================================================================
# numpy round trip
# ==========================================================================================

def numpy_rt(cfg: Config) -> list[Row]:
    import numpy as np
    import zmq

    rounds = cfg.n_rounds(20, 3)
    per_round = 3 if cfg.smoke else 10
    with pool_stack("a", "--no-dspy") as (ws, _, client), zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        echo_ep = ws.ipc("echo.sock")
        spawn_server(ws, "echo.log", "echo-router", "--bind", echo_ep)
        s = client.session("p")
        arr = np.random.default_rng(1).random(1_000_000)
        back = s.eval("x", {"x": arr})
        assert isinstance(back, np.ndarray) and np.array_equal(back, arr)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(echo_ep)
        wait_echo(sock, [b"x"])
        payload = arr.data

        def ours() -> None:
            s.eval("x", {"x": arr})

        def raw() -> None:
            sock.send(payload, copy=False)
            sock.recv(copy=False)

        lat = alternate({"dspex": ours, "raw": raw}, rounds, per_round, cfg)
        p50 = {k: quantile(pooled(v), 0.5) for k, v in lat.items()}
        r = ratio_p50(lat, "dspex", "raw")
        return [Row("numpy", "numpy float64[1M] (8 MB) round trip via s.eval", ms(p50["dspex"]),
                    f"raw zmq echo of the same bytes {ms(p50['raw'])}", f"{r:.2f}× raw", "≤ 3×", verdict(r <= 3.0),
                    data={"rounds": rounds, "calls_per_round": per_round, "p50_ms": {k: v * 1e3 for k, v in p50.items()},
                          "ratio": r})]


# ==========================================================================================
# flagship (needs colleagues' files: dspexctl flagship, supervisor.conf)
# ==========================================================================================

def flagship(cfg: Config) -> list[Row]:
    name, label, target = "flagship", "dspexctl flagship wall (offline, stack start included)", "≤ 15 s"
    exe = venv_bin("dspexctl")
    cmd = [exe] if exe else [PY, "-m", "dspexctl"]
    try:
        probe = subprocess.run([*cmd, "flagship", "--help"], env=base_env(), capture_output=True, timeout=60, cwd=REPO,
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Row.pending(name, label, target, f"dspexctl flagship --help did not run ({exc})")]
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).decode(errors="replace").strip().splitlines()
        return [Row.pending(name, label, target, f"`dspexctl flagship --help` exits {probe.returncode}: "
                            + (why[-1] if why else "no output"))]
    conf = REPO / "supervisor.conf"
    if not conf.exists():
        return [Row.pending(name, label, target, "no supervisor.conf at the repo root yet")]
    rounds = cfg.n_rounds(3, 1)
    times = []
    for _ in range(rounds):
        with Workspace("dxf") as ws:
            copy, env = private_conf(ws, conf)
            t0 = time.perf_counter()
            proc = ws.procs.spawn([*cmd, "--supervisor-conf", str(copy), "flagship"], "flagship.out", env,
                                  cwd=ws.root)
            try:
                rc = proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                return [Row.error(name, label, target, "dspexctl flagship ran over 240 s")]
            finally:
                elapsed = time.perf_counter() - t0
                stop_daemon(ws)
            times.append(elapsed)
            if rc != 0:
                return [Row.error(name, label, target, f"dspexctl flagship exited {rc}: "
                                  + ws.procs.log_tail("flagship.out", 400).replace("\n", " | "))]
    t = median(times)
    return [Row(name, label, secs(t), "", "", target, verdict(t <= 15.0), data={"times_s": times})]


# ==========================================================================================
# memory
# ==========================================================================================

def memory(cfg: Config) -> list[Row]:
    n_sessions = 1000 if cfg.smoke else 10_000
    n_cycles = 1000 if cfg.smoke else 10_000
    warm = 200 if cfg.smoke else 1000
    with pool_stack("m") as (_, st, client):  # a production worker: dspy preloaded
        assert st.broker is not None
        broker, wproc = st.broker, st.worker_procs[0]
        broker_idle = rss_bytes(broker.pid)

        def cycle() -> None:
            s = client.session("p")
            s.call("builtins", "object")  # a Ref: the session holds one object on the worker
            s.close()

        for _ in range(warm):
            cycle()
        time.sleep(1.5)  # let a heartbeat pass; RSS is read from /proc, not from heartbeats
        w0 = rss_bytes(wproc.pid)
        t0 = time.perf_counter()
        for _ in range(n_cycles):
            cycle()
        cycle_s = time.perf_counter() - t0
        w1 = rss_bytes(wproc.pid)
        growth = (w1 - w0) / w0
        sessions = [client.session("p") for _ in range(n_sessions)]
        for s in sessions:
            s.call("builtins", "len", [[]])
        n_open = client.status()["broker"]["sessions"]
        b1 = rss_bytes(broker.pid)
        w2 = rss_bytes(wproc.pid)
        mb = 2**20
        data = {"sessions_open": n_open, "broker_rss_idle_mb": broker_idle / mb, "broker_rss_mb": b1 / mb,
                "worker_rss_before_mb": w0 / mb, "worker_rss_after_mb": w1 / mb, "worker_growth": growth,
                "cycles": n_cycles, "cycles_per_s": n_cycles / cycle_s, "worker_rss_with_open_sessions_mb": w2 / mb}
        rows = [
            Row("memory.broker", f"broker RSS with {n_open} open sessions", f"{b1 / mb:.1f} MB",
                f"idle broker {broker_idle / mb:.1f} MB", f"+{(b1 - broker_idle) / n_open / 1024:.2f} KB/session",
                "≤ 60 MB", verdict(b1 <= 60 * mb), data=data),
            Row("memory.worker", f"worker RSS growth over {n_cycles} session open/call/close",
                f"{growth * 100:+.2f}%", f"{w0 / mb:.1f} → {w1 / mb:.1f} MB", "", "< 5%", verdict(growth < 0.05),
                data={}),
        ]
        if cfg.smoke:
            rows[0].verdict = rows[1].verdict = ""
            rows[0].target += " at 10k (smoke: 1k)"
            rows[1].target += " at 10k (smoke: 1k)"
        return rows
