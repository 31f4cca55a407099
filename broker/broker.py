"""The broker: a ROUTER frontend for clients, a ROUTER backend for workers, routing by session.

Per message the broker decodes one small msgpack header and forwards the payload frames untouched
(``copy=False``). It drains every ready message per poll wake-up. A socket monitor on the backend
reports a worker's disconnect within about a millisecond; heartbeats catch hosts that vanish
without closing their connection.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from dspex import config
from dspex.zmqfast import NOBLOCK, recv_frames, send_frames
from dspex.errors import (
    Cancelled,
    ConfigError,
    DspexError,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    Refused,
    SessionClosed,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
    UnknownOp,
    WorkerBusy,
    WorkerCrashed,
)
from dspex.protocol import (
    B_BYE,
    B_CANCEL,
    B_CREDIT,
    B_DISCONNECT,
    B_HEARTBEAT,
    B_RELEASE_SESSION,
    B_REQUEST,
    B_REREGISTER,
    BROKER_OPS,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    STREAM_OPS,
    W_DISCONNECT,
    W_DRAIN,
    W_HEARTBEAT,
    W_PARTIAL,
    W_READY,
    W_REPLY,
    WORKER_OPS,
    BUDGET_EPHEMERAL,
    Affinity,
    Op,
    Status,
    pack_budget,
    pack_error,
    pack_reply_header,
    unpack_request_header,
)
from broker.nudge import SupervisorNudge
from broker.security import CLIENTS, WORKERS, secure_server, start_authenticator
from broker.state import GoneWorkers, Pending, Pool, SessionRecord, Tombstones, WorkerRecord, percentile
from dspex.pools import PoolConfig

log = logging.getLogger("dspex.broker")

_STRICT = (Affinity.STRICT_QUEUE, Affinity.STRICT_FAIL_FAST)
_DRAIN_BATCH = 2000  # messages per socket per wake-up before giving the others a turn
_SWEEP_EVERY = 0.05
_MIN_WORKER_AGE = 2.0  # policy never retires a worker younger than this (seconds)
_MAX_BUDGET_MS = 2**31 - 1  # ~24 days: longer deadlines are "none" in practice
# A worker's monitor disconnect is acted on this long after it is seen: the goodbye it queued
# before closing may still be on its way through the backend socket (a clean exit is no crash).
_GOODBYE_GRACE = 0.02
_CLIENT_HWM = 100_000  # replies queued for one client that is not reading (DSPEX_CLIENT_HWM)


@dataclass
class BrokerOptions:
    frontend: str
    backend: str
    pools: list[PoolConfig]
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    max_sessions: int = 100_000
    max_message: int = 0
    metrics_port: int = 0
    curve_secret: bytes | None = None
    curve_public: bytes | None = None
    curve_allowed_dir: str | None = None
    supervisor_conf: str | None = None  # a supervisor.conf: nudge its supervisord when workers leave


class Broker:
    """Routes client requests to pool workers under the pools' affinity rules."""

    def __init__(self, options: BrokerOptions, context: zmq.Context[Any] | None = None) -> None:
        self.options = options
        self.ctx = context or zmq.Context.instance()
        self.pools: dict[str, Pool] = {p.name: Pool(p) for p in options.pools}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.closed = Tombstones()  # closed and expired session ids: late calls get SessionClosed
        self._disconnects: dict[bytes, float] = {}  # worker -> when the monitor saw it go
        self.events: deque[dict[str, Any]] = deque(maxlen=200)  # recent starts, recycles, crashes, exits
        self._admins: Callable[[], set[str]] | None = None  # z85 keys allowed admin ops (None: everyone)
        self.gone = GoneWorkers()
        self.fd_worker: dict[int, bytes] = {}
        self.running: dict[tuple[bytes, int], WorkerRecord] = {}  # for stream credit/cancel
        self.started = time.time()
        self._booted = time.monotonic()
        # strict calls pinned to an incarnation not (yet) registered with this young broker
        self.awaiting: dict[bytes, tuple[Pool, deque[Pending]]] = {}
        self.counters = {"garbage_frontend": 0, "garbage_backend": 0, "expired_unsent": 0,
                         "replies_dropped_slow_client": 0, "replies_to_gone_clients": 0}
        self._client_hwm = int(os.environ.get("DSPEX_CLIENT_HWM", _CLIENT_HWM))
        self._slow_clients: set[bytes] = set()
        self._stop = False
        self._bound: dict[str, int] = {}  # ipc socket files this broker bound -> their inode
        self._auth: ThreadAuthenticator | None = None
        self.nudge = SupervisorNudge.from_config(options.supervisor_conf)
        self.frontend: zmq.Socket[Any]
        self.backend: zmq.Socket[Any]
        self.monitor: zmq.Socket[Any]

    # -- lifecycle ------------------------------------------------------------------------
    def bind(self) -> None:
        max_message = self.options.max_message or config.max_message_bytes()
        tcp = [ep for ep in (self.options.frontend, self.options.backend) if ep.startswith("tcp://")]
        if tcp:
            if not self.options.curve_secret:
                raise ConfigError(
                    f"refusing to bind {tcp[0]} without CURVE keys: TCP endpoints need --curve-secret-key "
                    "(eval/exec through the broker is remote code execution; only authenticated peers may reach it)")
            self._auth, admins = start_authenticator(self.ctx, self.options.curve_allowed_dir)
            if admins is not None and self.options.frontend.startswith("tcp://"):
                self._admins = admins.keys
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        for sock, endpoint, plane in ((self.frontend, self.options.frontend, CLIENTS),
                                      (self.backend, self.options.backend, WORKERS)):
            config.tune_socket(sock, max_message=max_message)
            # bounded replies per client (frontend); workers' queues are bounded by pool limits
            sock.setsockopt(zmq.SNDHWM, self._client_hwm if sock is self.frontend else 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            config.prepare_bind(endpoint)
            if endpoint.startswith("tcp://"):
                secure_server(sock, endpoint, self.options.curve_secret, self.options.curve_public, plane)
            sock.bind(endpoint)
            if endpoint.startswith("ipc://"):  # ours to unlink at exit, and only this very file
                self._bound[endpoint[len("ipc://"):]] = os.stat(endpoint[len("ipc://"):]).st_ino
        # a send to a worker whose connection is already gone raises instead of vanishing; on the
        # frontend, a full or gone client raises too (counted in _to_client), never blocks
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No ROUTER_HANDOVER: with it, any peer connecting with a live worker's identity takes
        # that identity (and its requests) and cuts the real worker off. A worker's own stale
        # connection (a host gone without a FIN) is closed by ZMTP heartbeats instead.
        ivl = max(1, int(self.options.heartbeat_interval * 1000))
        self.backend.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        self.backend.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl * self.options.heartbeat_liveness)
        self.monitor = self.backend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        log.info("broker frontend=%s backend=%s pools=%s", self.options.frontend, self.options.backend,
                 ",".join(f"{p.name}:{p.mode.value}" for p in self.pools.values()))

    def stop(self, *_: Any) -> None:
        self._stop = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        for sock in (getattr(self, "monitor", None), getattr(self, "frontend", None), getattr(self, "backend", None)):
            if sock is not None:
                sock.close(0)
        # libzmq can leave ipc socket files behind when the process exits right after closing;
        # a client would then wait out its timeout on a file nobody listens on
        # (only files this broker bound: never another live stack's sockets)
        for path, inode in self._bound.items():
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        interval = self.options.heartbeat_interval
        next_beat = time.monotonic() + interval
        next_sweep = time.monotonic() + _SWEEP_EVERY
        while not self._stop:
            timeout = max(0.0, min(next_beat, next_sweep) - time.monotonic())
            if self._disconnects:
                timeout = min(timeout, _GOODBYE_GRACE)
            events = dict(poller.poll(int(timeout * 1000)))
            if self.backend in events:
                self._drain(self.backend, self._on_backend)
            if self.monitor in events:
                self._drain_monitor()
            if self._disconnects:
                self._settle_disconnects()
            if self.frontend in events:
                self._drain(self.frontend, self._on_frontend)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP_EVERY
            if now >= next_beat:
                self._heartbeat(now)
                next_beat = now + interval

    def _drain(self, sock: zmq.Socket[Any], handler: Any) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # one bad message must never stop the broker
                log.exception("error handling a message; dropped it")

    # -- frontend -------------------------------------------------------------------------
    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
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
        owner = self._identity(frames[1])
        if op in WORKER_OPS:
            now = time.monotonic()
            deadline = now + header.timeout_ms / 1000 if header.timeout_ms > 0 else math.inf
            p = Pending(client, header.req_id, op, header.session, frames[1], frames[2:], now, deadline, owner=owner)
            self._route(p, header.pool, header.worker)
        elif op in BROKER_OPS:
            try:
                args = msgpack.unpackb(frames[2].buffer) if len(frames) > 2 else {}
                if not isinstance(args, dict):
                    raise ProtocolError("broker op arguments must be a map")
                result = self._admin(op, header.session, header.pool, args, owner)
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

    def _identity(self, frame: zmq.Frame) -> str:
        """Who sent this: the CURVE key ZAP authenticated (its User-Id) on a TCP frontend. On ipc
        every peer is our own uid (the run directory is 0700), so all share one identity."""
        if not self.options.frontend.startswith("tcp://"):
            return ""
        try:
            return str(frame.get("User-Id"))
        except (zmq.ZMQError, AttributeError, TypeError, UnicodeDecodeError):
            return ""

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
            self._to_worker(w, [B_CREDIT if op == Op.CREDIT.value else B_CANCEL, client, msgpack.packb([req_id, n])])
            return
        pool = self.pools.get(pool_name)
        if op != Op.CANCEL.value or pool is None:
            return
        for queue in (pool.queue, *(wk.queue for wk in pool.workers.values())):
            for p in queue:
                if p.client == client and p.req_id == req_id:
                    queue.remove(p)
                    pool.queued -= 1
                    self._fail(p, pool, Cancelled("cancelled while queued"))
                    return

    def _error(self, client: bytes, req_id: int, err: DspexError) -> None:
        self._to_client(
            [client, pack_reply_header(Status.ERROR.value, req_id), pack_error(err.code, err.message, **err.details)])

    def _to_client(self, frames: list[Any]) -> None:
        """Replies queue per client up to the frontend's SNDHWM: a client that stops reading
        loses replies past it (counted, logged once per client; its calls time out) instead of
        growing the broker without bound."""
        try:
            send_frames(self.frontend, frames, NOBLOCK)
        except zmq.Again:
            self.counters["replies_dropped_slow_client"] += 1
            client = bytes(frames[0])
            if client not in self._slow_clients:
                if len(self._slow_clients) > 10_000:
                    self._slow_clients.clear()
                self._slow_clients.add(client)
                log.warning("client %s is not reading its replies: %d queued, its limit; dropping replies",
                            client.hex()[:12], self._client_hwm)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.counters["replies_to_gone_clients"] += 1  # it disconnected; nobody waits for this

    def _fail(self, p: Pending, pool: Pool | None, err: DspexError) -> None:
        if pool is not None:
            pool.outcomes[(p.op, err.code)] += 1
        self._error(p.client, p.req_id, err)

    # -- routing (the affinity table of the brief) -----------------------------------------
    def _route(self, p: Pending, pool_name: str, claimed_worker: str) -> None:
        pool = self.pools.get(pool_name)
        if pool is None:
            self._fail(p, None, PoolNotFound(f"no pool named {pool_name!r}; pools: {', '.join(sorted(self.pools))}"))
            return
        if not p.session or pool.mode is Affinity.NONE:
            self._run_anywhere(pool, p)
            return
        rec = self.sessions.get(p.session)
        if rec is None and (why := self.closed.why(p.session)) is not None:
            self._fail(p, pool, SessionClosed(f"session {p.session[:8]} {why}", session=p.session))
            return
        if rec is None:
            if len(self.sessions) >= self.options.max_sessions:
                self._fail(p, pool, SessionQuotaExceeded(f"the broker holds {len(self.sessions)} sessions, its limit"))
                return
            rec = self.sessions[p.session] = SessionRecord(p.session, pool.name, owner=p.owner)
            if claimed_worker:
                # a pin from before a broker restart: keep it if that incarnation is back
                wid = claimed_worker.encode()
                known = self.workers.get(wid)
                if known is not None and known.pool is pool:
                    rec.worker = wid
                    known.sessions.add(rec.id)
                elif pool.mode in _STRICT:
                    rec.worker = wid
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
            rec.worker = w.id
            w.sessions.add(rec.id)
        pinned = rec.worker
        w = self.workers.get(pinned)
        if w is None or w.draining:
            if w is None and pool.mode in _STRICT and self._in_restart_grace(pinned):
                # just (re)started: its worker may be alive and not re-registered yet; wait for it
                self._enqueue(pool, self.awaiting.setdefault(pinned, (pool, deque()))[1], p)
                return
            if pool.mode in _STRICT:
                why = "is being recycled" if w is not None else self.gone.why(pinned)
                incarnation = pinned.decode(errors="replace")
                self._fail(p, pool, SessionWorkerUnavailable(
                    f"session {rec.id[:8]} is pinned to worker {incarnation[:8]}, which {why}",
                    session=rec.id, worker=incarnation,
                ))
                return
            # hint: the session re-pins to the least-loaded worker
            if w is not None:
                w.sessions.discard(rec.id)
            rec.worker = None
            new = pool.least_loaded()
            if new is None:
                self._enqueue(pool, pool.queue, p)
                return
            rec.worker = new.id
            new.sessions.add(rec.id)
            w = new
        if w.can_start(p.session):
            self._dispatch(w, p)
        elif pool.mode is Affinity.STRICT_QUEUE:
            self._enqueue(pool, w.queue, p)
        elif pool.mode is Affinity.STRICT_FAIL_FAST:
            self._fail(p, pool, WorkerBusy(f"worker {w.incarnation[:8]} of session {rec.id[:8]} is busy", session=rec.id))
        else:  # hint: any idle worker, else the first one to free up
            self._run_anywhere(pool, p)

    def _restart_grace(self) -> float:
        return self.options.heartbeat_interval * self.options.heartbeat_liveness

    def _in_restart_grace(self, wid: bytes) -> bool:
        return wid not in self.gone and time.monotonic() - self._booted < self._restart_grace()

    def _run_anywhere(self, pool: Pool, p: Pending) -> None:
        w = pool.idle_worker()
        if w is not None and not pool.queue:
            self._dispatch(w, p)
        else:
            self._enqueue(pool, pool.queue, p)

    def _enqueue(self, pool: Pool, queue: Any, p: Pending) -> None:
        if pool.queued >= pool.config.queue_max:
            self._fail(p, pool, PoolSaturated(
                f"pool {pool.name!r} has {pool.queued} queued requests, its limit", pool=pool.name))
            return
        queue.append(p)
        pool.queued += 1

    def _dispatch(self, w: WorkerRecord, p: Pending) -> None:
        now = time.monotonic()
        if now > p.deadline:
            self.counters["expired_unsent"] += 1  # the client gave up already and raised Timeout
            return
        key = (p.client, p.req_id)
        if key in self.running:  # a client reusing the id of a request still running
            self._fail(p, w.pool, ProtocolError(f"request id {p.req_id} is already in flight", req_id=p.req_id))
            return
        # the deadline travels with the request: the worker stops the call when it passes
        # (capped: a client may send any timeout_ms, and msgpack ints stop at 64 bits)
        call_ms = min(_MAX_BUDGET_MS, max(1, int((p.deadline - now) * 1000))) if p.deadline != math.inf else 0
        pool = w.pool
        if not p.session:
            budget = pack_budget(call_ms, 0)
        elif pool.mode is Affinity.NONE:
            budget = pack_budget(call_ms, 0, 0, BUDGET_EPHEMERAL)  # nothing of it stays on the worker
        else:
            rec = self.sessions.get(p.session)
            if rec is not None:
                rec.touched.add(w.id)  # every worker that may hold its state gets the release
            budget = pack_budget(call_ms, 0, math.ceil(pool.config.session_ttl))
        p.started = now
        w.inflight[key] = p
        self.running[key] = w
        try:
            send_frames(self.backend, [w.id, B_REQUEST, p.client, p.header, budget, *p.payload])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
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
            send_frames(self.backend, [w.id, *frames])
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._remove_worker(w, "crashed (connection lost)")
            return False

    def _to_peer(self, wid: bytes, frames: list[bytes]) -> None:
        """Best effort to a peer we hold no record of (it may be gone already)."""
        try:
            self.backend.send_multipart([wid, *frames])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise

    def _feed(self, w: WorkerRecord) -> None:
        """Give a worker with free slots its next work: its own queue first, then the pool's."""
        pool = w.pool
        while w.free > 0:
            if w.queue:
                p = w.next_queued()
                if p is not None:
                    pool.queued -= 1
                    self._dispatch(w, p)
                    continue
            if not pool.queue:
                return
            p = pool.queue.popleft()
            pool.queued -= 1
            rec = self.sessions.get(p.session) if p.session and pool.mode is not Affinity.NONE else None
            if rec is not None and rec.worker is None:
                rec.worker = w.id
                w.sessions.add(rec.id)
            if rec is not None and rec.worker != w.id and pool.mode in _STRICT:
                # its session was pinned elsewhere while it waited: route it there
                self._route_pinned(pool, p, rec)
                continue
            if p.session and w.capacity > 1 and not w.can_start(p.session):
                w.queue.append(p)  # a call of a session already running here waits its turn
                pool.queued += 1
                continue
            self._dispatch(w, p)

    def _route_pinned(self, pool: Pool, p: Pending, rec: SessionRecord) -> None:
        target = self.workers.get(rec.worker) if rec.worker else None
        if target is None or target.draining:
            self._fail(p, pool, SessionWorkerUnavailable(f"session {rec.id[:8]} lost its worker", session=rec.id))
        elif target.can_start(p.session):
            self._dispatch(target, p)
        else:
            self._enqueue(pool, target.queue, p)

    # -- backend --------------------------------------------------------------------------
    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        wid = frames[0].bytes
        if len(frames) < 2:
            self.counters["garbage_backend"] += 1
            return
        command = frames[1].bytes
        w = self.workers.get(wid)
        if w is not None:
            w.expiry = time.monotonic() + self.options.heartbeat_interval * self.options.heartbeat_liveness
        if command == W_REPLY or command == W_PARTIAL:
            if len(frames) < 4:
                self.counters["garbage_backend"] += 1
                return
            client = frames[2].bytes
            try:
                status, req_id = msgpack.unpackb(frames[3].buffer)[:2]
                known = w is not None and (client, req_id) in w.inflight
            except Exception:
                self.counters["garbage_backend"] += 1
                log.warning("malformed reply header from worker %s", wid[:8])
                return
            if not known:  # never sent to this worker (forged, or from before a restart): drop it
                self.counters["garbage_backend"] += 1
                if w is None:
                    self._to_peer(wid, [B_REREGISTER])
                return
            self._to_client([client, *frames[3:]])
            assert w is not None
            if command == W_PARTIAL:
                return
            p = w.inflight.pop((client, req_id), None)
            if p is not None:
                self.running.pop((client, req_id), None)
                now = time.monotonic()
                outcome = "ok" if status == Status.OK.value else "error"
                if outcome == "ok":
                    w.served += 1
                else:
                    w.errors += 1
                w.pool.observe(p.op, outcome, now - p.started)
                rec = self.sessions.get(p.session) if p.session else None
                if rec is not None:
                    rec.last_used = now  # idle time counts from the end of the last call
                    if rec.closing and not self._session_running(rec):
                        self._release_session(rec)
            if w.draining and not w.inflight:
                self._to_worker(w, [B_DISCONNECT])
            elif self._over_request_limit(w):
                self.recycle(w)  # exactly at the limit, not at the next sweep
            else:
                self._feed(w)
        elif command == W_HEARTBEAT:
            if w is None:
                self._to_peer(wid, [B_REREGISTER])
            elif len(frames) > 2:
                try:
                    stats = msgpack.unpackb(frames[2].buffer)
                    if isinstance(stats, dict):
                        w.stats = stats
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
                self._start_draining(w, "is stopping")
        else:
            self.counters["garbage_backend"] += 1
            log.warning("unknown command %r from worker %s", command[:8], wid[:8])

    def _on_ready(self, wid: bytes, frames: list[zmq.Frame]) -> None:
        try:
            info = msgpack.unpackb(frames[2].buffer)
            pool_name = info["pool"]
            if not isinstance(pool_name, str):
                raise TypeError("pool must be a string")
            if not all(isinstance(info.get(k, 0), int) for k in ("pid", "capacity")):
                raise TypeError("pid and capacity must be integers")
        except Exception as exc:
            self.counters["garbage_backend"] += 1
            log.warning("malformed READY from %s: %s", wid[:8], exc)
            return
        # The disconnect of an earlier connection on a reused fd must be seen before we map it.
        self._drain_monitor()
        fd = _source_fd(frames[0])
        w = self.workers.get(wid)
        if w is not None:  # a re-READY after a reconnect: same incarnation, same sessions
            self._map_fd(w, fd)
            return
        pool = self.pools.get(pool_name)
        if pool is None:
            log.error("worker %s (pid %s) wants unknown pool %r; telling it to leave", wid[:8], info.get("pid"), pool_name)
            self._to_peer(wid, [B_DISCONNECT])
            return
        expiry = time.monotonic() + self.options.heartbeat_interval * self.options.heartbeat_liveness
        w = WorkerRecord(wid, pool, info, expiry)
        self.workers[wid] = w
        pool.workers[wid] = w
        self._map_fd(w, fd)
        # re-adopt sessions a restarted broker learned about from clients before this READY
        w.sessions.update(r.id for r in self.sessions.values() if r.worker == wid)
        _, waiting = self.awaiting.pop(wid, (pool, deque()))
        w.queue.extend(waiting)  # already counted in pool.queued
        self._event(pool.name, w, "start", "registered")
        log.info("worker %s ready: pool=%s pid=%s host=%s", w.incarnation[:8], pool.name, w.pid, w.host)
        self._feed(w)

    def _map_fd(self, w: WorkerRecord, fd: int) -> None:
        if fd < 0:
            return
        if w.fd >= 0 and self.fd_worker.get(w.fd) == w.id:
            del self.fd_worker[w.fd]
        w.fd = fd
        self.fd_worker[fd] = w.id

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                wid = self.fd_worker.pop(int(event["value"]), None)
                if wid is not None and wid in self.workers:
                    self._disconnects.setdefault(wid, time.monotonic())

    def _settle_disconnects(self) -> None:
        """Workers whose connection closed: a goodbye queued before the close is read first (it
        travels through the backend socket, the disconnect through the monitor, in no fixed
        order), so a clean exit is never counted as a crash."""
        now = time.monotonic()
        due = [wid for wid, seen in self._disconnects.items() if now - seen >= _GOODBYE_GRACE]
        if not due:
            return
        self._drain(self.backend, self._on_backend)
        for wid in due:
            self._disconnects.pop(wid, None)
            w = self.workers.get(wid)
            if w is None:
                continue  # it said goodbye meanwhile
            if self.fd_worker.get(w.fd) == w.id:
                continue  # its current connection is alive: the disconnect was of an older one
            self._remove_worker(w, "was recycled" if w.pool.recycling == w.id else "crashed (connection lost)")

    def _remove_worker(self, w: WorkerRecord, why: str, clean: bool = False) -> None:
        """``clean``: the worker said goodbye, so it answered every request it started; what is
        still in flight never ran there (handed back, not ``WorkerCrashed``)."""
        if self.workers.pop(w.id, None) is None:
            return
        self._disconnects.pop(w.id, None)
        pool = w.pool
        pool.workers.pop(w.id, None)
        if self.fd_worker.get(w.fd) == w.id:
            del self.fd_worker[w.fd]
        self.gone.add(w.id, why)
        if "recycled" in why:
            pool.recycles += 1
            event = "recycle"
        elif clean:  # a clean SIGTERM exit (supervisorctl stop/restart, a deploy) is not a crash
            event = "exit"
        else:
            pool.crashes += 1
            event = "crash"
        self._event(pool.name, w, event, why)
        log.log(logging.INFO if clean else logging.WARNING,
                "worker %s (pid %d, pool %s) %s; %d in flight, %d queued, %d sessions",
                w.incarnation[:8], w.pid, pool.name, why, len(w.inflight), len(w.queue), len(w.sessions))
        inflight = list(w.inflight.items())
        queued = list(w.queue)
        w.inflight.clear()
        w.queue.clear()
        if pool.mode is Affinity.HINT:
            for sid in w.sessions:
                rec = self.sessions.get(sid)
                if rec is not None and rec.worker == w.id:
                    rec.worker = None
        for key, p in inflight:
            self.running.pop(key, None)
            if clean:
                self._hand_back(p, pool, w, why)
            else:
                self._fail(p, pool, WorkerCrashed(
                    f"worker {w.incarnation[:8]} (pid {w.pid}) {why} while running this request",
                    worker=w.incarnation, session=p.session))
        for p in queued:
            pool.queued -= 1
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why}",
                session=p.session, worker=w.incarnation))
        if self.nudge is not None:
            self.nudge.worker_left()
        if pool.recycling == w.id:
            pool.recycle_started = time.monotonic()  # now wait for the replacement

    # -- timers ---------------------------------------------------------------------------
    def _heartbeat(self, now: float) -> None:
        for w in list(self.workers.values()):
            if now > w.expiry:
                self._remove_worker(w, "stopped answering heartbeats")
            else:
                self._to_worker(w, [B_HEARTBEAT])

    def _sweep(self, now: float) -> None:
        for pool in self.pools.values():
            limit = pool.config.queue_timeout
            queues = [pool.queue, *(w.queue for w in pool.workers.values())]
            for queue in queues:
                while queue and (now - queue[0].enqueued > limit or now > queue[0].deadline):
                    p = queue.popleft()
                    pool.queued -= 1
                    if now > p.deadline:
                        self.counters["expired_unsent"] += 1
                    else:
                        self._fail(p, pool, QueueTimeout(
                            f"waited {now - p.enqueued:.1f}s in pool {pool.name!r}, over its queue timeout of {limit:g}s",
                            pool=pool.name))
            self._stop_overdue(pool, now)
            self._recycle_step(pool, now)
        if self.awaiting and now - self._booted >= self._restart_grace():
            for wid, (pool, queue) in self.awaiting.items():
                for p in queue:
                    pool.queued -= 1
                    self._fail(p, pool, SessionWorkerUnavailable(
                        f"session {p.session[:8]} is pinned to worker {wid.decode(errors='replace')[:8]}, which did "
                        f"not re-register within {self._restart_grace():g}s of this broker's start",
                        session=p.session, worker=wid.decode(errors="replace")))
            self.awaiting.clear()
        self._expire_sessions(now)

    _last_ttl_sweep = 0.0

    def _expire_sessions(self, now: float) -> None:
        if now - self._last_ttl_sweep < 1.0:
            return
        self._last_ttl_sweep = now
        for rec in list(self.sessions.values()):
            pool = self.pools.get(rec.pool)
            ttl = pool.config.session_ttl if pool is not None else 3600.0
            if ttl and not rec.closing and now - rec.last_used > ttl and not self._session_running(rec):
                self._close_session(rec, f"expired after {ttl:g}s idle")

    def _session_running(self, rec: SessionRecord) -> bool:
        return any(w.runs_session(rec.id) for wid in rec.touched if (w := self.workers.get(wid)) is not None)

    def _close_session(self, rec: SessionRecord, why: str) -> bool:
        """Close now, or (a call of it still running) refuse new calls and release when the last
        call ends. Its calls still waiting in a queue never run. True if a worker holds state."""
        self.closed.add(rec.id, why)
        pool = self.pools.get(rec.pool)
        if pool is not None:
            queues = [pool.queue, *(w.queue for w in pool.workers.values())]
            for queue in queues:
                for p in [q for q in queue if q.session == rec.id]:
                    queue.remove(p)
                    pool.queued -= 1
                    self._fail(p, pool, SessionClosed(f"session {rec.id[:8]} {why} before this call ran",
                                                      session=rec.id))
        holders = any(wid in self.workers for wid in rec.touched)
        if self._session_running(rec):
            rec.closing = why
        else:
            self._release_session(rec)
        return holders

    def _release_session(self, rec: SessionRecord) -> None:
        """Every worker the session touched drops its state (a hint session may have run on
        several; a re-pin leaves state behind on the old worker)."""
        self.sessions.pop(rec.id, None)
        for wid in rec.touched:
            w = self.workers.get(wid)
            if w is not None:
                w.sessions.discard(rec.id)
                self._to_worker(w, [B_RELEASE_SESSION, rec.id.encode()])

    # -- recycling ------------------------------------------------------------------------
    def recycle(self, w: WorkerRecord) -> None:
        """Graceful: no new work; the worker finishes its request, says DISCONNECT and exits."""
        pool = w.pool
        pool.recycling = w.id
        pool.recycle_started = time.monotonic()
        pool.size_before_recycle = max(pool.size_before_recycle, len(pool.workers))
        self._start_draining(w, "is being recycled")
        if not w.inflight:
            self._to_worker(w, [B_DISCONNECT])
        log.info("recycling worker %s (pid %d) of pool %s", w.incarnation[:8], w.pid, pool.name)

    def _start_draining(self, w: WorkerRecord, why: str) -> None:
        """No new work for ``w``; what waits in its queue fails now (did not run)."""
        pool = w.pool
        w.draining = True
        w.draining_since = time.monotonic()
        queued = list(w.queue)
        w.queue.clear()
        for p in queued:
            pool.queued -= 1
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why}",
                session=p.session, worker=w.incarnation))

    def _stop_overdue(self, pool: Pool, now: float) -> None:
        """A draining worker past the pool's drain deadline (hung in a call) is stopped hard:
        through supervisord when it runs the pool, else SIGKILL by pid on this host. Its calls
        get ``WorkerCrashed`` and the rolling recycle goes on."""
        limit = pool.config.drain_timeout
        for w in list(pool.workers.values()):
            if not (w.draining and limit and now - w.draining_since > limit):
                continue
            log.error("worker %s (pid %d, pool %s) still busy %.0fs after it began draining: stopping it hard",
                      w.incarnation[:8], w.pid, pool.name, now - w.draining_since)
            if w.host == socket.gethostname() and w.pid > 0:
                try:
                    os.kill(w.pid, signal.SIGKILL)  # supervisord (autorestart) starts a new incarnation
                except (ProcessLookupError, PermissionError) as exc:
                    log.warning("could not stop pid %d: %s", w.pid, exc)
            self._to_peer(w.id, [B_DISCONNECT])  # a worker on another host: ask once more
            self._remove_worker(w, "was recycled (stopped hard at its drain deadline)")

    def _over_request_limit(self, w: WorkerRecord) -> bool:
        limit = w.pool.config.recycle.max_requests
        return bool(limit and w.served + w.errors >= limit and w.pool.recycling is None
                    and w.pool.ready_count() >= 2 and time.time() - w.registered >= _MIN_WORKER_AGE)

    def _recycle_step(self, pool: Pool, now: float) -> None:
        if pool.recycling is not None:
            if pool.recycling in self.workers:
                return
            # wait for the replacement (supervisord restarts it) before touching the next one
            target = pool.size_before_recycle or pool.config.size
            if pool.ready_count() < target and now - pool.recycle_started < 30.0:
                return
            pool.recycling = None
            pool.size_before_recycle = 0
        while pool.rolling:
            wid = pool.rolling.popleft()
            w = self.workers.get(wid)
            if w is not None:
                self.recycle(w)
                return
        policy = pool.config.recycle
        if not (policy.max_requests or policy.max_age or policy.max_rss_mb) or pool.ready_count() < 2:
            return  # policy never takes a pool's last worker
        wall = time.time()
        for w in pool.workers.values():
            if wall - w.registered < _MIN_WORKER_AGE:
                continue  # supervisord counts an exit within startsecs as a failed start
            rss_mb = float(w.stats.get("rss", 0)) / 2**20
            if ((policy.max_requests and w.served + w.errors >= policy.max_requests)
                    or (w.retire_age and wall - w.registered >= w.retire_age)
                    or (policy.max_rss_mb and rss_mb >= policy.max_rss_mb)):
                self.recycle(w)
                return

    # -- broker ops -----------------------------------------------------------------------
    def _admin(self, op: str, session: str, pool_name: str, args: dict[str, Any], owner: str = "") -> Any:
        if op == Op.PING.value:
            return {"pong": True, "pid": os.getpid()}
        if op == Op.STATUS.value:
            return self.status()
        if op == Op.CLOSE_SESSION.value:
            sid = str(args.get("session") or session)
            rec = self.sessions.get(sid)
            if rec is not None and rec.owner != owner and not self._is_admin(owner):
                raise SessionNotYours(f"session {sid[:8]} belongs to another client", session=sid)
            if rec is None or rec.closing:
                return {"closed": False, "released": False}
            return {"closed": True, "released": self._close_session(rec, "was closed")}
        if op == Op.SESSIONS.value:
            wanted = args.get("pool")
            now = time.monotonic()
            return [
                {"id": r.id, "pool": r.pool, "worker": (r.worker or b"").decode(errors="replace"),
                 "worker_alive": r.worker in self.workers if r.worker else False,
                 "calls": r.calls, "idle_s": round(now - r.last_used, 3), "created": r.created}
                for r in self.sessions.values()
                if (not wanted or r.pool == wanted) and not r.closing and (r.owner == owner or self._is_admin(owner))
            ]
        if op == Op.RECYCLE.value:
            if not self._is_admin(owner):
                raise Refused("recycle needs an admin key (see --curve-admin)")
            pool = self.pools.get(str(args.get("pool") or pool_name))
            if pool is None:
                raise PoolNotFound(f"no pool named {args.get('pool') or pool_name!r}")
            wanted_worker = args.get("worker")
            if wanted_worker:
                matches = [w for w in pool.workers.values() if w.incarnation.startswith(str(wanted_worker))
                           or str(w.pid) == str(wanted_worker)]
                if len(matches) != 1:
                    raise ProtocolError(f"worker {wanted_worker!r} matches {len(matches)} workers of {pool.name}")
                targets = matches
            elif args.get("all"):
                targets = list(pool.workers.values())
            else:  # the oldest worker
                targets = sorted(pool.workers.values(), key=lambda w: w.registered)[:1]
            pool.rolling.extend(w.id for w in targets if w.id not in pool.rolling)
            self._recycle_step(pool, time.monotonic())
            return {"pool": pool.name, "recycling": [w.incarnation for w in targets]}
        raise UnknownOp(f"unknown op {op!r}")

    def _is_admin(self, owner: str) -> bool:
        """Admin ops are open to every peer unless the broker has an admin allow-list (CURVE)."""
        return self._admins is None or owner in self._admins()

    def _event(self, pool: str, w: WorkerRecord, event: str, why: str) -> None:
        self.events.append({"t": time.time(), "pool": pool, "worker": w.incarnation[:8], "pid": w.pid,
                            "event": event, "why": why})

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        pools = {}
        for pool in self.pools.values():
            lat = list(pool.latencies)
            ok = sum(n for (op, outcome), n in pool.outcomes.items() if outcome == "ok")
            pools[pool.name] = {
                "affinity": pool.mode.value,
                "size": pool.config.size,
                "queue_max": pool.config.queue_max,
                "queue_timeout": pool.config.queue_timeout,
                "queued": pool.queued,
                "sessions": sum(1 for r in self.sessions.values() if r.pool == pool.name),
                "requests_ok": ok,
                "requests_error": sum(pool.outcomes.values()) - ok,
                "outcomes": {f"{op}:{outcome}": n for (op, outcome), n in pool.outcomes.items()},
                "latency_p50_ms": round(percentile(lat, 0.5) * 1000, 3),
                "latency_p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                "recycles": pool.recycles,
                "crashes": pool.crashes,
                "recycling": pool.recycling.decode() if pool.recycling else None,
                "workers": [
                    {
                        "id": w.incarnation[:8], "incarnation": w.incarnation, "pid": w.pid, "host": w.host,
                        "state": w.state.value, "sessions": len(w.sessions), "served": w.served,
                        "errors": w.errors, "inflight": len(w.inflight), "capacity": w.capacity,
                        "queued": len(w.queue), "rss": int(w.stats.get("rss", 0)),
                        "refs": int(w.stats.get("refs", 0)),
                        "held_sessions": int(w.stats.get("sessions", 0)),  # session states the worker holds
                        "uptime_s": round(wall - w.registered, 3),
                        "last_heartbeat_s": round(
                            self.options.heartbeat_interval * self.options.heartbeat_liveness - (w.expiry - now), 3),
                    }
                    for w in pool.workers.values()
                ],
            }
        return {
            "broker": {"pid": os.getpid(), "uptime_s": round(wall - self.started, 3),
                       "frontend": self.options.frontend, "backend": self.options.backend,
                       "sessions": len(self.sessions), "closed_sessions": len(self.closed), **self.counters},
            "pools": pools,
            "events": list(self.events),
        }


def _source_fd(frame: zmq.Frame) -> int:
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1
