"""The broker's routing core: pools, workers, sessions, queues, pins and recycling, no sockets.

Events come in through a small public API: the frames a socket delivered (``on_client_frames``,
``on_worker_frames``), a connection lost (``worker_lost``, ``client_gone``) and the clock (``tick``, due
at ``next_deadline``). Each carries ``now``, the monotonic time the shell read for it: the core
reads no clock of its own (wall-clock time, injected, is only displayed). What it needs done in
the world goes through one ``broker.port.Port``. The core reads frames and replies, and owns its
rules as objects: placement (``broker.dispatch``: affinity, dispatch, prefetch), the session
book (``broker.sessions``), the roster of workers (``broker.roster``) and what a worker says
about itself (``broker.registrar``), the recycler
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from broker.answers import Answers, BackendGarbage, error_cause, unreadable_reply
from broker.checkpoints import Job
from broker.control import RequestControl
from broker.dispatch import Dispatcher
from broker.durable import DurableSessions
from broker.moves import SessionMoves
from broker.port import Port, WorkerUnreachable
from broker.recycling import Recycler
from broker.registrar import Registrar
from broker.roster import LOST, Roster, recycled
from broker.sessions import SessionBook
from broker.state import (
    Clock,
    GoneWorkers,
    Pending,
    Pool,
    SessionRecord,
    WorkerRecord,
)
from broker.stats import bucket_bounds
from broker.timers import Timers
from broker.turned_away import TurnedAway
from dspex.stack.pools import PoolConfig
from dspex.wire.errors import (
    DspexError,
    ProtocolError,
    UnknownOp,
)
from dspex.wire.headers import (
    pack_reply_header,
    request_id_of,
    unpack_reply_envelope,
    unpack_request_header,
)
from dspex.wire.ops import BROKER_OPS, OPS, STREAM_OPS, WORKER_OPS
from dspex.wire.protocol import (
    B_DISCONNECT,
    B_REREGISTER,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    W_CHECKPOINT,
    W_PARTIAL,
    W_REPLY,
    Status,
)


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
        # the port's hot-path methods, bound once
        self._to_client = port.to_client
        self._send_worker = port.to_worker
        self._identity = port.client_identity
        self._client_seen = port.client_seen
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
        self.refusals: Callable[[], list[dict[str, Any]]] = list  # whom the CURVE allow-lists refused (none: ipc)
        self.turned_away = TurnedAway()  # workers told to leave at their READY (another pool, another version)
        self.stack_info: dict[str, Any] = {}  # what ``ping`` and ``status`` say about this stack (the shell's)
        self.answers = Answers(port, self.clock, self.workers, self.gone, self.sessions)
        self._garbage = BackendGarbage(port, self.counters)
        self._fail = self.answers.fail
        self.book = SessionBook(self.sessions, self.pools, self.workers, self.gone, clock=self.clock,
                                restart_grace=heartbeat_interval * heartbeat_liveness, max_sessions=max_sessions,
                                fail=self._fail, to_worker=self._to_worker, wake=self._wake)
        dispatcher = self.dispatcher = Dispatcher(self.pools, self.workers, self.sessions, self.running, self.gone,
                                                  clock=self.clock, port=port, answers=self.answers, book=self.book,
                                                  counters=self.counters)
        moves = SessionMoves(self.sessions, self.pools, self.workers, port=port, book=self.book, answers=self.answers,
                             to_worker=self._to_worker, dispatch=dispatcher.dispatch, route=dispatcher.route)
        self.durable = self.book.durable = dispatcher.durable = DurableSessions(
            self.sessions, self.pools, clock=self.clock, port=port, book=self.book, moves=moves, counters=self.counters)
        self.roster = dispatcher.roster = Roster(
            self.workers, self.sessions, self.running, self.gone, clock=self.clock, port=port, answers=self.answers,
            book=self.book,
            heartbeat_interval=heartbeat_interval, heartbeat_liveness=heartbeat_liveness, to_worker=self._to_worker,
            hand_back=dispatcher.hand_back, pin=self.book.pin, durable=self.durable)
        self.recycler = Recycler(self.workers, port, fail=self._fail, to_worker=self._to_worker,
                                 to_peer=self._to_peer, remove_worker=self.roster.remove, wake=self._wake,
                                 reroute=self.durable.reroute)
        self.registrar = Registrar(self.roster, dispatcher, self.recycler, self.durable, pools=self.pools,
                                   counters=self.counters, to_worker=self._to_worker, to_peer=self._to_peer,
                                   garbage=self._garbage, turned_away=self.turned_away)
        self.control = RequestControl(self.pools, self.running, port=port, answers=self.answers, counters=self.counters,
                                      to_worker=self._to_worker)
        self.timers = dispatcher.timers = Timers(
            self.pools, now=now, heartbeat_interval=heartbeat_interval, answers=self.answers, book=self.book,
            recycler=self.recycler, roster=self.roster, counters=self.counters)

    # -- events -------------------------------------------------------------------------------
    def on_client_frames(self, frames: list[Any], now: float) -> None:
        """A message from a client: ``[client id, request header, *payload]`` (the id as bytes or
        a frame, the rest frames)."""
        self.clock.now = now
        client = bytes(frames[0])
        if len(frames) < 2:
            self.counters["garbage_frontend"] += 1
            self.answers.error(client, 0, ProtocolError("empty message: expected [header, *payload]"))
            return
        try:
            header = unpack_request_header(frames[1])
        except ProtocolError as err:
            self.counters["garbage_frontend"] += 1
            self.port.log(logging.WARNING, "malformed request header from client %s: %s", client.hex()[:12], err.message)
            self.answers.error(client, request_id_of(frames[1]), err)
            return
        op, req_id, pool, session, worker, timeout_ms, flags = header
        owner = self._identity(frames[1])
        if op in WORKER_OPS:
            self._client_seen(client, frames[1])
            deadline = now + timeout_ms / 1000 if timeout_ms > 0 else math.inf
            # (positional: the hot path's one Pending per request)
            p = Pending(client, req_id, op, session, frames[1], frames[2:], now, deadline, 0.0, owner, False, flags)
            self.dispatcher.route(p, pool, worker)
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

    def on_worker_frames(self, frames: list[Any], now: float) -> None:
        """A message from a worker: ``[worker id, command frame, *frames]`` (the id as bytes or a
        frame, the rest frames)."""
        self.clock.now = now
        wid = bytes(frames[0])
        if len(frames) < 2:
            self.counters["garbage_backend"] += 1
            return
        first = frames[1].bytes
        command = first[:1]
        w = self.workers.get(wid)
        if w is not None:
            # an away worker's deadline is its renewal wait: a message its old connection still
            # held, read after that connection's loss, does not cut it short
            w.expiry = max(w.expiry, now + self.roster.silence) if w.away else now + self.roster.silence
        if command == W_REPLY or command == W_PARTIAL or command == W_CHECKPOINT:
            try:
                ok, req_id, client = unpack_reply_envelope(first)
            except ProtocolError as err:
                self._garbage(wid, w, err.message)
                return
            key = (client, req_id)
            if len(frames) < 3:
                self._garbage(wid, w, f"a reply to request {req_id} without its reply header")
                if w is None or key not in w.inflight or command == W_PARTIAL:
                    return
                # its caller hears it now, not at its timeout: the call ends in a broker-made error
                # reply (a checkpoint it may have meant is not there to keep)
                command, ok = W_REPLY, False
                frames = [frames[0], *unreadable_reply(w, req_id, client)]
            if w is None or key not in w.inflight:  # never sent to this worker (forged, or from before a restart)
                self.counters["garbage_backend"] += 1
                if w is None:
                    self._to_peer(wid, [B_REREGISTER])
                elif w.adopted and command != W_PARTIAL:
                    # a call it ran for the broker before us ended (its reply, or a durable
                    # call's checkpoint with it): a slot frees
                    w.adopted -= 1
                    self.dispatcher.feed(w)
                return
            if command == W_PARTIAL:
                self._to_client([client, *frames[2:]])
                return
            p = w.inflight.pop(key)
            rec = self.sessions.get(p.session) if p.session else None
            durable = rec is not None and rec.durable is not None or command == W_CHECKPOINT
            if durable:  # held until its checkpoint is stored, its outcome counted then
                ok = self.durable.writes.answered(w, p, rec, frames, ok)
            else:
                self._to_client([client, *frames[2:]])
            self.running.pop(key, None)
            took = now - p.started
            if ok:
                w.served += 1
            else:
                if not p.cancelled:
                    w.errors += 1
                code, cause = ("cancelled", "") if p.cancelled else error_cause(frames)
                self.answers.note_failure(w.pool, code, cause=cause)
            w.pool.observe(p.op, None if durable else p.outcome(ok), took)
            w.last_call = took
            if rec is not None:
                rec.last_used = now  # idle time counts from the end of the last call
                if rec.closing and not self.book.running(rec):
                    self.book.release(rec)
                elif rec.durable is not None:
                    self.durable.note_use(rec)
                    self.durable.moves.call_ended(rec)
            if w.draining and not w.inflight:
                self._to_worker(w, [B_DISCONNECT])
            elif self.recycler.over_request_limit(w, now):  # exactly at the limit, not at the next tick
                self.recycler.recycle(w, now, f"{w.served + w.errors} requests reached max_requests "
                                              f"{w.pool.config.recycle.max_requests}")
            else:
                self.dispatcher.feed(w)
        else:
            self.registrar.on_command(wid, w, first, frames, now)

    def worker_lost(self, wid: bytes, now: float) -> None:
        """The connection of worker ``wid`` closed without a goodbye (the shell's socket monitor)."""
        self.clock.now = now
        w = self.workers.get(wid)
        if w is not None:
            self.roster.lost(w, recycled(w) if w.pool.recycling == w.id else LOST)

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

    def _to_worker(self, w: WorkerRecord, frames: list[Any]) -> bool:
        try:
            self._send_worker(w.id, frames)
            return True
        except WorkerUnreachable:
            self.roster.lost(w)
            return False

    def _to_peer(self, wid: bytes, frames: list[bytes]) -> None:
        """Best effort to a peer we hold no record of (it may be gone already)."""
        try:
            self._send_worker(wid, frames)
        except WorkerUnreachable:
            pass

    def _wake(self, when: float) -> None:
        self.timers.wake(when)  # (the timers are made last: they use every other part)
