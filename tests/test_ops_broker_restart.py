"""After a broker restart (a deploy, ``supervisorctl restart broker``) the workers live on and
register again: what ``pools status -v`` and the dashboard say of them must still be their own.

A worker's UPTIME was counted from its registration with the running broker, so after a restart
every worker read as started with the broker (``0:00:05`` for a process up for hours, which looks
like a restart of every worker), and ``workers recycle POOL`` without ``--worker``, "the oldest
worker", took whichever registered first. Real supervisord stack, the CLI as a subprocess.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, dashboard_status, dspexctl, no_traceback, small_stack

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 2}) as s:
        yield s


def restart_broker(stack: SupervisedStack) -> None:
    before = stack.status()["broker"]["pid"]
    stack.rpc("supervisor.stopProcess", "broker:broker")
    stack.rpc("supervisor.startProcess", "broker:broker")

    def registered() -> bool:
        try:
            st = stack.status()
        except Exception:  # noqa: BLE001 - not listening yet
            return False
        return st["broker"]["pid"] != before and len(stack.ready("triage_pool")) == 2

    wait_for(registered, 60, 0.1, "the new broker with both workers")


@pytest.mark.timeout(240)
def test_worker_uptime_and_the_oldest_worker_survive_a_broker_restart(stack: SupervisedStack) -> None:
    res = dspexctl(stack, "--json", "workers", "recycle", "triage_pool")  # one young worker, one old
    assert res.returncode == 0, res.stdout + res.stderr
    young = json.loads(res.stdout)["recycled"][0]["new_pid"]
    (old,) = [w["pid"] for w in stack.ready("triage_pool") if w["pid"] != young]
    wait_for(lambda: min(p["now"] - p["start"] for p in stack.processes() if p["group"] == "triage_pool") >= 4,
             30, 0.2, "workers up for 4 s")
    restart_broker(stack)

    def uptimes() -> dict[int, int]:  # supervisord's, in whole seconds
        return {p["pid"]: p["now"] - p["start"] for p in stack.processes() if p["group"] == "triage_pool"}

    before = uptimes()
    res = dspexctl(stack, "--json", "pools", "status", "-v")
    after = uptimes()
    no_traceback(res)
    doc = json.loads(res.stdout)
    broker_up = doc["broker"]["uptime_s"]
    workers = {w["pid"]: w for w in doc["pools"][0]["workers"]}
    for pid in before:
        # its process started a moment before its worker's code did; the broker long after both
        assert before[pid] - 2 <= workers[pid]["uptime_s"] <= after[pid] + 1, (pid, workers[pid], before, after)
        assert workers[pid]["uptime_s"] > broker_up + 2, (workers[pid]["uptime_s"], broker_up)
    page = {w["pid"]: w["uptime_s"] for w in dashboard_status(stack)["pools"]["triage_pool"]["workers"]}
    assert all(abs(page[pid] - workers[pid]["uptime_s"]) < 5 for pid in before), (page, workers)

    res = dspexctl(stack, "--json", "workers", "recycle", "triage_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["recycled"][0]["old_pid"] == old, "the oldest process, not the first to register"
