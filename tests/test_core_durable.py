"""Durable sessions in the broker's routing core (broker/durable.py), without sockets: the
recording stub of tests/test_core.py plus a real checkpoint store (SQLite in a temp dir) whose
jobs run when the test says so, as the store thread would run them."""

from __future__ import annotations

import logging
import os
from typing import Any

import msgpack
import pytest
import zmq

from broker.checkpoints import CheckpointStore, Job
from dspex.wire.headers import (
    RequestEnvelope,
    RequestHeader,
    pack_reply_envelope,
    pack_reply_header,
    unpack_request_envelope,
)
from dspex.wire.protocol import B_RELEASE_SESSION, B_REQUEST, FLAG_DURABLE, W_CHECKPOINT, W_REPLY, Durable
from tests.test_core import A, B, C, StubCore

pytestmark = pytest.mark.timeout(10)
S = "d" * 32


class DurableCore(StubCore):
    def __init__(self, path: str, *specs: str, cap: int = 64 * 2**20, wall: float | None = None) -> None:
        """``wall``: the wall-clock time the core starts at (a restarted broker's, later than the
        one before it)."""
        super().__init__(*specs)
        if wall is not None:
            self.wall_offset = wall - self.t
        self.store = CheckpointStore(path, session_cap=cap)
        self.jobs: list[Job] = self.port.jobs  # what the core handed the port's store, not run yet
        self.sent: dict[str, dict[int, bytes]] = {}  # the blobs a worker sent per session (its size)
        self.core.durable.enabled = True
        self.core.durable.load(self.store.sessions())

    def commit(self) -> None:
        """The store thread runs what was submitted and hands the jobs back."""
        jobs = list(self.jobs)
        self.jobs.clear()
        for job in jobs:
            if job.op == "write":
                job.error = self.store.apply([job.args[0]])[0]
            else:
                try:
                    job.result = getattr(self.store, job.op)(*job.args)
                except Exception as exc:  # noqa: BLE001 - handed back like the thread does
                    job.error = exc
        self.core.store_done(jobs, self.t)

    def call(self, req_id: int, session: str = S, pool: str = "p", durable: bool = True) -> None:
        self.port.sender = C
        header = RequestHeader("call", req_id, pool, session, "", 0, FLAG_DURABLE if durable else 0).pack()
        self.core.on_client_frames([zmq.Frame(C), zmq.Frame(header), zmq.Frame(b"payload")], self.t)

    def checkpoint(self, wid: bytes, req_id: int, seq: int, set_slots: dict[int, bytes] | None = None,
                   clear: list[int] | None = None, full: bool = False, session: str = S, status: str = "ok",
                   **meta: Any) -> None:
        """A durable call's checkpoint and its reply, in one message (W_CHECKPOINT)."""
        blobs = set_slots or {}
        body = meta or {"session": session, "seq": seq, "set": list(blobs), "clear": clear or [], "full": full,
                        "size": 0}
        body.setdefault("session", session)
        if not meta:  # what the session holds once applied, as the worker counts it
            held = self.sent.setdefault(session, {})
            if full:
                held.clear()
            held.update(blobs)
            for i in clear or []:
                held.pop(i, None)
            body["size"] = len(b"skeleton %d" % seq) + sum(map(len, held.values()))
        frames = [wid, pack_reply_envelope(W_CHECKPOINT, status, req_id, C), msgpack.packb(body)]
        if not meta:
            frames += [b"skeleton %d" % seq, *blobs.values()]
        frames += [pack_reply_header(status, req_id), b"result"]
        self.backend(*frames)

    def requests(self) -> list[tuple[bytes, RequestEnvelope, int]]:
        """(worker, request envelope, req_id) of every request sent to a worker (restore frames
        between the envelope and the request header skipped)."""
        return [(wid, unpack_request_envelope(f[0]), _req_id(f)) for wid, f in self.to_workers
                if len(f[0]) > 1 and f[0][:1] == B_REQUEST]

    def head_of(self, req_id: int) -> int:
        """The ``durable`` byte of the request envelope of ``req_id``'s last dispatch."""
        return [head.durable for _, head, rid in self.requests() if rid == req_id][-1]

    def frames_of(self, req_id: int) -> list[bytes]:
        found = [f for _, f in self.to_workers if len(f[0]) > 1 and f[0][:1] == B_REQUEST]
        return [f for f in found if _req_id(f) == req_id][-1]


def _req_id(frames: list[bytes]) -> int:
    """The req_id of a request's frames, with or without restore frames before its header."""
    index = 1
    if unpack_request_envelope(frames[0]).durable & Durable.RESTORE:
        meta = msgpack.unpackb(frames[1])
        index = 2 + len(meta["slots"]) + (1 if meta["seq"] else 0)
    return int(msgpack.unpackb(frames[index])[1])


@pytest.fixture
def path(short_tmp: str) -> str:
    return os.path.join(short_tmp, "ck.sqlite")


def durable_core(path: str, spec: str = "p:strict_queue", **kw: Any) -> DurableCore:
    core = DurableCore(path, spec, **kw)
    core.ready(A, "p")
    core.ready(B, "p")
    core.commit()
    return core


def test_a_reply_waits_for_its_checkpoint_to_commit(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None and core.head_of(1) & Durable.CHECKPOINT
    core.checkpoint(w, 1, 1, {0: b"entry"})  # with its reply
    assert core.outcome(C, 1) is None  # held: its checkpoint is not committed yet
    core.commit()
    assert core.outcome(C, 1) == "ok"
    stored = core.store.load(S)
    assert stored is not None and stored.seq == 1 and stored.blobs == [b"entry"]
    rows = core.store.sessions()
    assert [(r.id, r.pool, r.worker) for r in rows] == [(S, "p", w.decode())]


def test_a_call_that_changed_nothing_replies_at_once_unless_an_earlier_write_is_pending(path: str) -> None:
    core = durable_core(path, "p:strict_queue:prefetch=0")
    core.call(1)
    core.commit()  # the session's record (the broker commits it at the end of the turn that opened it)
    w = core.worker_of(1)
    assert w is not None
    core.reply(w, C, 1)  # no checkpoint: nothing changed
    assert core.outcome(C, 1) == "ok"
    core.call(2)
    core.checkpoint(w, 2, 1)
    core.call(3)
    core.reply(w, C, 3)  # nothing changed, but call 2's write is pending: it waits behind it
    assert core.outcome(C, 2) is None and core.outcome(C, 3) is None
    core.commit()
    answered = [msgpack.unpackb(f[1])[1] for f in core.to_clients if f[0] == C]
    assert answered == [1, 2, 3]


def test_a_crashed_workers_session_moves_with_its_checkpoint(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0", 1 << 24: b"code"})
    core.commit()
    core.call(2)
    core.checkpoint(w, 2, 2, {1: b"e1"})  # its checkpoint and reply came; then the worker died
    core.call(9)  # a call in flight when it died: its checkpoint never came
    core.crash(w)
    assert core.outcome(C, 9) == "worker_crashed"
    core.call(3)
    assert core.worker_of(3) is None  # parked while the store loads the checkpoint
    core.commit()
    other = core.worker_of(3)
    assert other is not None and other != w
    assert core.head_of(3) & Durable.RESTORE and core.head_of(3) & Durable.CHECKPOINT
    frames = core.frames_of(3)
    meta = msgpack.unpackb(frames[1])
    assert meta == {"session": S, "seq": 2, "slots": [0, 1, 1 << 24]}  # call 2's effects, none of call 9's
    assert core.outcome(C, 2) == "ok"
    assert frames[2:6] == [b"skeleton 2", b"e0", b"e1", b"code"]
    core.reply(other, C, 3)
    core.call(4)
    assert core.worker_of(4) == other and not core.head_of(4) & Durable.RESTORE
    assert core.durable.moves.counters["moves"] == 1 and core.durable.counters["restores"] == 1
    core.commit()
    assert [r.worker for r in core.store.sessions()] == [other.decode()]


def test_a_recycled_workers_session_moves_after_its_running_call_answers(path: str) -> None:
    core = durable_core(path, "p:strict_queue:prefetch=0")
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.recycler.recycle(core.workers[w], core.t)  # draining: it finishes call 1
    core.call(2)
    assert core.worker_of(2) is None and core.outcome(C, 2) is None
    core.commit()
    assert core.worker_of(2) is None  # waits for call 1 (whose checkpoint comes with it)
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()  # call 1's write, then the load after it
    assert core.outcome(C, 1) == "ok"
    core.commit()
    assert core.worker_of(2) not in (None, w) and core.head_of(2) & Durable.RESTORE
    assert msgpack.unpackb(core.frames_of(2)[1])["seq"] == 1
    assert w in core.released(S) and any(f[0] == B_RELEASE_SESSION for _, f in core.to_workers)


def test_a_session_over_its_cap_gets_a_clear_error_and_goes_on_plain(path: str) -> None:
    core = durable_core(path, cap=1000)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"x" * 2000})
    core.commit()
    assert core.outcome(C, 1) == "session_not_durable"
    body = msgpack.unpackb([f for f in core.to_clients if msgpack.unpackb(f[1])[1] == 1][-1][2])
    assert body["ran"] is True and "per-session cap" in body["reason"]
    core.commit()
    assert [(r.seq, "per-session cap" in r.plain) for r in core.store.sessions()] == [(-1, True)]
    assert core.store.load(S) is None
    core.call(2)
    assert core.worker_of(2) == w and not core.head_of(2) & Durable.CHECKPOINT
    core.reply(w, C, 2)
    assert core.outcome(C, 2) == "ok"


def test_a_refused_restore_loses_the_session_with_checkpoint_refused(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()
    core.crash(w)
    core.call(2)
    core.commit()
    other = core.worker_of(2)
    assert other is not None
    core.checkpoint(other, 2, 0, lost="its checkpoint is corrupt (its state does not match its digest)",
                    status="err")
    core.commit()
    core.call(3)
    assert core.outcome(C, 3) == "checkpoint_refused"
    assert core.store.sessions() == [] and core.durable.moves.counters["lost"] == 1


def test_a_restarted_broker_knows_its_durable_sessions(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()
    core.store.close()

    again = DurableCore(path, "p:strict_queue")  # same run dir, workers kept
    assert S in again.sessions and again.sessions[S].worker == w
    again.ready(w, "p")
    again.call(2)
    assert again.worker_of(2) == w and again.head_of(2) & Durable.FULL  # the store may lack its last one
    again.checkpoint(w, 2, 2, {0: b"e0"}, full=True)
    again.commit()
    again.call(3)
    assert not again.head_of(3) & Durable.FULL
    again.store.close()

    third = DurableCore(path, "p:strict_queue")  # its worker never comes back
    third.ready(B if w == A else A, "p")
    third.call(4)
    assert third.worker_of(4) is None  # within the re-registration grace it waits
    third.advance(1.0)  # the grace (heartbeat x liveness) ends
    third.commit()
    moved = third.worker_of(4)
    assert moved is not None and moved != w and third.head_of(4) & Durable.RESTORE


@pytest.mark.parametrize("changed", [True, False])
def test_a_restarted_broker_counts_a_durable_sessions_idle_time_from_its_last_call(path: str, changed: bool) -> None:
    """A restarted broker counted every durable session's TTL from its own start: one idle for
    most of its TTL lived a whole TTL more (docs/operations.md: idle time counts from the end of
    the session's last call). ``changed``: the last call wrote a checkpoint, or changed nothing."""
    core = durable_core(path, "p:strict_queue:session_ttl=100")
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()
    core.advance(50)
    core.call(2)
    if changed:
        core.checkpoint(w, 2, 2, {0: b"e1"})
    else:
        core.reply(w, C, 2)
    core.commit()
    assert core.outcome(C, 2) == "ok"
    last_call = core.t + core.wall_offset
    core.advance(80)
    core.store.close()

    again = DurableCore(path, "p:strict_queue:session_ttl=100", wall=last_call + 85)  # down for 5 s
    again.ready(w, "p")
    assert again.sessions[S].durable is not None
    again.advance(14)  # 99 s after its last call: never early
    again.commit()
    assert S in again.sessions
    again.advance(16)  # 115 s after its last call, 30 s after the restart: at most a tenth of its TTL late
    again.commit()
    assert S not in again.sessions and again.store.sessions() == []  # expired: its rows went
    again.call(3)
    assert again.outcome(C, 3) == "session_closed"


def test_closing_a_durable_session_deletes_its_checkpoint(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()
    assert core.admin(C, "close_session", session=S)["closed"]
    core.commit()
    assert core.store.sessions() == [] and core.store.load(S) is None


def test_durable_on_a_none_pool_is_a_config_error(path: str) -> None:
    from dspex.errors import ConfigError
    from dspex.stack.pools import parse_pool_spec

    core = DurableCore(path, "p:none")
    core.ready(A, "p")
    core.call(1)
    assert core.outcome(C, 1) == "config_error"
    with pytest.raises(ConfigError, match="cannot be durable"):
        parse_pool_spec("p:none:durable=true")
    assert parse_pool_spec("p:hint:durable=true").durable
    with pytest.raises(ConfigError, match="bad value"):
        parse_pool_spec("p:hint:durable=maybe")


def test_a_pool_setting_makes_every_session_durable_and_hint_keeps_one_worker(path: str) -> None:
    core = durable_core(path, "p:hint:durable=true")
    core.call(1, durable=False)
    w = core.worker_of(1)
    assert w is not None and core.head_of(1) & Durable.CHECKPOINT
    core.call(2, durable=False)  # its worker is busy: a durable hint session waits for it
    assert core.worker_of(2) is None
    core.reply(w, C, 1)
    assert core.worker_of(2) == w


def test_a_checkpoint_of_a_request_the_worker_does_not_run_is_dropped(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    core.commit()  # the session's record, as the broker commits it at the end of the turn
    w = core.worker_of(1)
    assert w is not None
    other = B if w == A else A
    before = core.counters["garbage_backend"]
    core.checkpoint(other, 1, 1, {0: b"forged"})
    core.checkpoint(w, 99, 1, {0: b"unknown request"})
    assert core.counters["garbage_backend"] == before + 2 and not [j for j in core.jobs if j.op == "write"]
    assert core.outcome(C, 1) is None  # the forged reply was not forwarded
    core.reply(w, C, 1)
    assert core.outcome(C, 1) == "ok"


def test_the_checkpoint_of_a_call_run_for_the_broker_before_frees_its_slot(path: str) -> None:
    """A restarted broker counts the calls a worker says it runs (its READY) as taking slots; the
    end of one frees its slot, whether it ends with a reply or, a durable call's, with its
    checkpoint (W_CHECKPOINT): a call waiting for the worker goes at once, not at its next
    heartbeat."""
    core = DurableCore(path, "p:strict_queue")
    core.ready(A, "p", capacity=1, running=1)
    core.commit()
    core.call(1)
    core.commit()
    assert core.worker_of(1) is None  # the slot is the earlier broker's call's
    core.checkpoint(A, 99, 7, {0: b"state"})  # that call ended: its checkpoint and reply, for a broker gone
    assert core.worker_of(1) == A


def test_a_malformed_checkpoint_answers_its_call_and_turns_the_session_plain(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    core.commit()  # the session's record, as the broker commits it at the end of the turn
    w = core.worker_of(1)
    assert w is not None
    frames = [w, pack_reply_envelope(W_CHECKPOINT, "ok", 1, C), b"\xc1 not msgpack", pack_reply_header("ok", 1), b"r"]
    core.backend(*frames)
    assert core.outcome(C, 1) == "session_not_durable"  # the call ran; its checkpoint could not be kept
    core.commit()
    # no checkpoint kept, and its row says it went plain (a restarted broker keeps it plain)
    assert [(r.id, r.seq, bool(r.plain)) for r in core.store.sessions()] == [(S, -1, True)]
    assert core.store.load(S) is None and core.sessions[S].durable is not None and core.sessions[S].durable.off
    core.call(2)
    assert core.worker_of(2) == w and not core.head_of(2) & Durable.CHECKPOINT


def test_an_expired_durable_session_deletes_its_checkpoint(path: str) -> None:
    core = durable_core(path, "p:strict_queue:session_ttl=1")
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"})
    core.commit()
    assert [r.id for r in core.store.sessions()] == [S]
    core.advance(2.0)
    core.commit()
    assert core.store.sessions() == [] and core.store.load(S) is None
    core.call(2)
    assert core.outcome(C, 2) == "session_closed"


def test_a_worker_that_registers_takes_idle_durable_sessions_and_their_calls_wait_for_the_move(path: str) -> None:
    """Idle sessions are pinned to the new worker at once; each one's checkpoint loads at its next
    call, which waits for it, and its old worker holds it until then."""
    core = DurableCore(path, "p:strict_queue:prefetch=0")
    core.ready(A, "p")
    sids = [c * 32 for c in "abcd"]
    for n, sid in enumerate(sids, 1):
        core.call(n, session=sid)
        core.commit()
        core.checkpoint(A, n, 1, {0: b"e%d" % n}, full=True, session=sid)
        core.commit()
    core.call(9, session=sids[3])  # running on A: it stays there
    core.ready(B, "p")
    moved = [sid for sid in sids if core.sessions[sid].worker == B]
    assert len(moved) == 2 and sids[3] not in moved and core.workers[A].pinned == 2
    assert not [j for j in core.jobs if j.op == "load"] and not core.released(moved[0])  # nothing loaded or released yet
    core.call(10, session=moved[0])
    assert core.worker_of(10) is None  # waits for its checkpoint, never sent to A
    core.commit()
    assert core.worker_of(10) == B and core.head_of(10) & Durable.RESTORE
    assert msgpack.unpackb(core.frames_of(10)[1])["seq"] == 1
    assert core.released(moved[0]) == {A} and not core.released(moved[1])
    core.reply(B, C, 10)
    core.call(11, session=moved[1])
    core.commit()
    assert core.worker_of(11) == B and core.head_of(11) & Durable.RESTORE and core.released(moved[1]) == {A}
    core.checkpoint(A, 9, 2, {1: b"x"}, session=sids[3])  # its call ends: even already, it stays
    core.commit()
    assert core.sessions[sids[3]].worker == A and not [j for j in core.jobs if j.op == "load"]


def test_sessions_never_idle_when_a_worker_registers_spread_as_their_calls_end(path: str) -> None:
    """Under steady load every session has a call running or queued at any instant: they move
    one by one as their calls end (their checkpoints committed)."""
    core = DurableCore(path, "p:strict_queue:prefetch=0")
    core.ready(A, "p")
    sids = [c * 32 for c in "abc"]
    for n, sid in enumerate(sids, 1):
        core.call(n, session=sid)
        core.commit()
    for n, sid in enumerate(sids, 1):  # one runs on A, two wait in its queue
        core.checkpoint(A, n, 1, {0: b"e%d" % n}, full=True, session=sid)
        core.commit()
    core.call(4, session=sids[0])
    core.call(5, session=sids[1])
    core.call(6, session=sids[2])
    core.ready(B, "p")
    assert {core.sessions[sid].worker for sid in sids} == {A}  # none idle
    core.checkpoint(A, 4, 2, {1: b"x"}, session=sids[0])
    core.commit()  # call 4's write: sids[0] is idle now, and moves
    assert core.sessions[sids[0]].worker == B
    core.call(7, session=sids[0])
    core.commit()
    assert core.worker_of(7) == B and core.head_of(7) & Durable.RESTORE
    assert msgpack.unpackb(core.frames_of(7)[1])["seq"] == 2  # with call 4's effects


def test_durable_sessions_of_a_pool_the_restarted_broker_lacks_are_dropped_and_logged(path: str) -> None:
    core = durable_core(path)
    core.call(1)
    w = core.worker_of(1)
    assert w is not None
    core.checkpoint(w, 1, 1, {0: b"e0"}, full=True)
    core.commit()
    core.store.close()
    again = DurableCore(path, "q:strict_queue")  # the conf lost pool p
    again.commit()
    assert S not in again.sessions and again.store.sessions() == []
    assert any(level == logging.WARNING and "1 durable session of pool 'p' dropped" in text
               and "no pool 'p'" in text for level, text in again.port.logs), again.port.logs


def _spread_the_store_cannot_serve(path: str) -> tuple[DurableCore, str]:
    """Two durable sessions on A with their checkpoints stored; B registers and one spreads to it;
    the store then loses that one's checkpoint: (the core, the spread session)."""
    core = DurableCore(path, "p:strict_queue:prefetch=0")
    core.ready(A, "p")
    sids = [c * 32 for c in "ab"]
    for n, sid in enumerate(sids, 1):
        core.call(n, session=sid)
        core.commit()
        core.checkpoint(A, n, 1, {0: b"e%d" % n}, full=True, session=sid)
        core.commit()
    core.ready(B, "p")
    (moved,) = [sid for sid in sids if core.sessions[sid].worker == B]
    core.store.forget(moved)
    return core, moved


def test_a_spread_the_store_cannot_serve_goes_back_to_the_worker_that_holds_the_session(path: str) -> None:
    core, moved = _spread_the_store_cannot_serve(path)
    core.call(3, session=moved)
    core.commit()
    assert core.worker_of(3) == A and not core.head_of(3) & Durable.RESTORE  # where it lives, unharmed
    assert not core.released(moved) and core.sessions[moved].worker == A


def test_a_session_whose_spread_went_back_is_not_spread_again_until_its_store_holds_it(path: str) -> None:
    """Without this, each call that ended spread it again, and each next call waited for a load
    that failed and re-pinned it back: a move without end (two stored pins and a load per call)."""
    core, moved = _spread_the_store_cannot_serve(path)
    core.call(3, session=moved)
    core.commit()
    assert core.worker_of(3) == A
    core.commit()  # its pin back to A
    for req_id in (4, 5, 6):  # calls that change nothing: no write tells the store holds it
        core.reply(A, C, req_id - 1)
        assert core.sessions[moved].worker == A and not core.jobs  # no new pin, nothing to load
        core.call(req_id, session=moved)
        assert core.worker_of(req_id) == A and not core.head_of(req_id) & Durable.RESTORE


@pytest.mark.parametrize("command", [W_REPLY, W_CHECKPOINT])
def test_a_durable_calls_reply_without_its_header_answers_the_caller_at_once(path: str, command: bytes) -> None:
    """The envelope alone (a broken worker): the caller hears an error now, not at its timeout,
    the garbage is counted, and the worker's slot serves the session's next call."""
    core = durable_core(path)
    core.call(1)
    core.commit()
    w = core.worker_of(1)
    assert w is not None
    before = core.counters["garbage_backend"]
    core.backend(w, pack_reply_envelope(command, "ok", 1, C))
    core.commit()
    assert core.outcome(C, 1) == "internal_error", core.to_clients[-1]
    assert core.counters["garbage_backend"] == before + 1
    core.call(2)
    assert core.worker_of(2) == w
