"""dspexctl conveniences: --version, pools restart, stop, sessions close in bulk, the OWNER
column, and supervisord's errors in the dspex error tree.

One small stack (the shipped broker, triage_pool with 2 workers, analytics_pool with 1) started
by ``dspexctl pools start`` and stopped by ``dspexctl stop`` (the module's last test); the CLI runs
as a subprocess.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from dspex.errors import DidNotRun, MayHaveRun, UsageError
from dspex.stack.supervisor import SupervisorError, SupervisorNoSuchProcess, SupervisorUnreachable, pid_alive
from dspexctl.sessions import SessionsList
from tests.harness import base_env, wait_for
from tests.harness.supervisord import SupervisedStack
from tests.test_cli import dspexctl, no_traceback
from tests.test_ops_python import small_conf_text

POOLS = {"triage_pool": 2, "analytics_pool": 1}


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "dspexctl", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.strip() == f"dspexctl {importlib.metadata.version('dspex')}"


def test_supervisor_errors_are_in_the_dspex_tree() -> None:
    assert issubclass(SupervisorUnreachable, DidNotRun)
    assert issubclass(SupervisorError, MayHaveRun)
    assert issubclass(SupervisorNoSuchProcess, UsageError)


def test_owner_column_only_when_the_broker_reports_owners() -> None:
    base = {"id": "s1" * 16, "pool": "triage_pool", "worker": "ab" * 16, "worker_alive": True, "calls": 3,
            "idle_s": 2.0, "created": time.time() - 5}
    plain = SessionsList().present({"pool": None, "sessions": [base], "unreachable": []})
    assert "OWNER" not in plain.splitlines()[0]
    owned = SessionsList().present({"pool": None, "sessions": [{**base, "owner": "client-7f3a"},
                                                               {**base, "id": "s2" * 16, "owner": None}],
                                  "unreachable": []})
    header, first, second = owned.splitlines()
    assert header.split() == ["SESSION", "POOL", "OWNER", "WORKER", "CALLS", "IDLE", "AGE", "DURABLE"]
    assert first.split()[2] == "client-7f3a" and second.split()[2] == "-"


def test_durable_column_says_the_checkpoints_size_and_age() -> None:
    base = {"id": "s1" * 16, "pool": "triage_pool", "worker": "ab" * 16, "worker_alive": True, "calls": 3,
            "idle_s": 2.0, "created": time.time() - 5}
    rows = SessionsList().present({"pool": None, "sessions": [
        base, {**base, "id": "s2" * 16, "durable": True, "checkpoint_bytes": 4608, "checkpoint_age_s": 3.2},
        {**base, "id": "s3" * 16, "durable": True, "checkpoint_bytes": 0, "checkpoint_age_s": None}],
        "unreachable": []}).splitlines()
    assert rows[1].endswith(" no")
    assert rows[2].endswith(" yes (4.5 KB, 0:00:03 ago)")
    assert rows[3].endswith(" yes (no checkpoint yet)")


@pytest.mark.parametrize("args, needle", [
    (["sessions", "close"], "which sessions?"),
    (["sessions", "close", "abc", "--all"], "not both"),
    (["sessions", "close", "--idle", "-3"], "Invalid value for '--idle'"),
    (["flagship", "--lm-timeout", "nan"], "'nan' is not a finite number of seconds"),
    (["flagship", "--lm-timeout", "inf"], "'inf' is not a finite number of seconds"),
    (["flagship", "--lm-timeout", "0.05"], "0.05 is less than the minimum 0.1"),
    (["flagship", "--max-metric-calls", "2"], "2 is less than the minimum 3"),
    (["flagship", "--max-tokens", "0"], "0 is less than the minimum 1"),
])
def test_sessions_close_usage(args: list[str], needle: str) -> None:
    res = subprocess.run([sys.executable, "-m", "dspexctl", *args], capture_output=True, text=True, timeout=60,
                         cwd="/tmp", env=base_env())
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    no_traceback(res)


@pytest.mark.parametrize("args, needle", [
    (["--json", "sessions", "list", "--bogus"], "No such option '--bogus'"),
    (["sessions", "list", "--json", "--pool"], "requires an argument"),
    (["--json", "--timeout", "0", "pools", "status"], "Invalid value for '--timeout'"),
    (["--json", "workers", "recycle"], "Missing argument 'POOL'"),
    (["--json", "pools", "status", "--watch", "--bogus"], "No such option '--bogus'"),
    (["--json", "hosts", "conf", "--broker", "tcp://h:1", "--pool", "p=1", "--worker-key", "/nonexistent"],
     "Invalid value for '--worker-key'"),
    (["--json", "sessions", "close"], "which sessions?"),  # dspexctl's own usage error, for comparison
])
def test_every_usage_error_under_json_is_one_json_document_on_stdout(args: list[str], needle: str) -> None:
    """A script that asks for --json parses stdout: click's own usage errors (an unknown option, a
    missing argument, a bad value) answer there as dspexctl's do, exit 2, and the line on stderr."""
    res = subprocess.run([sys.executable, "-m", "dspexctl", *args], capture_output=True, text=True, timeout=60,
                         cwd="/tmp", env=base_env())
    no_traceback(res)
    assert res.returncode == 2, res.stderr
    doc = json.loads(res.stdout)
    assert doc["error"]["code"] == "usage" and doc["error"]["exit"] == 2, doc
    assert needle in doc["error"]["message"] and needle in res.stderr, (doc, res.stderr)


def test_an_error_under_watch_json_is_the_document_a_single_run_prints(short_tmp: str) -> None:
    """``pools status --watch --json`` shows an error in place, as the same JSON document (its
    ``exit`` included) that ``pools status --json`` prints, and goes on until Ctrl-C."""
    import signal

    env = base_env(f"{short_tmp}/r")
    args = [sys.executable, "-m", "dspexctl", "pools", "status", "nope", "--json"]
    once = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=short_tmp, env=env)
    assert once.returncode == 2, once.stderr
    watch = subprocess.Popen([*args, "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=short_tmp, env=env)
    assert watch.stdout is not None
    text = ""
    while not text.endswith("\n}\n"):
        line = watch.stdout.readline()
        assert line, text
        text += line
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=30)
    assert watch.returncode == 130 and "Traceback" not in err, err
    assert json.loads(text) == json.loads(once.stdout), (text, once.stdout)


@pytest.fixture(scope="module")
def small() -> Iterator[SupervisedStack]:
    stack = SupervisedStack(small_conf_text(POOLS), venv_link=False)
    try:
        res = dspexctl(stack, "pools", "start", "--wait", "120")
        try:
            stack.adopt_daemon()
        except AssertionError:
            pass
        assert res.returncode == 0, res.stdout + res.stderr + stack.logs()
        yield stack
    finally:
        stack.stop()
        stack.cleanup()


def ready_ids(stack: SupervisedStack, pool: str) -> set[str]:
    return {w["incarnation"] for w in stack.ready(pool)}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pools_restart_replaces_the_pools_workers(small: SupervisedStack) -> None:
    old_a, old_t = ready_ids(small, "analytics_pool"), ready_ids(small, "triage_pool")
    res = dspexctl(small, "pools", "restart", "analytics_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("restarted analytics_pool: 1/1 ready"), res.stdout
    new_a = ready_ids(small, "analytics_pool")
    assert len(new_a) == 1 and not new_a & old_a
    assert ready_ids(small, "triage_pool") == old_t, "only the named pool restarts"
    res = dspexctl(small, "pools", "restart", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["pools"] == {"triage_pool": {"ready": 2, "expected": 2, "here": 2, "state": "ok", "problems": []},
                           "analytics_pool": {"ready": 1, "expected": 1, "here": 1, "state": "ok", "problems": []}}
    assert doc["health"] == "ok"
    assert not ready_ids(small, "triage_pool") & old_t
    res = dspexctl(small, "pools", "restart", "nope")
    assert res.returncode == 2 and "no pool named 'nope'" in res.stderr
    assert dspexctl(small, "pools", "status").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sessions_close_by_pool_idle_all_and_id(small: SupervisedStack) -> None:
    with small.client() as dx:
        def opened(pool: str) -> dspex.Session:
            s = dx.session(pool)
            s.call("os", "getpid")
            return s

        old = opened("triage_pool")
        ref = old.call("types", "SimpleNamespace", kwargs={"a": 1})

        def listed() -> dict[str, dict[str, Any]]:
            return {s["id"]: s for s in json.loads(dspexctl(small, "sessions", "list", "--json").stdout)["sessions"]}

        # 15 s: the fresh sessions below must stay under the threshold while a loaded machine starts the CLI
        wait_for(lambda: listed()[old.id]["idle_s"] >= 15, 60, 0.5, "the first session idle for 15 s")
        fresh, analytics, other = opened("triage_pool"), opened("analytics_pool"), opened("triage_pool")

        res = dspexctl(small, "sessions", "close", "--pool", "analytics_pool")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"closed {analytics.id}", "1 session(s) closed"]
        assert set(listed()) == {old.id, fresh.id, other.id}

        res = dspexctl(small, "sessions", "close", "--idle", "15", "--json")
        assert res.returncode == 0, res.stderr
        assert [s["session"] for s in json.loads(res.stdout)["sessions"]] == [old.id]
        assert set(listed()) == {fresh.id, other.id}

        res = dspexctl(small, "sessions", "close", fresh.id[:10])
        assert res.returncode == 0 and res.stdout.strip() == f"closed {fresh.id}", res.stdout + res.stderr

        res = dspexctl(small, "sessions", "close", "--all")
        assert res.returncode == 0 and f"closed {other.id}" in res.stdout and "1 session(s) closed" in res.stdout
        assert listed() == {}
        res = dspexctl(small, "sessions", "close", "--all")
        assert res.returncode == 0 and res.stdout.strip() == "0 session(s) closed"
        res = dspexctl(small, "sessions", "close", "--pool", "nope")
        assert res.returncode == 2 and "no pool named 'nope'" in res.stderr
        with pytest.raises(dspex.SessionClosed):  # closed: its refs were released; its id answers so
            old.attr(ref, "a")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unknown_supervisord_name_is_a_usage_error(small: SupervisedStack) -> None:
    with small.supervisor() as sup, pytest.raises(SupervisorNoSuchProcess) as info:
        sup.stop_group("nope")
    assert info.value.code == "supervisor_bad_name" and "'nope'" in info.value.message


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stop_stops_the_stack_this_conf_started(small: SupervisedStack) -> None:
    """Last on this stack."""
    pids = {p["pid"] for p in small.processes() if p["pid"]}
    assert small.supervisord_pid and len(pids) == 4
    res = dspexctl(small, "stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"stopped supervisord (pid {small.supervisord_pid}) and 4 program(s)")
    assert not pid_alive(small.supervisord_pid) and not any(pid_alive(p) for p in pids)
    res = dspexctl(small, "stop")
    assert res.returncode == 0 and "is not running: nothing to stop" in res.stdout
    res = dspexctl(small, "pools", "status")
    assert res.returncode == 4
    res = dspexctl(small, "pools", "restart")
    assert res.returncode == 4 and "supervisord is not running" in res.stderr
    no_traceback(res)


def test_a_broker_that_does_not_answer_is_a_timeout_not_unreachable(short_tmp: str) -> None:
    """Something listens but never answers (an overloaded or wedged broker): exit 8, one line."""
    import os

    import zmq

    run_dir = os.path.join(short_tmp, "r")
    os.mkdir(run_dir, 0o700)
    endpoint = f"ipc://{run_dir}/f.sock"
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.bind(endpoint)
    try:
        env = {**os.environ, "DSPEX_RUN_DIR": run_dir, "DSPEX_REPLY_GRACE": "0.2"}
        res = subprocess.run([sys.executable, "-m", "dspexctl", "--endpoint", endpoint, "--timeout", "0.5",
                              "sessions", "list"], capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 8, res.stdout + res.stderr
        assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "within 0.5s" in res.stderr
        no_traceback(res)
        # pools status: the same exit code, the stack UNREACHABLE, saying it did not answer
        res = subprocess.run([sys.executable, "-m", "dspexctl", "--endpoint", endpoint, "--timeout", "0.5",
                              "pools", "status"], capture_output=True, text=True, timeout=60, cwd=short_tmp,
                             env=base_env(run_dir, DSPEX_REPLY_GRACE="0.2"))  # no ./supervisor.conf there
        assert res.returncode == 8, res.stdout + res.stderr
        assert "UNREACHABLE: broker did not answer: no reply to status within 0.5s" in res.stdout, res.stdout
        no_traceback(res)
    finally:
        silent.close(0)
        ctx.term()


def test_help_describes_every_option_without_range_noise() -> None:
    """Every command's --help, the flagship's included: each option has a description, and no click
    range such as "0<x<=315360000" or "x>=1" is printed."""
    import click

    from dspexctl.cli import main

    def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, (*prefix, name))
            else:
                yield (*prefix, name), cmd

    seen = 0
    for path, cmd in [((), main), *commands(main)]:
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"dspexctl {' '.join(path)} {param.opts[0]} has no description"
        res = subprocess.run([sys.executable, "-m", "dspexctl", *path, "--help"], capture_output=True, text=True,
                             timeout=60, cwd="/tmp", env=base_env())
        assert res.returncode == 0, res.stderr
        assert "<x" not in res.stdout and "x>" not in res.stdout and "<=" not in res.stdout, res.stdout
        seen += 1
    assert seen >= 10  # dspexctl, pools status/start/stop/restart, stop, workers recycle, sessions list/close, keys ...
