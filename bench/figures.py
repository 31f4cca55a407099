"""The registry of the benchmark table: every group of figures and the rows it produces.

Each group lives in its own module, starts what it needs and cleans it up; every comparison is
measured in the same run with the systems alternating (the order rotates each round), and every
figure is a median over rounds (:mod:`bench.common`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.bulk import flagship, memory, numpy_rt
from bench.common import BROKER_CPU_GOAL_US, NOOP_GOAL, Config, Row
from bench.durable import ROWS as DURABLE_ROWS
from bench.durable import durable
from bench.hop import noop, throughput
from bench.idle import idle
from bench.lifecycle import coldstart, crash, lmlike, recycle
from bench.localmodel import localmodel
from bench.predict import ROWS as PREDICT_ROWS
from bench.predict import predict
from bench.scale import scale
from bench.serving import serving
from bench.sessioncode import ROWS as CODE_ROWS
from bench.sessioncode import code
from bench.stop import stop

__all__ = ["GOALS", "GROUPS", "ROWS", "Config", "goals"]

GROUPS: dict[str, Callable[[Config], list[Row]]] = {
    "noop": noop,
    "throughput": throughput,
    "lmlike": lmlike,
    "crash": crash,
    "coldstart": coldstart,
    "recycle": recycle,
    "stop": stop,
    "numpy": numpy_rt,
    "flagship": flagship,
    "memory": memory,
    "serving": serving,
    "predict": predict,
    "scale": scale,
    "idle": idle,
    "localmodel": localmodel,
    "code": code,
    "durable": durable,
}

# the rows each group produces (for --only and for the smoke test's completeness check)
ROWS: dict[str, list[str]] = {
    "noop": ["noop.p50", "noop.p99", "noop.mp", "noop.client_broker", "noop.broker_raw", "noop.ray"],
    "throughput": ["throughput", "throughput.prefetch_off", "throughput.cap4", "throughput.broker_only", "throughput.broker_only_cap4",
                   "throughput.client", "broker_cpu", "worker_cpu"],
    "lmlike": ["lmlike.cap1", "lmlike.cap8"],
    "crash": ["crash"],
    "coldstart": ["coldstart"],
    "recycle": ["recycle", "recycle.nodspy"],
    "stop": ["stop"],
    "numpy": ["numpy"],
    "flagship": ["flagship"],
    "memory": ["memory.broker", "memory.worker"],
    "serving": ["serving.dspex", "serving.asyncify", "serving.ray", "serving.ray_threads"],
    "predict": PREDICT_ROWS,
    "scale": ["scale.grid", "scale.idle"],
    "idle": ["idle.stack", "idle.worker", "idle.busy"],
    "localmodel": ["localmodel"],
    "code": CODE_ROWS,
    "durable": DURABLE_ROWS,
}


@dataclass(frozen=True)
class Goal:
    """One figure of the performance issue's table: the row that measures it and where its number is."""

    figure: str  # the wording
    row: str
    key: tuple[str, ...]  # path of the number in the row's ``data``
    unit: str  # "×", "µs", "/s", "% of a core"
    goal: str
    ok: Callable[[float], bool] | None  # None: informational
    scale: float = 1.0  # the number in the row's data times this is the figure in ``unit``

    def value(self, rows: dict[str, Row]) -> float | None:
        row = rows.get(self.row)
        if row is None or row.status != "ok":
            return None
        v: Any = row.data
        for k in self.key:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return float(v) * self.scale if isinstance(v, (int, float)) else None


# the performance goals table of docs/benchmarks.md, in its order
GOALS: tuple[Goal, ...] = (
    Goal("no-op pinned call p50 vs C zmq.proxy", "noop.p50", ("ratio_p50_vs_cproxy",), "×",
         f"≤ {NOOP_GOAL}× (stretch 1.25×)", lambda v: v <= NOOP_GOAL),
    Goal("pipelined calls/s, 100 sessions, 2 capacity-1 workers, vs C proxy", "throughput", ("ratio",), "×", "≥ 0.35×",
         lambda v: v >= 0.35),
    Goal("broker CPU per request + reply", "broker_cpu", ("cpu_us_per_call", "dspex", "hub_us"), "µs",
         f"≤ {BROKER_CPU_GOAL_US} µs", lambda v: v <= BROKER_CPU_GOAL_US),
    Goal("Predict via a session vs in-process (DummyLM, median)", "predict.predict", ("ratio",), "×", "≤ 1.5×",
         lambda v: v <= 1.5),
    Goal("Predict via s.run vs in-process (DummyLM, median)", "predict.run", ("ratio",), "×", "≤ 1.5×",
         lambda v: v <= 1.5),
    Goal("durable session vs plain, ChainOfThought call (DummyLM, median)", "durable.call", ("ratio",), "×",
         "≤ 1.2×", lambda v: v <= 1.2),
    Goal("durable session: kill -9 of its worker to its next call, minus the call", "durable.restore",
         ("restore_ms",), "ms", "≤ 50 ms", lambda v: v <= 50.0),
    Goal("vs a Ray actor call (no-op p50)", "noop.ray", ("ratio",), "×", "≤ 0.35×", lambda v: v <= 0.35),
    Goal("numpy float64[1M] round trip vs raw zmq", "numpy", ("ratio",), "×", "≤ 3×", lambda v: v <= 3.0),
    Goal("LM-bound serving, dspex vs min(ideal, asyncify × worker processes)", "serving.dspex", ("x_linear",), "×",
         "≥ 0.9×", lambda v: v >= 0.9),
    Goal("LM-bound serving, dspex calls/s vs ideal", "serving.dspex", ("x_ideal", "dspex"), "×", "(info)", None),
    Goal("LM-bound serving, dspex vs in-process dspy.asyncify", "serving.dspex", ("ratios", "dspex_vs_asyncify"), "×",
         "(info)", None),
    Goal("LM-bound serving, dspex vs Ray async actors", "serving.dspex", ("ratios", "dspex_vs_ray"), "×", "(info)", None),
    Goal("one broker carries (1 s ÷ its CPU per call, all threads, median of the points)", "scale.grid",
         ("carries_calls_per_s",), "/s", "(info)", None),
    Goal("100,000 idle sessions: broker CPU per call vs an empty broker", "scale.idle", ("cpu_ratio",), "×", "≤ 1.10×",
         lambda v: v <= 1.10),
    Goal("100,000 idle sessions: broker RSS vs an empty broker", "scale.idle", ("rss_ratio",), "×", "≤ 1.10×",
         lambda v: v <= 1.10),
    Goal("idle stack (6 workers, supervisord), CPU", "idle.stack", ("totals", "with_supervisord", "cpu"),
         "% of a core", "≤ 0.5%", lambda v: v <= 0.5, scale=100.0),
    Goal("idle stack (6 workers, supervisord), wake-ups", "idle.stack", ("totals", "with_supervisord", "wakeups"), "/s",
         "≤ 30/s", lambda v: v <= 30),
    Goal("local model: the same requests through the stack vs plain, wall", "localmodel",
         ("ratios", "dspex_vs_plain_wall"), "×", "≤ 1.02×", lambda v: v <= 1.02),
)


def goals(rows: list[Row], smoke: bool = False) -> list[dict[str, Any]]:
    """The goals' figures from this run's rows: value, goal, verdict (none in smoke mode or when
    the row did not run: the ``--only`` selection, a skipped baseline)."""
    by_name = {r.name: r for r in rows}
    out = []
    for g in GOALS:
        v = g.value(by_name)
        row = by_name.get(g.row)
        if row is None:
            status = "not run"
        elif v is None:  # a skipped row, or a number its baseline did not give (Ray not measured)
            status = row.status if row.status != "ok" else "not measured"
        else:
            status = "ok"
        verdict_ = "" if v is None or g.ok is None or smoke else ("PASS" if g.ok(v) else "FAIL")
        out.append({"figure": g.figure, "row": g.row, "value": v, "unit": g.unit, "goal": g.goal,
                    "verdict": verdict_, "status": status})
    return out
