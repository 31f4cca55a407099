"""The registry of the benchmark table: every group of figures and the rows it produces.

Each group lives in its own module, starts what it needs and cleans it up; every comparison is
measured in the same run with the systems alternating (the order rotates each round), and every
figure is a median over rounds (:mod:`bench.common`).
"""

from __future__ import annotations

from typing import Callable

from bench.bulk import flagship, memory, numpy_rt
from bench.common import Config, Row
from bench.hop import noop, throughput
from bench.lifecycle import coldstart, crash, lmlike, recycle
from bench.serving import serving

__all__ = ["Config", "GROUPS", "ROWS"]

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
    "serving": ["serving.dspex", "serving.asyncify", "serving.ray"],
}
