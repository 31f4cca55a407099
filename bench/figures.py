"""The registry of the benchmark table: every group of figures and the rows it produces.

Each group lives in its own module, starts what it needs and cleans it up; every comparison is
measured in the same run with the systems alternating (the order rotates each round), and every
figure is a median over rounds (:mod:`bench.common`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bench.bulk import flagship, memory, numpy_rt
from bench.common import Config, Row
from bench.hop import noop, throughput
from bench.lifecycle import coldstart, crash, lmlike, recycle
from bench.predict import ROWS as PREDICT_ROWS
from bench.predict import predict
from bench.serving import serving
from bench.sessioncode import ROWS as CODE_ROWS
from bench.sessioncode import code


__all__ = ["Config", "GROUPS", "ISSUE14", "ROWS", "issue14"]

GROUPS: dict[str, Callable[[Config], list[Row]]] = {
    "noop": noop,
    "throughput": throughput,
    "lmlike": lmlike,
    "crash": crash,
    "coldstart": coldstart,
    "recycle": recycle,
    "numpy": numpy_rt,
    "flagship": flagship,
    "memory": memory,
    "serving": serving,
    "predict": predict,
    "code": code,
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
    "numpy": ["numpy"],
    "flagship": ["flagship"],
    "memory": ["memory.broker", "memory.worker"],
    "serving": ["serving.dspex", "serving.asyncify", "serving.ray", "serving.ray_threads"],
    "predict": PREDICT_ROWS,
    "code": CODE_ROWS,
}


@dataclass(frozen=True)
class Goal:
    """One figure of issue 14's table: the row that measures it and where its number is."""

    figure: str  # the issue's wording
    row: str
    key: tuple[str, ...]  # path of the number in the row's ``data``
    unit: str
    goal: str
    ok: Callable[[float], bool] | None  # None: informational

    def value(self, rows: dict[str, Row]) -> float | None:
        row = rows.get(self.row)
        if row is None or row.status != "ok":
            return None
        v: Any = row.data
        for k in self.key:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return float(v) if isinstance(v, (int, float)) else None


# issue 14's table, in its order (the serving figure split into its two goals and the Ray comparison)
ISSUE14: tuple[Goal, ...] = (
    Goal("no-op pinned call p50 vs C zmq.proxy", "noop.p50", ("ratio_p50_vs_cproxy",), "×", "≤ 1.25× (stretch 1.15×)",
         lambda v: v <= 1.25),
    Goal("pipelined calls/s, 100 sessions, 2 capacity-1 workers, vs C proxy", "throughput", ("ratio",), "×", "≥ 0.35×",
         lambda v: v >= 0.35),
    Goal("broker CPU per request + reply", "broker_cpu", ("cpu_us_per_call", "dspex", "hub_us"), "µs", "≤ 35 µs",
         lambda v: v <= 35),
    Goal("Predict via a session vs in-process (DummyLM, median)", "predict.predict", ("ratio",), "×", "≤ 2×",
         lambda v: v <= 2.0),
    Goal("vs a Ray actor call (no-op p50)", "noop.ray", ("ratio",), "×", "≤ 0.35×", lambda v: v <= 0.35),
    Goal("numpy float64[1M] round trip vs raw zmq", "numpy", ("ratio",), "×", "≤ 3×", lambda v: v <= 3.0),
    Goal("LM-bound serving, dspex calls/s vs ideal", "serving.dspex", ("x_ideal", "dspex"), "×", "≥ 0.9× ideal",
         lambda v: v >= 0.9),
    Goal("LM-bound serving, dspex vs in-process dspy.asyncify", "serving.dspex", ("ratios", "dspex_vs_asyncify"), "×",
         "≥ 1× (ahead)", lambda v: v >= 1.0),
    Goal("LM-bound serving, dspex vs Ray async actors", "serving.dspex", ("ratios", "dspex_vs_ray"), "×", "(info)", None),
    Goal("LM-bound serving, dspex vs Ray threaded actors", "serving.dspex", ("ratios", "dspex_vs_ray_threads"), "×",
         "(info)", None),
)


def issue14(rows: list[Row], smoke: bool = False) -> list[dict[str, Any]]:
    """Issue 14's figures from this run's rows: value, goal, verdict (none in smoke mode or when
    the row did not run: the ``--only`` selection, a skipped baseline)."""
    by_name = {r.name: r for r in rows}
    out = []
    for g in ISSUE14:
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
