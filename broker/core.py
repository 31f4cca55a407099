"""The broker's routing core: pools, workers, sessions, queues, pins and recycling, no sockets.

Events come in through a small public API: the frames a socket delivered (``on_client_frames``,
``on_worker_frames``), a connection lost (``worker_lost``, ``client_gone``) and the clock (``tick``, due
at ``next_deadline``). Each carries ``now``, the monotonic time the shell read for it: the core
reads no clock of its own (wall-clock time, injected, is only displayed). What it needs done in
the world goes through one ``broker.port.Port``. The core routes (affinity, dispatch, prefetch,
replies, request control) and owns its other rules as objects: the session book
(``broker.sessions``), the roster of workers (``broker.roster``), the recycler
(``broker.recycling``), request control (``broker.control``), the timers (``broker.timers``) and
the answers it gives in a worker's place (``broker.answers``), durable sessions
(``broker.durable``); broker ops are handlers the shell registers (``broker.ops``).
``broker.broker.Broker`` is the zmq shell that holds a core; tests/test_core.py drives one with a
recording port on a fake clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from broker.answers import Answers, error_code
from broker.checkpoints import Job
from broker.control import RequestControl
from broker.durable import DurableSessions, movable
from broker.port import Port, WorkerUnreachable
from broker.recycling import Recycler
from broker.roster import Roster
from broker.sessions import SessionBook, worker_gone
from broker.state import (
    Clock,
    GoneWorkers,
    Pending,
    Pool,
    SessionRecord,
    WorkerRecord,
    bucket_bounds,
)
from broker.timers import Timers
from dspex.wire.errors import (
    DspexError,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    SessionWorkerUnavailable,
    UnknownOp,
    WorkerBusy,
)
from dspex.stack.pools import PoolConfig
from dspex.wire.protocol import (
    B_BYE,
    B_DISCONNECT,
    B_REREGISTER,
    BROKER_OPS,
    FLAG_DURABLE,
    GOODBYE_ABANDONED,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    OPS,
    STREAM_OPS,
    W_CHECKPOINT,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
    WORKER_OPS,
    Affinity,
    SessionMode,
    Status,
    pack_reply_header,
    pack_request_envelope,
    unpack_reply_envelope,
    unpack_request_header,
)

if TYPE_CHECKING:
    import zmq  # frames only: the core never touches a socket

log = logging.getLogger("dspex.broker")

_MAX_BUDGET_MS = 2**31 - 1  # ~24 days: longer deadlines are "none" in practice


@dataclass(frozen=True)
class OpCall:
    """A broker op as its handler gets it."""

    session: str  # the request header's session
    pool: str  # the request header's pool
    args: dict[str, Any]  # the op's arguments, checked against its definition, defaults filled in
    owner: str  # the caller's client identity


Handler = Callable[["Core", OpCall], Any]  # a broker op's handler: its result is the reply


class Core:
    """Routes client requests to pool workers under the pools' affinity rules."""

    def __init__(self, pools: list[PoolConfig], port: Port, ops: Mapping[str, Handler], *, now: float,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL, heartbeat_liveness: int = HEARTBEAT_LIVENESS,
                 max_sessions: int = 100_000, wall: Callable[[], float] = time.time) -> None:
        """``port``: what acts in the world; ``ops``: the handlers of the broker ops, by name
        (``broker.ops.HANDLERS``); ``now``: the monotonic time the core starts at (its restart
        grace counts from it); ``wall``: wall-clock time, for what is displayed (events, session
        creation, start)."""
        self.port = port
        self.ops = ops
        # the port's two hot-path sends, bound once
        self._to_client = port.to_client
        self._send_worker = port.to_worker
        self.clock = Clock(now, wall)
        self.started = wall()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        # histogram buckets reach the longest wait a pool allows: its queue timeout, or the drain
        # deadline (the longest a call may run on a worker being recycled)
        longest = max([60.0, *(max(p.queue_timeout, p.drain_timeout) for p in pools)])
        bounds = bucket_bounds(longest)
        self.pools: dict[str, Pool] = {p.name: Pool(p, bounds) for p in pools}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.running: dict[tuple[bytes, int], WorkerRecord] = {}  # for stream credit/cancel
        self.gone = GoneWorkers()
        self.counters = {"garbage_frontend": 0, "garbage_backend": 0, "expired_unsent": 0}
        self.admins: Callable[[], set[str]] | None = None  # client keys allowed admin ops (None: everyone)
        self.stack_info: dict[str, Any] = {}  # what ``ping`` and ``status`` say about this stack (the shell's)
        self.answers = Answers(port, self.clock, self.workers, self.gone)
        self._fail = self.answers.fail
        self.book = SessionBook(self.sessions, self.pools, self.workers, self.gone, clock=self.clock,
                                restart_grace=heartbeat_interval * heartbeat_liveness, max_sessions=max_sessions,
                                fail=self._fail, to_worker=self._to_worker, wake=self._wake)
        self.durable = self.book.durable = DurableSessions(
            self.sessions, self.pools, self.workers, clock=self.clock, port=port, book=self.book, answers=self.answers,
            to_worker=self._to_worker, dispatch=self._dispatch, route=self._route, counters=self.counters)
        self.roster = Roster(self.pools, self.workers, self.sessions, self.running, self.gone, clock=self.clock,
                             port=port, answers=self.answers, book=self.book, counters=self.counters,
                             heartbeat_interval=heartbeat_interval, heartbeat_liveness=heartbeat_liveness,
                             to_worker=self._to_worker, to_peer=self._to_peer, hand_back=self._hand_back,
                             pin=self.book.pin, durable=self.durable)
        self.recycler = Recycler(self.workers, port, fail=self._fail, to_worker=self._to_worker,
                                 to_peer=self._to_peer, remove_worker=self.roster.remove, wake=self._wake,
                                 reroute=self.durable.reroute)
        self.control = RequestControl(self.pools, self.running, answers=self.answers, counters=self.counters,
                                      to_worker=self._to_worker)
        self.timers = Timers(self.pools, now=now, heartbeat_interval=heartbeat_interval, answers=self.answers,
                             book=self.book, recycler=self.recycler, roster=self.roster, counters=self.counters)

    # -- events -------------------------------------------------------------------------------
    def on_client_frames(self, frames: list[zmq.Frame], now: float) -> None:
        """A message from a client: ``[client id, request header, *payload]``."""
        self.clock.now = now
        client = frames[0].bytes
        if len(frames) < 2:
            self.counters["garbage_frontend"] += 1
            self.answers.error(client, 0, ProtocolError("empty message: expected [header, *payload]"))
            return
        try:
            header = unpack_request_header(frames[1].buffer)
        except ProtocolError as err:
            self.counters["garbage_frontend"] += 1
            log.warning("malformed request header from client %s: %s", client.hex()[:12], err.message)
            self.answers.error(client, 0, err)
            return
        op = header.op
        owner = self.port.client_identity(frames[1])
        if op in WORKER_OPS:
            self.port.client_seen(client, frames[0])
            deadline = now + header.timeout_ms / 1000 if header.timeout_ms > 0 else math.inf
            p = Pending(client, header.req_id, op, header.session, frames[1], frames[2:], now, deadline, owner=owner,
                        flags=header.flags)
            self._route(p, header.pool, header.worker)
        elif op in BROKER_OPS:
            try:
                args = OPS[op].bind_map(msgpack.unpackb(frames[2].buffer) if len(frames) > 2 else {})
                result = self.ops[op](self, OpCall(header.session, header.pool, args, owner))
            except DspexError as err:
                self.answers.error(client, header.req_id, err)
            except Exception as exc:  # noqa: BLE001 - a body the op cannot use is the caller's error
                self.answers.error(client, header.req_id, ProtocolError(f"bad {op} request: {exc}"))
            else:
                self._to_client([client, pack_reply_header(Status.OK.value, header.req_id), msgpack.packb(result)])
        elif op in STREAM_OPS:
            self.control.on_control(client, header.req_id, header.pool, op, frames)
        else:
            self.answers.error(client, header.req_id, UnknownOp(f"unknown op {op!r}"))

    def on_worker_frames(self, frames: list[zmq.Frame], now: float) -> None:
        """A message from a worker: ``[worker id, command frame, *frames]``."""
        self.clock.now = now
        wid = frames[0].bytes
        if len(frames) < 2:
            self.counters["garbage_backend"] += 1
            return
        first = frames[1].bytes
        command = first[:1]
        w = self.workers.get(wid)
        if w is not None:
            w.expiry = now + self.roster.silence
        if command == W_REPLY or command == W_PARTIAL or command == W_CHECKPOINT:
            try:
                if len(frames) < 3:
                    raise ProtocolError("no reply header")
                ok, req_id, client = unpack_reply_envelope(first)
            except ProtocolError:
                self.counters["garbage_backend"] += 1
                log.warning("malformed reply from worker %s", wid[:8])
                return
            known = w is not None and (client, req_id) in w.inflight
            if not known:  # never sent to this worker (forged, or from before a restart): drop it
                self.counters["garbage_backend"] += 1
                if w is None:
                    self._to_peer(wid, [B_REREGISTER])
                elif w.adopted and command == W_REPLY:
                    w.adopted -= 1  # a call it ran for the broker before us ended: a slot frees
                    self._feed(w)
                return
            assert w is not None
            if command == W_PARTIAL:
                self._to_client([client, *frames[2:]])
                return
            p = w.inflight.pop((client, req_id), None)
            rec = self.sessions.get(p.session) if p is not None and p.session else None
            if rec is not None and rec.durable is not None or command == W_CHECKPOINT:
                ok = self.durable.answered(w, p, rec, frames, ok)  # held until its checkpoint is stored
            else:
                self._to_client([client, *frames[2:]])
            if p is not None:
                self.running.pop((client, req_id), None)
                outcome = "ok" if ok else "cancelled" if p.cancelled else "error"
                if outcome == "ok":
                    w.served += 1
                else:
                    if not p.cancelled:
                        w.errors += 1
                    self.answers.note_failure(w.pool, "cancelled" if p.cancelled else error_code(frames))
                w.pool.observe(p.op, outcome, now - p.started)
                w.last_call = now - p.started
                if rec is not None:
                    rec.last_used = now  # idle time counts from the end of the last call
                    if rec.closing and not self.book.running(rec):
                        self.book.release(rec)
                    elif rec.durable is not None:
                        self.durable.call_ended(rec)
            if w.draining and not w.inflight:
                self._to_worker(w, [B_DISCONNECT])
            elif self.recycler.over_request_limit(w, now):
                self.recycler.recycle(w, now)  # exactly at the limit, not at the next tick
            else:
                self._feed(w)
        elif len(first) != 1:
            self.counters["garbage_backend"] += 1
            log.warning("unknown command %r from worker %s", first[:8], wid[:8])
        elif command == W_HEARTBEAT:
            if w is None:
                self._to_peer(wid, [B_REREGISTER])
            elif len(frames) > 2:
                try:
                    stats = msgpack.unpackb(frames[2].buffer)
                    if isinstance(stats, dict) and self.roster.heard(w, stats):
                        self._feed(w)
                except Exception:  # noqa: BLE001 - a worker's garbage is counted, never fatal
                    self.counters["garbage_backend"] += 1
        elif command == W_READY:
            w = self.roster.register(wid, frames)
            if w is not None:
                self._feed(w)
                if w.pool.parked:
                    self.durable.worker_ready(w.pool)
                if w.pool.recycling is not None:
                    # a rolling recycle waits for this replacement: go on now, not at the next tick
                    # (an operator who saw the replacement ready must not find the pool "recycling")
                    self.recycler.step(w.pool, now)
        elif command == W_DISCONNECT:
            self._to_peer(wid, [B_BYE])  # it waits for this before exiting (its goodbye arrived)
            # abandoned: a call of it ignored its hard time limit, so what it was running may have run
            if w is not None and len(frames) > 2 and frames[2].bytes == GOODBYE_ABANDONED:
                self.roster.remove(w, "was recycled at a call's hard time limit")
            elif w is not None:
                self.roster.remove(w, "was recycled" if w.pool.recycling == w.id else "exited", clean=True)
        elif command == W_DRAIN:
            if w is not None and not w.draining:
                log.info("worker %s (pid %d) is stopping: draining", w.incarnation[:8], w.pid)
                self.recycler.start_draining(w, "is stopping", now)
        else:
            self.counters["garbage_backend"] += 1
            log.warning("unknown command %r from worker %s", command[:8], wid[:8])

    def worker_lost(self, wid: bytes, now: float) -> None:
        """The connection of worker ``wid`` closed without a goodbye (the shell's socket monitor)."""
        self.clock.now = now
        w = self.workers.get(wid)
        if w is not None:
            self.roster.remove(w, "was recycled" if w.pool.recycling == w.id else "crashed (connection lost)")

    def client_gone(self, client: bytes, now: float) -> None:
        """The connection of ``client`` (a client socket's routing id) closed (the shell's socket
        monitor): its requests are cancelled."""
        self.clock.now = now
        self.control.client_gone(client, self.workers)

    def store_done(self, jobs: list[Job], now: float) -> None:
        """Checkpoint store jobs finished, in the order they were handed to the port's ``store``:
        the replies they held go out."""
        self.clock.now = now
        self.durable.store_done(jobs)

    def tick(self, now: float) -> None:
        """The clock: what is due by ``now`` (see ``broker.timers``)."""
        self.clock.now = now
        self.timers.tick(now)

    def next_deadline(self) -> float:
        """When the core next has something to do if no message comes (monotonic seconds): the
        shell calls :meth:`tick` then."""
        return self.timers.due

    # -- routing ------------------------------------------------------------------------------
    def _route(self, p: Pending, pool_name: str, claimed_worker: str) -> None:
        pool = self.pools.get(pool_name)
        if pool is None:
            self._fail(p, None, PoolNotFound(f"no pool named {pool_name!r}; pools: {', '.join(sorted(self.pools))}"))
            return
        durable = p.flags & FLAG_DURABLE or pool.config.durable
        if durable and p.session and (refused := self.durable.refusal(p, pool)):
            self._fail(p, pool, refused)
            return
        if not p.session or pool.mode is Affinity.NONE:
            self._run_anywhere(pool, p)
            return
        rec = self.book.admit(p, pool, claimed_worker)
        if isinstance(rec, DspexError):
            self._fail(p, pool, rec)
            return
        if durable and rec.durable is None and rec.calls == 1:
            self.durable.open(rec)
        if rec.worker is None:
            w = pool.least_loaded()
            if w is None:
                self._enqueue(pool, pool.queue, p)  # pinned when a worker takes it
                return
            self.book.pin(rec, w.id)
        pinned = rec.worker
        assert pinned is not None
        w = self.workers.get(pinned)
        if w is None or w.draining:
            if w is None and (pool.strict or rec.durable is not None) and self.book.in_restart_grace(pinned):
                # just (re)started: its worker may be alive and not re-registered yet; wait for it
                self._enqueue(pool, pool.awaiting.setdefault(pinned, deque()), p)
                return
            if rec.durable is not None and self.durable.route(rec, pool, p, w):
                return  # it moves with its checkpoint; the call waits for the move
            if pool.strict:
                if w is None:  # its worker left: from now on the session is a tombstone
                    self._fail(p, pool, worker_gone(rec.id, pinned, self.gone.why(pinned)))
                    self.book.retire(rec, pinned)
                else:
                    self._fail(p, pool, worker_gone(rec.id, pinned, "is being recycled"))
                return
            # hint: the session re-pins to the least-loaded worker
            self.book.pin(rec, None)
            new = pool.least_loaded()
            if new is None:
                self._enqueue(pool, pool.queue, p)
                return
            self.book.pin(rec, new.id)
            w = new
        if w.can_start(p.session):
            self._dispatch(w, p)
        elif pool.mode is Affinity.STRICT_QUEUE:
            # (pool.queued counts every queue: asked last)
            if not w.queue and w.may_prefetch(self.clock.now) and pool.queued < pool.config.queue_max:
                self._dispatch(w, p)
            else:
                self._enqueue(pool, w.queue, p)
        elif pool.mode is Affinity.STRICT_FAIL_FAST:
            self._fail(p, pool, WorkerBusy(f"worker {w.incarnation[:8]} of session {rec.id[:8]} is busy", session=rec.id))
        elif rec.durable is not None:  # hint, durable: one state, so its own worker only
            self._enqueue(pool, w.queue, p)
        else:  # hint: any idle worker, else the first one to free up
            self._run_anywhere(pool, p)

    def _run_anywhere(self, pool: Pool, p: Pending) -> None:
        w = pool.idle_worker()
        if w is not None and not pool.queue:
            self._dispatch(w, p)
        else:
            self._enqueue(pool, pool.queue, p)

    def _enqueue(self, pool: Pool, queue: deque[Pending], p: Pending) -> None:
        if pool.admit(queue, p):
            when = p.enqueued + pool.config.queue_timeout  # its queue deadline, or its caller's
            when = min(when, p.deadline)
            timers = self.timers
            timers.due = min(timers.due, when)
        else:
            self.answers.fail_in_bulk(p, pool, PoolSaturated(
                f"pool {pool.name!r} has {pool.queued} queued requests, its limit", pool=pool.name))

    def _dispatch(self, w: WorkerRecord, p: Pending) -> None:
        now = self.clock.now
        if now > p.deadline:
            self.counters["expired_unsent"] += 1  # the client gave up already and raised Timeout
            return
        pool = w.pool
        queue_left = p.enqueued + pool.config.queue_timeout - now
        if queue_left < 0:  # waited out its queue time before a tick came by
            self._fail(p, pool, QueueTimeout(
                f"waited {now - p.enqueued:.1f}s in pool {pool.name!r}, over its queue timeout of "
                f"{pool.config.queue_timeout:g}s", pool=pool.name))
            return
        key = (p.client, p.req_id)
        if key in self.running:  # a client reusing the id of a request still running
            self._fail(p, w.pool, ProtocolError(f"request id {p.req_id} is already in flight", req_id=p.req_id))
            return
        # the deadline travels with the request: the worker stops the call when it passes
        # (capped: a client may send any timeout_ms, and msgpack ints stop at 64 bits)
        call_ms = min(_MAX_BUDGET_MS, max(1, int((p.deadline - now) * 1000))) if p.deadline != math.inf else 0
        # and so does its queue deadline: a worker that reaches it later (it was prefetched behind
        # a call that turned out long) answers QueueTimeout without running it
        queue_ms = min(_MAX_BUDGET_MS, max(1, int(queue_left * 1000)))
        restore: list[Any] = []  # the checkpoint of a durable session that moved here
        if not p.session:
            envelope = pack_request_envelope(p.client, call_ms, queue_ms)
        elif pool.mode is Affinity.NONE:  # nothing of it stays on the worker
            envelope = pack_request_envelope(p.client, call_ms, queue_ms, 0, SessionMode.EPHEMERAL)
        else:
            rec = self.sessions.get(p.session)
            durable = 0
            if rec is not None:
                rec.touched.add(w.id)  # every worker that may hold its state gets the release
                if rec.durable is not None:
                    durable, restore = self.durable.envelope(rec, w)
            envelope = pack_request_envelope(p.client, call_ms, queue_ms, math.ceil(pool.config.session_ttl),
                                             durable=durable)
        p.started = now
        pool.queue_wait.observe(now - p.enqueued)
        w.inflight[key] = p
        self.running[key] = w
        try:
            self._send_worker(w.id, [envelope, *restore, p.header, *p.payload])
        except WorkerUnreachable:
            del w.inflight[key]  # never delivered: not a crash mid-request
            self.running.pop(key, None)
            self.roster.remove(w, "crashed (connection lost)")
            self._hand_back(p, pool, w, "crashed (connection lost)")

    def _hand_back(self, p: Pending, pool: Pool, w: WorkerRecord, why: str) -> None:
        """A request ``w`` never started: route it again where the pool allows, else say so
        (a did-not-run error: the caller may retry); a durable session's call moves with it."""
        if not p.session or pool.mode in (Affinity.HINT, Affinity.NONE) or movable(self.sessions.get(p.session)):
            self._route(p, pool.name, "")
            return
        self._fail(p, pool, SessionWorkerUnavailable(
            f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why} before running "
            "this request (it did not run)", session=p.session, worker=w.incarnation))

    def _feed(self, w: WorkerRecord) -> None:
        """Give a worker its next work: free slots first, then what it may prefetch."""
        self._feed_free(w)
        while w.queue and w.free <= 0 and w.may_prefetch(self.clock.now):
            self._dispatch(w, w.queue.popleft())

    def _feed_free(self, w: WorkerRecord) -> None:
        """Give a worker with free slots its next work: its own queue first, then the pool's."""
        pool = w.pool
        while w.free > 0:
            if w.queue:
                p = w.next_queued()
                if p is not None:
                    self._dispatch(w, p)
                    continue
            if not pool.queue:
                return
            p = pool.queue[0]
            rec = self.sessions.get(p.session) if p.session and pool.mode is not Affinity.NONE else None
            if rec is not None and rec.worker is None and w.id in pool.rolling:
                return  # a new session waits for a worker that is not about to be recycled
            pool.queue.popleft()
            if rec is not None and rec.worker is None:
                self.book.pin(rec, w.id)
            if rec is not None and rec.worker != w.id and pool.strict:
                # its session was pinned elsewhere while it waited: route it there
                self._route_pinned(pool, p, rec)
                continue
            if p.session and w.capacity > 1 and not w.can_start(p.session):
                w.queue.append(p)  # a call of a session already running here waits its turn
                continue
            self._dispatch(w, p)

    def _route_pinned(self, pool: Pool, p: Pending, rec: SessionRecord) -> None:
        target = self.workers.get(rec.worker) if rec.worker else None
        if (target is None or target.draining) and movable(rec):
            self._route(p, pool.name, "")  # it moves with its session
        elif target is None or target.draining:
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {rec.id[:8]} lost its worker", session=rec.id,
                worker=(rec.worker or b"").decode(errors="replace")))
        elif target.can_start(p.session):
            self._dispatch(target, p)
        else:
            self._enqueue(pool, target.queue, p)

    def _to_worker(self, w: WorkerRecord, frames: list[Any]) -> bool:
        try:
            self._send_worker(w.id, frames)
            return True
        except WorkerUnreachable:
            self.roster.remove(w, "crashed (connection lost)")
            return False

    def _to_peer(self, wid: bytes, frames: list[bytes]) -> None:
        """Best effort to a peer we hold no record of (it may be gone already)."""
        try:
            self._send_worker(wid, frames)
        except WorkerUnreachable:
            pass

    def _wake(self, when: float) -> None:
        self.timers.wake(when)  # (the timers are made last: they use every other part)
