"""The broker's routing core: pools, workers, sessions, queues, pins and recycling, no sockets.

Events come in through a small public API: the frames a socket delivered
(:meth:`Core.on_client_frames`, :meth:`Core.on_worker_frames`), a worker's connection lost
(:meth:`Core.worker_lost`) and the clock (:meth:`Core.tick`). Every event carries ``now``, the
monotonic time the shell read for it: the core reads no clock of its own, so its rules run on
the time it is given (the table tests drive it with a fake clock). Wall-clock time is only
displayed (``wall``, injected). Everything it needs done in the world goes through one
``broker.port.Port`` the shell implements (frames to clients and workers, a hung worker stopped).
``broker.broker.Broker`` is the zmq shell that holds a core; tests/test_core.py drives one with a
recording port, in milliseconds, no processes.
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

from dspex.errors import (
    Cancelled,
    DspexError,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    SessionClosed,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
    UnknownOp,
    WorkerBusy,
    WorkerCrashed,
)
from dspex.health import SERVICE, failure_kind
from dspex.pools import PoolConfig
from dspex.protocol import (
    B_BYE,
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_REREGISTER,
    BROKER_OPS,
    BUDGET_EPHEMERAL,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    PROTOCOL_VERSION,
    STREAM_OPS,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
    WORKER_OPS,
    OPS,
    Affinity,
    Op,
    Status,
    pack_error,
    pack_reply_header,
    pack_request_head,
    unpack_reply_head,
    unpack_request_header,
)
from broker.port import Port, WorkerUnreachable
from broker.recycling import Recycler
from broker.sessions import SessionBook
from broker.state import GoneWorkers, Notices, Pending, Pool, SessionRecord, WorkerRecord, bucket_bounds

if TYPE_CHECKING:
    import zmq  # frames only: the core never touches a socket

log = logging.getLogger("dspex.broker")

_STRICT = (Affinity.STRICT_QUEUE, Affinity.STRICT_FAIL_FAST)
_MAX_BUDGET_MS = 2**31 - 1  # ~24 days: longer deadlines are "none" in practice
PREFETCH_YOUNG = 0.010  # seconds: prefetch only behind a call that started this recently
# refusals and queue timeouts are logged as counts, at most once per pool and kind this often
NOTICE_EVERY = 10.0
# failures counted and logged in bulk (``Notices``), not one line per call
_BULK_CODES = (PoolSaturated.code, QueueTimeout.code)


@dataclass(frozen=True)
class OpCall:
    """A broker op as its handler gets it."""

    session: str  # the request header's session
    pool: str  # the request header's pool
    args: dict[str, Any]  # the op's arguments, checked against its definition, defaults filled in
    owner: str  # the caller's client identity


Handler = Callable[["Core", OpCall], Any]  # a broker op's handler: its result is the reply


def _error_code(frames: list[zmq.Frame]) -> str:
    """The code of a worker's error reply (its last frame: the error map); only error replies pay."""
    try:
        body = msgpack.unpackb(frames[-1].buffer)
        return str(body.get("code") or "error") if isinstance(body, dict) else "error"
    except Exception:
        return "error"


class Core:
    """Routes client requests to pool workers under the pools' affinity rules; owns the session
    book (``book``) and the recycler (``recycler``)."""

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
        self.now = now  # the time of the event being handled (every public event sets it)
        self.wall = wall
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        self.max_sessions = max_sessions
        # histogram buckets reach the longest wait a pool allows: its queue timeout, or the drain
        # deadline (the longest a call may run on a worker being recycled)
        longest = max([60.0, *(max(p.queue_timeout, p.drain_timeout) for p in pools)])
        bounds = bucket_bounds(longest)
        self.pools: dict[str, Pool] = {p.name: Pool(p, bounds) for p in pools}
        self.notices = Notices(NOTICE_EVERY)
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=200)  # recent starts, recycles, crashes, exits
        self.admins: Callable[[], set[str]] | None = None  # client keys allowed admin ops (None: everyone)
        self.gone = GoneWorkers()
        self.book = SessionBook(self.sessions, self.pools, self.workers, self.gone, fail=self._fail,
                                to_worker=self._to_worker)
        self.recycler = Recycler(self.workers, port, fail=self._fail, to_worker=self._to_worker,
                                 to_peer=self._to_peer, remove_worker=self._remove_worker)
        self.running: dict[tuple[bytes, int], WorkerRecord] = {}  # for stream credit/cancel
        self.started = wall()
        self.booted = now
        self._beat_due = now + heartbeat_interval
        self._grace_over = False  # the restart grace has passed (unclaimed pins retired)
        self.counters = {"garbage_frontend": 0, "garbage_backend": 0, "expired_unsent": 0}
        self.stack_info: dict[str, Any] = {}  # what ``ping`` and ``status`` say about this stack (the shell's)

    # -- frontend -------------------------------------------------------------------------
    # -- events -------------------------------------------------------------------------------
    def on_client_frames(self, frames: list[zmq.Frame], now: float) -> None:
        """A message from a client: ``[client id, request header, *payload]``."""
        self.now = now
        client = frames[0].bytes
        if len(frames) < 2:
            self.counters["garbage_frontend"] += 1
            self._error(client, 0, ProtocolError("empty message: expected [header, *payload]"))
            return
        try:
            header = unpack_request_header(frames[1].buffer)
        except ProtocolError as err:
            self.counters["garbage_frontend"] += 1
            log.warning("malformed request header from client %s: %s", client.hex()[:12], err.message)
            self._error(client, 0, err)
            return
        op = header.op
        owner = self.port.client_identity(frames[1])
        if op in WORKER_OPS:
            deadline = now + header.timeout_ms / 1000 if header.timeout_ms > 0 else math.inf
            p = Pending(client, header.req_id, op, header.session, frames[1], frames[2:], now, deadline, owner=owner)
            self._route(p, header.pool, header.worker)
        elif op in BROKER_OPS:
            try:
                args = OPS[op].bind_map(msgpack.unpackb(frames[2].buffer) if len(frames) > 2 else {})
                result = self.ops[op](self, OpCall(header.session, header.pool, args, owner))
            except DspexError as err:
                self._error(client, header.req_id, err)
            except Exception as exc:
                self._error(client, header.req_id, ProtocolError(f"bad {op} request: {exc}"))
            else:
                self._to_client([client, pack_reply_header(Status.OK.value, header.req_id), msgpack.packb(result)])
        elif op in STREAM_OPS:
            self._stream_control(client, header.req_id, header.pool, op, frames)
        else:
            self._error(client, header.req_id, UnknownOp(f"unknown op {op!r}"))

    def _stream_control(self, client: bytes, req_id: int, pool_name: str, op: str, frames: list[zmq.Frame]) -> None:
        key = (client, req_id)
        w = self.running.get(key)
        if w is not None:
            n = 0
            if op == Op.CREDIT.value and len(frames) > 2:
                try:
                    n = int(msgpack.unpackb(frames[2].buffer))
                except Exception:
                    self.counters["garbage_frontend"] += 1
                    return
            elif op == Op.CANCEL.value and (p := w.inflight.get(key)) is not None:
                p.cancelled = True  # its error reply counts as ``cancelled``, not as a worker error
            self._to_worker(w, [B_CREDIT if op == Op.CREDIT.value else B_CANCEL, client, msgpack.packb([req_id, n])])
            return
        pool = self.pools.get(pool_name)
        if op == Op.CANCEL.value and pool is not None and (p := pool.take(client, req_id)) is not None:
            self._fail(p, pool, Cancelled("cancelled while queued"))

    def _error(self, client: bytes, req_id: int, err: DspexError) -> None:
        self._to_client(
            [client, pack_reply_header(Status.ERROR.value, req_id), pack_error(err.code, err.message, **err.details)])

    def _fail(self, p: Pending, pool: Pool | None, err: DspexError) -> None:
        if pool is not None:
            pool.outcomes[(p.op, err.code)] += 1
            self._note_failure(pool, err.code, str(err.details.get("worker") or ""))
        if err.code not in _BULK_CODES:
            log.info("call failed in the broker: pool=%s session=%s request=%d op=%s error=%s: %s",
                     pool.name if pool is not None else "-", p.session[:8] or "-", p.req_id, p.op, err.code,
                     err.message)
        self._error(p.client, p.req_id, err)

    def _note_failure(self, pool: Pool, code: str, worker: str = "") -> None:
        """Count a failed answer in the pool's health window: the service's, the caller's, or
        (a session whose worker was recycled or stopped) the operator's."""
        wid = worker.encode()
        cleanly = wid in self.workers or (bool(wid) and not self.gone.crashed(wid))
        pool.recent.add(failure_kind(code, cleanly), code, self.now)

    def _route(self, p: Pending, pool_name: str, claimed_worker: str) -> None:
        pool = self.pools.get(pool_name)
        if pool is None:
            self._fail(p, None, PoolNotFound(f"no pool named {pool_name!r}; pools: {', '.join(sorted(self.pools))}"))
            return
        if not p.session or pool.mode is Affinity.NONE:
            self._run_anywhere(pool, p)
            return
        rec = self.sessions.get(p.session)
        if rec is None and (why := self.book.closed.why(p.session)) is not None:
            lost = self.book.closed.worker(p.session)
            if lost:
                self._fail(p, pool, self._worker_gone(p.session, lost, why))
            else:
                self._fail(p, pool, SessionClosed(f"session {p.session[:8]} {why}", session=p.session))
            return
        if rec is None:
            if len(self.sessions) >= self.max_sessions:
                self._fail(p, pool, SessionQuotaExceeded(f"the broker holds {len(self.sessions)} sessions, its limit"))
                return
            rec = self.sessions[p.session] = SessionRecord(p.session, pool.name, self.wall(), self.now, owner=p.owner)
            if claimed_worker:
                # a pin from before a broker restart: keep it if that incarnation is back
                wid = claimed_worker.encode()
                known = self.workers.get(wid)
                if (known is not None and known.pool is pool) or pool.mode in _STRICT:
                    self._pin(rec, wid)
        elif rec.owner != p.owner:
            self._fail(p, pool, SessionNotYours(f"session {p.session[:8]} belongs to another client", session=p.session))
            return
        elif rec.closing:
            self._fail(p, pool, SessionClosed(f"session {p.session[:8]} {rec.closing}", session=p.session))
            return
        elif rec.pool != pool.name:
            self._fail(p, pool, SessionPoolMismatch(
                f"session {p.session[:8]} belongs to pool {rec.pool!r}, not {pool.name!r}", session=p.session))
            return
        rec.last_used = p.enqueued
        rec.calls += 1
        if rec.worker is None:
            w = pool.least_loaded()
            if w is None:
                self._enqueue(pool, pool.queue, p)  # pinned when a worker takes it
                return
            self._pin(rec, w.id)
        pinned = rec.worker
        assert pinned is not None
        w = self.workers.get(pinned)
        if w is None or w.draining:
            if w is None and pool.mode in _STRICT and self._in_restart_grace(pinned):
                # just (re)started: its worker may be alive and not re-registered yet; wait for it
                self._enqueue(pool, pool.awaiting.setdefault(pinned, deque()), p)
                return
            if pool.mode in _STRICT:
                if w is None:  # its worker left: from now on the session is a tombstone
                    self._fail(p, pool, self._worker_gone(rec.id, pinned, self.gone.why(pinned)))
                    self.book.retire(rec, pinned)
                else:
                    self._fail(p, pool, self._worker_gone(rec.id, pinned, "is being recycled"))
                return
            # hint: the session re-pins to the least-loaded worker
            self._pin(rec, None)
            new = pool.least_loaded()
            if new is None:
                self._enqueue(pool, pool.queue, p)
                return
            self._pin(rec, new.id)
            w = new
        if w.can_start(p.session):
            self._dispatch(w, p)
        elif pool.mode is Affinity.STRICT_QUEUE:
            # (pool.queued counts every queue: asked last)
            if not w.queue and self._may_prefetch(w) and pool.queued < pool.config.queue_max:
                self._dispatch(w, p)
            else:
                self._enqueue(pool, w.queue, p)
        elif pool.mode is Affinity.STRICT_FAIL_FAST:
            self._fail(p, pool, WorkerBusy(f"worker {w.incarnation[:8]} of session {rec.id[:8]} is busy", session=rec.id))
        else:  # hint: any idle worker, else the first one to free up
            self._run_anywhere(pool, p)

    @staticmethod
    def _worker_gone(session: str, wid: bytes, why: str) -> SessionWorkerUnavailable:
        incarnation = wid.decode(errors="replace")
        return SessionWorkerUnavailable(f"session {session[:8]} is pinned to worker {incarnation[:8]}, which {why}",
                                        session=session, worker=incarnation)

    def _pin(self, rec: SessionRecord, wid: bytes | None) -> None:
        """The one place a session's pin changes: the workers' session sets follow it."""
        old = self.workers.get(rec.worker) if rec.worker else None
        if old is not None:
            old.sessions.discard(rec.id)
        rec.worker = wid
        new = self.workers.get(wid) if wid else None
        if new is not None:
            new.sessions.add(rec.id)

    def _restart_grace(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness

    def _in_restart_grace(self, wid: bytes) -> bool:
        return wid not in self.gone and self.now - self.booted < self._restart_grace()

    def _run_anywhere(self, pool: Pool, p: Pending) -> None:
        w = pool.idle_worker()
        if w is not None and not pool.queue:
            self._dispatch(w, p)
        else:
            self._enqueue(pool, pool.queue, p)

    def _enqueue(self, pool: Pool, queue: deque[Pending], p: Pending) -> None:
        if not pool.admit(queue, p):
            if n := self.notices.note((pool.name, PoolSaturated.code), self.now):
                self._log_notice(pool, PoolSaturated.code, n, 0.0)
            self._fail(p, pool, PoolSaturated(
                f"pool {pool.name!r} has {pool.queued} queued requests, its limit", pool=pool.name))

    def _dispatch(self, w: WorkerRecord, p: Pending) -> None:
        now = self.now
        if now > p.deadline:
            self.counters["expired_unsent"] += 1  # the client gave up already and raised Timeout
            return
        pool = w.pool
        queue_left = p.enqueued + pool.config.queue_timeout - now
        if queue_left < 0:  # waited out its queue time between two sweeps
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
        if not p.session:
            head = pack_request_head(p.client, call_ms, queue_ms)
        elif pool.mode is Affinity.NONE:  # nothing of it stays on the worker
            head = pack_request_head(p.client, call_ms, queue_ms, 0, BUDGET_EPHEMERAL)
        else:
            rec = self.sessions.get(p.session)
            if rec is not None:
                rec.touched.add(w.id)  # every worker that may hold its state gets the release
            head = pack_request_head(p.client, call_ms, queue_ms, math.ceil(pool.config.session_ttl))
        p.started = now
        pool.queue_wait.observe(now - p.enqueued)
        w.inflight[key] = p
        self.running[key] = w
        try:
            self._send_worker(w.id, [head, p.header, *p.payload])
        except WorkerUnreachable:
            del w.inflight[key]  # never delivered: not a crash mid-request
            self.running.pop(key, None)
            self._remove_worker(w, "crashed (connection lost)")
            self._hand_back(p, pool, w, "crashed (connection lost)")

    def _hand_back(self, p: Pending, pool: Pool, w: WorkerRecord, why: str) -> None:
        """A request ``w`` never started: route it again where the pool allows, else say so
        (a did-not-run error: the caller may retry)."""
        if not p.session or pool.mode in (Affinity.HINT, Affinity.NONE):
            self._route(p, pool.name, "")
            return
        self._fail(p, pool, SessionWorkerUnavailable(
            f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why} before running "
            "this request (it did not run)", session=p.session, worker=w.incarnation))

    def _to_worker(self, w: WorkerRecord, frames: list[Any]) -> bool:
        try:
            self._send_worker(w.id, frames)
            return True
        except WorkerUnreachable:
            self._remove_worker(w, "crashed (connection lost)")
            return False

    def _to_peer(self, wid: bytes, frames: list[bytes]) -> None:
        """Best effort to a peer we hold no record of (it may be gone already)."""
        try:
            self._send_worker(wid, frames)
        except WorkerUnreachable:
            pass

    def _may_prefetch(self, w: WorkerRecord) -> bool:
        """Send ``w`` a pinned request before its running call ends (``prefetch`` per pool)?

        strict_queue, capacity-1 workers only (strict_fail_fast keeps "busy means busy"; capacity
        > 1 already has slots), and only while its calls are short: its last call took, and its
        running call has so far taken, under ``PREFETCH_YOUNG``. Short calls are where the idle
        broker round trip costs; behind a long call (or on a worker that has not answered yet) the
        request waits in the broker as before (cancellable, a crash says it did not run)."""
        pool = w.pool
        if (w.last_call >= PREFETCH_YOUNG or pool.mode is not Affinity.STRICT_QUEUE or w.capacity != 1
                or w.draining or w.adopted or not w.inflight or len(w.inflight) - 1 >= pool.config.prefetch):
            return False
        now = self.now
        for p in w.inflight.values():
            if now - p.started >= PREFETCH_YOUNG:
                return False
        return True

    def _feed(self, w: WorkerRecord) -> None:
        """Give a worker its next work: free slots first, then what it may prefetch."""
        self._feed_free(w)
        while w.queue and w.free <= 0 and self._may_prefetch(w):
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
                self._pin(rec, w.id)
            if rec is not None and rec.worker != w.id and pool.mode in _STRICT:
                # its session was pinned elsewhere while it waited: route it there
                self._route_pinned(pool, p, rec)
                continue
            if p.session and w.capacity > 1 and not w.can_start(p.session):
                w.queue.append(p)  # a call of a session already running here waits its turn
                continue
            self._dispatch(w, p)

    def _route_pinned(self, pool: Pool, p: Pending, rec: SessionRecord) -> None:
        target = self.workers.get(rec.worker) if rec.worker else None
        if target is None or target.draining:
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {rec.id[:8]} lost its worker", session=rec.id,
                worker=(rec.worker or b"").decode(errors="replace")))
        elif target.can_start(p.session):
            self._dispatch(target, p)
        else:
            self._enqueue(pool, target.queue, p)

    def on_worker_frames(self, frames: list[zmq.Frame], now: float) -> None:
        """A message from a worker: ``[worker id, command frame, *frames]``."""
        self.now = now
        wid = frames[0].bytes
        if len(frames) < 2:
            self.counters["garbage_backend"] += 1
            return
        first = frames[1].bytes
        command = first[:1]
        w = self.workers.get(wid)
        if w is not None:
            w.expiry = now + self.heartbeat_interval * self.heartbeat_liveness
        if command == W_REPLY or command == W_PARTIAL:
            try:
                if len(frames) < 3:
                    raise ProtocolError("no reply header")
                ok, req_id, client = unpack_reply_head(first)
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
            self._to_client([client, *frames[2:]])
            assert w is not None
            if command == W_PARTIAL:
                return
            p = w.inflight.pop((client, req_id), None)
            if p is not None:
                self.running.pop((client, req_id), None)
                outcome = "ok" if ok else "cancelled" if p.cancelled else "error"
                if outcome == "ok":
                    w.served += 1
                else:
                    if not p.cancelled:
                        w.errors += 1
                    self._note_failure(w.pool, "cancelled" if p.cancelled else _error_code(frames))
                w.pool.observe(p.op, outcome, now - p.started)
                w.last_call = now - p.started
                rec = self.sessions.get(p.session) if p.session else None
                if rec is not None:
                    rec.last_used = now  # idle time counts from the end of the last call
                    if rec.closing and not self.book.running(rec):
                        self.book.release(rec)
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
                    if isinstance(stats, dict):
                        w.stats = stats
                        if w.adopted:  # calls from before a broker restart that ended unseen
                            running = int(stats.get("running", 0))
                            w.adopted = min(w.adopted, max(0, running - len(w.inflight)))
                            self._feed(w)
                except Exception:
                    self.counters["garbage_backend"] += 1
        elif command == W_READY:
            self._on_ready(wid, frames)
        elif command == W_DISCONNECT:
            self._to_peer(wid, [B_BYE])  # it waits for this before exiting (its goodbye arrived)
            if w is not None:
                self._remove_worker(w, "was recycled" if w.pool.recycling == w.id else "exited", clean=True)
        elif command == W_DRAIN:
            if w is not None and not w.draining:
                log.info("worker %s (pid %d) is stopping: draining", w.incarnation[:8], w.pid)
                self.recycler.start_draining(w, "is stopping", now)
        else:
            self.counters["garbage_backend"] += 1
            log.warning("unknown command %r from worker %s", command[:8], wid[:8])

    def _on_ready(self, wid: bytes, frames: list[zmq.Frame]) -> None:
        try:
            info = msgpack.unpackb(frames[2].buffer)
            pool_name = info["pool"]
            if not isinstance(pool_name, str):
                raise TypeError("pool must be a string")
            if not all(isinstance(info.get(k, 0), int) for k in ("pid", "capacity", "running")):
                raise TypeError("pid, capacity and running must be integers")
            version = info.get("version", 1)
        except Exception as exc:
            self.counters["garbage_backend"] += 1
            log.warning("malformed READY from %s: %s", wid[:8], exc)
            return
        w = self.workers.get(wid)
        if w is not None:  # a re-READY after a reconnect: same incarnation, same sessions
            self.port.worker_connected(wid, frames[0])
            return
        if version != PROTOCOL_VERSION:  # its frames would not parse here, nor ours there
            log.error("worker %s (pid %s, host %s) speaks wire protocol version %r, this broker speaks %d: "
                      "telling it to leave (run one dspex version on a stack)", wid[:8], info.get("pid"),
                      info.get("host", "?"), version, PROTOCOL_VERSION)
            self._to_peer(wid, [B_DISCONNECT])
            return
        pool = self.pools.get(pool_name)
        if pool is None:
            log.error("worker %s (pid %s) wants unknown pool %r; telling it to leave", wid[:8], info.get("pid"), pool_name)
            self._to_peer(wid, [B_DISCONNECT])
            return
        w = WorkerRecord(wid, pool, info, self.now, self.now + self.heartbeat_interval * self.heartbeat_liveness)
        self.workers[wid] = w
        pool.workers[wid] = w
        self.port.worker_connected(wid, frames[0])
        # re-adopt sessions a restarted broker learned about from clients before this READY
        w.sessions.update(r.id for r in self.sessions.values() if r.worker == wid)
        w.queue.extend(pool.awaiting.pop(wid, ()))
        pool.starts += 1
        self._event(pool.name, w, "start", "registered")
        log.info("worker %s ready: pool=%s pid=%s host=%s", w.incarnation[:8], pool.name, w.pid, w.host)
        self._feed(w)
        if pool.recycling is not None:
            # a rolling recycle waits for this replacement: go on now, not at the next sweep (an
            # operator who saw the replacement ready must not find the pool still "recycling")
            self.recycler.step(pool, self.now)

    def worker_lost(self, wid: bytes, now: float) -> None:
        """The connection of worker ``wid`` closed without a goodbye (the shell's socket monitor)."""
        self.now = now
        w = self.workers.get(wid)
        if w is not None:
            self._remove_worker(w, "was recycled" if w.pool.recycling == w.id else "crashed (connection lost)")

    def _remove_worker(self, w: WorkerRecord, why: str, clean: bool = False) -> None:
        """``clean``: the worker said goodbye, so it answered every request it started; what is
        still in flight never ran there (handed back, not ``WorkerCrashed``)."""
        if self.workers.pop(w.id, None) is None:
            return
        pool = w.pool
        pool.workers.pop(w.id, None)
        if "recycled" in why:
            pool.recycles += 1
            event = "recycle"
        elif clean:  # a clean SIGTERM exit (supervisorctl stop/restart, a deploy) is not a crash
            event = "exit"
        else:
            pool.crashes += 1
            event = "crash"
            pool.recent.add(SERVICE, "crash", self.now)
        self.gone.add(w.id, why, crashed=event == "crash")
        self._event(pool.name, w, event, why)
        # an intended recycle or a clean exit is routine (INFO); anything else needs a look
        log.log(logging.INFO if clean or why == "was recycled" else logging.WARNING,
                "worker %s (pid %d, pool %s) %s; %d in flight, %d queued, %d sessions",
                w.incarnation[:8], w.pid, pool.name, why, len(w.inflight), len(w.queue), len(w.sessions))
        inflight = list(w.inflight.items())
        queued = list(w.queue)
        w.inflight.clear()
        w.queue.clear()
        for sid in list(w.sessions):
            rec = self.sessions.get(sid)
            if rec is None or rec.worker != w.id:
                continue
            if pool.mode is Affinity.HINT and not rec.closing:
                self._pin(rec, None)  # re-pins on its next call
            else:  # its state is gone with the worker: the id stays as a tombstone only
                self.book.retire(rec, w.id)
        for key, p in inflight:
            self.running.pop(key, None)
            if clean:
                self._hand_back(p, pool, w, why)
            else:
                self._fail(p, pool, WorkerCrashed(
                    f"worker {w.incarnation[:8]} (pid {w.pid}) {why} while running this request",
                    worker=w.incarnation, session=p.session))
        for p in queued:
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why}",
                session=p.session, worker=w.incarnation))
        self.port.worker_gone(w.id)
        if pool.recycling == w.id:
            pool.recycle_started = self.now  # now wait for the replacement

    def tick(self, now: float) -> None:
        """The clock: what is due by ``now`` (heartbeats, queue deadlines, session TTLs, drain
        deadlines, rolling recycles, counted notices)."""
        self.now = now
        if now >= self._beat_due:
            self._heartbeat(now)
            self._beat_due = now + self.heartbeat_interval
        self._sweep(now)

    def _heartbeat(self, now: float) -> None:
        for w in list(self.workers.values()):
            if now > w.expiry:
                self._remove_worker(w, "stopped answering heartbeats")
            else:
                self._to_worker(w, [B_HEARTBEAT])

    def _sweep(self, now: float) -> None:
        for pool in self.pools.values():
            for p, gave_up in pool.expire(now):
                if gave_up:
                    self.counters["expired_unsent"] += 1
                    continue
                if n := self.notices.note((pool.name, QueueTimeout.code), now):
                    self._log_notice(pool, QueueTimeout.code, n, 0.0)
                self._fail(p, pool, QueueTimeout(
                    f"waited {now - p.enqueued:.1f}s in pool {pool.name!r}, over its queue timeout of "
                    f"{pool.config.queue_timeout:g}s", pool=pool.name))
            self.recycler.stop_overdue(pool, now)
            self.recycler.step(pool, now)
        if not self._grace_over and now - self.booted >= self._restart_grace():
            self._end_restart_grace()
        self.book.expire(now)
        for (name, code), n, span in self.notices.due(now):
            if (pool_ := self.pools.get(name)) is not None:
                self._log_notice(pool_, code, n, span)

    def _end_restart_grace(self) -> None:
        """Pins claimed by clients after a broker restart whose worker never came back: strict
        sessions end, and the calls that waited for that worker are answered."""
        self._grace_over = True
        for rec in [r for r in self.sessions.values() if r.worker and r.worker not in self.workers]:
            if self.pools[rec.pool].mode in _STRICT:
                self.book.retire(rec, rec.worker)
        for pool in self.pools.values():
            for wid, p in pool.take_awaiting():
                self._fail(p, pool, SessionWorkerUnavailable(
                    f"session {p.session[:8]} is pinned to worker {wid.decode(errors='replace')[:8]}, which did not "
                    f"re-register within {self._restart_grace():g}s of this broker's start",
                    session=p.session, worker=wid.decode(errors="replace")))

    def _log_notice(self, pool: Pool, code: str, n: int, span: float) -> None:
        """One line for ``n`` refusals or queue timeouts (``span`` > 0: counted over that many seconds)."""
        during = f" in the last {span:.0f}s" if span else ""
        if code == PoolSaturated.code:
            log.warning("pool %s refused %d request(s)%s: queue full (%d/%d queued; %s)", pool.name, n, during,
                        pool.queued, pool.config.queue_max, code)
        else:
            log.warning("pool %s: %d request(s) waited past its queue timeout of %gs%s (%d queued, %d workers "
                        "ready; %s)", pool.name, n, pool.config.queue_timeout, during, pool.queued,
                        pool.ready_count(), code)

    def _event(self, pool: str, w: WorkerRecord, event: str, why: str) -> None:
        self.events.append({"time": self.wall(), "pool": pool, "worker": w.incarnation, "pid": w.pid,
                            "event": event, "why": why})

