"""Session lifecycle, pool settings reaching workers, graceful stops and one stack per run
directory, on real brokers and workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import dspex
from dspex.stack.pools import parse_pool_spec
from tests.harness import PY, REPO, Stack, base_env, wait_for

pytestmark = pytest.mark.timeout(120)


def pid_of(s: dspex.Session) -> int:
    return int(s.call("os", "getpid"))


def held(stack: Stack, pool: str) -> dict[int, int]:
    """Session states each worker holds (pid -> count), as its heartbeat stats report them."""
    return {w["pid"]: w["held_sessions"] for w in stack.workers(pool)}


def in_background(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- lifecycle rules -------------------------------------------------------------------------
def test_call_longer_than_ttl_keeps_its_session(stack: Stack) -> None:
    """Idle time counts from the END of the last call (a GEPA compile longer than the TTL)."""
    dx = stack.pool("p:strict_queue:session_ttl=2", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 41")
    s.call("time", "sleep", [3.0])  # longer than the TTL
    time.sleep(1.3)  # idle, but for less than the TTL since the call ended (the sweep runs every 1s)
    assert s.eval("x + 1") == 42


def test_closed_session_answers_session_closed(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 1")
    s.close()
    again = dx.session("p", s.id)  # the same id from another handle: never a fresh namespace
    with pytest.raises(dspex.SessionClosed, match="closed"):
        again.eval("x")
    wait_for(lambda: held(stack, "p") == {pid: 0 for pid in held(stack, "p")}, what="state released")


def test_expired_session_answers_session_closed(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:session_ttl=1", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 1")
    wait_for(lambda: not dx.sessions("p"), what="session expired")
    with pytest.raises(dspex.SessionClosed, match="expired"):
        s.eval("x")
    wait_for(lambda: set(held(stack, "p").values()) == {0}, what="state released")


def test_release_reaches_every_worker_a_hint_session_touched(stack: Stack) -> None:
    dx = stack.pool("p:hint", 2, "--no-dspy")
    s = dx.session("p")
    first = pid_of(s)
    t, _ = in_background(s.call, "time", "sleep", [1.0])
    wait_for(lambda: any(w["state"] == "busy" for w in stack.workers("p")), what="pinned worker busy")
    assert pid_of(s) != first  # ran on the other worker, which now holds state of the session too
    t.join(10)
    wait_for(lambda: set(held(stack, "p").values()) == {1}, what="both workers hold the session")
    s.close()
    wait_for(lambda: set(held(stack, "p").values()) == {0}, what="both released")


def test_none_pool_keeps_no_worker_state(stack: Stack) -> None:
    dx = stack.pool("p:none", 2, "--no-dspy")
    sessions = [dx.session("p") for _ in range(6)]
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda s: [s.eval("1 + 1") for _ in range(5)], sessions))
    ended = time.monotonic()

    def settled() -> bool:
        # every worker's last message came after the calls (so it is a heartbeat, whose stats say
        # what it holds now), and none holds a session; which worker ran how many calls is the
        # broker's choice (one may have run them all)
        workers = stack.workers("p")
        since = time.monotonic() - ended
        return (sum(w["served"] for w in workers) == 30
                and all(w["last_heartbeat_s"] < since and w["held_sessions"] == 0 for w in workers))

    wait_for(settled, what="no session state on none-pool workers")


def test_close_while_a_call_runs_cancels_it_then_releases(stack: Stack) -> None:
    """Closing a session ends what it runs (tests/test_session_close.py): its running call's caller
    gets ``Cancelled``, and the worker releases the session once that call has answered."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 5")
    t, out = in_background(s.eval, "__import__('time').sleep(30) or x")
    wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="call running")
    s.close()
    t.join(10)
    assert not t.is_alive() and len(out) == 1 and isinstance(out[0], dspex.Cancelled), out
    wait_for(lambda: set(held(stack, "p").values()) == {0}, what="released after the call")
    with pytest.raises(dspex.SessionClosed):
        dx.session("p", s.id).eval("1")


def test_worker_backstop_ttl_after_a_broker_restart(stack: Stack) -> None:
    """The broker that knew the session is gone: the worker releases it by itself."""
    dx = stack.pool("p:strict_queue:session_ttl=1", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 1")
    wait_for(lambda: set(held(stack, "p").values()) == {1}, what="the worker holds the session")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.start_broker()
    stack.wait_workers("p", 1)
    wait_for(lambda: set(held(stack, "p").values()) == {0}, timeout=20, what="backstop release")


def test_ready_after_a_broker_restart_reports_running_calls(stack: Stack) -> None:
    dx = stack.pool("p:none", 1, "--no-dspy")
    t, _ = in_background(lambda: dx.call("time", "sleep", [3.0], pool="p"))  # its client loses the broker
    wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="call running")
    assert stack.broker is not None
    stack.kill(stack.broker)
    stack.start_broker()
    (w,) = stack.wait_workers("p", 1)
    assert w["state"] == "busy", "the new broker knows the worker's slot is taken"
    started = time.monotonic()
    dx.call("os", "getpid", pool="p")  # waits for the slot instead of piling onto the worker
    assert time.monotonic() - started > 0.3
    t.join(10)


# -- pool settings reach workers ------------------------------------------------------------
def test_capacity_from_supervisor_conf_reaches_workers(stack: Stack) -> None:
    conf = Path(stack.root, "supervisor.conf")
    conf.write_text("[dspex:pool:p]\naffinity = none\ncapacity = 4\n")
    stack.broker_args = ["--config", str(conf)]
    stack.start_broker()
    stack.start_worker("p", "--no-dspy", "--config", str(conf))
    (w,) = stack.wait_workers("p", 1)
    assert w["capacity"] == 4
    dx = stack.client()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda _: dx.call("time", "sleep", [1.0], pool="p"), range(4)))
    assert time.monotonic() - started < 2.5, "4 one-second calls on a capacity-4 worker run at once"


def test_dspex_capacity_applies_when_the_pool_section_does_not_set_one(stack: Stack) -> None:
    """docs/operations.md: DSPEX_CAPACITY is a worker's capacity when neither --capacity nor its
    pool's section in --config says; a section's capacity wins over it, --capacity over both."""
    conf = Path(stack.root, "supervisor.conf")
    conf.write_text("[dspex:pool:p]\naffinity = none\n\n[dspex:pool:q]\naffinity = none\ncapacity = 2\n")
    stack.broker_args = ["--config", str(conf)]
    stack.start_broker()
    env = {**stack.env, "DSPEX_CAPACITY": "3"}
    stack.start_worker("p", "--no-dspy", "--config", str(conf), env=env)
    stack.start_worker("q", "--no-dspy", "--config", str(conf), env=env)
    stack.start_worker("q", "--no-dspy", "--config", str(conf), "--capacity", "5", env=env)
    (p,) = stack.wait_workers("p", 1)
    assert p["capacity"] == 3
    assert sorted(w["capacity"] for w in stack.wait_workers("q", 2)) == [2, 5]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_pool_capacity_below_one_is_refused(value: str) -> None:
    with pytest.raises(dspex.ConfigError, match="capacity must be at least 1"):
        parse_pool_spec(f"p:none:capacity={value}")


# -- graceful stops -----------------------------------------------------------------------------
def _crashes(dx: dspex.Client, pool: str) -> int:
    return int(dx.status()["pools"][pool]["crashes"])


def test_sigterm_rounds_with_pinned_sessions_count_no_crash(stack: Stack) -> None:
    """Rounds of SIGTERM to every worker, each holding many pinned sessions, on a machine kept
    busy (the goodbye/disconnect race shows under load): never a crash."""
    n_workers, rounds = 3, 10
    dx = stack.pool("p:strict_queue", n_workers, "--no-dspy")
    burners = [subprocess.Popen([PY, "-c", "while True: pass"], start_new_session=True) for _ in range(2)]
    try:
        for _ in range(rounds):
            sessions = [dx.session("p") for _ in range(200)]
            with ThreadPoolExecutor(6) as ex:
                list(ex.map(lambda s: s.exec("x = 1"), sessions))
            for w in stack.workers("p"):
                os.kill(w["pid"], signal.SIGTERM)
            wait_for(lambda: not stack.workers("p"), what="all workers gone")
            for _ in range(n_workers):
                stack.start_worker("p", "--no-dspy")
            stack.wait_workers("p", n_workers)
        status = dx.status()
        assert status["pools"]["p"]["crashes"] == 0, status["events"]
        assert sum(1 for e in status["events"] if e["event"] == "exit") == n_workers * rounds
    finally:
        for b in burners:
            b.kill()
            b.wait(10)


def test_sigterm_under_load_hands_back_unstarted_calls(stack: Stack) -> None:
    """A capacity-2 worker stopped while calls wait for it: the running ones finish, the others
    never get WorkerCrashed (they did not run); nothing hangs."""
    dx = stack.pool("p:none", 1, "--no-dspy", "--capacity", "2")
    stack.start_worker("p", "--no-dspy", "--capacity", "2")
    stack.wait_workers("p", 2)
    victim = stack.workers("p")[0]["pid"]
    with ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(dx.call, "time", "sleep", [0.4], pool="p") for _ in range(16)]
        wait_for(lambda: any(w["inflight"] for w in stack.workers("p") if w["pid"] == victim), what="busy")
        os.kill(victim, signal.SIGTERM)
        errors = [f.exception(timeout=30) for f in futures]
    assert [e for e in errors if e is not None] == [], "handed-back calls ran on the other worker"
    assert _crashes(dx, "p") == 0


def test_hung_draining_worker_is_stopped_at_its_deadline(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:drain_timeout=1", 2, "--no-dspy")
    s = dx.session("p")
    hung = pid_of(s)
    child = s.eval("__import__('subprocess').Popen(['sleep', '60']).pid")  # spawned by user code
    t, out = in_background(s.call, "time", "sleep", [60])
    wait_for(lambda: any(w["state"] == "busy" for w in stack.workers("p")), what="call running")
    other = next(w for w in stack.workers("p") if w["pid"] != hung)
    result = dx.recycle("p", all=True)
    assert len(result["recycling"]) == 2
    t.join(20)
    assert len(out) == 1 and isinstance(out[0], dspex.WorkerCrashed)
    assert wait_for(lambda: _gone(hung), what="hung worker killed")
    assert wait_for(lambda: _gone(child), what="its process group killed with it")
    stack.start_worker("p", "--no-dspy")  # what supervisord would do
    # the rolling recycle goes on: the other worker is recycled too
    wait_for(lambda: _gone(other["pid"]), timeout=45, what="rolling recycle continued")
    events = dx.status()["events"]
    assert any(e["event"] == "recycle" and "deadline" in e["why"] and e["pid"] == hung for e in events)


def _renewals(stack: Stack) -> int:
    return stack.procs_reg.log_tail("worker-p.log", 1 << 20).count("broker silent; new socket and READY")


@pytest.mark.parametrize(("durable", "renewals"), [(False, 1), (True, 2)], ids=["strict", "durable-renewed-twice"])
def test_a_paused_broker_keeps_its_workers_and_their_sessions(stack: Stack, durable: bool, renewals: int) -> None:
    """The broker does not run past the workers' liveness (SIGSTOP, a VM pause) while a call
    runs: each worker renews its socket (again, with backoff, for a longer pause). When the broker
    runs again, the old connection's close is not a crash: the same incarnation is back on a new
    connection with its sessions (a durable one does not move), and the call's reply arrives."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", durable=durable)
    s.exec("x = 41")
    pid = pid_of(s)
    assert stack.broker is not None
    running, out = in_background(s.call, "time", "sleep", [0.3])
    wait_for(lambda: stack.workers("p")[0]["inflight"], what="call running")
    renewed = _renewals(stack)
    paused = time.monotonic()
    os.kill(stack.broker.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _renewals(stack) >= renewed + renewals, timeout=20, what="the worker renewed its socket")
        took = time.monotonic() - paused
    finally:
        os.kill(stack.broker.pid, signal.SIGCONT)
    # the worker's silence runs from the broker's last heartbeat, at most an interval before the pause
    assert took >= stack.heartbeat * (stack.liveness - 1)
    running.join(20)
    assert out == [None]
    assert s.eval("x + 1") == 42 and pid_of(s) == pid
    status = dx.status()
    assert status["pools"]["p"]["crashes"] == 0, status["events"]
    assert [e["event"] for e in status["events"]] == ["start"], status["events"]
    assert status["checkpoints"]["moves"] == status["checkpoints"]["restores"] == 0
    assert [w["pid"] for w in stack.workers("p")] == [pid]


@pytest.mark.slow
def test_a_renewed_connection_the_resumed_broker_ignored_is_tried_again_within_a_silence_limit(stack: Stack) -> None:
    """After a long broker pause, libzmq may ignore the worker's renewed connection and its READY
    (the old connection still holds the identity: no handover). The worker sees the handshake on
    it succeed and nothing after: the broker runs, so it tries again after one silence limit, not
    after the backoff of an outage (here 4.8 s; before, 1 or 2 of these 5 pauses took that). And
    the old connection's disconnect, read after the READY on a new one that got its fd number, is
    not the worker's (before, it made a renewed worker away again, or crashed its call)."""
    stack.heartbeat, stack.liveness = 0.2, 3
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 41")
    assert stack.broker is not None
    back = []
    for _ in range(5):
        renewed = _renewals(stack) + 4
        os.kill(stack.broker.pid, signal.SIGSTOP)
        try:  # four renewals: 0.6, 1.2, 2.4 s apart, the next one 4.8 s after the fourth
            wait_for(lambda n=renewed: _renewals(stack) >= n, timeout=30, what="the worker renewed its socket")
        finally:
            os.kill(stack.broker.pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert s.eval("x + 1", timeout=30) == 42
        back.append(round(time.monotonic() - resumed, 2))
    assert max(back) < 2.5, back
    assert dx.status()["pools"]["p"]["crashes"] == 0


def test_a_worker_killed_while_the_broker_is_paused_is_a_crash_at_once(stack: Stack) -> None:
    """A worker of the broker's host whose process exited is no renewal to wait for."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 41")
    pid = pid_of(s)
    assert stack.broker is not None
    silence = stack.heartbeat * stack.liveness
    paused = time.monotonic()
    os.kill(stack.broker.pid, signal.SIGSTOP)
    try:
        stack.kill(pid)
        wait_for(lambda: _gone(pid), what="worker killed")
        wait_for(lambda: time.monotonic() - paused > 2 * silence, what="a pause past the liveness")
    finally:
        os.kill(stack.broker.pid, signal.SIGCONT)
    resumed = time.monotonic()
    with pytest.raises(dspex.SessionWorkerUnavailable, match="crashed"):
        s.eval("x")
    assert time.monotonic() - resumed < 1.5  # at once: not after the renewal wait (about 3 s here)
    assert _crashes(dx, "p") == 1


def test_a_paused_worker_past_its_liveness_is_dropped(stack: Stack) -> None:
    """The other way round: a worker that does not run past its liveness is gone for the broker."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    s.exec("x = 41")
    pid = pid_of(s)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: pid not in [w["pid"] for w in stack.workers("p")], timeout=20, what="paused worker dropped")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _crashes(dx, "p") == 1


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of ours counts as gone: reap it
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"


# -- one stack per run directory --------------------------------------------------------------
def test_second_broker_on_a_live_run_dir_exits_and_the_first_keeps_serving(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    env = base_env(stack.run_dir)
    second = subprocess.run(
        [PY, "-m", "broker", "--frontend", stack.frontend, "--backend", stack.backend, "--pool", "p"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "another broker is live" in second.stderr
    assert "Traceback" not in second.stderr
    assert os.path.exists(stack.frontend[len("ipc://"):]) and os.path.exists(stack.backend[len("ipc://"):])
    assert dx.call("os", "getpid", pool="p")
    assert stack.broker is not None and stack.broker.poll() is None
    assert dx.ping()["pid"] == stack.broker.pid and dx.ping()["frontend"] == stack.frontend



@pytest.mark.parametrize("where", ["spec", "conf"])
def test_broker_refuses_the_removed_direct_setting_by_name(stack: Stack, where: str) -> None:
    """A conf written for direct pools (removed) stops the broker with the setting's name, not a
    pool that silently routes otherwise."""
    if where == "conf":
        conf = Path(stack.root) / "old.conf"
        conf.write_text("[dspex:pool:p]\naffinity = strict_queue\ndirect = true\n")
        pools = ["--config", str(conf)]
    else:
        pools = ["--pool", "p:strict_queue:direct=true"]
    res = subprocess.run([PY, "-m", "broker", "--frontend", stack.frontend, "--backend", stack.backend, *pools],
                         cwd=REPO, env=base_env(stack.run_dir), capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert "pool setting 'direct' was removed" in res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(stack.frontend[len("ipc://"):]), "nothing was bound"

# -- bounded reply buffering per client -------------------------------------------------------
def test_replies_to_a_client_that_stops_reading_are_bounded(stack: Stack) -> None:
    import msgpack
    import zmq

    from dspex.wire.headers import RequestHeader

    stack.env["DSPEX_CLIENT_HWM"] = "100"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 10)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.frontend)
    try:
        body = msgpack.packb({})
        for i in range(30_000):  # pings it never reads the replies of
            sock.send_multipart([RequestHeader("ping", i + 1, "", "", "", 0, 0).pack(), body])
        wait_for(lambda: dx.status()["broker"]["replies_dropped_slow_client"] > 0, timeout=30,
                 what="replies past the client's limit dropped, not buffered")
        assert dx.call("os", "getpid", pool="p")  # everyone else is still served
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("durable", [False, True], ids=["pinned", "durable"])
def test_a_worker_past_max_rss_mb_is_recycled_after_its_call_and_says_why(stack: Stack, durable: bool) -> None:
    """A call that leaves its worker's RSS past the pool's max_rss_mb gets its reply; the worker
    is then recycled (its heartbeats report the RSS). The recycle history and the session's next
    call name the reason: a pinned session is gone with it, a durable one moves."""
    dx = stack.pool("p:strict_queue:max_rss_mb=120", 2, "--no-dspy")
    s = dx.session("p", durable=durable)
    s.exec("x = 41")
    pid = pid_of(s)
    assert max(w["rss"] for w in stack.workers("p")) < 120 << 20  # nothing to recycle before the call
    # held outside the session's namespace (not in a durable checkpoint), every page written
    assert s.eval("setattr(__import__('sys'), 'dx_held', b'x' * (200 << 20)) or 'held'") == "held"
    wait_for(lambda: _gone(pid), timeout=30, what="the worker past max_rss_mb recycled")
    [recycled] = [e for e in dx.status()["events"] if e["event"] == "recycle" and e["pid"] == pid]
    assert "max_rss_mb 120" in recycled["why"], recycled
    if durable:
        assert s.eval("x") == 41 and pid_of(s) != pid
    else:
        with pytest.raises(dspex.SessionWorkerUnavailable, match="max_rss_mb 120"):
            s.eval("x")
    log = stack.procs_reg.log_tail("broker.log", 1 << 20)
    assert re.search(rf"recycling worker \w+ \(pid {pid}\) of pool p: its RSS [\d.]+ MB reached max_rss_mb 120", log), log
