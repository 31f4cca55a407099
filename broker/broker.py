"""The broker's zmq shell: a ROUTER frontend for clients, a ROUTER backend for workers.

The routing rules live in the socket-free ``broker.core.Core`` this shell holds; the shell binds
the sockets, polls them, hands the core what arrives with the time it arrived, feeds the
ROUTERs' socket monitors to ``broker.connections`` (a peer's disconnect within about a
millisecond; dspex heartbeats catch worker hosts that vanish without closing their connection,
ZMTP heartbeats such client hosts) and implements the core's port (``broker.port.Port``); what
goes in and out of the ROUTERs per message is ``broker.sockets``. The checkpoint store's jobs
(:class:`StoreLink`): small writes wait for the end of the loop turn and commit together on the routing thread; loads,
big writes and everything after them go to the store's own thread (``broker.checkpoints``), in
order, and come back to the core (``Core.store_done``) in the order they were handed over.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from broker import checkpoints, store_schema
from broker.checkpoint_thread import StoreThread
from broker.checkpoints import CheckpointStore, Job
from broker.connections import GOODBYE_GRACE, Connections, Peers, source_fd
from broker.core import Core
from broker.nudge import SupervisorNudge
from broker.ops import HANDLERS
from broker.port import WorkerUnreachable
from broker.publisher import StatusPublisher
from broker.settings import BrokerOptions
from broker.sockets import BrokerSockets, ClientOutbox, SocketDrain, bind_sockets
from dspex.stack.rundir import claim, ensure_private_dir
from dspex.stack.supervisor import pid_alive
from dspex.wire.errors import ConfigError
from dspex.wire.sockets import ZmqThreads
from dspex.wire.zmqfast import EVENTS, POLLIN, SNDMORE, get_opt, send_frame, zmq_poll

log = logging.getLogger("dspex.broker")

# Sends: the small frames the broker makes itself (ids, commands, envelopes) go with copy=True,
# which copies bytes at once, cheaper than wrapping them in a zmq.Frame; the rest with copy=False:
# a frame received from a peer is forwarded without a copy either way, a large one of ours too.
_INLINE_WRITE_MAX = 256 * 1024  # a checkpoint write this small commits on the routing thread


class Broker:
    """A routing core behind a frontend and a backend ROUTER socket; the core's port."""

    def __init__(self, options: BrokerOptions, context: zmq.Context[Any] | None = None) -> None:
        self.core = Core(options.pools, self, HANDLERS, now=time.monotonic(), heartbeat_interval=options.heartbeat_interval,
                         heartbeat_liveness=options.heartbeat_liveness, max_sessions=options.max_sessions)
        self.options = options
        self.ctx = context or zmq.Context.instance()
        self.zmq_threads = ZmqThreads(self.ctx)  # batch while no client calls (before any socket)
        self._round = self.core.roster.last_round  # the last heartbeat round the zmq threads saw
        self.connections = Connections()
        self.outbox = ClientOutbox(self.core.counters, options.client_hwm)
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
        self.publisher = StatusPublisher(self.core, self.wake)
        self.frontend: zmq.Socket[Any]
        self.backend: zmq.Socket[Any]
        self.monitor: zmq.Socket[Any]
        self.front_monitor: zmq.Socket[Any]  # clients' disconnects and CURVE handshake failures
        self.store_link: StoreLink | None = None  # durable sessions' checkpoints (opened by bind)
        self._store_claim = -1  # the lock that makes the store this broker's alone (rundir.claim)
        self._curve_clients = options.frontend.startswith("tcp://")  # (asked per request: once here)
        self._poll_items: list[tuple[Any, int]] = []  # what the loop waits on (made by its first turn)
        self._poll_but_backend: list[tuple[Any, int]] = []  # ... while the workers' answers wait (Roster.answers_wait_until)

    # -- the core's port -----------------------------------------------------------------------
    def to_worker(self, wid: bytes, frames: list[Any]) -> None:
        sock = self.backend
        try:
            # (ROUTER_MANDATORY: an unreachable worker raises at the id, before any frame goes)
            send_frame(sock, wid, SNDMORE, True)
            last = len(frames) - 1
            if last == 0:
                send_frame(sock, frames[0], 0, True)
                return
            send_frame(sock, frames[0], SNDMORE, True)  # the command or envelope: ours, small
            for i in range(1, last):
                send_frame(sock, frames[i], SNDMORE, False)
            send_frame(sock, frames[last], 0, False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            raise WorkerUnreachable() from None

    def worker_connected(self, wid: bytes, frame: Any) -> bool:
        # the disconnect of an earlier connection on a reused fd must be seen before we map it
        self.connections.workers.read(self.monitor, self.core.workers)
        return self.connections.workers.connected(wid, source_fd(frame), time.monotonic())

    def worker_gone(self, wid: bytes) -> None:
        self.connections.workers.gone(wid)
        if self.nudge is not None:
            self.nudge.worker_left()

    def store(self, job: Job) -> None:
        assert self.store_link is not None
        self.store_link.submit(job)

    def to_client(self, frames: list[Any]) -> None:
        self.outbox.add(frames)

    def log(self, level: int, message: str, *args: Any) -> None:
        log.log(level, message, *args)

    def process_exited(self, pid: int, host: str) -> bool:
        return host == socket.gethostname() and pid > 0 and not pid_alive(pid)

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
        if self.connections.clients.known(client):
            return
        # the disconnect of an earlier connection on a reused fd must be seen before we map it
        self.connections.clients.read(self.front_monitor)
        self.connections.clients.connected(client, source_fd(frame), time.monotonic(), reuse_is_loss=True)

    # -- sockets ----------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the two sockets (broker/sockets.py), then open the checkpoint store."""
        sockets = self.sockets = bind_sockets(self.ctx, self.options)
        self.frontend, self.backend = sockets.frontend, sockets.backend
        self.outbox.frontend = sockets.frontend
        self.from_clients = SocketDrain(sockets.frontend, self.core.on_client_frames)
        self.from_workers = SocketDrain(sockets.backend, self.core.on_worker_frames)
        self.monitor, self.front_monitor = sockets.monitor, sockets.front_monitor
        if sockets.admins is not None:
            self.core.admins = sockets.admins
        if sockets.refusals is not None:
            self.core.refusals = sockets.refusals
        self._open_store()
        log.info("broker frontend=%s backend=%s pools=%s", self.options.frontend, self.options.backend,
                 ",".join(f"{p.name}:{p.mode.value}" for p in self.core.pools.values()))

    def _open_store(self) -> None:
        """The checkpoint store, once this broker owns its run directory (its sockets are bound);
        durable sessions of an earlier broker on it come back."""
        opened = _store_of(self.options)
        if opened is None:
            return
        store, path, self._store_claim = opened
        self.store_link = StoreLink(store, self.core.store_done)
        self.core.durable.enabled = True
        self.core.durable.total_cap = store.total_cap
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
        if self.store_link is not None:
            self.store_link.close()
            self.store_link = None
        if self._store_claim >= 0:
            os.close(self._store_claim)
            self._store_claim = -1
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
        every message that is ready, then what is due. Just after a heartbeat round with no
        request in flight, the backend is read once when the workers' answers are in, not at
        each (``Roster.answers_wait_until``), by the turn whose sleep ends that wait."""
        items = self._poll_items
        if not items:  # (zmq_poll on lists made once: no Poller sugar per turn)
            items = self._poll_items = [(s, POLLIN) for s in (self.frontend, self.backend, self.monitor, self._wake_r,
                                                               self.front_monitor)]
            if self.store_link is not None:
                items.append((self.store_link.thread.fileno(), POLLIN))
            self._poll_but_backend = [item for item in items if item[0] is not self.backend]
        core, publisher, conns, store_link = self.core, self.publisher, self.connections, self.store_link
        due = min(core.next_deadline(), publisher.history.due, conns.handshakes.next_due())
        now = time.monotonic()
        answers_wait = core.roster.answers_wait_until()  # the workers' answers to a heartbeat round
        if answers_wait > now:
            items = self._poll_but_backend
            due = min(due, answers_wait)
        timeout = max(0.0, due - now)
        if conns.workers.disconnects or conns.clients.disconnects:
            timeout = min(timeout, GOODBYE_GRACE)
        events = {s for s, _ in zmq_poll(items, math.ceil(timeout * 1000))}  # rounded up: not woken before it
        if items is self._poll_but_backend and time.monotonic() >= answers_wait and get_opt(self.backend, EVENTS) & POLLIN:
            events.add(self.backend)  # the sleep ended the answers' wait: read them in this turn, not one more
        if self.frontend in events or core.running:
            self.zmq_threads.serving()  # before this turn's sends
        if self.backend in events:
            self.from_workers.drain()
            if store_link is not None:
                store_link.commit_here()  # checkpoints committed: the replies they held go out now
            self.outbox.flush()
        if self.monitor in events:
            conns.workers.read(self.monitor, core.workers)
        if conns.workers.disconnects:
            self._settle(conns.workers, self.from_workers, core.worker_lost)
        # a call to a worker whose disconnect waits for its grace would be sent to a dead worker
        # and fail as having run (WorkerCrashed): the clients wait for the grace, one turn
        if self.frontend in events and not (conns.workers.disconnects and conns.workers.settling(time.monotonic())):
            self.from_clients.drain()
        if self.front_monitor in events:
            conns.clients.read(self.front_monitor)
        if conns.clients.disconnects:
            self._settle(conns.clients, self.from_clients, core.client_gone)
        if store_link is not None and store_link.thread.fileno() in events:
            store_link.collect()  # held replies go out
        if self._wake_r in events:
            while True:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    break
        now = time.monotonic()
        if now >= core.next_deadline():
            core.tick(now)
            if core.roster.last_round != self._round:
                self._round = core.roster.last_round
                self.zmq_threads.quiet()
        if now >= publisher.history.due:
            publisher.history.tick(now)
        conns.log_handshakes_due(now)
        if store_link is not None:
            store_link.commit_here()
        self.outbox.flush()
        if publisher.asked:
            publisher.serve()

    def client_identity(self, frame: zmq.Frame) -> str:
        """Who sent this: the CURVE key ZAP authenticated (its User-Id) on a TCP frontend. On ipc
        every peer is our own uid (the run directory is 0700), so all share one identity."""
        if not self._curve_clients:
            return ""
        try:
            return str(frame.get("User-Id"))
        except (zmq.ZMQError, AttributeError, TypeError, UnicodeDecodeError):
            return ""

    def _settle(self, peers: Peers, sock: SocketDrain, lost: Callable[[bytes, float], None]) -> None:
        """Peers whose connection closed: what they sent before closing is read first (it travels
        through the ROUTER, the disconnect through the monitor, in no fixed order), so a worker's
        goodbye is never counted as a crash; then the core hears of each loss (``worker_lost``:
        a crash if it still holds the worker; ``client_gone``: its calls are cancelled)."""
        due = peers.due(time.monotonic())
        if not due:
            return
        sock.drain()
        for peer in due:
            if peers.settle(peer):  # (not a disconnect of an older connection)
                lost(peer, time.monotonic())


def _store_of(options: BrokerOptions) -> tuple[CheckpointStore, str, int] | None:
    """The checkpoint store ``options`` ask for, its path and the lock held on it (None: durable
    sessions are off). Another broker on the same file, started by mistake on the same run
    directory with other sockets, would read, expire and drop this one's sessions: refused."""
    path = options.checkpoints
    if path == "":
        return None
    if path is None:
        if not options.run_dir:
            return None
        path = str(ensure_private_dir(Path(options.run_dir)) / "checkpoints.sqlite")
    # a name no glob of the store's own files matches (`rm checkpoints.sqlite*` takes the store,
    # which the broker writes again, not the lock that keeps a second broker off it)
    lock = claim(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"), f"the checkpoint store {path}")
    try:
        store = checkpoints.open_store(path, session_cap=options.checkpoint_cap, total_cap=options.checkpoint_total_cap)
    except (store_schema.StoreError, sqlite3.Error) as exc:
        os.close(lock)
        raise ConfigError(f"cannot open the checkpoint store {path}: {exc}") from None
    return store, path, lock


class StoreLink:
    """Checkpoint jobs from the routing thread to the store, and back to ``done`` when finished."""

    def __init__(self, store: CheckpointStore, done: Callable[[list[Job], float], None]) -> None:
        self.thread = StoreThread(store)
        self._done = done
        self._here: list[Job] = []  # small writes committed at the end of this loop turn

    def submit(self, job: Job) -> None:
        if job.op != "load" and not self.thread.writing and _job_bytes(job) <= _INLINE_WRITE_MAX:
            self._here.append(job)
            return
        self.commit_here()  # what waits here goes first: one order for every job
        self.thread.submit(job)

    def commit_here(self) -> None:
        if not self._here:
            return
        jobs, self._here = self._here, []
        done = self.thread.run_here(jobs)  # (the others go to the store's thread)
        self._done(done, time.monotonic())

    def collect(self) -> None:
        """Hand back what the store's thread finished."""
        self._done(self.thread.completed(), time.monotonic())

    def close(self) -> None:
        self.commit_here()
        self.thread.close()  # the writes submitted so far are committed first


def _job_bytes(job: Job) -> int:
    if job.op != "write":
        return 0
    write = job.args[0]
    return len(write.skeleton) + sum(len(b) for b in write.blobs)
