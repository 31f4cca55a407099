"""Stacks sharing a machine: a taken metrics port, a taken run directory. ``dspexctl pools start``
as a subprocess launching real supervisords (small stacks: the shipped broker and one triage_pool
worker each).

* The metrics port is taken by another program: the broker serves on a free port, ``pools start``
  warns and names it, ``pools status`` shows the dashboard URL, and the page there is this stack's.
* Another stack's broker is live on the run directory: ``pools start`` refuses before starting
  anything, naming that stack and the fix; and when this stack's broker only finds out as it binds
  (a socket of the run directory is held), ``pools start`` stops the supervisord it started (all
  or nothing) and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dspex.stack.supervisor import Supervisor, SupervisorConf, supervisord_pid
from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack
from tests.test_cli import dspexctl, no_traceback
from tests.test_ops_python import small_conf_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def processes_of(conf: Path) -> list[int]:
    """Pids of live processes whose command line names ``conf`` (a stack's supervisord and programs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if str(conf).encode() in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture
def stacks() -> Iterator[list[SupervisedStack]]:
    made: list[SupervisedStack] = []
    try:
        yield made
    finally:
        for s in made:
            with contextlib.suppress(Exception):  # it may never have started, or stopped already
                s.adopt_daemon()
            s.remember(processes_of(s.conf))
            s.stop()
            s.cleanup()


def start(stack: SupervisedStack) -> None:
    res = dspexctl(stack, "pools", "start", "--wait", "120")
    assert res.returncode == 0, res.stdout + res.stderr + stack.logs()
    stack.adopt_daemon()


def test_a_taken_metrics_port_is_said_and_the_fallback_named(stacks: list[SupervisedStack]) -> None:
    stack = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(stack)
    taken = stack.metrics_port
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", taken))
    squatter.listen(1)
    try:
        res = dspexctl(stack, "pools", "start", "--wait", "120")
        stack.adopt_daemon()
        assert res.returncode == 0, res.stdout + res.stderr
        no_traceback(res)
        found = re.search(rf"port {taken} is in use by another program; serving on (\d+) instead", res.stderr)
        assert found and res.stderr.count("warning: metrics:") == 1, res.stderr
        port = int(found.group(1))
        assert f"dashboard http://127.0.0.1:{port}/, metrics http://127.0.0.1:{port}/metrics" in res.stdout
        status = dspexctl(stack, "pools", "status")
        assert status.returncode == 0, status.stdout
        assert f"port {taken} is in use by another program; serving on {port} instead" in status.stdout
        # the page there is this stack's, and says so
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as resp:
            broker = json.loads(resp.read())["broker"]
        assert broker["config"] == str(stack.conf) and broker["run_dir"] == stack.run_dir
        assert broker["metrics"] == {"requested": taken, "port": port,
                                     "error": f"port {taken} is in use by another program; serving on {port} instead"}
    finally:
        squatter.close()


def test_the_metrics_line_says_when_metrics_are_off() -> None:
    from dspexctl.commands import metrics_text

    assert metrics_text({"requested": 0, "port": None, "error": None}) == (
        "metrics: off (the broker runs without DSPEX_METRICS_PORT / --metrics-port)", False)
    assert metrics_text({"requested": 9464, "port": None, "error": "cannot serve metrics on 127.0.0.1:9464: nope"}) \
        == ("metrics: off: cannot serve metrics on 127.0.0.1:9464: nope", True)
    assert metrics_text({"requested": 9464, "port": 9464, "error": None}) == (
        "dashboard: http://127.0.0.1:9464/ (metrics: http://127.0.0.1:9464/metrics)", False)


def test_whose_broker_answers_is_one_rule(tmp_path: Path) -> None:
    """commands.foreign_broker, which every command applies: supervisord's broker pid decides while
    it has one, else the conf the broker was started with (a broker without one only for pools start)."""
    from dspexctl.commands import foreign_broker

    (tmp_path / "supervisor.conf").write_text("[unix_http_server]\nfile = %(here)s/s.sock\n")
    conf = SupervisorConf.load(tmp_path / "supervisor.conf")
    ep = "ipc:///tmp/x/frontend.sock"
    gone = 2**22 + 1  # above pid_max: no /proc entry, where it listens unknown
    ours = [{"group": "broker", "name": "broker", "pid": gone, "statename": "RUNNING"},
            {"group": "p", "name": "p_00", "pid": 7, "statename": "RUNNING"}]
    assert foreign_broker({"pid": gone, "config": "/elsewhere.conf"}, ep, conf, ours) is None
    assert foreign_broker({"pid": 42, "config": str(conf.path)}, ep, conf, ours) == (
        f"another stack is using this run directory /tmp/x: the broker there (pid 42) is not this supervisord's "
        f"broker (pid {gone}); it was started with {conf.path}; run this command with DSPEX_RUN_DIR / --endpoint, "
        "or stop that broker (kill 42)")
    assert foreign_broker({"pid": 42, "config": str(conf.path)}, ep, conf, []) is None
    assert foreign_broker({"pid": 42, "config": ""}, ep, conf, []) is None
    assert foreign_broker({"pid": 42, "config": ""}, ep, conf, [], confless_is_foreign=True) == (
        f"another stack is using this run directory /tmp/x: the broker there (pid 42) was started without a "
        f"supervisor.conf, not {conf.path}; stop that broker (kill 42), or give this one its own run directory "
        "and metrics port (DSPEX_RUN_DIR=/tmp/dspex-mine DSPEX_METRICS_PORT=9465 dspexctl ...; a second stack also "
        "needs a second checkout, whose run/ holds its supervisord's socket)")
    other = foreign_broker({"pid": 42, "config": "/srv/a/supervisor.conf"}, ep, conf, [])
    assert other is not None and other.startswith(
        f"another stack is using this run directory /tmp/x: the broker there (pid 42) was started with "
        f"/srv/a/supervisor.conf, not {conf.path}; stop that stack (dspexctl --supervisor-conf "
        "/srv/a/supervisor.conf stop), or give this one its own run directory"), other


def test_pools_start_on_another_stacks_run_dir_starts_nothing(stacks: list[SupervisedStack]) -> None:
    first = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(first)
    start(first)
    broker_pid = first.status()["broker"]["pid"]
    second = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(second)
    second.env["DSPEX_RUN_DIR"] = first.run_dir  # the mistake: the first stack's run directory
    res = dspexctl(second, "pools", "start", "--wait", "60")
    assert res.returncode == 2, res.stdout + res.stderr
    no_traceback(res)
    assert res.stderr.startswith(
        f"Error: another stack is using this run directory {first.run_dir}: the broker there (pid {broker_pid}) "
        f"was started with {first.conf}, not {second.conf}; stop that stack (dspexctl --supervisor-conf "
        f"{first.conf} stop), or give this one its own run directory"), res.stderr
    assert "declare it in supervisor.conf" not in res.stderr and "has no pool" not in res.stderr
    assert "starting supervisord" not in res.stderr, "nothing was started"
    assert processes_of(second.conf) == []
    with Supervisor(SupervisorConf.load(second.conf), timeout=5) as sup:
        assert not sup.running()
    st = first.status()
    assert st["broker"]["pid"] == broker_pid and len(st["pools"]["triage_pool"]["workers"]) == 1


def test_a_conflict_found_while_starting_stops_what_was_started(stacks: list[SupervisedStack]) -> None:
    """Something holds the run directory's worker socket (another broker's backend, say): this
    stack's broker refuses to start; pools start must not leave its supervisord and workers behind."""
    stack = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(stack)
    os.makedirs(stack.run_dir, mode=0o700)
    ctx = zmq.Context()
    holder = ctx.socket(zmq.ROUTER)
    holder.bind(f"ipc://{stack.run_dir}/backend.sock")
    try:
        t0 = time.monotonic()
        res = dspexctl(stack, "pools", "start", "--wait", "120")
        took = time.monotonic() - t0
    finally:
        holder.close(0)
        ctx.term()
    assert res.returncode == 2, res.stdout + res.stderr
    no_traceback(res)
    assert "starting supervisord" in res.stderr
    assert res.stderr.splitlines()[-1].startswith(
        f"Error: another stack is using this run directory {stack.run_dir}: this stack's broker refused to start "
        f"(another broker is live on ipc://{stack.run_dir}/backend.sock"), res.stderr
    assert "this command stopped the supervisord it had started" in res.stderr
    assert took < 60, f"found out at the first refusal, not at the wait's end ({took:.0f}s)"
    leftovers = wait_for(lambda: not processes_of(stack.conf) or None, 10, 0.1, "every process of the stack gone")
    assert leftovers
    assert not (stack.root / "run" / "supervisord.pid").exists()


def test_the_flagship_on_another_stacks_run_dir_names_it(stacks: list[SupervisedStack]) -> None:
    """`dspexctl flagship` with the run directory of another conf's running stack says so, and never
    runs its flow against that stack nor tells the user to declare its pools."""
    first = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(first)
    start(first)
    other = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(other)
    other.env["DSPEX_RUN_DIR"] = first.run_dir
    res = dspexctl(other, "flagship", "--no-recycle")
    assert res.returncode == 2, res.stdout + res.stderr
    no_traceback(res)
    assert "another stack is using this run directory" in res.stderr and str(first.conf) in res.stderr, res.stderr
    assert "declare it in supervisor.conf" not in res.stdout + res.stderr
    assert "triage" not in res.stdout.lower(), "the flow did not run against the other stack"
    assert processes_of(other.conf) == []


def test_ctrl_c_exits_130_and_watch_refreshes(stacks: list[SupervisedStack]) -> None:
    """Ctrl-C while `pools start` waits: 130, what goes on said; `pools status --watch` redraws every
    second until Ctrl-C, then 130. Never click's "Aborted!" (exit 1), never a traceback."""
    stack = SupervisedStack(small_conf_text(), venv_link=False)
    stacks.append(stack)
    env = dict(stack.env)
    env.pop("DSPEX_SUPERVISOR_CONF", None)

    def ctl(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "dspexctl", *args], cwd=stack.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    start_ = ctl("pools", "start", "--wait", "120")
    assert start_.stderr is not None
    seen = [start_.stderr.readline() for _ in range(2)]  # "starting supervisord", "supervisord running"
    assert seen[0].startswith("starting supervisord"), seen
    start_.send_signal(signal.SIGINT)
    out, err = start_.communicate(timeout=60)
    assert start_.returncode == 130, out + err
    assert "Error: interrupted: supervisord goes on starting the stack" in err
    assert "Aborted" not in err and "Traceback" not in err, err
    start(stack)  # the stack it left starting finishes; pools start waits for it

    watch = ctl("pools", "status", "--watch")
    assert watch.stdout is not None
    lines: list[str] = []
    while sum(ln.startswith("Every 1s: dspexctl pools status") for ln in lines) < 3:
        line = watch.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    lines += out.splitlines(keepends=True)
    assert watch.returncode == 130 and err.strip() == "Error: interrupted", err
    rows = [ln.split() for ln in lines if ln.startswith("triage_pool ")]
    assert len(rows) >= 2 and all(r[-1] == "OK" for r in rows), "".join(lines)

    # --watch --json: each refresh is the document a single `pools status --json` prints
    once = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status", "--json"], cwd=stack.root, env=env,
                          text=True, capture_output=True, timeout=60)
    watch = ctl("pools", "status", "--watch", "--json")
    assert watch.stdout is not None
    text = ""
    docs: list[dict[str, object]] = []
    decoder = json.JSONDecoder()
    while len(docs) < 2:
        line = watch.stdout.readline()
        assert line, text
        text += line
        if line == "}\n":  # the end of one indented document
            docs.append(decoder.decode(text))
            text = ""
    watch.send_signal(signal.SIGINT)
    watch.communicate(timeout=30)
    assert all(set(d) == set(json.loads(once.stdout)) for d in docs), (set(docs[0]), set(json.loads(once.stdout)))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_killed_supervisord_is_named_with_what_it_left_running_which_stop_stops() -> None:
    """supervisord SIGKILLed: its broker and workers run on, orphaned. pools status only said to
    start supervisord, pools start then refused naming this very conf as another stack's, and
    stop said there was nothing to stop, leaving them running."""
    from tests.harness.supervisord import small_stack

    with small_stack({"triage_pool": 1}) as stack:
        procs = {f"{p['group']}:{p['name']}": p["pid"] for p in stack.processes()}
        assert set(procs) == {"broker:broker", "triage_pool:triage_pool_00"}, procs
        os.kill(stack.supervisord_pid, signal.SIGKILL)
        stack.proc.wait(10)
        left = (f"supervisord of {stack.conf} is not running, but 2 process(es) it started still run: "
                f"broker:broker (pid {procs['broker:broker']}), triage_pool:triage_pool_00 "
                f"(pid {procs['triage_pool:triage_pool_00']}); it was killed: stop them with `dspexctl stop`, then "
                "`dspexctl pools start`")
        res = dspexctl(stack, "pools", "status")
        no_traceback(res)
        assert res.returncode == 4 and f"UNREACHABLE: {left}" in res.stdout, res.stdout
        res = dspexctl(stack, "--json", "pools", "status")
        assert res.returncode == 4 and left in json.loads(res.stdout)["problems"], res.stdout
        for json_out in ([], ["--json"]):
            res = dspexctl(stack, *json_out, "pools", "start", "--wait", "30")
            assert res.returncode == 2, res.stdout + res.stderr
            no_traceback(res)
            assert res.stderr.strip().splitlines()[-1] == f"Error: {left}", res.stderr
            if json_out:
                assert json.loads(res.stdout)["error"]["code"] == "stack_conflict", res.stdout
        assert supervisord_pid(SupervisorConf.load(stack.conf)) is None, "a second supervisord was started"
        res = dspexctl(stack, "--json", "stop")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["processes"] == ["broker:broker", "triage_pool:triage_pool_00"], res.stdout
        from tests.harness.procs import pid_alive

        wait_for(lambda: not any(pid_alive(pid) for pid in procs.values()), 10, 0.05, "the orphans gone")
        res = dspexctl(stack, "stop")
        assert res.returncode == 0 and res.stdout.strip() == f"supervisord of {stack.conf} is not running: nothing to " \
            "stop", res.stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_broker_that_crashed_and_was_restarted_is_warn_naming_how() -> None:
    """supervisord restarts a SIGKILLed broker within a second: every session it held is gone, yet
    pools status said OK (exit 0), the new broker's uptime the only trace."""
    from tests.harness.supervisord import cli_status, small_stack

    with small_stack({"triage_pool": 1}) as stack:
        code, doc, _ = cli_status(stack)
        assert code == 0 and doc["health"] == "ok", doc["problems"]
        broker_pid = next(p["pid"] for p in stack.processes() if p["name"] == "broker")
        os.kill(broker_pid, signal.SIGKILL)
        wait_for(lambda: any(p["name"] == "broker" and p["statename"] == "RUNNING" and p["pid"] != broker_pid
                             for p in stack.processes()) and len(stack.ready("triage_pool")) == 1, 60, 0.1,
                 "the broker restarted, its worker back")
        code, doc, text = cli_status(stack)
        assert code == 6 and doc["health"] == "warn", text
        crash = (rf"the broker \(pid {broker_pid}\) exited \d+s ago \(terminated by SIGKILL\) and supervisord "
                 r"restarted it: the sessions it held are gone \(this clears 300s after\)")
        assert any(re.fullmatch(f"WARN: {crash}", ln) for ln in text.splitlines()), text
        assert any(re.fullmatch(crash, p) for p in doc["problems"]), doc["problems"]
