"""Group ``scale``: how far one broker carries (the work grows until something saturates).

``scale.grid``: one broker with W protocol-echo workers (``bench.servers fake-worker``: the wire
protocol alone, so the broker is what is measured) for W in 1, 8, 32, 64, each stack driven by
the pipelined load generator with S sessions (one call each in flight, ``strict_queue``) for S in
100, 1000, 10000. Every (W, S) point is a short block; the points alternate round by round (the
order rotating) and every figure is a median over rounds: calls/s, p50/p99, the broker's RSS at
the end of the block, its CPU per call (all threads, and its main thread alone) and how busy its
main thread was (CPU seconds per second: 1.0 is one core, the most its one Python thread can
use). Every block starts a fresh broker (its workers re-register), so every point starts from an
empty broker and its RSS is that point's.

``scale.idle``: 100,000 idle sessions. Two identical stacks (a broker, 2 protocol-echo workers);
one is filled with 100k sessions (one call each, then idle), then both take the same 100-session
load in alternating blocks: the broker's CPU per call and RSS with 100k idle sessions vs none.

``python -m bench.plot RESULT.json OUT.png`` draws the grid's curve from the JSON.
"""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

from bench.common import (
    PY,
    REPO,
    Config,
    Row,
    Stack,
    Workspace,
    base_env,
    iter_rotated,
    median,
    rss_bytes,
    spawn_server,
    verdict,
)
from bench.hop import loadgen

WORKERS = (1, 8, 32, 64)
SESSIONS = (100, 1000, 10_000)
IDLE_SESSIONS = 100_000
# deep queues and a long queue timeout: 10k sessions on one capacity-1 worker all wait in the broker
POOL = "p:strict_queue:queue_max=1000000,queue_timeout=600"
SATURATED = 0.85  # the broker's main thread busy this share of one core: it is the bottleneck


def _stack(ws: Workspace, name: str, n_workers: int, extra: list[str] | None = None) -> tuple[Stack, list[int]]:
    st = Stack(ws, name)
    broker = st.start_broker(POOL, extra=extra)
    fakes = [spawn_server(ws, f"{name}-fake.log", "fake-worker", "--backend", st.backend, "--pool", "p")
             for _ in range(n_workers)]
    return st, [broker.pid, *(f.pid for f in fakes)]


def _restart_broker(st: Stack, n_workers: int) -> int:
    """A fresh broker with the same pools; once every worker is registered again, its pid."""
    assert st.broker is not None
    st.procs_reg.stop(st.broker, signal.SIGTERM, wait=30)
    broker = st.start_broker()
    st.wait_workers("p", n_workers, 60)
    return broker.pid


def _load(ws: Workspace, endpoint: str, sessions: int, duration: float, warmup: float,
          pids: list[int]) -> dict[str, Any]:
    return loadgen(ws, "loadgen", endpoint, duration, warmup, pids,
                   ["--sessions", str(sessions), "--sockets", str(min(64, max(4, sessions // 100))), "--timeout", "600"])


def _point(xs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over rounds of one (W, S) point's blocks."""
    def med(f: Any) -> float:
        return median([f(x) for x in xs if x["calls"]])

    return {
        "rate": med(lambda x: x["rate"]),
        "p50_ms": med(lambda x: x["p50"] * 1e3),
        "p99_ms": med(lambda x: x["p99"] * 1e3),
        "broker_rss_mb": med(lambda x: x["hub_rss"] / 2**20),
        "broker_us_per_call": med(lambda x: x["cpu"][str(x["broker"])] / x["calls"] * 1e6),
        "broker_main_us_per_call": med(lambda x: (x["cpu"]["hub_main_user"] + x["cpu"]["hub_main_sys"]) / x["calls"] * 1e6),
        "broker_main_busy": med(lambda x: (x["cpu"]["hub_main_user"] + x["cpu"]["hub_main_sys"]) / x["elapsed"]),
        "broker_busy": med(lambda x: x["cpu"][str(x["broker"])] / x["elapsed"]),
        "loadgen_busy": med(lambda x: x["loadgen_cpu"] / x["elapsed"]),
        "errors": sum(x["errors"] for x in xs),
    }


def grid(cfg: Config) -> Row:
    workers, sessions = ((2,), (20, 200)) if cfg.smoke else (WORKERS, SESSIONS)
    duration, warmup = (0.4, 0.2) if cfg.smoke else (3.0, 0.5)
    rounds = cfg.n_rounds(3, 1)
    ws = Workspace()
    try:
        stacks = {w: _stack(ws, f"g{w}", w) for w in workers}
        for w, (st, _) in stacks.items():
            st.wait_workers("p", w, 120)
        points = [(w, s) for w in workers for s in sessions]
        raw: dict[str, list[dict[str, Any]]] = {f"{w}x{s}": [] for w, s in points}
        for r in range(rounds):
            for w, s in iter_rotated(points, r):
                st, pids = stacks[w]
                pids[0] = _restart_broker(st, w)
                raw[f"{w}x{s}"].append({**_load(ws, st.frontend, s, duration, warmup, pids), "broker": pids[0]})
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in raw.items()))
        table = [{"workers": w, "sessions": s, **_point(raw[f"{w}x{s}"])} for w, s in points]
    finally:
        ws.close()
    best = max(table, key=lambda p: p["rate"])
    saturated = [p for p in table if p["broker_main_busy"] >= SATURATED]
    first_sat = min(saturated, key=lambda p: (p["workers"], p["sessions"])) if saturated else None
    # what one broker carries with one core to itself: 1 s ÷ its CPU per call (all its threads),
    # the median over the points (its main thread alone would allow more, on a second core)
    carries = 1e6 / median([p["broker_us_per_call"] for p in table])
    carries_main = 1e6 / median([p["broker_main_us_per_call"] for p in table])
    data = {"points": table, "rounds": rounds, "duration_s": duration, "pool": POOL, "saturated_at": SATURATED,
            "best": best, "first_saturated": first_sat, "carries_calls_per_s": carries,
            "carries_main_thread_calls_per_s": carries_main, "raw": raw}
    sat = (f"broker saturated from {first_sat['workers']} workers × {first_sat['sessions']} sessions"
           if first_sat else f"broker main thread never ≥ {SATURATED:.0%} busy (peak "
           f"{max(p['broker_main_busy'] for p in table):.0%}): the machine saturates first")
    return Row("scale.grid", f"one broker, {'/'.join(map(str, workers))} protocol-echo workers × "
               f"{'/'.join(map(str, sessions))} sessions (pipelined)",
               f"peak {best['rate']:.0f} calls/s at {best['workers']}×{best['sessions']} (p50 {best['p50_ms']:.1f} ms, "
               f"p99 {best['p99_ms']:.1f} ms, broker {best['broker_us_per_call']:.0f} µs/call, "
               f"RSS {best['broker_rss_mb']:.0f} MB)",
               f"{sat}; {len(table)} points in the JSON",
               f"carries ≈ {carries:.0f} calls/s on one core ({carries_main:.0f} with a core for its main thread)",
               "(info: the curve)", "", data=data)


def idle(cfg: Config) -> Row:
    n_idle = 1000 if cfg.smoke else IDLE_SESSIONS
    duration, warmup = (0.4, 0.2) if cfg.smoke else (3.0, 0.5)
    rounds = cfg.n_rounds(7, 1)
    ws = Workspace()
    try:
        extra = ["--max-sessions", str(n_idle + 10_000)]
        systems = {"idle": _stack(ws, "i", 2, extra), "empty": _stack(ws, "e", 2, extra)}
        for st, _ in systems.values():
            st.wait_workers("p", 2, 60)
        rss_before = {k: rss_bytes(pids[0]) for k, (_, pids) in systems.items()}
        st_idle = systems["idle"][0]
        proc = subprocess.run([PY, "-m", "bench.servers", "open-sessions", "--endpoint", st_idle.frontend, "--pool", "p",
                               "--sessions", str(n_idle), "--timeout", "120"], env=base_env(), cwd=REPO,
                              capture_output=True, timeout=900, start_new_session=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"open-sessions failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        opened = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        cfg.log(f"  opened {opened['opened']} sessions in {opened['seconds']:.1f}s ({opened['errors']} errors)")
        rss_filled = rss_bytes(systems["idle"][1][0])
        res: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
        for r in range(rounds):
            for k in iter_rotated(list(systems), r):
                st, pids = systems[k]
                res[k].append(_load(ws, st.frontend, 100, duration, warmup, pids))
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]['rate']:.0f}/s {v[-1]['cpu'][str(systems[k][1][0])] / max(1, v[-1]['calls']) * 1e6:.0f} µs"
                for k, v in res.items()))
        rss_after = {k: rss_bytes(pids[0]) for k, (_, pids) in systems.items()}
    finally:
        ws.close()

    def per_call(k: str, x: dict[str, Any]) -> float:
        return x["cpu"][str(systems[k][1][0])] / x["calls"] if x["calls"] else float("nan")

    cpu_ratio = median([per_call("idle", a) / per_call("empty", b) for a, b in zip(res["idle"], res["empty"])])
    cpu_us = {k: median([per_call(k, x) for x in v]) * 1e6 for k, v in res.items()}
    rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
    rss_ratio = rss_after["idle"] / rss_after["empty"]
    drift = rss_after["idle"] / rss_filled - 1
    mb = 2**20
    data = {"idle_sessions": opened["opened"], "open_errors": opened["errors"], "open_seconds": opened["seconds"],
            "rounds": rounds, "cpu_us_per_call": cpu_us, "cpu_ratio": cpu_ratio, "rate": rate,
            "rss_mb": {"before": {k: v / mb for k, v in rss_before.items()}, "filled": rss_filled / mb,
                       "after": {k: v / mb for k, v in rss_after.items()}},
            "rss_ratio": rss_ratio, "rss_drift_while_idle": drift,
            "kb_per_session": (rss_filled - rss_before["idle"]) / max(1, opened["opened"]) / 1024,
            "raw": res}
    ok = cpu_ratio <= 1.10 and rss_ratio <= 1.10
    return Row("scale.idle", f"broker with {opened['opened']} idle sessions vs an empty broker, 100-session load",
               f"CPU/call {cpu_us['idle']:.0f} µs, RSS {rss_after['idle'] / mb:.0f} MB "
               f"(+{data['kb_per_session']:.2f} KB/session; {drift * 100:+.1f}% over the blocks)",
               f"empty broker {cpu_us['empty']:.0f} µs, RSS {rss_after['empty'] / mb:.0f} MB",
               f"CPU/call {cpu_ratio:.2f}×, RSS {rss_ratio:.2f}×", "both ≤ 1.10×",
               "" if cfg.smoke else verdict(ok), data=data)


def scale(cfg: Config) -> list[Row]:
    return [grid(cfg), idle(cfg)]
