"""Group ``idle``: what a stack that waits costs the rest of the machine.

``idle.stack``: the shipped ``supervisor.conf`` (3 pools × 2 workers, the broker with its metrics
port on) on a private copy under supervisord, left alone once every worker is ready and the
stack's CPU over a second fell under 10% of a core (start-up over). Over each window, per process:
CPU (the run time of all its threads, ``/proc/PID/task/*/schedstat``, in ns)
and wake-ups (voluntary + involuntary context switches of every thread,
``/proc/PID/task/*/status``) per second, the involuntary ones (a thread preempted, most often by
another thread of the stack that a heartbeat woke on the same core) also apart; in all for dspex
(broker + workers) and with supervisord, and by thread name (the broker's routing thread ``main``
and zmq I/O thread, the workers' summed over the six, supervisord's own loop).

``idle.worker``: the idle workers of that stack alone (the median worker), per thread: a worker
sleeps until its next real deadline (its heartbeat, a call's time limit), so its wake-ups are
bounded by its heartbeats.

``idle.busy``: one worker of the same stack running a long call (``time.sleep``): its wake-ups
and CPU per second in the middle of the call against the same worker idle just before, and the
whole stack's.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from bench.common import Config, Row, Workspace, median, verdict
from bench.shipped import ShippedStack

CPU_GOAL = 0.005  # of one core, the whole idle stack
WAKEUPS_GOAL = 30.0  # per second, the whole idle stack
# per second, one idle worker: per heartbeat interval (1 s) it reads the broker's heartbeat and
# sends its own in one wake-up, and zmq's I/O thread carries each; 5 leaves the broker its share
# of the stack's goal
WORKER_WAKEUPS_GOAL = 5.0


# -- /proc counters ------------------------------------------------------------------------------

def counters(pid: int) -> dict[str, Any]:
    """CPU seconds (the run time of its threads, in ns: ``/proc/PID/task/*/schedstat``; utime +
    stime come in 10 ms ticks, so a 20 s window read an idle worker's ~0.035% as 0 or 0.05%),
    context switches per thread (``comm:tid`` -> count) and the involuntary ones among them."""
    cpu = 0.0
    threads: dict[str, int] = {}
    preempted: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ran = int(f.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            switches = {}
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        name, n = line.split()
                        switches[name] = int(n)
        except OSError:  # the thread ended meanwhile
            continue
        cpu += ran
        key = f"{'main' if int(tid) == pid else comm}:{tid}"
        threads[key] = sum(switches.values())
        preempted[key] = switches.get("nonvoluntary_ctxt_switches:", 0)
    return {"cpu": cpu, "threads": threads, "preempted": preempted}


def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """CPU share of one core, wake-ups and the preemptions among them per second between two
    :func:`counters` readings (threads present in both; a thread that started meanwhile counts
    from 0)."""
    per_thread = {k: (v - before["threads"].get(k, 0)) / seconds for k, v in after["threads"].items()}
    preempted = {k: (v - before["preempted"].get(k, 0)) / seconds for k, v in after["preempted"].items()}
    return {"cpu": (after["cpu"] - before["cpu"]) / seconds, "wakeups": sum(per_thread.values()),
            "preempted": sum(preempted.values()), "threads": {k: round(v, 2) for k, v in per_thread.items() if v},
            "threads_preempted": {k: round(v, 2) for k, v in preempted.items() if v}}


def by_thread(m: dict[str, dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """One window's wake-ups and preemptions per second by thread name: the broker's, supervisord's,
    and the workers' summed over the workers (``workers main``, ``workers ZMQbg/IO/0``...)."""
    out: dict[str, tuple[float, float]] = {}
    for proc, r in m.items():
        role = proc if proc in ("broker", "supervisord") else "workers"
        for key, n in r["threads"].items():
            name = f"{role} {key.split(':')[0]}"
            woke, preempted = out.get(name, (0.0, 0.0))
            out[name] = (woke + n, preempted + r["threads_preempted"].get(key, 0.0))
    return out


def measure(pids: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    before = {k: counters(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)  # the measured window: nothing of ours runs in it
    elapsed = time.monotonic() - t0
    return {k: rates(before[k], counters(p), elapsed) for k, p in pids.items()}


def settle(pids: dict[str, int], limit: float, quiet: float = 0.10) -> float:
    """Wait until the processes' start-up is over (their CPU in one second under ``quiet`` of a
    core) or ``limit`` seconds passed; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if sum(x["cpu"] for x in measure(pids, 1.0).values()) < quiet:
            break
    return time.monotonic() - t0


def _totals(m: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    dspex = [v for k, v in m.items() if k != "supervisord"]
    return {name: {f: sum(v[f] for v in procs) for f in ("cpu", "wakeups", "preempted")}
            for name, procs in (("dspex", dspex), ("with_supervisord", list(m.values())))}


def _fmt(x: dict[str, float]) -> str:
    return f"{x['cpu'] * 100:.2f}% of a core, {x['wakeups']:.0f} wake-ups/s"


def idle(cfg: Config) -> list[Row]:
    settle_limit, window = (1.0, 1.0) if cfg.smoke else (60.0, 20.0)
    sleep_s, busy_window = (3.0, 1.0) if cfg.smoke else (10.0, 6.0)
    rounds = cfg.n_rounds(3, 1)
    ws = Workspace("dxi")
    stack = ShippedStack(ws)
    client = None
    try:
        pids = stack.start()
        settled = settle(pids, settle_limit)
        idle_rounds = [measure(pids, window) for _ in range(rounds)]
        import dspex

        client = dspex.connect(stack.endpoint, timeout=30)
        pool = next(k for k in pids if k not in ("supervisord", "broker")).rsplit("_", 1)[0]
        busy_rounds = []
        for _ in range(rounds):
            s = client.session(pool)
            wpid = int(s.call("os", "getpid"))
            who = next(k for k, v in pids.items() if v == wpid)
            quiet = measure(pids, busy_window)
            call = threading.Thread(target=s.call, args=("time", "sleep", [sleep_s]), kwargs={"timeout": sleep_s + 30},
                                    daemon=True)
            call.start()
            time.sleep((sleep_s - busy_window) / 2)  # into the middle of the call
            during = measure(pids, busy_window)
            call.join(sleep_s + 30)
            s.close()
            busy_rounds.append({"worker": who, "idle": quiet[who], "busy": during[who], "stack_busy": _totals(during),
                                "broker_busy": during["broker"]})
    finally:
        if client is not None:
            client.close()
        stack.stop()
        ws.close()

    per_proc = {k: {f: median([r[k][f] for r in idle_rounds]) for f in ("cpu", "wakeups")} for k in pids}
    totals = {k: {f: median([_totals(r)[k][f] for r in idle_rounds]) for f in ("cpu", "wakeups", "preempted")}
              for k in ("dspex", "with_supervisord")}
    threads = {k: idle_rounds[-1][k]["threads"] for k in pids}
    windows = [by_thread(r) for r in idle_rounds]
    names = sorted({name for w in windows for name in w})
    thread_rates = {name: [median([w.get(name, (0.0, 0.0))[i] for w in windows]) for i in (0, 1)] for name in names}
    ok = totals["with_supervisord"]["cpu"] <= CPU_GOAL and totals["with_supervisord"]["wakeups"] <= WAKEUPS_GOAL
    workers = [k for k in pids if k not in ("supervisord", "broker")]
    w_cpu = median([per_proc[k]["cpu"] for k in workers])
    w_wake = median([per_proc[k]["wakeups"] for k in workers])
    rows = [Row("idle.stack", f"idle stack: shipped supervisor.conf ({len(workers)} workers), {window:.0f} s windows",
                f"{_fmt(totals['with_supervisord'])} (dspex alone: {_fmt(totals['dspex'])})",
                f"broker {_fmt(per_proc['broker'])}; a worker {_fmt({'cpu': w_cpu, 'wakeups': w_wake})}; "
                f"supervisord {_fmt(per_proc['supervisord'])}; of all the wake-ups, "
                f"{totals['with_supervisord']['preempted']:.1f}/s were preemptions; by thread (wake-ups/s, of them "
                "preempted): " + ", ".join(f"{name} {woke:.1f} ({preempted:.1f})"
                                           for name, (woke, preempted) in thread_rates.items()), "",
                f"≤ {CPU_GOAL * 100:.1f}% of a core, ≤ {WAKEUPS_GOAL:.0f} wake-ups/s", "" if cfg.smoke else verdict(ok),
                data={"window_s": window, "rounds": rounds, "settled_s": settled, "per_process": per_proc, "totals": totals,
                      "by_thread": thread_rates, "threads_last_round": threads, "raw": idle_rounds})]
    median_worker = sorted(workers, key=lambda k: per_proc[k]["wakeups"])[len(workers) // 2]
    rows.append(Row("idle.worker", f"an idle worker of that stack (median of {len(workers)}), {window:.0f} s windows",
                    _fmt({"cpu": w_cpu, "wakeups": w_wake}),
                    "its threads (last round): " + ", ".join(
                        f"{k.split(':')[0]} {v:g}/s" for k, v in threads[median_worker].items()), "",
                    f"≤ {WORKER_WAKEUPS_GOAL:.0f} wake-ups/s", "" if cfg.smoke else verdict(w_wake <= WORKER_WAKEUPS_GOAL),
                    data={"cpu": w_cpu, "wakeups": w_wake, "worker": median_worker,
                          "threads_last_round": threads[median_worker]}))
    busy: list[dict[str, Any]] = busy_rounds
    b = {f: median([r["busy"][f] for r in busy]) for f in ("cpu", "wakeups")}
    q = {f: median([r["idle"][f] for r in busy]) for f in ("cpu", "wakeups")}
    st_busy = {f: median([r["stack_busy"]["with_supervisord"][f] for r in busy]) for f in ("cpu", "wakeups")}
    rows.append(Row("idle.busy", f"a worker running time.sleep({sleep_s:g}), {busy_window:.0f} s in the middle of the call",
                    f"worker {_fmt(b)}", f"same worker idle just before: {_fmt(q)}; whole stack during the call: "
                    f"{_fmt(st_busy)}", f"{b['wakeups'] / q['wakeups'] if q['wakeups'] else float('inf'):.0f}× "
                    "idle wake-ups", "(info)", "",
                    data={"busy": b, "idle": q, "stack_busy": st_busy, "threads_busy_last_round":
                          busy[-1]["busy"]["threads"], "raw": busy}))
    return rows
