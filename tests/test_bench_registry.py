"""The benchmark registry's pure logic (the performance goals' figures from a run's rows) and the
private Ray the Ray baselines start: nothing of it may outlive the bench.

How fast anything is stays out of tests (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import os
import time

import pytest

from bench.common import Row, starttime
from bench.figures import GOALS, ROWS, goals

pytestmark = pytest.mark.timeout(120)


def _rows() -> list[Row]:
    return [
        Row("noop.p50", "noop", "300 µs", data={"ratio_p50_vs_cproxy": 1.2}),
        Row("throughput", "tp", "5000/s", data={"ratio": 0.2}),
        Row("broker_cpu", "cpu", "40 µs", data={"cpu_us_per_call": {"dspex": {"hub_us": 40.0}}}),
        Row.skipped("noop.ray", "ray", "≤ 0.35× Ray", "ray is not importable"),
        Row("numpy", "numpy", "9 ms", data={"ratio": 2.5}),
        Row("serving.dspex", "serving", "600/s", data={"x_ideal": {"dspex": 0.91}, "x_linear": 0.95,
                                                       "ratios": {"dspex_vs_asyncify": 1.3}}),
        Row("idle.stack", "idle", "3%", data={"totals": {"with_supervisord": {"cpu": 0.004, "wakeups": 95.0}}}),
    ]


def by_row(results: list[dict]) -> dict[str, dict]:
    return {g["figure"]: g for g in results}


def test_goals_take_their_numbers_and_verdicts_from_the_rows() -> None:
    results = goals(_rows())
    assert [g["figure"] for g in results] == [g.figure for g in GOALS]
    got = by_row(results)
    noop = got["no-op pinned call p50 vs C zmq.proxy"]
    assert (noop["value"], noop["verdict"], noop["status"]) == (1.2, "PASS", "ok")
    assert got["pipelined calls/s, 100 sessions, 2 capacity-1 workers, vs C proxy"]["verdict"] == "FAIL"
    assert got["broker CPU per request + reply"]["value"] == 40.0
    assert got["broker CPU per request + reply"]["verdict"] == "FAIL"
    assert got["numpy float64[1M] round trip vs raw zmq"]["verdict"] == "PASS"
    assert got["LM-bound serving, dspex vs min(ideal, asyncify × worker processes)"]["verdict"] == "PASS"
    # informational figures carry their number and no verdict
    vs_ideal = got["LM-bound serving, dspex calls/s vs ideal"]
    assert (vs_ideal["value"], vs_ideal["verdict"]) == (0.91, "")
    # a share of a core is shown in percent; each of the idle stack's two goals has its own verdict
    cpu = got["idle stack (6 workers, supervisord), CPU"]
    assert (cpu["value"], cpu["unit"], cpu["verdict"]) == (0.4, "% of a core", "PASS")
    assert got["idle stack (6 workers, supervisord), wake-ups"]["verdict"] == "FAIL"


def test_goals_not_measured_have_no_verdict_and_say_why() -> None:
    got = by_row(goals(_rows()))
    assert got["vs a Ray actor call (no-op p50)"]["status"] == "skipped"
    assert got["Predict via a session vs in-process (DummyLM, median)"]["status"] == "not run"
    assert got["local model: the same requests through the stack vs plain, wall"]["status"] == "not run"
    ray_serving = got["LM-bound serving, dspex vs Ray async actors"]
    assert ray_serving["status"] == "not measured" and ray_serving["value"] is None
    for g in got.values():
        if g["value"] is None:
            assert g["verdict"] == ""
    # smoke runs check the harness, not speed: no verdicts at all
    assert all(g["verdict"] == "" for g in goals(_rows(), smoke=True))


def test_goal_rows_are_rows_the_bench_produces() -> None:
    produced = {name for names in ROWS.values() for name in names}
    assert not {g.row for g in GOALS} - produced


def test_private_ray_leaves_no_process_behind() -> None:
    ray = pytest.importorskip("ray")
    from bench.rayhead import local_ray

    with local_ray() as head:
        @ray.remote
        class Echo:
            def pid(self) -> int:
                return os.getpid()

        actor = Echo.remote()
        actor_pid = ray.get(actor.pid.remote(), timeout=60)
        pids = head.pids()
        assert actor_pid in pids  # the actor's worker descends from the raylet we started
        assert len(pids) >= 3  # GCS, raylet, workers at least
        seen = set(head.seen)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [p for p, st in seen if starttime(p) == st]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"Ray processes left behind: {alive}"
