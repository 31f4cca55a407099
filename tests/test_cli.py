"""dspexctl against a real stack it started itself (``pools start`` launches supervisord).

The stack runs an unmodified copy of the shipped supervisor.conf, here without a .venv next to it:
dspexctl passes its own interpreter to the programs through DSPEX_PYTHON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dspex
from dspex.stack.supervisor import pid_alive
from dspexctl.stack import ensure_stack, stop_stack
from tests.harness import wait_for
from tests.harness.supervisord import POOLS, READY_TIMEOUT, SupervisedStack, dspexctl, no_traceback

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def started() -> Iterator[tuple[SupervisedStack, subprocess.CompletedProcess[str]]]:
    stack = SupervisedStack(venv_link=False)
    try:
        res = dspexctl(stack, "pools", "start", "--wait", str(READY_TIMEOUT))
        try:
            stack.adopt_daemon()
        except AssertionError:
            pass
        assert res.returncode == 0, res.stdout + res.stderr + stack.logs()
        stack.wait_all_ready()
        yield stack, res
    finally:
        stack.stop()
        stack.cleanup()


@pytest.fixture
def stack(started: tuple[SupervisedStack, Any]) -> Iterator[SupervisedStack]:
    s = started[0]
    yield s
    s.wait_all_ready()  # every test leaves the stack whole for the next


# -- no stack at all -----------------------------------------------------------------------------
def test_nothing_running_exits_4_without_traceback() -> None:
    s = SupervisedStack(venv_link=False)
    try:
        res = dspexctl(s, "pools", "status")
        assert res.returncode == 4, res.stdout + res.stderr
        assert "UNREACHABLE" in res.stdout and "supervisord is not running" in res.stdout
        no_traceback(res)
        res = dspexctl(s, "pools", "status", "--json")
        assert res.returncode == 4
        doc = json.loads(res.stdout)  # one JSON document and nothing else
        assert doc["health"] == "unreachable" and doc["broker"] is None
        assert [p["name"] for p in doc["pools"]] == list(POOLS)
        for args in (["workers", "recycle", "triage_pool"], ["sessions", "list"], ["pools", "stop"]):
            res = dspexctl(s, *args)
            assert res.returncode == 4, (args, res.stderr)
            assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
            no_traceback(res)
    finally:
        s.cleanup()


@pytest.mark.parametrize("args, needle", [
    (["--endpoint", "foo", "pools", "status"], "unsupported endpoint"),
    (["--endpoint", "ipc:///tmp/" + "x" * 120, "sessions", "list"], "over the unix socket limit"),
    (["--supervisor-conf", "/nonexistent/supervisor.conf", "pools", "status"], "no supervisor config"),
    (["workers", "recycle", "triage_pool", "--worker", "1", "--all"], "exclude each other"),
    (["--supervisor-conf", "/etc/passwd", "pools", "status"], "/etc/passwd: line 1 comes before any [section]"),
    (["--json", "--supervisor-conf", "/etc/passwd", "sessions", "list"], "/etc/passwd: line 1 comes before"),
    (["keys", "generate", "--dir", "/proc/no-such-pid/keys"], "cannot write keys into /proc/no-such-pid/keys"),
    (["--json", "keys", "generate", "--dir", "/proc/no-such-pid/keys"], "cannot write keys into"),
])
def test_user_mistakes_are_one_line_errors(args: list[str], needle: str) -> None:
    s = SupervisedStack(venv_link=False)
    try:
        res = dspexctl(s, *args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr.startswith("Error: ") and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
        no_traceback(res)
        if "--json" in args:  # the same fact as one document on stdout
            error = json.loads(res.stdout)["error"]
            assert error["exit"] == 2 and needle in error["message"], res.stdout
    finally:
        s.cleanup()


# -- on the stack dspexctl started ------------------------------------------------------------------
def test_pools_start_launched_supervisord_with_progress(started: tuple[SupervisedStack, Any]) -> None:
    stack, res = started
    assert stack.supervisord_pid > 0
    assert "starting supervisord" in res.stderr and "ready: triage_pool 2/2" in res.stderr
    assert "nothing is listening" not in res.stderr, "a normal start has no alarming line"
    assert res.stdout.startswith("started supervisord;")
    # no .venv here: the programs run the interpreter dspexctl passed through DSPEX_PYTHON
    pid = stack.status()["pools"]["analytics_pool"]["workers"][0]["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == sys.executable


def test_status_json_healthy(stack: SupervisedStack) -> None:
    res = dspexctl(stack, "pools", "status", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["health"] == "ok" and doc["problems"] == []
    assert {p["name"]: p["affinity"] for p in doc["pools"]} == POOLS
    assert sum(p["ready"] + p["busy"] for p in doc["pools"]) == 6
    assert all(p["expected"] == 2 and p["total"] == 2 for p in doc["pools"])
    assert {pr["state"] for pr in doc["supervisor"]["processes"]} == {"RUNNING"}
    assert len(doc["supervisor"]["processes"]) == 7


def test_status_verbose_text(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        s = dx.session("triage_pool")
        s.call("os", "getpid")
        res = dspexctl(stack, "pools", "status", "-v")
        s.close()
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["POOL", "AFFINITY", "WORKERS"]
    header = lines[0]
    triage = next(ln for ln in lines if ln.startswith("triage_pool "))
    assert header.index("SESSIONS") == triage.index(triage.split()[5]), "columns are aligned"
    assert "triage_pool:triage_pool_00" in res.stdout and "triage_pool:triage_pool_01" in res.stdout
    for col in ("PROCESS", "ID", "PID", "STATE", "SESSIONS", "SERVED", "RSS", "UPTIME", "HEARTBEAT"):
        assert col in res.stdout


def test_degraded_exits_3_and_pools_start_restores(stack: SupervisedStack) -> None:
    with stack.supervisor() as sup:
        sup.call("supervisor.stopProcess", "triage_pool:triage_pool_01", True)
    res = dspexctl(stack, "pools", "status")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "DEGRADED" in res.stdout and "triage_pool:triage_pool_01 is STOPPED" in res.stdout
    doc = json.loads(dspexctl(stack, "pools", "status", "--json").stdout)
    assert doc["health"] == "degraded"
    triage = next(p for p in doc["pools"] if p["name"] == "triage_pool")
    assert triage["health"] == "degraded" and triage["ready"] == 1
    res = dspexctl(stack, "pools", "start", "triage_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "starting triage_pool:triage_pool_01" in res.stderr
    assert dspexctl(stack, "pools", "status").returncode == 0


def test_pools_stop_then_start(stack: SupervisedStack) -> None:
    old = {w["incarnation"] for w in stack.ready("optimizer_pool")}
    res = dspexctl(stack, "pools", "stop", "optimizer_pool", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["stopped"] == ["optimizer_pool"] and set(doc["processes"].values()) == {"STOPPED"}
    assert stack.status()["pools"]["optimizer_pool"]["workers"] == []
    res = dspexctl(stack, "pools", "status")
    assert res.returncode == 5 and "DOWN: optimizer_pool has no ready worker" in res.stdout, res.stdout
    res = dspexctl(stack, "pools", "start", "optimizer_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "optimizer_pool: 2/2 ready" in res.stdout
    new = {w["incarnation"] for w in stack.ready("optimizer_pool")}
    assert len(new) == 2 and not new & old
    assert dspexctl(stack, "pools", "status").returncode == 0


def test_sessions_list_and_close(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        s = dx.session("triage_pool")
        ref = s.call("types", "SimpleNamespace", kwargs={"a": 1})
        res = dspexctl(stack, "sessions", "list", "--pool", "triage_pool", "--json")
        assert res.returncode == 0, res.stderr
        rows = {r["id"]: r for r in json.loads(res.stdout)["sessions"]}
        assert rows[s.id]["worker"] == s.worker and rows[s.id]["calls"] == 1
        text = dspexctl(stack, "sessions", "list").stdout
        assert s.id in text and "SESSION" in text
        res = dspexctl(stack, "sessions", "close", s.id[:12])
        assert res.returncode == 0 and f"closed {s.id}" in res.stdout, res.stdout + res.stderr
        assert s.id not in {r["id"] for r in json.loads(dspexctl(stack, "sessions", "list", "--json").stdout)["sessions"]}
        with pytest.raises(dspex.SessionClosed):  # closed for good: never a fresh namespace
            s.attr(ref, "a")
    res = dspexctl(stack, "sessions", "close", "ffffffffffff")
    assert res.returncode == 2 and res.stderr.startswith("Error: ")


def test_recycle_all_rolls_through_the_pool(stack: SupervisedStack) -> None:
    old = {w["incarnation"] for w in stack.ready("analytics_pool")}
    res = dspexctl(stack, "workers", "recycle", "analytics_pool", "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all("(graceful)" in ln and " -> " in ln for ln in lines)
    new = {w["incarnation"] for w in stack.ready("analytics_pool")}
    assert len(new) == 2 and not new & old
    assert {ln.split()[1] for ln in lines} == {o[:8] for o in old}
    # rolling: the second worker was asked to leave only once the first one's replacement registered
    st = stack.status()["pools"]["analytics_pool"]
    assert st["recycles"] >= 2 and st["recycling"] is None


def test_unknown_pool_and_worker(stack: SupervisedStack) -> None:
    for args in (["workers", "recycle", "nope"], ["pools", "status", "nope"], ["pools", "start", "nope"],
                 ["pools", "stop", "nope"], ["sessions", "list", "--pool", "nope"],
                 ["workers", "recycle", "triage_pool", "--worker", "zzzz"]):
        res = dspexctl(stack, *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
        no_traceback(res)
    res = dspexctl(stack, "workers", "recycle", "nope", "--json")
    assert json.loads(res.stdout)["error"]["code"] == "pool_not_found"


def test_ensure_stack_on_a_running_stack(stack: SupervisedStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_RUN_DIR", stack.run_dir)
    monkeypatch.delenv("DSPEX_ENDPOINT", raising=False)
    lines: list[str] = []
    handle = ensure_stack(stack.conf, timeout=30, progress=lines.append)
    assert (handle.conf, handle.endpoint, handle.started) == (stack.conf, stack.endpoint, False)
    assert handle.pools == list(POOLS) and handle.wanted == dict.fromkeys(POOLS, 2)
    assert set(handle.status["pools"]) == set(POOLS)
    assert lines and lines[-1].startswith("ready:")
    with dspex.connect(handle.endpoint, timeout=10) as dx:
        assert dx.call("operator", "add", [2, 3], pool="triage_pool") == 5
    assert stack.processes() and wait_for(lambda: len(stack.ready("triage_pool")) == 2)


def test_stop_stack_stops_what_dspexctl_started(started: tuple[SupervisedStack, Any]) -> None:
    """Last test of the module: stop_stack on the stack `pools start` launched."""
    stack = started[0]
    stack.processes()
    stack.status()
    lines: list[str] = []
    result = stop_stack(stack.conf, progress=lines.append)
    assert result["was_running"] and result["pid"] == stack.supervisord_pid and len(result["processes"]) == 7
    assert lines and lines[0].startswith(f"stopping supervisord (pid {stack.supervisord_pid})")
    assert not pid_alive(stack.supervisord_pid)
    assert stack.child_pids and not any(pid_alive(p) for p in stack.child_pids)
    assert not (stack.root / "run" / "supervisord.pid").exists()
    res = dspexctl(stack, "pools", "status")
    assert res.returncode == 4
    assert not stop_stack(stack.conf)["was_running"]  # nothing left to stop: fine
