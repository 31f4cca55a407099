"""The broker's routing core, table-driven, without sockets or processes (milliseconds each).

A recording port stands in for the shell (dramatiq's StubBroker idea): events go in through the
core's public API as the frames a socket would deliver, on a fake clock the test moves; actions
come out as what the core asked its port to do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import pytest
import zmq

from broker.core import Core
from broker.ops import HANDLERS, status
from broker.port import WorkerUnreachable
from broker.state import Tombstones
from dspex.stack.health import State, Verdict, facts_from_status, pool_state
from dspex.stack.pools import parse_pool_spec
from dspex.wire.headers import (
    RequestEnvelope,
    RequestHeader,
    pack_reply_envelope,
    pack_reply_header,
    unpack_request_envelope,
    unpack_request_header,
)
from dspex.wire.protocol import (
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_SYNC,
    CANCEL_SESSION_CLOSED,
    PROTOCOL_VERSION,
    RECEIVED_WINDOW,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_HELD,
    W_READY,
    W_REPLY,
    SessionMode,
)

pytestmark = pytest.mark.timeout(10)


START = 1000.0  # the fake clock's reading when a core starts (monotonic seconds)
HEARTBEAT = 0.25


class RecordingPort:
    """The core's port: records what the core asks for."""

    def __init__(self) -> None:
        self.sender = b""  # the client whose message is being delivered
        self.to_workers: list[tuple[bytes, list[bytes]]] = []
        self.to_clients: list[list[bytes]] = []
        self.unreachable: set[bytes] = set()
        self.owners: dict[bytes, str] = {}  # client id -> identity (its CURVE key)
        self.stopped: list[tuple[int, str]] = []  # processes stopped hard: (pid, host)
        self.gone: list[bytes] = []  # workers whose connection the shell may forget
        self.exited: set[int] = set()  # worker pids the shell knows have exited
        self.jobs: list[Any] = []  # checkpoint store jobs (tests/test_core_durable.py runs them)
        self.logs: list[tuple[int, str]] = []  # the broker log's records: (level, text)
        self.renewed = True  # a worker's READY comes on another connection than its last one

    def to_client(self, frames: list[Any]) -> None:
        self.to_clients.append([bytes(f) for f in frames])

    def to_worker(self, wid: bytes, frames: list[Any]) -> None:
        if wid in self.unreachable:
            raise WorkerUnreachable()
        self.to_workers.append((wid, [bytes(f) for f in frames]))

    def client_identity(self, frame: Any) -> str:
        return self.owners.get(self.sender, "")

    def client_seen(self, client: bytes, frame: Any) -> None:
        pass

    def worker_connected(self, wid: bytes, frame: Any) -> bool:
        return self.renewed

    def worker_gone(self, wid: bytes) -> None:
        self.gone.append(wid)

    def process_exited(self, pid: int, host: str) -> bool:
        return pid in self.exited

    def stop_process(self, pid: int, host: str) -> None:
        self.stopped.append((pid, host))

    def log(self, level: int, message: str, *args: Any) -> None:
        self.logs.append((level, message % args))

    def store(self, job: Any) -> None:
        self.jobs.append(job)


class StubCore:
    """A core on a fake clock with a recording port, and the events a test sends it. Reads of
    anything else (``workers``, ``pools``...) are the core's."""

    def __init__(self, *specs: str) -> None:
        self.t = START
        self.wall_offset = 1e9  # wall-clock time minus self.t
        self.port = RecordingPort()
        self.core = Core([parse_pool_spec(s) for s in specs], self.port, HANDLERS, now=self.t, heartbeat_interval=HEARTBEAT,
                         heartbeat_liveness=3, wall=lambda: self.t + self.wall_offset)
        self.silent: set[bytes] = set()  # workers that stopped heartbeating (a vanished host)
        self.next_beat = START + HEARTBEAT  # when the workers heartbeat next
        self.ticks: list[float] = []  # when the core ticked
        self.to_workers, self.to_clients = self.port.to_workers, self.port.to_clients
        self.unreachable, self.owners = self.port.unreachable, self.port.owners

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    # -- events ------------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        self.advance_to(self.t + seconds)

    def advance_to(self, end: float) -> None:
        """Move the clock as the shell would: the core ticks when its next deadline comes, and
        every live worker heartbeats each interval (PPP)."""
        while True:
            beat = self.next_beat if self.next_beat > self.t else self.t + HEARTBEAT
            due = self.core.next_deadline()
            self.t = min(end, beat, max(due, self.t))
            if self.t == beat:
                self.next_beat = beat + HEARTBEAT
                for wid in list(self.workers):
                    if wid not in self.silent:
                        self.say(wid, W_HEARTBEAT)
            if self.t >= self.core.next_deadline():
                self.ticks.append(self.t)
                self.core.tick(self.t)
            if self.t >= end:
                return

    def ready(self, wid: bytes, pool: str, capacity: int = 1, running: int = 0,
              version: int = PROTOCOL_VERSION, started: float | None = None, age: float | None = None) -> None:
        info: dict[str, Any] = {"pool": pool, "pid": 4242, "host": "elsewhere", "capacity": capacity,
                                "running": running, "version": version}
        if started is not None:  # its process's start, wall clock
            info["started"] = started
        if age is not None:  # its process's age, by its own clock
            info["age"] = age
        self.core.on_worker_frames([zmq.Frame(wid), zmq.Frame(W_READY), zmq.Frame(msgpack.packb(info))], self.t)

    def request(self, client: bytes, req_id: int, pool: str, session: str = "", op: str = "call",
                timeout_ms: int = 0, body: bytes = b"payload") -> None:
        self.port.sender = client
        header = RequestHeader(op, req_id, pool, session, "", timeout_ms, 0).pack()
        self.core.on_client_frames([zmq.Frame(client), zmq.Frame(header), zmq.Frame(body)], self.t)

    def admin(self, client: bytes, op: str, **args: Any) -> Any:
        self.port.sender = client
        header = RequestHeader(op, 999, "", "", "", 0, 0).pack()
        self.core.on_client_frames([zmq.Frame(client), zmq.Frame(header), zmq.Frame(msgpack.packb(args))], self.t)
        status, _, _, _ = msgpack.unpackb(self.to_clients[-1][1])
        body = msgpack.unpackb(self.to_clients[-1][2])
        return body if status == "ok" else ("error", body["code"])

    def reply(self, wid: bytes, client: bytes, req_id: int, status: str = "ok") -> None:
        self.backend(wid, pack_reply_envelope(W_REPLY, status, req_id, client), pack_reply_header(status, req_id), b"result")

    def say(self, wid: bytes, command: bytes) -> None:
        self.backend(wid, command)

    def backend(self, wid: bytes, *frames: bytes) -> None:
        self.core.on_worker_frames([zmq.Frame(wid), *(zmq.Frame(f) for f in frames)], self.t)

    def client_gone(self, client: bytes) -> None:
        """Its connection closed (what the shell's socket monitor reports)."""
        self.core.client_gone(client, self.t)

    def crash(self, wid: bytes) -> None:
        """Its connection closed without a goodbye (what the shell's socket monitor reports)."""
        self.core.worker_lost(wid, self.t)

    # -- actions -----------------------------------------------------------------------------
    def requests(self) -> list[tuple[bytes, RequestEnvelope, int]]:
        """(worker, request envelope, req_id) of every request sent to a worker, in order."""
        return [(wid, unpack_request_envelope(f[0]), unpack_request_header(f[1]).req_id)
                for wid, f in self.to_workers if len(f[0]) > 1]

    def dispatched(self) -> list[tuple[bytes, bytes, int]]:
        """(worker, client, req_id) of every request sent to a worker, in order."""
        return [(wid, head.client, req_id) for wid, head, req_id in self.requests()]

    def worker_of(self, req_id: int) -> bytes | None:
        found = [wid for wid, _, rid in self.dispatched() if rid == req_id]
        return found[-1] if found else None

    def outcome(self, client: bytes, req_id: int) -> str | None:
        """"ok", an error code, or None (no answer yet)."""
        for frames in self.to_clients:
            if frames[0] != client:
                continue
            status, rid = msgpack.unpackb(frames[1])[:2]
            if rid == req_id:
                if status == "ok" or frames[2] == b"result":  # a worker's reply (the stub's body)
                    return status
                return str(msgpack.unpackb(frames[2])["code"])
        return None

    def released(self, session: str) -> set[bytes]:
        return {wid for wid, f in self.to_workers if f[0] == B_RELEASE_SESSION and f[1] == session.encode()}


C = b"client-1"
A, B = b"worker-a", b"worker-b"


def two_workers(spec: str, capacity: int = 1) -> StubCore:
    core = StubCore(spec)
    core.ready(A, "p", capacity)
    core.ready(B, "p", capacity)
    return core


# -- the affinity table, row by row ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strict_queue", "strict_fail_fast", "hint"])
def test_new_sessions_go_to_the_least_loaded_worker_and_idle_runs_there(mode: str) -> None:
    core = two_workers(f"p:{mode}")
    core.request(C, 1, "p", "s1")
    core.reply(core.worker_of(1) or b"", C, 1)
    core.request(C, 2, "p", "s2")
    assert core.worker_of(1) != core.worker_of(2)
    core.reply(core.worker_of(2) or b"", C, 2)
    core.request(C, 3, "p", "s1")
    assert core.worker_of(3) == core.worker_of(1)


@pytest.mark.parametrize("mode, busy_outcome, runs_on", [
    ("strict_queue", None, "pinned"),  # waits in the pinned worker's queue, then runs there
    ("strict_fail_fast", "worker_busy", None),
    ("hint", "running", "other"),  # any idle worker
])
def test_pinned_worker_busy(mode: str, busy_outcome: str | None, runs_on: str | None) -> None:
    core = two_workers(f"p:{mode}")
    core.request(C, 1, "p", "s")
    pinned = core.worker_of(1)
    core.request(C, 2, "p", "s")
    if busy_outcome == "worker_busy":
        assert core.outcome(C, 2) == "worker_busy"
        return
    if runs_on == "other":
        assert core.worker_of(2) not in (None, pinned)
        return
    assert core.worker_of(2) is None and core.outcome(C, 2) is None  # queued
    assert core.pools["p"].queued == 1
    core.reply(pinned or b"", C, 1)
    assert core.worker_of(2) == pinned and core.pools["p"].queued == 0


@pytest.mark.parametrize("mode, outcome", [
    ("strict_queue", "session_worker_unavailable"),
    ("strict_fail_fast", "session_worker_unavailable"),
    ("hint", "repinned"),
])
def test_pinned_worker_gone(mode: str, outcome: str) -> None:
    core = two_workers(f"p:{mode}")
    core.request(C, 1, "p", "s")
    pinned = core.worker_of(1) or b""
    core.reply(pinned, C, 1)
    core.crash(pinned)
    core.request(C, 2, "p", "s")
    if outcome == "repinned":
        assert core.worker_of(2) not in (None, pinned)
        assert core.sessions["s"].worker == core.worker_of(2)
    else:
        assert core.outcome(C, 2) == outcome
        core.request(C, 3, "p", "s")  # and it stays so: no silent re-pin
        assert core.outcome(C, 3) == outcome


def test_none_runs_anywhere_and_keeps_no_session() -> None:
    core = two_workers("p:none")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")  # the same session's calls run at once on both workers
    assert {core.worker_of(1), core.worker_of(2)} == {A, B}
    assert "s" not in core.sessions
    heads = [head for _, head, _ in core.requests()]
    assert heads and all(head.session_mode == SessionMode.EPHEMERAL for head in heads)


def test_queue_bound_unknown_pool_and_queue_timeout() -> None:
    core = StubCore("p:strict_queue:queue_max=1,queue_timeout=5")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")
    core.request(C, 3, "p", "s")
    assert core.outcome(C, 3) == "pool_saturated"
    core.request(C, 4, "nope", "s")
    assert core.outcome(C, 4) == "pool_not_found"
    core.advance(4.9)
    assert core.outcome(C, 2) is None
    core.advance(0.2)
    assert core.outcome(C, 2) == "queue_timeout"


def test_cancel_takes_a_queued_request_out_and_goes_to_the_worker_of_a_running_one() -> None:
    core = StubCore("p:strict_queue:prefetch=0")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")  # queued behind 1
    core.request(C, 2, "p", "s", op="cancel", body=msgpack.packb(0))
    assert core.outcome(C, 2) == "cancelled" and core.pools["p"].queued == 0
    core.request(C, 1, "p", "s", op="credit", body=msgpack.packb(32))
    core.request(C, 1, "p", "s", op="credit", body=b"\xc1")  # garbage: counted, not forwarded
    core.request(C, 1, "p", "s", op="cancel", body=msgpack.packb(0))
    control = [f for wid, f in core.to_workers if wid == A and f[0] in (B_CREDIT, B_CANCEL)]
    assert control == [[B_CREDIT, C, msgpack.packb([1, 32])], [B_CANCEL, C, msgpack.packb([1, 0])]]
    assert core.counters["garbage_frontend"] == 1
    core.reply(A, C, 1, "err")
    assert core.pools["p"].outcomes[("call", "cancelled")] == 2, "its error reply counts as cancelled too"
    core.request(C, 1, "p", "s", op="cancel", body=msgpack.packb(0))  # already answered: dropped
    assert len([f for _, f in core.to_workers if f[0] == B_CANCEL]) == 1


def budget_of(core: StubCore, req_id: int) -> tuple[int, int]:
    heads = [head for _, head, rid in core.requests() if rid == req_id]
    return heads[-1].call_ms, heads[-1].queue_ms


def test_prefetch_sends_a_pinned_request_ahead_behind_short_calls_with_its_queue_deadline() -> None:
    core = StubCore("p:strict_queue:queue_timeout=5,prefetch=1")
    core.ready(A, "p")
    core.request(C, 1, "p", "s1")
    assert core.worker_of(1) == A
    core.request(C, 2, "p", "s2")
    assert core.worker_of(2) is None  # no reply seen from A yet: nothing is known to be short
    core.reply(A, C, 1)  # A answered fast: 2 goes at once, and 3 may be sent ahead of 2's reply
    assert core.worker_of(2) == A
    core.request(C, 3, "p", "s3")
    assert core.worker_of(3) == A and core.outcome(C, 3) is None
    _call_ms, queue_ms = budget_of(core, 3)
    assert 4000 < queue_ms <= 5000  # what is left of its queue time: the worker enforces it
    core.request(C, 4, "p", "s4")
    assert core.worker_of(4) is None  # one ahead at most (prefetch=1)
    core.reply(A, C, 2)  # 3 runs now; 4 is sent ahead of 3's reply
    assert core.worker_of(4) == A
    worker = core.admin(C, "status")["pools"]["p"]["workers"][0]
    assert (worker["inflight"], worker["queued"]) == (1, 1)  # 4 waits at the worker: it counts as queued
    assert core.admin(C, "status")["pools"]["p"]["queued"] == 1


def test_prefetch_default_depth_sends_up_to_four_ahead() -> None:
    core = StubCore("p:strict_queue")
    assert core.pools["p"].config.prefetch == 4
    core.ready(A, "p")
    core.request(C, 1, "p", "s1")
    core.reply(A, C, 1)  # a short call: A may be sent requests ahead of its replies
    for rid in range(2, 8):
        core.request(C, rid, "p", f"s{rid}")
    assert [core.worker_of(rid) for rid in range(2, 8)] == [A] * 5 + [None]  # running + 4 ahead; the 6th waits
    assert core.admin(C, "status")["pools"]["p"]["queued"] == 5  # 4 prefetched + 1 in the broker


def test_prefetched_requests_count_against_queue_max() -> None:
    core = StubCore("p:strict_queue:queue_max=1")
    core.ready(A, "p")
    core.request(C, 1, "p", "s1")
    core.reply(A, C, 1)
    core.request(C, 2, "p", "s1")
    core.request(C, 3, "p", "s2")
    assert core.worker_of(3) == A  # sent ahead: the pool's one queue place is taken
    core.request(C, 4, "p", "s3")
    assert core.outcome(C, 4) == "pool_saturated"


def test_no_prefetch_behind_a_long_call_in_fail_fast_pools_or_when_off() -> None:
    core = StubCore("p:strict_queue", "f:strict_fail_fast", "o:strict_queue:prefetch=0")
    for wid, pool in ((A, "p"), (B, "f"), (b"worker-o", "o")):
        core.ready(wid, pool)
    rid = 0
    for pool, session in (("p", "sp"), ("f", "sf"), ("o", "so")):
        rid += 1
        core.request(C, rid, pool, session)
        core.reply(core.worker_of(rid) or b"", C, rid)  # a short call: prefetch would be allowed
        core.request(C, rid + 1, pool, session)
        rid += 2
        core.request(C, rid, pool, session + "2")  # the worker is busy with rid + 1
    assert core.worker_of(3) == A  # strict_queue: sent ahead
    assert core.outcome(C, 6) == "worker_busy"  # strict_fail_fast: busy means busy
    assert core.worker_of(9) is None  # prefetch=0: waits in the broker
    core.advance(0.5)
    core.reply(A, C, 2)  # A's last call took long: no more prefetch
    core.request(C, 10, "p", "sp3")
    assert core.worker_of(10) is None


def test_a_request_dispatched_past_its_queue_deadline_times_out_in_the_broker() -> None:
    core = StubCore("p:strict_queue:queue_timeout=5,prefetch=0")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")
    core.t += 6  # it waited 6 s, and the reply comes in before the clock's tick
    core.reply(A, C, 1)
    assert core.outcome(C, 2) == "queue_timeout" and core.worker_of(2) is None


def test_a_session_of_another_pool_is_a_usage_error() -> None:
    core = StubCore("p:strict_queue", "q:strict_queue")
    core.ready(A, "p")
    core.ready(B, "q")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "q", "s")
    assert core.outcome(C, 2) == "session_pool_mismatch"


def test_sessionless_call_whose_worker_vanished_is_routed_again() -> None:
    core = two_workers("p:strict_queue")
    core.unreachable.add(A)
    core.unreachable.add(B)
    core.request(C, 1, "p")
    assert core.outcome(C, 1) is None and core.pools["p"].queued == 1  # both gone: it waits
    core.unreachable.clear()
    core.ready(b"worker-c", "p")
    assert core.worker_of(1) == b"worker-c"


@pytest.mark.timeout(10)
def test_a_worker_found_gone_while_fed_from_the_pool_queue_is_fed_no_more() -> None:
    # its reply frees its slot, the pool's queue gives it the next call, the send finds its
    # connection gone: the call goes back to the pool's queue, and the gone worker must not take
    # it again (it did, forever: the broker hung)
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p")
    core.request(C, 2, "p")  # sessionless, the only worker busy: it waits in the pool's queue
    assert core.worker_of(1) == A and core.pools["p"].queued == 1
    core.unreachable.add(A)
    core.reply(A, C, 1)
    assert A not in core.workers and core.outcome(C, 2) is None and core.pools["p"].queued == 1
    core.ready(B, "p")
    assert core.worker_of(2) == B


# -- a client whose connection closed ----------------------------------------------------------
D = b"client-2"


def cancels(core: StubCore) -> list[tuple[bytes, bytes, list[int]]]:
    """(worker, client, [req_id, n]) of every cancel sent to a worker."""
    return [(wid, f[1], msgpack.unpackb(f[2])) for wid, f in core.to_workers if f[0] == B_CANCEL]


def test_a_client_gone_has_its_running_calls_cancelled_and_its_queued_ones_dropped() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p", "s1")  # runs on A
    core.request(C, 2, "p", "s1")  # waits behind it
    core.request(D, 1, "p", "s2")  # another client's, pinned to A too: waits
    core.client_gone(C)
    assert cancels(core) == [(A, C, [1, 0])]
    assert core.pools["p"].queued == 1 and core.outcome(C, 2) is None  # dropped unanswered: nobody reads
    core.reply(A, C, 1, "error")  # the worker stopped the call: its slot frees
    assert core.dispatched() == [(A, C, 1), (A, D, 1)], "request 2 of the gone client never runs"
    assert core.pools["p"].outcomes == {("call", "cancelled"): 2}
    core.client_gone(C)  # again (it reconnected and left once more): nothing left to cancel
    assert len(cancels(core)) == 1


@pytest.mark.parametrize("spec", ["p:none", "p:hint"])
def test_a_client_gone_leaves_other_clients_alone_in_every_queue(spec: str) -> None:
    """Calls running at once on a capacity-2 worker and waiting in the pool's queue: only the gone
    client's are cancelled or dropped."""
    core = StubCore(spec)
    core.ready(A, "p", capacity=2)
    core.request(C, 1, "p", "s1")
    core.request(D, 1, "p", "s2")
    core.request(C, 2, "p", "s3")  # no free slot: the pool's queue
    core.request(D, 2, "p", "s4")
    core.client_gone(C)
    assert cancels(core) == [(A, C, [1, 0])]
    core.reply(A, C, 1, "error")
    core.reply(A, D, 1)
    assert [(c, r) for _, c, r in core.dispatched()] == [(C, 1), (D, 1), (D, 2)]
    assert core.outcome(D, 1) == "ok" and core.pools["p"].queued == 0


# -- lifecycle rules ----------------------------------------------------------------------------
def test_idle_time_counts_from_the_end_of_the_last_call() -> None:
    core = StubCore("p:strict_queue:session_ttl=1")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.advance(50)  # a call longer than the TTL
    assert "s" in core.sessions, "a running call never expires its session"
    core.reply(A, C, 1)
    core.advance(0.5)
    assert "s" in core.sessions, "idle for less than the TTL since the call ended"
    core.advance(1.5)
    assert "s" not in core.sessions and core.released("s") == {A}
    core.request(C, 2, "p", "s")
    assert core.outcome(C, 2) == "session_closed"


def test_closed_session_answers_session_closed_never_a_fresh_namespace() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.reply(A, C, 1)
    assert core.admin(C, "close_session", session="s") == {"closed": True, "released": True}
    assert core.released("s") == {A}
    core.request(C, 2, "p", "s")
    assert core.outcome(C, 2) == "session_closed"
    assert "s" not in core.sessions


def test_tombstones_are_bounded() -> None:
    closed = Tombstones(limit=10)
    for i in range(25):
        closed.add(f"s{i}", "was closed")
    assert len(closed) == 10 and closed.get("s24") and closed.get("s0") is None


def test_release_goes_to_every_worker_a_hint_session_touched() -> None:
    core = two_workers("p:hint")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")  # pinned worker busy: runs on the other one
    assert {core.worker_of(1), core.worker_of(2)} == {A, B}
    core.reply(core.worker_of(1) or b"", C, 1)
    core.reply(core.worker_of(2) or b"", C, 2)
    core.admin(C, "close_session", session="s")
    assert core.released("s") == {A, B}


def test_close_while_a_call_runs_cancels_it_releases_after_it_and_drops_queued_calls() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.request(C, 2, "p", "s")  # queued behind call 1
    core.request(D, 1, "p", "t")  # another session's: runs on
    core.admin(C, "close_session", session="s")
    assert cancels(core) == [(A, C, [1, CANCEL_SESSION_CLOSED])], "the session's running call is cancelled on its worker"
    assert core.released("s") == set(), "never released under a running call"
    assert core.outcome(C, 2) == "session_closed"
    core.request(C, 3, "p", "s")
    assert core.outcome(C, 3) == "session_closed"
    core.reply(A, C, 1, "err")
    assert core.pools["p"].outcomes[("call", "cancelled")] == 1, "its error reply counts as cancelled"
    assert core.released("s") == {A}


def test_sessions_belong_to_their_client_identity() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    alice, bob = b"alice-c", b"bob-c"
    core.owners.update({alice: "ALICEKEY", bob: "BOBKEY"})
    core.request(alice, 1, "p", "s")
    core.reply(A, alice, 1)
    core.request(bob, 2, "p", "s")
    assert core.outcome(bob, 2) == "session_not_yours"
    assert core.admin(bob, "sessions") == []
    assert core.admin(bob, "close_session", session="s") == ("error", "session_not_yours")
    assert [r["id"] for r in core.admin(alice, "sessions")] == ["s"]
    core.core.admins = lambda: {"OPSKEY"}
    assert core.admin(bob, "recycle", pool="p") == ("error", "refused")
    ops = b"ops-c"
    core.owners[ops] = "OPSKEY"
    assert [(r["id"], r["owner"]) for r in core.admin(ops, "sessions")] == [("s", "ALICEKEY")], \
        "an admin sees whose session it is (dspexctl sessions list's OWNER column)"
    assert core.admin(ops, "close_session", session="s")["closed"]


def test_sessions_of_the_shared_ipc_identity_name_no_owner() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.reply(A, C, 1)
    (row,) = core.admin(C, "sessions")
    assert "owner" not in row


# -- stops, drains and recycling -----------------------------------------------------------------
@pytest.mark.parametrize("mode, unstarted", [
    ("strict_queue", "session_worker_unavailable"),  # did not run; the caller may retry
    ("none", "rerouted"),
])
def test_goodbye_hands_back_what_never_ran(mode: str, unstarted: str) -> None:
    core = two_workers(f"p:{mode}", capacity=2)
    core.request(C, 1, "p", "s1")
    victim = core.worker_of(1) or b""
    core.say(victim, W_DRAIN)
    assert core.workers[victim].draining
    core.say(victim, W_DISCONNECT)  # a clean goodbye with call 1 unanswered: it never started
    assert victim not in core.workers and core.pools["p"].crashes == 0
    if unstarted == "rerouted":
        assert core.worker_of(1) not in (None, victim)
    else:
        assert core.outcome(C, 1) == unstarted
    assert [e["event"] for e in core.roster.events][-1] == "exit"


def test_a_connection_lost_without_goodbye_is_a_crash() -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    core.crash(core.worker_of(1) or b"")
    assert core.outcome(C, 1) == "worker_crashed" and core.pools["p"].crashes == 1


def test_heartbeats_go_out_every_interval_and_a_silent_worker_is_dropped_after_liveness_intervals() -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    silent = core.worker_of(1) or b""
    other = B if silent == A else A
    core.silent.add(silent)  # a host gone without closing its connection: only heartbeats tell
    core.advance(HEARTBEAT * 3)
    assert silent in core.workers and core.outcome(C, 1) is None, "silent for interval × liveness, not more"
    core.advance(HEARTBEAT)
    assert silent not in core.workers and core.outcome(C, 1) == "worker_crashed"
    assert other in core.workers
    assert core.to_workers.count((other, [B_HEARTBEAT])) == 4  # one per interval, idle or not


def test_a_broker_that_did_not_run_does_not_blame_its_workers_for_the_silence() -> None:
    """The broker process stopped (SIGSTOP, swapped out, a VM pause) past interval × liveness: its
    first tick comes before it has read the heartbeats waiting in its sockets. Its own silence is
    not the workers': none is dropped; one that really stays silent goes liveness intervals later."""
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    core.t += HEARTBEAT * 10  # nothing ran meanwhile: no tick, no heartbeat read
    core.core.tick(core.t)
    assert A in core.workers and B in core.workers and core.outcome(C, 1) is None
    core.next_beat = core.t
    silent = core.worker_of(1) or b""
    core.silent.add(silent)
    core.advance(HEARTBEAT * 5)
    assert silent not in core.workers and core.outcome(C, 1) == "worker_crashed"


def _broker_paused(core: StubCore) -> None:
    """The broker process did not run past the workers' liveness; its first tick notices."""
    core.t += HEARTBEAT * 10
    core.core.tick(core.t)
    core.next_beat = core.t


def test_a_worker_back_on_a_new_connection_after_a_broker_pause_keeps_its_sessions() -> None:
    """Each worker renewed its socket while the broker did not run: the old connection's close
    (a send finding it gone, the monitor's disconnect) is no crash. Calls wait for the same
    incarnation's READY on its new connection, then run there."""
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    w = core.worker_of(1) or b""
    core.reply(w, C, 1)
    core.unreachable.add(w)  # the first heartbeat after the pause finds its old connection gone
    _broker_paused(core)
    core.crash(w)  # and the monitor reports that connection's close
    core.request(C, 2, "p", "s")
    assert w in core.workers and core.outcome(C, 2) is None and core.worker_of(2) is None
    core.unreachable.discard(w)
    core.ready(w, "p")
    assert core.worker_of(2) == w
    core.reply(w, C, 2)
    core.advance(HEARTBEAT * 10)
    assert core.outcome(C, 2) == "ok" and w in core.workers
    assert core.pools["p"].crashes == 0 and [e["event"] for e in core.roster.events] == ["start", "start"]


def _syncs(core: StubCore, wid: bytes) -> list[bytes]:
    """The sync numbers of the B_SYNCs sent to ``wid``."""
    return [f[1] for w, f in core.to_workers if w == wid and f[0] == B_SYNC]


def _held(core: StubCore, wid: bytes, sync: bytes, held: tuple[int, ...], received: tuple[int, ...]) -> None:
    """``wid`` answers B_SYNC ``sync``: it holds requests ``held`` and received ``received`` last
    (of client C)."""
    core.backend(wid, W_HELD, sync, msgpack.packb([[C, r] for r in held]), msgpack.packb([[C, r] for r in received]))


def test_requests_a_renewed_connection_lost_fail_as_may_have_run_or_go_again_and_free_their_slots() -> None:
    """Until the broker's ROUTER let go of a worker's old connection (closed while the broker did
    not run), a request sent to the worker went there and was lost without an error. Back on a
    new connection it says which requests it holds and which it received last. One it received
    but neither holds nor answered is failed ``worker_crashed`` (its reply was lost after it
    ran) and its slot is free; its session stays on the worker. One it never received is sent
    again. One it holds runs on; one answered meanwhile is answered once."""
    core = StubCore("p:strict_queue")
    core.ready(A, "p", capacity=4)
    for req_id in (1, 2, 3, 4):
        core.request(C, req_id, "p", "s" if req_id == 1 else "")
    assert [rid for _, _, rid in core.dispatched()] == [1, 2, 3, 4]
    core.ready(A, "p")  # its re-READY on the new connection
    assert len(_syncs(core, A)) == 1
    core.reply(A, C, 3)  # answered before its answer to the sync
    _held(core, A, _syncs(core, A)[0], (2,), (1, 2, 3))
    assert core.outcome(C, 1) == "worker_crashed" and core.outcome(C, 2) is None
    assert [f[0] for f in core.to_clients].count(C) == 2  # 1 failed, 3 answered: each once
    assert [rid for _, _, rid in core.dispatched()] == [1, 2, 3, 4, 4]  # 4 never reached it: sent again
    assert set(core.workers[A].inflight) == {(C, 2), (C, 4)} and A in core.workers
    assert core.sessions["s"].worker == A and core.pools["p"].crashes == 0
    core.request(C, 5, "p", "s")  # the session goes on on its worker, in the freed slot
    assert core.worker_of(5) == A
    for req_id in (2, 4, 5):
        core.reply(A, C, req_id)
    assert [core.outcome(C, r) for r in (2, 3, 4, 5)] == ["ok"] * 4


@pytest.mark.parametrize("received", ["received", "not-received", "not-received-long-ago"])
def test_a_capacity_one_workers_session_is_not_wedged_by_a_request_its_old_connection_lost(received: str) -> None:
    """Request 1 of a session, on a capacity-1 worker, is lost with its old connection; 2 waits
    for its slot. Received there, 1 may have run: ``worker_crashed``; not received, it never
    ran and goes again, first; unless the worker was sent too many requests since for its
    window of received ones to say."""
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.ready(A, "p")
    core.request(C, 2, "p", "s")  # waits for the slot request 1 holds
    assert core.worker_of(2) is None
    if received == "not-received-long-ago":
        core.workers[A].sent += RECEIVED_WINDOW
    _held(core, A, _syncs(core, A)[0], (), (1,) if received == "received" else ())
    if received == "not-received":
        assert core.outcome(C, 1) is None and [rid for _, _, rid in core.dispatched()] == [1, 1]
        core.reply(A, C, 1)
        assert core.outcome(C, 1) == "ok"
    else:
        assert core.outcome(C, 1) == "worker_crashed"
    assert core.worker_of(2) == A


def test_only_a_re_ready_on_a_new_connection_with_calls_in_flight_asks_and_only_its_last_ask_counts() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p", capacity=2)
    core.ready(A, "p")  # nothing in flight: nothing to ask
    core.request(C, 1, "p")
    core.port.renewed = False
    core.ready(A, "p")  # on the same connection (after B_REREGISTER): nothing was lost
    assert _syncs(core, A) == []
    core.port.renewed = True
    core.ready(A, "p")
    core.ready(A, "p")  # renewed again before it answered the first ask
    first, last = _syncs(core, A)
    _held(core, A, first, (), (1,))  # the first ask's answer, read late: not this connection's
    assert core.outcome(C, 1) is None
    _held(core, A, last, (1,), (1,))
    core.reply(A, C, 1)
    assert core.outcome(C, 1) == "ok"


def _away_after_a_pause() -> tuple[StubCore, bytes]:
    """Two workers; the one that ran a session's call lost its connection while the broker did
    not run: it is away, waited for on a new connection."""
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    w = core.worker_of(1) or b""
    core.reply(w, C, 1)
    core.unreachable.add(w)
    _broker_paused(core)
    core.crash(w)
    return core, w


def test_a_heartbeat_read_late_from_an_away_workers_old_connection_does_not_cut_its_wait() -> None:
    """After a pause the broker reads what the old connection still held (a heartbeat sent
    before the worker gave the broker up) after that connection's loss: the worker is still
    waited for its renewal wait, not one silence limit from that heartbeat."""
    core, w = _away_after_a_pause()
    assert core.workers[w].away
    core.say(w, W_HEARTBEAT)  # from the old connection, read late
    core.silent.add(w)
    core.advance(HEARTBEAT * 6)  # twice a silence limit, within the renewal wait
    assert w in core.workers and core.pools["p"].crashes == 0
    core.silent.discard(w)
    core.unreachable.discard(w)
    core.ready(w, "p")
    assert not core.workers[w].away and core.pools["p"].crashes == 0


def test_an_away_worker_is_shown_away_and_its_pool_degraded_until_it_is_back() -> None:
    """The operator's view of a worker waited for on a new connection: not ``ready`` (it may be
    gone), and the pool's health says how many are away and that their sessions' calls wait."""
    core, w = _away_after_a_pause()

    def view() -> tuple[dict[bytes, str], Verdict]:
        pool = status(core.core, core.t)["pools"]["p"]
        states = {x.id: pool_w["state"] for x in core.pools["p"].workers.values() for pool_w in pool["workers"]
                  if pool_w["incarnation"] == x.incarnation}
        up = sum(1 for x in pool["workers"] if x["state"] in ("ready", "busy"))
        return states, pool_state("p", facts_from_status(pool, expected=2, up=up))

    states, verdict = view()
    assert states[w] == "away" and set(states.values()) == {"away", "ready"}
    assert verdict.state == State.DEGRADED
    assert verdict.reasons == [("p has 1/2 workers ready; 1 away (connection lost, waited for on a new one; "
                                "its sessions' calls wait)")]
    core.unreachable.discard(w)
    core.ready(w, "p")
    states, verdict = view()
    assert set(states.values()) == {"ready"} and verdict.state == State.OK


def test_a_call_whose_send_finds_the_connection_renewed_after_a_broker_pause_waits_for_the_worker() -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    w = core.worker_of(1) or b""
    core.reply(w, C, 1)
    core.t += HEARTBEAT * 10  # the broker did not run; the first thing it reads after is a call
    core.unreachable.add(w)  # whose send finds the old connection gone, before any tick
    core.request(C, 2, "p", "s")
    core.request(C, 3, "p", "s")
    assert w in core.workers and core.outcome(C, 2) is None and core.worker_of(2) is None
    core.unreachable.discard(w)
    core.ready(w, "p")
    assert [rid for wid, _, rid in core.dispatched() if rid > 1] == [2, 3]  # in order, on w (3 prefetched)
    assert core.worker_of(2) == core.worker_of(3) == w
    core.reply(w, C, 2)
    core.reply(w, C, 3)
    assert core.outcome(C, 2) == core.outcome(C, 3) == "ok" and core.pools["p"].crashes == 0


@pytest.mark.parametrize("ticked", [True, False], ids=["lost-after-its-tick", "lost-before-its-tick"])
def test_a_worker_that_died_while_the_broker_did_not_run_is_a_crash_a_liveness_later(ticked: bool) -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    w = core.worker_of(1) or b""
    other = B if w == A else A
    if ticked:
        _broker_paused(core)
        core.crash(w)
    else:
        core.t += HEARTBEAT * 10
        core.crash(w)
        core.core.tick(core.t)
        core.next_beat = core.t
    core.silent.add(w)
    core.request(C, 2, "p", "s")
    # waited for up to the liveness, an interval, and its backoff (which grew through the pause)
    wait = HEARTBEAT * 3 + HEARTBEAT + HEARTBEAT * 10
    core.advance(wait - HEARTBEAT)
    assert w in core.workers and core.outcome(C, 1) is None and core.outcome(C, 2) is None
    core.advance(HEARTBEAT * 2)
    assert w not in core.workers and core.pools["p"].crashes == 1
    assert core.outcome(C, 1) == "worker_crashed" and core.outcome(C, 2) == "session_worker_unavailable"
    assert core.roster.events[-1]["why"] == "crashed (connection lost)"
    core.crash(other)  # that long after the pause, a lost connection is a crash at once
    assert other not in core.workers and core.pools["p"].crashes == 2


def test_a_worker_whose_process_exited_while_the_broker_did_not_run_is_a_crash_at_once() -> None:
    """No renewal is waited for from a process the shell knows has exited (one of its host)."""
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    w = core.worker_of(1) or b""
    _broker_paused(core)
    core.port.exited.add(core.workers[w].pid)
    core.crash(w)
    assert w not in core.workers and core.pools["p"].crashes == 1
    assert core.outcome(C, 1) == "worker_crashed"


# -- deadlines: the core says when it next has something to do --------------------------------
def test_an_idle_core_ticks_once_per_heartbeat_and_at_nothing_else() -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "s")
    core.reply(A, C, 1)
    assert core.next_deadline() == START + HEARTBEAT
    core.advance(10)
    assert core.ticks == [START + HEARTBEAT * i for i in range(1, 41)]


def test_a_queued_request_wakes_the_core_at_its_callers_deadline_or_its_queue_timeout() -> None:
    core = StubCore("p:strict_queue:queue_timeout=0.1,prefetch=0")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")  # runs
    core.request(C, 2, "p", "s", timeout_ms=60)  # waits; its caller gives up after 60 ms
    core.request(C, 3, "p", "s")  # waits; the pool's queue timeout is 100 ms
    assert core.next_deadline() == START + 0.06
    core.advance_to(START + 0.06)
    # its caller still waits (a reply grace past its timeout): it hears at once that the call never ran
    assert core.counters["expired_unsent"] == 1 and core.outcome(C, 2) == "queue_timeout"
    assert core.next_deadline() == START + 0.1
    core.advance_to(START + 0.1)
    assert core.outcome(C, 3) == "queue_timeout" and core.ticks == [START + 0.06, START + 0.1]
    assert core.next_deadline() == START + HEARTBEAT


def test_a_draining_worker_wakes_the_core_at_its_drain_deadline() -> None:
    core = StubCore("p:strict_queue:drain_timeout=0.15")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.advance_to(START + 0.05)
    core.say(A, W_DRAIN)  # stopping, with a call that does not end
    assert core.next_deadline() == START + 0.05 + 0.15
    core.advance_to(START + 0.05 + 0.15)
    assert A not in core.workers and core.port.stopped == [(4242, "elsewhere")]
    assert core.ticks == [START + 0.05 + 0.15]


def test_an_idle_session_wakes_the_core_at_its_ttl_not_before() -> None:
    core = StubCore("p:strict_queue:session_ttl=30")
    core.ready(A, "p")
    core.request(C, 1, "p", "s")
    core.advance(5)  # a 5 s call: idle time counts from its end
    core.reply(A, C, 1)
    ended = core.t
    core.advance_to(ended + 29.9)
    assert "s" in core.sessions
    core.advance_to(ended + 30)
    assert "s" not in core.sessions and core.released("s") == {A}
    assert core.t in core.ticks


def test_a_draining_worker_gets_nothing_new() -> None:
    core = two_workers("p:none")
    core.say(A, W_DRAIN)
    for i in range(4):
        core.request(C, i, "p")
        core.reply(B, C, i)
    assert {core.worker_of(i) for i in range(4)} == {B}


def test_hung_draining_worker_is_stopped_at_its_deadline_and_the_rolling_recycle_goes_on() -> None:
    core = two_workers("p:strict_queue:drain_timeout=5")
    core.request(C, 1, "p", "s")
    hung = core.worker_of(1) or b""
    other = B if hung == A else A
    core.admin(C, "recycle", pool="p", worker=hung.decode())  # the busy one first, then the other
    core.admin(C, "recycle", pool="p", worker=other.decode())
    assert core.pools["p"].recycling == hung and core.workers[hung].draining
    assert not core.workers[other].draining, "one worker of a pool at a time"
    core.advance(4.9)
    assert hung in core.workers and core.outcome(C, 1) is None
    core.advance(0.2)  # past the drain deadline
    assert hung not in core.workers
    assert core.outcome(C, 1) == "worker_crashed"
    assert any(e["event"] == "recycle" and "deadline" in e["why"] for e in core.roster.events)
    assert core.port.stopped == [(4242, "elsewhere")] and (hung, [B_DISCONNECT]) in core.to_workers
    assert core.pools["p"].recycling == hung and (other, [B_DISCONNECT]) not in core.to_workers
    core.ready(b"worker-d", "p")  # its replacement: the rolling recycle goes on to the other worker
    assert core.pools["p"].recycling == other and (other, [B_DISCONNECT]) in core.to_workers


def test_a_rolling_recycle_goes_on_when_the_replacement_registers_not_at_the_next_sweep() -> None:
    core = two_workers("p:strict_queue")
    core.admin(C, "recycle", pool="p", all=True)
    first = core.pools["p"].recycling
    assert first in (A, B)
    second = B if first == A else A
    core.say(first, W_DISCONNECT)
    core.ready(b"worker-c", "p")  # no sweep in between: the READY itself moves the recycle on
    assert core.pools["p"].recycling == second and (second, [B_DISCONNECT]) in core.to_workers
    core.say(second, W_DISCONNECT)
    core.ready(b"worker-d", "p")
    # what an operator's `workers recycle --all` reads once both replacements are ready
    assert core.pools["p"].recycling is None
    assert core.admin(C, "status")["pools"]["p"]["recycling"] is None


def test_ready_reports_calls_running_for_an_earlier_broker() -> None:
    """After a broker restart the worker's READY says what it still runs: no over-dispatch."""
    core = StubCore("p:none")
    core.ready(A, "p", capacity=1, running=1)
    assert core.workers[A].state.value == "busy"
    core.request(C, 1, "p")
    assert core.worker_of(1) is None, "its only slot is taken by the earlier broker's call"
    core.reply(A, b"old-client", 77)  # that call ends (its client belonged to the old broker)
    assert core.worker_of(1) == A


@pytest.mark.parametrize("mode", ["strict_queue", "strict_queue:queue_timeout=60,prefetch=2", "strict_queue:prefetch=4",
                                  "strict_fail_fast", "hint", "none"])
def test_random_events_keep_pins_and_queue_counts_consistent(mode: str) -> None:
    """Requests, replies, crashes, goodbyes and new workers in random order: every pin is in its
    worker's session set and nowhere else, the pool's count is what its queues hold, and every
    request is answered once, running, or waiting."""
    import random

    rnd = random.Random(f"core-{mode}")
    mode, _, options = mode.partition(":")
    core = StubCore(f"p:{mode}:queue_max=50{',' + options if options else ''}")
    n_workers = 0

    def new_worker() -> None:
        nonlocal n_workers
        n_workers += 1
        # deeper prefetch: capacity-1 workers only (the only ones it applies to), so it gets deep
        core.ready(b"w%d" % n_workers, "p", capacity=1 if options else rnd.choice([1, 2]))

    for _ in range(3):
        new_worker()
    depth = core.pools["p"].config.prefetch
    deepest = 0  # requests sent ahead to one worker, at most
    sent: list[int] = []
    for req_id in range(600):
        roll = rnd.random()
        if roll < 0.5:
            core.request(C, req_id, "p", f"s{rnd.randrange(12)}" if rnd.random() < 0.9 else "")
            sent.append(req_id)
        elif roll < 0.85:
            running = [(w, key) for w in core.workers.values() for key in w.inflight]
            if running:
                w, (client, rid) = rnd.choice(running)
                core.reply(w.id, client, rid, rnd.choice(["ok", "err"]))
        elif roll < 0.9 and core.workers:
            core.crash(rnd.choice(list(core.workers)))
        elif roll < 0.94 and core.workers:
            w = rnd.choice(list(core.workers.values()))
            core.say(w.id, W_DRAIN)
            core.say(w.id, W_DISCONNECT)
        else:
            new_worker()
        pool = core.pools["p"]
        assert pool.queued == len(pool.queue) + sum(len(w.queue) for w in pool.workers.values()) + sum(
            len(q) for q in pool.awaiting.values()) + sum(  # + prefetched: waiting at their worker
            max(0, len(w.inflight) + w.adopted - w.capacity) for w in pool.workers.values())
        for w in core.workers.values():
            assert w.pinned == sum(1 for r in core.sessions.values() if r.worker == w.id)
            deepest = max(deepest, len(w.inflight) - w.capacity)
        for r in core.sessions.values():  # a tuple kept a set: each worker once
            assert len(set(r.touched)) == len(r.touched)
    if mode == "strict_queue":
        assert deepest == depth, "never more than `prefetch` requests ahead, and this run reaches that depth"
    else:
        assert deepest <= 0, "prefetch only in strict_queue pools"
    answered = [rid for rid in sent if core.outcome(C, rid) is not None]
    waiting = {p.req_id for q in core.pools["p"].queues() for p in q}
    running = {rid for w in core.workers.values() for (_, rid) in w.inflight}
    assert set(sent) == set(answered) | waiting | running
    replies = [msgpack.unpackb(f[1])[1] for f in core.to_clients if f[0] == C]
    assert len(replies) == len(set(replies)), "one answer per request"


@pytest.mark.timeout(60)  # (tracemalloc slows the 4000 calls down: seconds on a loaded machine)
def test_an_idle_session_costs_the_core_a_few_hundred_bytes() -> None:
    """What the core keeps per session after its one call (scale.idle holds 100k of them): the
    record, its id, its times and its entry in the book; its ``touched`` is its worker's shared
    tuple, not a set of its own (216 bytes more), and its worker counts its sessions, not keeps
    their ids in a set (~50 bytes more)."""
    import gc
    import tracemalloc

    core = two_workers("p:strict_queue")
    warm, n = 10, 4000
    ids = [f"{i:032x}" for i in range(warm + n)]  # (made before measuring: the request frames' copies are what stays)

    def one_call_each(first: int, count: int) -> None:
        for i, sid in enumerate(ids[first:first + count]):
            core.request(C, first + i, "p", sid)
            core.reply(core.to_workers[-1][0], C, first + i)
            core.to_workers.clear()
            core.to_clients.clear()

    one_call_each(0, warm)  # what the first calls make once (counters, histograms) is not the sessions'
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        one_call_each(warm, n)  # (the tables that grow with them, the book's and any per worker, included)
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(core.sessions) == warm + n
    assert per_session < 300, f"{per_session:.0f} bytes per idle session"


# -- the backend wire: hot-path envelopes, protocol version ----------------------------------
def test_request_envelope_carries_budget_and_client_and_reply_envelope_is_read_without_msgpack() -> None:
    core = StubCore("p:strict_queue:queue_timeout=5,session_ttl=90")
    core.ready(A, "p")
    core.request(C, 1, "p", "s1", timeout_ms=2000)
    (wid, head, req_id), = core.requests()
    assert (wid, head.client, req_id, head.session_ttl_s, head.session_mode) == (A, C, 1, 90, SessionMode.KEPT)
    assert 1000 < head.call_ms <= 2000 and 4000 < head.queue_ms <= 5000
    assert len(core.to_workers[0][1]) == 3  # [head, request header, payload]: no separate command or budget
    # the broker learns ok/req_id/client from the reply head and forwards the reply header untouched
    core.backend(A, pack_reply_envelope(W_REPLY, "err", 1, C), pack_reply_header("err", 1, "w", "p"), b"result")
    assert core.to_clients[-1] == [C, pack_reply_header("err", 1, "w", "p"), b"result"]
    assert core.pools["p"].outcomes[("call", "error")] == 1
    # a v1 reply (a bare command byte, the client id in its own frame) is garbage, not a crash
    before = core.counters["garbage_backend"]
    core.backend(A, W_REPLY, C, pack_reply_header("ok", 1))
    assert core.counters["garbage_backend"] == before + 1


def test_a_worker_of_another_protocol_version_is_told_to_leave() -> None:
    core = StubCore("p:strict_queue")
    core.ready(A, "p", version=PROTOCOL_VERSION - 1)
    assert A not in core.workers
    assert core.to_workers == [(A, [B_DISCONNECT])]
    errors = [text for level, text in core.port.logs if level == logging.ERROR]
    assert any(f"speaks wire protocol version {PROTOCOL_VERSION - 1}, this broker speaks {PROTOCOL_VERSION}" in text
               for text in errors), core.port.logs
    core.ready(B, "p")
    assert B in core.workers


def test_request_ids_outside_64_unsigned_bits_are_refused() -> None:
    core = two_workers("p:strict_queue")
    for bad in (-1, -(2**63)):  # (msgpack itself stops at 2**64 - 1)
        core.port.sender = C
        header = msgpack.packb(["call", bad, "p", "s", "", 0, 0])
        core.core.on_client_frames([zmq.Frame(C), zmq.Frame(header), zmq.Frame(b"payload")], core.t)
        assert msgpack.unpackb(core.to_clients[-1][2])["code"] == "protocol_error"
    assert core.requests() == []


# -- health window, sessions of gone workers, rolling recycles ---------------------------------
def error_reply(core: StubCore, wid: bytes, client: bytes, req_id: int, code: str) -> None:
    core.backend(wid, pack_reply_envelope(W_REPLY, "err", req_id, client), pack_reply_header("err", req_id),
                 msgpack.packb({"code": code, "message": "boom"}))


def recent(core: StubCore) -> dict[str, dict[str, int]]:
    return core.pools["p"].recent.totals(core.t)


def test_the_health_window_counts_the_services_failures_apart_from_users_and_recycles() -> None:
    core = two_workers("p:strict_queue:health_window=30")
    for i in range(50):  # user code raising: the caller's, never the service's
        core.request(C, i, "p", "s1")
        error_reply(core, core.worker_of(i) or b"", C, i, "remote_error")
    core.request(C, 50, "p", "s2")
    error_reply(core, core.worker_of(50) or b"", C, 50, "timeout")  # stopped at its deadline on the worker
    assert recent(core) == {"user": {"remote_error": 50}, "service": {"timeout": 1}}
    pinned = core.sessions["s1"].worker or b""
    core.admin(C, "recycle", pool="p", worker=pinned.decode())
    core.say(pinned, W_DISCONNECT)  # recycled: its sessions' next calls are the operator's doing
    core.request(C, 51, "p", "s1")
    assert core.outcome(C, 51) == "session_worker_unavailable"
    assert recent(core)["recycle"] == {"session_worker_unavailable": 1}
    other = next(iter(core.workers))
    core.crash(other)
    core.request(C, 52, "p", "s2")  # its worker crashed: the service's
    assert core.outcome(C, 52) == "session_worker_unavailable"
    assert recent(core)["service"] == {"timeout": 1, "crash": 1, "session_worker_unavailable": 1}
    st = core.admin(C, "status")["pools"]["p"]
    assert st["health_window"] == 30 and st["recent"]["user"] == {"remote_error": 50}
    core.advance(32)
    assert recent(core) == {}, "the window slides: old failures leave it"


def test_failures_of_a_busy_window_stay_bounded() -> None:
    from broker.stats import RecentFailures

    window = RecentFailures(10)
    for i in range(100_000):
        window.add("service", "queue_timeout", 1000.0 + i / 1000)  # 100 s at 1000 failures/s
    assert len(window) <= 12
    assert window.totals(1100.0) == {"service": {"queue_timeout": 10_000}}


@pytest.mark.parametrize("how", ["recycled", "crashed"])
def test_sessions_of_a_gone_worker_leave_every_count_and_answer_from_their_tombstone(how: str) -> None:
    core = two_workers("p:strict_queue")
    for i, sid in enumerate(["s1", "s2", "s3", "s4"]):
        core.request(C, i, "p", sid)
        core.reply(core.worker_of(i) or b"", C, i)
    lost = core.sessions["s1"].worker or b""
    kept = {sid for sid, r in core.sessions.items() if r.worker != lost}
    if how == "recycled":
        core.admin(C, "recycle", pool="p", worker=lost.decode())
        core.say(lost, W_DISCONNECT)
    else:
        core.crash(lost)
    st = core.admin(C, "status")
    pool = st["pools"]["p"]
    listed = core.admin(C, "sessions")
    assert {s["id"] for s in listed} == kept
    assert pool["sessions"] == st["broker"]["sessions"] == sum(w["sessions"] for w in pool["workers"]) == len(kept)
    for req_id in (10, 11):  # answered so every time, from the tombstone; never a fresh namespace
        core.request(C, req_id, "p", "s1")
        assert core.outcome(C, req_id) == "session_worker_unavailable"
        assert core.worker_of(req_id) is None
    assert "s1" not in core.sessions


def test_a_rolling_recycle_never_pins_a_new_session_to_a_worker_scheduled_in_it() -> None:
    core = two_workers("p:strict_queue")
    core.request(C, 1, "p", "busy")  # keeps its worker draining a while
    first = core.worker_of(1) or b""
    second = B if first == A else A
    core.admin(C, "recycle", pool="p", all=True)
    assert core.pools["p"].recycling in (first, second)
    draining = core.pools["p"].recycling
    scheduled = second if draining == first else first
    core.request(C, 2, "p", "new")  # during the roll: not pinned to the worker recycled next
    assert core.worker_of(2) is None and core.sessions["new"].worker is None
    if draining == first:
        core.reply(first, C, 1)
    core.say(draining or b"", W_DISCONNECT)
    core.ready(b"worker-c", "p")  # the replacement takes the new session
    assert core.sessions["new"].worker == b"worker-c" and core.worker_of(2) == b"worker-c"
    core.reply(b"worker-c", C, 2)
    assert core.pools["p"].recycling == scheduled
    core.request(C, 3, "p", "new")
    assert core.worker_of(3) == b"worker-c" and core.outcome(C, 3) is None


def test_a_silent_workers_sessions_wait_uncounted_and_come_back_with_it() -> None:
    """Heartbeats stopped (a partitioned host): its sessions leave every count; one called meanwhile
    is answered session_worker_unavailable and is a tombstone from then on; the others are served
    again when the same incarnation re-registers (it kept their state)."""
    core = StubCore("p:strict_queue")
    core.ready(A, "p")
    for req_id, session in ((1, "waits"), (2, "called")):
        core.request(C, req_id, "p", session)
        core.reply(A, C, req_id)
    core.ready(B, "p")
    core.silent.add(A)  # only A misses its heartbeats
    core.advance(HEARTBEAT * 4)
    assert A not in core.workers and B in core.workers
    assert core.admin(C, "status")["pools"]["p"]["sessions"] == 0
    assert core.admin(C, "sessions") == []
    core.request(C, 3, "p", "called")
    assert core.outcome(C, 3) == "session_worker_unavailable"
    core.silent.discard(A)
    core.ready(A, "p")  # the partition healed: the same incarnation
    core.request(C, 4, "p", "waits")
    assert core.worker_of(4) == A, "the waiting session is served where its state is"
    core.request(C, 5, "p", "called")
    assert core.outcome(C, 5) == "session_worker_unavailable", "a tombstone stays one"


def test_a_pin_claimed_after_the_restart_grace_to_an_unknown_worker_does_not_wait() -> None:
    core = two_workers("p:strict_queue")
    core.advance(2.0)  # past the restart grace (heartbeat x liveness)
    core.port.sender = C
    header = RequestHeader("call", 5, "p", "s" * 32, "ghost-worker", 0, 0).pack()
    core.core.on_client_frames([zmq.Frame(C), zmq.Frame(header), zmq.Frame(b"x")], core.t)
    assert core.outcome(C, 5) == "session_worker_unavailable" and not core.pools["p"].awaiting


def expired_message(core: StubCore, client: bytes, req_id: int) -> str:
    (frames,) = [f for f in core.to_clients if f[0] == client and msgpack.unpackb(f[1])[1] == req_id]
    body = msgpack.unpackb(frames[2])
    assert body["code"] == "queue_timeout", body
    return str(body["message"])


def test_a_call_that_never_ran_says_why_it_waited_as_its_pool_mode_runs_sessions() -> None:
    """A pinned session's call waits for its own worker, one call at a time; a hint session's
    calls run side by side on any free slot, so one that never ran waited for the whole pool."""
    strict = StubCore("p:strict_queue:prefetch=0")
    strict.ready(A, "p")
    strict.request(C, 1, "p", "s")
    strict.request(C, 2, "p", "s", timeout_ms=60)
    strict.advance(0.1)
    said = expired_message(strict, C, 2)
    assert "behind the calls on its session's worker" in said and "runs on that worker only, one call at a time" in said
    hint = StubCore("p:hint")
    hint.ready(A, "p", capacity=2)
    hint.request(C, 1, "p", "s")
    hint.request(C, 2, "p", "s")  # the same session's second call runs beside its first
    assert [rid for _, _, rid in hint.dispatched()] == [1, 2]
    hint.request(C, 3, "p", "s", timeout_ms=60)
    hint.advance(0.1)
    said = expired_message(hint, C, 3)
    assert "one call at a time" not in said, said
    assert "while every worker slot of the pool was busy" in said and "side by side" in said, said


def test_max_age_counts_from_the_workers_process_start_not_its_registration() -> None:
    """A broker restarted under running workers: a worker whose process is older than max_age is
    retired by the policy at once, not max_age after it registered with this broker (up to twice
    max_age in all); one younger than max_age is not. Its age is the one it says by its own clock
    (a worker host's wall clock may be off by hours); a worker of before ``age``: its ``started``."""
    core = StubCore("p:strict_queue:max_age=50,age_jitter=0")
    third = b"worker-c"
    core.ready(A, "p", started=time.time(), age=100)  # a host whose wall clock is behind
    core.ready(B, "p", started=time.time() - 3600, age=10)  # ahead
    core.ready(third, "p", started=time.time() - 20)  # an older worker: no age
    core.advance(0.5)
    assert core.workers[A].draining and (A, [B_DISCONNECT]) in core.to_workers
    assert not core.workers[B].draining and not core.workers[third].draining
    assert 19 < core.t - core.workers[third].started < 21
    assert any(text.endswith("its age 100s reached max_age 50s less its jitter of 0s") for _, text in core.port.logs), \
        core.port.logs


@pytest.mark.parametrize(("spec", "rule"), [
    ("max_requests=2", "2 requests reached max_requests 2"),
    ("max_age=5,age_jitter=0", "its age 5s reached max_age 5s less its jitter of 0s"),
    ("max_rss_mb=100", "its RSS 150 MB reached max_rss_mb 100"),
])
def test_a_policy_recycle_names_its_rule_in_the_why_of_its_goodbye(spec: str, rule: str) -> None:
    core = two_workers(f"p:strict_queue:{spec}")
    core.advance(3)  # past the youngest age a policy recycles at
    core.request(C, 1, "p", "s")
    core.reply(A, C, 1)
    core.request(C, 2, "p", "s")
    core.core.on_worker_frames([zmq.Frame(A), zmq.Frame(W_HEARTBEAT), zmq.Frame(msgpack.packb({"rss": 150 << 20}))],
                               core.t)
    core.reply(A, C, 2)
    core.advance(2.1)
    assert core.workers[A].draining and (A, [B_DISCONNECT]) in core.to_workers
    core.backend(A, W_DISCONNECT)
    assert core.roster.events[-1]["why"] == f"was recycled: {rule}", core.roster.events[-1]
    assert any(level == logging.INFO and text.endswith(rule) for level, text in core.port.logs), core.port.logs
