"""A worker of a pool the broker does not declare (a worker host's conf naming a pool the broker
lacks): the broker's log names it as every other worker line does (its id as text, its pid and
its host), so the operator of the broker host can tell which host to fix; and ``pools status``
names it (as it names a worker of another wire version), from what the broker remembers of whom it
turned away (``broker.turned_away``)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import urllib.request

import msgpack
import pytest
import zmq

from broker.turned_away import MAX_TURNED_AWAY, UNKNOWN_POOL, TurnedAway
from dspex.stack.health import HEALTH_WINDOW_S
from dspex.wire.protocol import B_DISCONNECT, PROTOCOL_VERSION, W_READY
from tests.harness import Stack, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def test_the_broker_names_the_host_of_a_worker_of_an_unknown_pool(stack: Stack) -> None:
    stack.start_broker("apool:strict_queue")
    worker = stack.start_worker("nosuch_pool", "--no-dspy")
    line = wait_for(lambda: next((s for s in stack.procs_reg.log_tail("broker.log", 1 << 16).splitlines()
                                  if "wants unknown pool" in s), None), 20, what="the broker's refusal")
    assert re.search(rf"worker [0-9a-f]{{8}} \(pid {worker.pid}, host {re.escape(socket.gethostname())}\) "
                     r"wants unknown pool 'nosuch_pool'", line), line


def test_pools_status_names_a_worker_the_broker_turned_away(stack: Stack) -> None:
    """On the broker host, ``pools status`` (text and --json) and the dashboard name the worker
    host whose workers knock for a pool the broker does not serve (supervisord restarts them;
    nothing else says why the pool's workers are missing), with how often and what to fix."""
    port = free_port()
    stack.start_broker("apool:strict_queue", extra=["--metrics-port", str(port)])
    first = stack.start_worker("nosuch_pool", "--no-dspy")
    wait_for(lambda: first.poll() is not None, 20, what="the first worker told to leave")
    second = stack.start_worker("nosuch_pool", "--no-dspy")
    wait_for(lambda: second.poll() is not None, 20, what="the second worker told to leave")
    here = tempfile.mkdtemp(dir=stack.root)  # no ./supervisor.conf: the broker's view alone
    ctl = [sys.executable, "-m", "dspexctl", "--endpoint", stack.frontend, "pools", "status"]
    text = subprocess.run(ctl, cwd=here, env=stack.env, capture_output=True, text=True, timeout=60)
    said = (rf"worker pid {second.pid} on host {re.escape(socket.gethostname())} wants pool 'nosuch_pool', which "
            r"this broker does not serve \(it serves apool; turned away 2 times, last \d+s ago\): fix its --pool or "
            r"add the pool and restart the broker")
    assert [s for s in text.stdout.splitlines() if re.fullmatch(f"WARN: {said}", s)], text.stdout
    doc = json.loads(subprocess.run([*ctl, "--json"], cwd=here, env=stack.env, capture_output=True, text=True,
                                    timeout=60).stdout)
    assert [i["state"] for i in doc["issues"] if re.fullmatch(said, i["text"])] == ["warn"], doc["issues"]

    def dashboard() -> list[str] | None:  # its snapshot is a tick old: polled until it has both knocks
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as res:
                issues = json.loads(res.read())["issues"]
        except OSError:
            return None
        return [i["state"] for i in issues if re.fullmatch(said, i["text"])] or None

    assert wait_for(dashboard, 20, 0.1, "the dashboard's line") == ["warn"]


def test_pools_status_names_a_worker_of_another_wire_version(stack: Stack) -> None:
    """A worker of another dspex version (its READY says another wire protocol version) is told to
    leave; ``pools status`` names its host and both versions."""
    stack.start_broker("apool:strict_queue")
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(stack.backend)
    try:
        peer.send_multipart([W_READY, msgpack.packb({"pool": "apool", "pid": 4242, "host": "gpu9", "capacity": 1,
                                                       "version": PROTOCOL_VERSION + 1})])
        assert peer.poll(20_000) and peer.recv_multipart()[0] == B_DISCONNECT
    finally:
        peer.close()
    here = tempfile.mkdtemp(dir=stack.root)
    text = subprocess.run([sys.executable, "-m", "dspexctl", "--endpoint", stack.frontend, "pools", "status"],
                          cwd=here, env=stack.env, capture_output=True, text=True, timeout=60)
    assert [s for s in text.stdout.splitlines() if re.fullmatch(
        rf"WARN: worker pid 4242 on host gpu9 speaks wire protocol version {PROTOCOL_VERSION + 1}, this broker "
        rf"{PROTOCOL_VERSION} \(turned away 1 time, last \d+s ago\): run one dspex version on a stack \(upgrade "
        r"that host or this one\)", s)], text.stdout


def test_the_broker_remembers_the_last_distinct_knocks_for_the_health_window() -> None:
    seen = TurnedAway()
    seen.add("gpu1", 1, UNKNOWN_POOL, "a", 0.0)
    seen.add("gpu1", 2, UNKNOWN_POOL, "a", 1.0)  # the same host and pool again: counted, its newest pid
    for n in range(MAX_TURNED_AWAY):
        seen.add(f"h{n}", n, UNKNOWN_POOL, "b", 2.0)
    report = seen.report(3.0)
    assert len(report) == MAX_TURNED_AWAY and all(r["host"] != "gpu1" for r in report)  # the oldest went
    seen.add("gpu1", 3, UNKNOWN_POOL, "a", 4.0)
    seen.add("gpu1", 4, UNKNOWN_POOL, "a", 5.0)
    assert seen.report(6.0)[0] == {"host": "gpu1", "pid": 4, "reason": UNKNOWN_POOL, "wants": "a", "count": 2,
                                   "ago_s": 1.0}
    assert seen.report(5.0 + HEALTH_WINDOW_S) == []  # a health window after the last knock: forgotten
