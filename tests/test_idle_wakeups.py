"""An idle stack stays out of the way: the broker reads the workers' answers to a heartbeat round
in one wake-up of its routing thread, not in one each, and only while no request is in flight; a
worker's main thread turns once per heartbeat; the zmq I/O threads of the broker and the workers,
woken by a heartbeat, do not preempt the thread running (issue 22 item 6; bench/idle.py measures
the stack)."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq

import dspex
from broker.roster import ANSWERS_WAIT
from dspex.wire.protocol import (
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    W_HEARTBEAT,
    W_READY,
)
from tests.harness.procs import wait_for
from tests.harness.stack import Stack
from tests.test_core import HEARTBEAT, START, StubCore
from worker.link import Link
from worker.worker import _Rss

C, A = b"client-1", b"worker-a"


def test_the_answers_to_a_round_wait_only_while_no_request_is_in_flight() -> None:
    core = StubCore("p:strict_queue")
    assert core.roster.answers_wait_until() == -math.inf  # no worker: nothing to wait for
    core.ready(A, "p")
    core.advance_to(START + HEARTBEAT)  # a round
    assert core.roster.answers_wait_until() == START + HEARTBEAT * (1 + ANSWERS_WAIT)
    core.request(C, 1, "p", "s")
    assert core.worker_of(1) == A
    assert core.roster.answers_wait_until() == -math.inf  # its reply must not wait
    core.reply(A, C, 1)
    assert core.roster.answers_wait_until() == START + HEARTBEAT * (1 + ANSWERS_WAIT)


def _voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.timeout(60)
def test_an_idle_broker_reads_its_workers_answers_in_one_wake_up_per_round(stack: Stack) -> None:
    """Three workers (DEALERs of this test) answer each heartbeat 0, 15 and 30 ms after it came:
    read as they arrive, each answer would wake the broker's routing thread, 4 wake-ups a round
    with its heartbeat timer; read together, 2. The heartbeats still reach every worker each
    round, and their answers keep them registered."""
    stack.heartbeat = 0.5
    broker = stack.start_broker("p:strict_queue")
    ctx = zmq.Context()
    dealers = []
    try:
        for i in range(3):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.ROUTING_ID, b"fake-worker-%d" % i)
            d.connect(stack.backend)
            d.send_multipart([W_READY, msgpack.packb({"pool": "p", "pid": os.getpid(), "host": socket.gethostname(),
                                                      "capacity": 1, "running": 0, "version": PROTOCOL_VERSION})])
            dealers.append(d)
        stack.wait_workers("p", 3)
        poller = zmq.Poller()
        for d in dealers:
            poller.register(d, zmq.POLLIN)
        stats = msgpack.packb({"rss": 1, "served": 0, "errors": 0, "refs": 0, "sessions": 0, "running": 0})
        beats = [0, 0, 0]
        answers: list[tuple[float, zmq.Socket[bytes]]] = []  # (when, to whom)

        def serve(until: float) -> None:
            while (now := time.monotonic()) < until:
                for when, d in [a for a in answers if a[0] <= now]:
                    d.send_multipart([W_HEARTBEAT, stats])
                    answers.remove((when, d))
                wait = min([until, *(when for when, _ in answers)]) - now
                for d, _ in poller.poll(max(1, math.ceil(wait * 1000))):
                    i = dealers.index(d)
                    if d.recv_multipart()[0] == B_HEARTBEAT:
                        beats[i] += 1
                        answers.append((time.monotonic() + 0.015 * i, d))

        serve(time.monotonic() + 1.0)  # settled: the registrations' traffic is over
        before, rounds_before = _voluntary_switches(broker.pid), beats[0]
        serve(time.monotonic() + 5.0)
        woke, rounds = _voluntary_switches(broker.pid) - before, beats[0] - rounds_before
        assert rounds >= 8 and min(beats) >= beats[0] - 1  # every worker heard each round
        assert woke <= 2.5 * rounds, f"the routing thread woke {woke} times in {rounds} heartbeat rounds"
        assert len(stack.workers("p")) == 3
    finally:
        for d in dealers:
            d.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_the_turn_whose_sleep_ends_the_wait_for_the_answers_reads_them() -> None:
    """The broker's routing thread sleeps through the workers' answers to a heartbeat round until
    the answers' wait ends, and reads them in the turn that wakes then: one more turn (a poll that
    finds them ready at once) would cost a third turn a round. The broker's shell in this thread
    over inproc sockets, a worker's DEALER beside it that answers each round at once."""
    from broker.broker import Broker
    from broker.settings import parse

    ctx: zmq.Context[Any] = zmq.Context()
    tag = f"{os.getpid()}-{id(ctx):x}"
    options = parse(["--frontend", f"inproc://dxi-f-{tag}", "--backend", f"inproc://dxi-b-{tag}", "--pool",
                     "p:strict_queue", "--checkpoints", "", "--heartbeat", "1.0", "--liveness", "5"])
    broker = Broker(options, ctx)
    broker.bind()
    wid = b"w" * 32
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.setsockopt(zmq.ROUTING_ID, wid)
    worker.connect(options.backend)
    worker.send_multipart([W_READY, msgpack.packb({"pool": "p", "pid": 1, "host": "elsewhere", "capacity": 1,
                                                   "running": 0, "version": PROTOCOL_VERSION,
                                                   "incarnation": wid.decode()})])
    try:
        deadline = time.monotonic() + 30
        while wid not in broker.core.workers:
            assert time.monotonic() < deadline, "the worker never registered"
            broker.turn()
        for served in range(1, 4):
            while not worker.poll(0):  # the next round
                assert time.monotonic() < deadline, "no heartbeat round"
                broker.turn()
            assert worker.recv_multipart()[0] == B_HEARTBEAT
            worker.send_multipart([W_HEARTBEAT, msgpack.packb({"rss": 1, "served": served, "errors": 0, "refs": 0,
                                                               "sessions": 0, "running": 0})])
            broker.turn()
            while time.monotonic() < broker.core.roster.answers_wait_until():
                broker.turn()
            assert broker.core.workers[wid].stats.get("served") == served, "the answer waits for one more turn"
    finally:
        broker.close()
        worker.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_a_worker_answers_the_brokers_heartbeats_without_returning_to_its_loop(short_tmp: str) -> None:
    """The link answers the broker's heartbeat itself. ``Link.read`` returns to the worker's loop
    only for a message for the worker: a read that handled a heartbeat waits again in the same
    call, where returning would make the loop's next read turn again (drain the socket, run the
    timers) before it waits, two turns of the main thread per heartbeat instead of one."""
    backend = f"ipc://{short_tmp}/backend.sock"
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(backend)
    delivered: list[bytes] = []
    link_ctx: zmq.Context[Any] = zmq.Context()  # its own: the link sets its zmq threads' policy before its first socket
    link = Link(link_ctx, backend, "worker-a", max_message=MAX_MESSAGE_BYTES, heartbeat_interval=0.2,
                heartbeat_liveness=25, curve_server_key=None, curve_keypair=None, ready=lambda: b"{}",
                stats=lambda: b"{}", deliver=lambda command, frames: delivered.append(command),
                held=lambda: ([], []), on_beat=lambda now: None, grace=60.0,
                timers=lambda now: 0.005)  # a read waits 5 ms at most: this thread drives it
    link.connect()
    try:
        beats, reads = 0, []
        deadline = time.monotonic() + 20
        # the broker's beat answers each of the link's: before the link's next, a read took it
        while beats < 5:
            assert time.monotonic() < deadline, f"{beats} heartbeats of the worker"
            reads.append(link.read())
            while router.poll(0):
                wid, command, *_ = router.recv_multipart()
                if command in (W_READY, W_HEARTBEAT):
                    beats += command == W_HEARTBEAT
                    router.send_multipart([wid, B_HEARTBEAT])
        assert not any(reads), "a read that handled only heartbeats returned to the worker's loop"
        router.send_multipart([wid, B_RELEASE_SESSION, b"s-1"])
        while not link.read():  # a message for the worker ends the read
            assert time.monotonic() < deadline, "the worker's message was never read"
        assert delivered == [B_RELEASE_SESSION]
    finally:
        link.close()
        link_ctx.destroy(0)
        router.close(0)
        ctx.term()


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_heartbeats_rss_is_read_from_a_file_kept_open_which_user_code_may_close(tmp_path: Any) -> None:
    """Each heartbeat carries the worker's RSS, read with one pread of /proc/self/statm opened
    at the worker's start (one opened at its first heartbeat would look leaked by the calls that
    ran meanwhile). User code that closes the descriptor, its number then another file's, does not
    make the heartbeat wrong or fail: the file is opened again."""
    rss = _Rss()
    opened = sorted(os.listdir("/proc/self/fd"))
    assert abs(rss() - _vm_rss()) < 4 << 20
    assert sorted(os.listdir("/proc/self/fd")) == opened, "the first read opened a descriptor"
    os.close(rss._fd)
    other = tmp_path / "other"
    other.write_text("one-word")
    with open(other) as taken:  # the lowest free number: the one just closed
        assert taken.fileno() == rss._fd
        assert abs(rss() - _vm_rss()) < 4 << 20
        assert rss._fd != taken.fileno()


def _io_threads(pid: int) -> dict[int, str]:
    """The zmq threads of process ``pid`` (``ZMQbg/IO/0``, ``ZMQbg/Reaper``), by thread id."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            comm = f.read().strip()
        if comm.startswith("ZMQbg/"):
            found[int(tid)] = comm
    return found


def _policies(pid: int) -> dict[str, int]:
    return {comm: os.sched_getscheduler(tid) for tid, comm in _io_threads(pid).items()}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.timeout(60)
def test_the_zmq_threads_run_as_batch_threads_while_no_call_comes_and_as_ordinary_ones_while_calls_do(
        stack: Stack) -> None:
    """Each heartbeat wakes the zmq I/O threads of both ends; as ordinary threads they preempted
    the thread running on their core (the process's own routing or main thread, most often, or
    another program's), ~5 wake-ups/s of an idle stack of 6 workers. As SCHED_BATCH threads they
    run at once on an idle core, else when that thread yields; but under load that costs a call's
    every hop up to a scheduler slice, so they are batch only while no call comes. The routing
    thread and the worker's main thread keep the ordinary policy throughout."""
    stack.heartbeat = 0.5
    broker = stack.start_broker("p:strict_queue")
    worker = stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    pids = (broker.pid, worker.pid)
    for pid in pids:
        assert "ZMQbg/IO/0" in _io_threads(pid).values()
    batch = {pid: dict.fromkeys(_io_threads(pid).values(), os.SCHED_BATCH) for pid in pids}
    wait_for(lambda: all(_policies(pid) == batch[pid] for pid in pids), 10, 0.05, "batch zmq threads, idle")
    calling = threading.Event()
    stop = threading.Event()

    def call_on() -> None:
        with dspex.connect(stack.frontend, timeout=10) as c, c.session("p") as s:
            while not stop.is_set():
                s.call("os", "getpid")
                calling.set()

    caller = threading.Thread(target=call_on, daemon=True)
    caller.start()
    try:
        assert calling.wait(10)
        deadline = time.monotonic() + 1.5  # three heartbeat rounds of calls
        while time.monotonic() < deadline:
            for pid in pids:
                assert set(_policies(pid).values()) == {os.SCHED_OTHER}
                assert os.sched_getscheduler(pid) == os.SCHED_OTHER
            time.sleep(0.02)
    finally:
        stop.set()
        caller.join(10)
    wait_for(lambda: all(_policies(pid) == batch[pid] for pid in pids), 10, 0.05, "batch zmq threads, idle again")
    for pid in pids:
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
