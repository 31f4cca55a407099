"""The broker's zmq shell: a ROUTER frontend for clients, a ROUTER backend for workers.

The routing rules live in the socket-free ``broker.core.Core`` this shell holds; the shell binds
the sockets, polls them, hands the core what arrives with the time it arrived, feeds the
ROUTERs' socket monitors to ``broker.connections`` (a peer's disconnect within about a
millisecond; dspex heartbeats catch worker hosts that vanish without closing their connection,
ZMTP heartbeats such client hosts) and implements the core's port (``broker.port.Port``). Per
message the broker decodes one small msgpack header and forwards the payload frames untouched
(``copy=False``); it drains every ready message per wake-up.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker import checkpoints as checkpoints_store
from broker.checkpoint_thread import StoreThread
from broker.checkpoints import Job, open_store
from broker.connections import GOODBYE_GRACE, Connections, source_fd
from broker.core import Core
from broker.nudge import SupervisorNudge
from broker.ops import HANDLERS
from broker.ops import status as status_of
from broker.port import WorkerUnreachable
from broker.publisher import StatusPublisher
from broker.settings import BrokerOptions
from broker.sockets import BrokerSockets, bind_sockets
from dspex.stack.rundir import ensure_private_dir
from dspex.wire.errors import ConfigError
from dspex.wire.zmqfast import EVENTS, NOBLOCK, POLLIN, SNDMORE, get_opt, recv_frame, send_frame, zmq_poll

log = logging.getLogger("dspex.broker")

_DRAIN_BATCH = 2000  # messages per socket per wake-up before giving the others a turn
_OUTBOX_MAX = 64  # replies held back at most before the end of a drain sends them
# Sends: the small frames the broker makes itself (ids, commands, envelopes) go with copy=True,
# which copies bytes at once, cheaper than wrapping them in a zmq.Frame; the rest with copy=False:
# a frame received from a peer is forwarded without a copy either way, a large one of ours too.
_MORE = SNDMORE
_MORE_NOBLOCK = SNDMORE | NOBLOCK
_INLINE_WRITE_MAX = 256 * 1024  # a checkpoint write this small commits on the routing thread
class Broker:
    """A routing core behind a frontend and a backend ROUTER socket; the core's port."""

    def __init__(self, options: BrokerOptions, context: zmq.Context[Any] | None = None) -> None:
        self.core = Core(options.pools, self, HANDLERS, now=time.monotonic(), heartbeat_interval=options.heartbeat_interval,
                         heartbeat_liveness=options.heartbeat_liveness, max_sessions=options.max_sessions)
        self.options = options
        self.ctx = context or zmq.Context.instance()
        self.connections = Connections()
        self.counters = self.core.counters  # the shell's own counters show in the status too
        self.counters.update(replies_dropped_slow_client=0, replies_to_gone_clients=0)
        self._slow_clients: set[bytes] = set()
        # replies wait here until the end of the drain that produced them, then go out back to
        # back: zmq's I/O thread is woken once for the burst instead of once per reply
        self._outbox: list[list[Any]] = []
        self._stop = False
        self.sockets: BrokerSockets | None = None  # (made by bind)
        self.nudge = SupervisorNudge.from_config(options.supervisor_conf)
        # the metrics/dashboard server: the port asked for, the one served, or why none (serve_metrics)
        self.metrics: dict[str, Any] = {"requested": options.metrics_port, "port": None, "error": None}
        self.core.stack_info = {"config": os.path.abspath(options.supervisor_conf) if options.supervisor_conf else "",
                                "frontend": options.frontend, "backend": options.backend,
                                "run_dir": os.path.dirname(options.frontend[len("ipc://"):])
                                if options.frontend.startswith("ipc://") else "", "metrics": self.metrics}
        # wakes the loop from another thread or a signal handler (a status wanted, a stop)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # the status other threads read, built on this one
        self.publisher = StatusPublisher(self.core, self.status, self.wake)
        self.frontend: zmq.Socket[Any]
        self.backend: zmq.Socket[Any]
        self.monitor: zmq.Socket[Any]
        self.front_monitor: zmq.Socket[Any]  # clients' disconnects and CURVE handshake failures
        self.store_thread: StoreThread | None = None  # durable sessions' checkpoints (opened by bind)
        self._store_here: list[Job] = []  # small writes committed at the end of this loop turn
        self._curve_clients = options.frontend.startswith("tcp://")  # (asked per request: once here)
        self._poll_items: list[tuple[Any, int]] = []  # what the loop waits on (made by its first turn)
        self._one_at_a_time: set[zmq.Socket[Any]] = set()  # sockets whose last drain held one message

    def status(self, now: float) -> dict[str, Any]:
        return status_of(self.core, now)

    # -- the core's port -----------------------------------------------------------------------
    def to_worker(self, wid: bytes, frames: list[Any]) -> None:
        sock = self.backend
        try:
            # (ROUTER_MANDATORY: an unreachable worker raises at the id, before any frame goes)
            send_frame(sock, wid, _MORE, True)
            last = len(frames) - 1
            if last == 0:
                send_frame(sock, frames[0], 0, True)
                return
            send_frame(sock, frames[0], _MORE, True)  # the command or envelope: ours, small
            for i in range(1, last):
                send_frame(sock, frames[i], _MORE, False)
            send_frame(sock, frames[last], 0, False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            raise WorkerUnreachable() from None

    def worker_connected(self, wid: bytes, frame: Any) -> None:
        # the disconnect of an earlier connection on a reused fd must be seen before we map it
        self._drain_monitor()
        self.connections.worker_connected(wid, source_fd(frame))

    def worker_gone(self, wid: bytes) -> None:
        self.connections.worker_gone(wid)
        if self.nudge is not None:
            self.nudge.worker_left()

    def store(self, job: Job) -> None:
        """Small writes wait for the end of this loop turn and commit together on this thread;
        loads, big writes and everything after them go to the store's thread, in order."""
        assert self.store_thread is not None
        if job.op != "load" and not self.store_thread.writing and _job_bytes(job) <= _INLINE_WRITE_MAX:
            self._store_here.append(job)
            return
        self._commit_here()  # what waits here goes first: one order for every job
        self.store_thread.submit(job)

    def _commit_here(self) -> None:
        if not self._store_here:
            return
        jobs, self._store_here = self._store_here, []
        assert self.store_thread is not None
        done = self.store_thread.run_here(jobs)  # (the others go to the store's thread)
        self.core.store_done(done, time.monotonic())

    def log(self, level: int, message: str, *args: Any) -> None:
        log.log(level, message, *args)

    def stop_process(self, pid: int, host: str) -> None:
        """SIGKILL a worker of this host (one on another host is asked to leave by the core)."""
        if host != socket.gethostname() or pid <= 0:
            return
        try:
            # supervisord (like setsid) makes each program lead its own process group: kill the
            # group, so what the hung call spawned goes too (killasgroup); supervisord's
            # autorestart then starts the next incarnation
            if os.getpgid(pid) == pid and os.getpgid(0) != pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError) as exc:
            log.warning("could not stop pid %d: %s", pid, exc)

    def client_seen(self, client: bytes, frame: Any) -> None:
        if self.connections.client_known(client):
            return
        # the disconnect of an earlier connection on a reused fd must be seen before we map it
        self._drain_front_monitor()
        self.connections.client_connected(client, source_fd(frame), time.monotonic())

    # -- sockets ----------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the two sockets (broker/sockets.py), then open the checkpoint store."""
        sockets = self.sockets = bind_sockets(self.ctx, self.options)
        self.frontend, self.backend = sockets.frontend, sockets.backend
        self.monitor, self.front_monitor = sockets.monitor, sockets.front_monitor
        if sockets.admins is not None:
            self.core.admins = sockets.admins
        self._open_store()
        log.info("broker frontend=%s backend=%s pools=%s", self.options.frontend, self.options.backend,
                 ",".join(f"{p.name}:{p.mode.value}" for p in self.core.pools.values()))

    def _open_store(self) -> None:
        """The checkpoint store, once this broker owns its run directory (its sockets are bound);
        durable sessions of an earlier broker on it come back."""
        path = self.options.checkpoints
        if path == "":
            return
        if path is None:
            if not self.options.run_dir:
                return
            path = str(ensure_private_dir(Path(self.options.run_dir)) / "checkpoints.sqlite")
        try:
            store = open_store(path, session_cap=self.options.checkpoint_cap,
                               total_cap=self.options.checkpoint_total_cap)
        except (checkpoints_store.StoreError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the checkpoint store {path}: {exc}") from None
        self.store_thread = StoreThread(store)
        self.core.durable.enabled = True
        self.core.durable.load(store.sessions())
        self.core.stack_info["checkpoints"] = path

    def stop(self, *_: Any) -> None:
        self._stop = True
        self.wake()

    def wake(self) -> None:
        """Make the loop turn now (safe from any thread and from a signal handler)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is woken already

    def close(self) -> None:
        if self.store_thread is not None:
            self._commit_here()
            self.store_thread.close()  # the writes submitted so far are committed first
            self.store_thread = None
        if self.sockets is not None:
            self.sockets.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def run(self) -> None:
        """Serve until :meth:`stop`. Between messages the loop sleeps until the next deadline of
        the core (a heartbeat, a queue timeout, a session's TTL, a drain deadline...), of the
        status history or of a logged count; never polls on a fixed period."""
        while not self._stop:
            self.turn()

    def turn(self) -> None:
        """One turn of the loop: sleep until a socket is readable or the next deadline, handle
        every message that is ready, then what is due."""
        items = self._poll_items
        if not items:  # (zmq_poll on a list made once: no Poller sugar per turn)
            items = self._poll_items = [(s, POLLIN) for s in (self.frontend, self.backend, self.monitor, self._wake_r,
                                                               self.front_monitor)]
            if self.store_thread is not None:
                items.append((self.store_thread.fileno(), POLLIN))
        store_fd = self.store_thread.fileno() if self.store_thread is not None else -1
        core, publisher, conns = self.core, self.publisher, self.connections
        due = min(core.next_deadline(), publisher.next_due(), conns.handshakes.next_due())
        timeout = max(0.0, due - time.monotonic())
        if conns.worker_disconnects or conns.client_disconnects:
            timeout = min(timeout, GOODBYE_GRACE)
        events = {s for s, _ in zmq_poll(items, math.ceil(timeout * 1000))}  # rounded up: not woken before it
        if self.backend in events:
            self._drain(self.backend, self.core.on_worker_frames)
            self._commit_here()  # checkpoints committed: the replies they held go out now
            self._flush_clients()
        if self.monitor in events:
            self._drain_monitor()
        if conns.worker_disconnects:
            self._settle_disconnects()
        if self.frontend in events:
            self._drain(self.frontend, self.core.on_client_frames)
        if self.front_monitor in events:
            self._drain_front_monitor()
        if conns.client_disconnects:
            self._settle_client_disconnects()
        if store_fd in events and self.store_thread is not None:
            core.store_done(self.store_thread.completed(), time.monotonic())  # held replies go out
        if self._wake_r in events:
            while True:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    break
        now = time.monotonic()
        if now >= core.next_deadline():
            core.tick(now)
        if now >= publisher.next_due():
            publisher.tick(now)
        conns.log_handshakes_due(now)
        self._commit_here()
        self._flush_clients()
        if publisher.asked:
            publisher.serve()

    def _drain(self, sock: zmq.Socket[Any], handler: Any) -> None:
        """Handle the messages waiting on ``sock`` (at most ``_DRAIN_BATCH``), reading until
        ``zmq.Again``. A socket whose last drain held one message (calls that come one at a time)
        is asked whether a second waits instead (an EVENTS read is cheaper than the exception,
        but one question per message would cost more than one exception per drain)."""
        recv, clock = recv_frame, time.monotonic  # (per message: no lookups, no helper call)
        ask = sock in self._one_at_a_time
        n = 0
        for n in range(_DRAIN_BATCH):
            if n == 1 and ask and not get_opt(sock, EVENTS) & POLLIN:
                break
            try:
                # the sender's routing id, as bytes: a ROUTER always delivers it before the
                # message's own frames (at least one), so it needs no "more" check
                ident = recv(sock, NOBLOCK, True)
            except zmq.Again:
                break
            f = recv(sock, 0, False)
            frames = [ident, f]
            while f.more:
                f = recv(sock, 0, False)
                frames.append(f)
            try:
                handler(frames, clock())
            except Exception:  # one bad message must never stop the broker
                log.exception("error handling a message; dropped it")
        if n == 1:
            self._one_at_a_time.add(sock)
        else:
            self._one_at_a_time.discard(sock)

    def client_identity(self, frame: zmq.Frame) -> str:
        """Who sent this: the CURVE key ZAP authenticated (its User-Id) on a TCP frontend. On ipc
        every peer is our own uid (the run directory is 0700), so all share one identity."""
        if not self._curve_clients:
            return ""
        try:
            return str(frame.get("User-Id"))
        except (zmq.ZMQError, AttributeError, TypeError, UnicodeDecodeError):
            return ""

    def to_client(self, frames: list[Any]) -> None:
        self._outbox.append(frames)
        if len(self._outbox) >= _OUTBOX_MAX:  # a long drain does not hold its first replies back
            self._flush_clients()

    def _flush_clients(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        sock = self.frontend
        for frames in outbox:
            try:
                send_frame(sock, frames[0], _MORE_NOBLOCK, True)  # the client's id
                last = len(frames) - 1
                for i in range(1, last):
                    send_frame(sock, frames[i], _MORE_NOBLOCK, False)
                send_frame(sock, frames[last], NOBLOCK, False)
            except zmq.ZMQError as exc:
                self._not_sent(frames, exc)

    def _not_sent(self, frames: list[Any], exc: zmq.ZMQError) -> None:
        """Replies queue per client up to the frontend's SNDHWM: a client that stops reading
        loses replies past it (counted, logged once per client; its calls time out) instead of
        growing the broker without bound. (A full or gone client refuses the id frame, before
        any frame of the reply went.)"""
        if isinstance(exc, zmq.Again):
            self.counters["replies_dropped_slow_client"] += 1
            client = bytes(frames[0])
            if client not in self._slow_clients:
                if len(self._slow_clients) > 10_000:
                    self._slow_clients.clear()
                self._slow_clients.add(client)
                log.warning("client %s is not reading its replies: %d queued, its limit; dropping replies",
                            client.hex()[:12], self.options.client_hwm)
        elif exc.errno == zmq.EHOSTUNREACH:
            self.counters["replies_to_gone_clients"] += 1  # it disconnected; nobody waits for this
        else:
            raise exc

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.connections.worker_event(event, self.core.workers, time.monotonic())

    def _drain_front_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.front_monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.connections.client_event(event, time.monotonic())

    def _settle_client_disconnects(self) -> None:
        """Clients whose connection closed: what they sent before closing is read first (the
        frontend and the monitor deliver in no fixed order), then their calls are cancelled."""
        due = self.connections.clients_due(time.monotonic())
        if not due:
            return
        self._drain(self.frontend, self.core.on_client_frames)
        for client in due:
            self.connections.settle_client(client)
            self.core.client_gone(client, time.monotonic())

    def _settle_disconnects(self) -> None:
        """Workers whose connection closed: a goodbye queued before the close is read first (it
        travels through the backend socket, the disconnect through the monitor, in no fixed
        order), so a clean exit is never counted as a crash."""
        due = self.connections.workers_due(time.monotonic())
        if not due:
            return
        self._drain(self.backend, self.core.on_worker_frames)
        for wid in due:
            # not gone meanwhile (a goodbye), and the disconnect was of its current connection
            if self.connections.settle_worker(wid) and wid in self.core.workers:
                self.core.worker_lost(wid, time.monotonic())


def _job_bytes(job: Job) -> int:
    if job.op != "write":
        return 0
    write = job.args[0]
    return len(write.skeleton) + sum(len(b) for b in write.blobs)
