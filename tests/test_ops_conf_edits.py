"""supervisor.conf edited while the stack runs, then ``supervisorctl update``, as an operator adds
or removes a pool: the broker read its pools when it started, so until it restarts it serves a
pool that is gone and turns away the workers of one that is new. ``dspexctl pools status`` says
that, with the fix, instead of calling the new pool STARTING while its workers loop through
supervisord (or FATAL with no cause) and the removed one short of workers "expected from other
hosts" (the dashboard too). Real supervisord; the CLI as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.harness import wait_for
from tests.harness.supervisord import BIN, SupervisedStack, dashboard_status, dspexctl, small_conf_text, small_stack
from tests.test_cli import no_traceback

pytestmark = pytest.mark.timeout(240)


def update(stack: SupervisedStack) -> None:
    """``supervisorctl update``: supervisord rereads the conf, adds and removes groups."""
    res = subprocess.run([str(BIN / "supervisorctl"), "-c", str(stack.conf), "update"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def pool_of(stack: SupervisedStack, name: str) -> tuple[int, dict[str, Any]]:
    res = dspexctl(stack, "pools", "status", "--json")
    no_traceback(res)
    doc = json.loads(res.stdout)
    return res.returncode, next(p for p in doc["pools"] if p["name"] == name)


def sections_of(text: str, pool: str) -> str:
    """The three sections of ``pool`` in a small_conf_text (they are the last ones, in order)."""
    return text[text.index(f"[dspex:pool:{pool}]"):]


@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_a_pool_added_or_removed_while_the_broker_runs_is_named_with_the_fix() -> None:
    with small_stack({"triage_pool": 1, "analytics_pool": 1}) as stack:
        text = stack.conf.read_text()
        analytics = sections_of(text, "analytics_pool")
        stack.conf.write_text(text.replace(analytics, "") + analytics.replace("analytics_pool", "extra_pool"))
        update(stack)
        stack.processes()  # their pids, killed at the end

        # the new pool: the broker turns its workers away, whatever supervisord does with them
        code, extra = pool_of(stack, "extra_pool")
        assert code == 5 and extra["health"] == "down", extra
        assert extra["reasons"] == [
            (f"extra_pool is in {stack.conf} but the broker does not serve it: it read its pools when it "
            f"started, so it turns the pool's workers away; restart the broker (supervisorctl -c {stack.conf} "
            "restart broker), then dspexctl pools start")], extra["reasons"]
        text_out = dspexctl(stack, "pools", "status").stdout
        assert f"DOWN: {extra['reasons'][0]}" in text_out, text_out

        # the removed pool: still served, no worker will come
        _, gone = pool_of(stack, "analytics_pool")
        assert gone["health"] == "down", gone
        assert gone["reasons"] == [
            (f"analytics_pool has no ready worker (0/1): it is not in {stack.conf} any more, but the broker "
            f"still serves it from the conf it started with; restart the broker (supervisorctl -c {stack.conf} "
            "restart broker) to drop it")], gone["reasons"]
        page = dashboard_status(stack)["pools"]["analytics_pool"]  # one function says it for both
        assert (page["state"], page["reasons"]) == ("down", gone["reasons"]), page

        # the worker turned away says why in its log
        log = stack.root / "log" / "extra_pool_00.log"
        wait_for(lambda: "turned this worker away" in (log.read_text() if log.exists() else ""), 60, 0.2,
                 "the worker's line")
        assert "the broker turned this worker away: it does not serve pool 'extra_pool' (its pools: " \
            "triage_pool, analytics_pool; " in log.read_text(), log.read_text()

        # the fix the lines name works
        res = subprocess.run([str(BIN / "supervisorctl"), "-c", str(stack.conf), "restart", "broker"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        res = dspexctl(stack, "pools", "start", "--wait", "120")
        no_traceback(res)
        stack.processes()
        assert res.returncode == 0, res.stdout + res.stderr
        res = dspexctl(stack, "pools", "status")
        assert res.returncode == 0 and "analytics_pool" not in res.stdout, res.stdout


@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_a_worker_that_restarts_in_a_loop_is_not_called_starting() -> None:
    """A worker process that exits a few seconds after each start (after supervisord's startsecs,
    so never BACKOFF or FATAL) and never registers: supervisord restarts it forever, and each new
    process looked like one still importing dspy, so the pool read STARTING ("nothing wrong yet",
    exit 7) for as long as the loop went on."""
    text = small_conf_text({"triage_pool": 1, "analytics_pool": 1}).replace(
        'command = /bin/sh "%(here)s/bin/dspex-python" -m worker --pool analytics_pool',
        'command = /bin/sh -c "sleep 2; echo cannot reach the model server; exit 3" -m worker --pool analytics_pool', 1)
    stack = SupervisedStack(text)
    try:
        stack.start_foreground()
        log = stack.root / "log" / "supervisord.log"
        wait_for(lambda: log.exists() and log.read_text().count("exited: analytics_pool_00 (exit status 3") >= 2,
                 60, 0.2, "two exits of the looping worker")
        wait_for(lambda: len(stack.ready("triage_pool")) == 1, 120, 0.2, "the other pool ready")
        code, pool = pool_of(stack, "analytics_pool")
        assert code == 5 and pool["health"] == "down", pool
        loop = [r for r in pool["reasons"] if "restarts in a loop" in r]
        assert len(loop) == 1, pool["reasons"]
        assert loop[0].startswith("analytics_pool:analytics_pool_00 restarts in a loop: supervisord restarted it "), loop
        assert "in the last 1m (last exit: exit status 3); its last log line: cannot reach the model server" in loop[0], loop
        page = dashboard_status(stack)["pools"]["analytics_pool"]  # the same words there
        assert page["state"] == "down", page
        assert [r.split(" restarted it ")[0] for r in page["reasons"]] == [r.split(" restarted it ")[0]
                                                                             for r in pool["reasons"]], page
    finally:
        stack.stop()
        stack.cleanup()
