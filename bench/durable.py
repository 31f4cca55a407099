"""Group ``durable``: what a durable session costs per call, how long a move takes, how big it is.

``durable.call``: ``dspy.ChainOfThought("question -> answer")`` with 4 demos answered by a
``DummyLM``, called through a durable session and through a plain one on the same capacity-1
worker (with DSPy), in alternating blocks; each session has made 200 calls first, so its LM
history is at the worker's bound and every call adds one entry and drops one (the steady state).
The ratio is the median over rounds of the two neighbouring blocks' p50 ratio. Goal ≤ 1.2×.
Beside it, the broker's and the worker's CPU per call of each session (``/proc`` schedstat, all
threads, medians over the blocks): what the durable call costs each process, which the latency
ratio of a loaded machine resolves less well.

``durable.restore``: the durable session's worker is SIGKILLed; the figure is the time from the
moment the broker has seen it go (``status``) to the session's next call answering (the broker
loads the checkpoint, pins the session to the other worker, which restores it and runs the
call), minus that worker's own p50 of the same call once it holds the session: the restore's
cost. Goal ≤ 50 ms (plus the new worker's first call). How long the broker took to see the kill
is shown beside it.

``durable.bytes``: the session's checkpoint as the broker holds it (the ``sessions`` op).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from bench.ab_drivers import ANSWERS, DURABLE_CONFIGURE, QUESTION, cpu_ns
from bench.common import (
    Row,
    Stack,
    iter_rotated,
    median,
    ms,
    pool_stack,
    quantile,
    timed,
    us,
    verdict,
    wait_for,
)

TARGET = "≤ 1.2× a plain session"
# the typical session: a ChainOfThought with 4 demos (the same as bench.ab --what durable's)
_CONFIGURE = DURABLE_CONFIGURE.format(question=QUESTION, answers=ANSWERS["cot"])


def durable(cfg: Any) -> list[Row]:
    rounds = cfg.n_rounds(15, 2)
    per_block = 20 if cfg.smoke else 150
    with pool_stack("du") as (_, st, client):
        calls: dict[str, Callable[[], Any]] = {}
        sessions = {}
        for kind in ("durable", "plain"):
            s = client.session("p", durable=kind == "durable")
            cot = s.exec(_CONFIGURE)["cot"]

            def call(cot: Any = cot) -> Any:
                out = cot(question=QUESTION)
                if out.answer != "Paris":
                    raise AssertionError(f"unexpected answer {out!r}")
                return out

            timed(call, 200)  # the LM history at the worker's bound (--lm-history 200)
            calls[kind], sessions[kind] = call, s
        lat: dict[str, list[list[float]]] = {k: [] for k in calls}
        cpu: dict[str, dict[str, list[float]]] = {k: {"broker": [], "worker": []} for k in calls}
        assert st.broker is not None
        pids = {"broker": st.broker.pid, "worker": st.worker_procs[0].pid}
        for r in range(rounds):
            for kind in iter_rotated(list(calls), r):
                before = {who: cpu_ns(pid) for who, pid in pids.items()}
                lat[kind].append(timed(calls[kind], per_block))
                for who, pid in pids.items():
                    cpu[kind][who].append((cpu_ns(pid) - before[who]) / per_block / 1e9)
            cfg.log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {quantile(v[-1], 0.5) * 1e6:.0f}µs" for k, v in lat.items()))
        p50 = {k: median([quantile(b, 0.5) for b in blocks]) for k, blocks in lat.items()}
        ratio = median([quantile(d, 0.5) / quantile(p, 0.5) for d, p in zip(lat["durable"], lat["plain"])])
        per_call = {k: {who: median(v) for who, v in by.items()} for k, by in cpu.items()}
        extra = {who: per_call["durable"][who] - per_call["plain"][who] for who in pids}
        (row,) = [r for r in client.sessions("p") if r["id"] == sessions["durable"].id]
        size = int(row["checkpoint_bytes"])
        rows = [Row("durable.call", "ChainOfThought, 4 demos, DummyLM: a durable session's call vs a plain one's",
                    f"{us(p50['durable'])} (+{us(p50['durable'] - p50['plain'])})",
                    f"plain {us(p50['plain'])}; CPU per call +{us(extra['worker'])} worker, "
                    f"+{us(extra['broker'])} broker",
                    f"{ratio:.2f}×", TARGET, "" if cfg.smoke else verdict(ratio <= 1.2),
                    data={"rounds": rounds, "calls_per_block": per_block, "ratio": ratio,
                          "p50_us": {k: v * 1e6 for k, v in p50.items()},
                          "cpu_per_call_us": {k: {who: v * 1e6 for who, v in by.items()} for k, by in per_call.items()},
                          "raw_p50_us": {k: [quantile(b, 0.5) * 1e6 for b in v] for k, v in lat.items()}})]
        rows.append(Row("durable.bytes", "that session's checkpoint (200 LM history entries)", f"{size / 1024:.1f} KB",
                        "", "", "(info)", "", data={"bytes": size}))
        rows.append(_restore(cfg, st, client, sessions["durable"], calls["durable"]))
        return rows


def _restore(cfg: Any, st: Stack, client: Any, s: Any, call: Callable[[], Any]) -> Row:
    """Kill the session's worker with a second one ready; time the next call."""
    st.start_worker("p")
    st.wait_workers("p", 2, 90, client=client)
    other = next(w for w in st.workers("p", client) if w["pid"] != int(s.eval("__import__('os').getpid()")))
    # the other worker runs the same program first (a plain session: the least-loaded worker
    # takes it), so the figure is the move, not that worker's first DSPy call
    warmup = client.session("p")
    warm_cot = warmup.exec(_CONFIGURE)["cot"]
    if int(warmup.eval("__import__('os').getpid()")) != other["pid"]:
        raise AssertionError("the warm-up session is not on the other worker")
    timed(lambda: warm_cot(question=QUESTION), 20)
    pid = int(s.eval("__import__('os').getpid()"))
    os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    # a call sent before the broker saw the worker go would be WorkerCrashed (it may have run)
    wait_for(lambda: pid not in {w["pid"] for w in st.workers("p", client)}, 10, 0.001, "the kill noticed")
    noticed = time.perf_counter() - t_kill
    t = time.perf_counter()
    call()
    moved = time.perf_counter() - t
    if int(s.eval("__import__('os').getpid()")) != other["pid"]:
        raise AssertionError("the session did not move to the other worker")
    warm = median([quantile(timed(call, 50 if not cfg.smoke else 10), 0.5) for _ in range(3)])
    cost = moved - warm
    return Row("durable.restore", "its worker killed (-9) and gone: the session's next call, minus that call warm",
               ms(cost), f"the call: {ms(moved)}; warm {us(warm)}; kill noticed in {ms(noticed)}", "",
               "≤ 50 ms (+ the first call)", "" if cfg.smoke else verdict(cost <= 0.050),
               data={"restore_ms": cost * 1e3, "first_call_ms": moved * 1e3, "warm_us": warm * 1e6,
                     "noticed_ms": noticed * 1e3})


ROWS = ["durable.call", "durable.bytes", "durable.restore"]
