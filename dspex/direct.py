"""The sync client's direct path to a ``direct`` pool's workers (issue 14 prototype).

A brokered reply whose header carries a worker's direct endpoint (worker/direct.py) teaches the
client that endpoint; from then on a request of a session pinned to that worker — one without
streaming or progress callbacks — goes straight to it over a DEALER of its own (a small
pool of them per endpoint, one request at a time each, like the broker channels) and its reply
comes straight back. Its meaning is the same ``dspex.core.Exchange`` as through the broker.

Failures keep the broker's contract:

- the worker answers ``STATUS_VIA_BROKER`` (session not admitted or released, worker stopping):
  nothing ran, the request goes through the broker, which answers as usual;
- the connection drops while a request waits (a socket monitor sees the disconnect):
  ``WorkerCrashed`` (it may have run), and that worker is dead for this client: the next calls
  of its sessions get ``SessionWorkerUnavailable`` (did not run), as a strict_queue pool answers;
- nothing listens at the endpoint any more: ``SessionWorkerUnavailable``.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex import config
from dspex.core import Exchange, control_frames
from dspex.errors import BrokerUnreachable, ProtocolError, SessionWorkerUnavailable, WorkerCrashed
from dspex.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, STATUS_VIA_BROKER, Op, unpack_reply
from dspex.zmqfast import recv_frames, send_frames

VIA_BROKER = object()  # the request did not run: send it through the broker
_IDLE_PER_ENDPOINT = 8


def frozen_peer_check(sock: Any) -> None:
    """ZMTP heartbeats on a direct link: a worker that stops without closing its connection
    (SIGSTOP, a hung host) is dropped after the broker's own silence limit, so its callers get
    ``WorkerCrashed`` then as through the broker. The worker's zmq I/O thread answers them even
    while a call holds the GIL, so a long call is never taken for a freeze."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS * 1000))


def unavailable(dead: dict[str, str], ex: Exchange, worker: str) -> SessionWorkerUnavailable | None:
    """The error of a call pinned to a worker this client saw die (``dead``: worker -> why), or None."""
    why = dead.get(worker)
    if why is None:
        return None
    return SessionWorkerUnavailable(f"session {ex.session[:8]} is pinned to worker {worker[:8]}, which {why}",
                                    session=ex.session, worker=worker)


class _Link:
    """One DEALER to one worker's direct socket, used by one request at a time."""

    __slots__ = ("sock", "monitor", "poller", "ids", "broken", "sndtimeo")

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, max_message: int) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        config.tune_socket(self.sock, max_message=max_message)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        frozen_peer_check(self.sock)
        self.monitor: zmq.Socket[Any] = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.ids = itertools.count(1)
        self.broken = False
        self.sndtimeo = -2  # the SNDTIMEO set last (one setsockopt per change, not per call)

    def dropped(self) -> bool:
        """Whether the monitor saw the connection drop since the last look."""
        seen = False
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                if parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"] == zmq.EVENT_DISCONNECTED:
                    seen = True
            except zmq.Again:
                break
        if seen:
            self.broken = True
        return seen

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


class DirectRoutes:
    """Per client: worker incarnation -> direct endpoint, idle links, workers seen dead."""

    def __init__(self, ctx: zmq.Context[Any], max_message: int, local: bool) -> None:
        self._ctx = ctx
        self._local = local  # the client reaches its broker over ipc: the workers are on this host
        self._max_message = max_message
        self.endpoints: dict[str, str] = {}  # read without the lock on the hot path (GIL-atomic)
        self._dead: dict[str, str] = {}
        self._idle: dict[str, list[_Link]] = {}
        self._open: set[_Link] = set()
        self._lock = threading.Lock()
        self._closed = False

    def learn(self, worker: str, endpoint: str) -> None:
        # ipc only (prototype): a client of a remote broker could not reach the worker's socket
        if self._local and worker and endpoint.startswith("ipc://") and worker not in self.endpoints and worker not in self._dead:
            self.endpoints[worker] = endpoint

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._open, self._idle = list(self._open), set(), {}
        for link in links:
            link.close()

    def _checkout(self, endpoint: str) -> _Link:
        with self._lock:
            if self._closed:
                raise BrokerUnreachable("client is closed: nothing was sent")
            idle = self._idle.get(endpoint)
            link = idle.pop() if idle else None
        if link is None:
            # a new link only: a stale socket file (the worker died) fails at once, not at timeout
            config.probe_ipc(endpoint)
            with self._lock:
                if self._closed:
                    raise BrokerUnreachable("client is closed: nothing was sent")
                link = _Link(self._ctx, endpoint, self._max_message)
                self._open.add(link)
        return link

    def _checkin(self, endpoint: str, link: _Link) -> None:
        with self._lock:
            if not self._closed and not link.broken:
                idle = self._idle.setdefault(endpoint, [])
                if len(idle) < _IDLE_PER_ENDPOINT:
                    idle.append(link)
                    return
            self._open.discard(link)
        link.close()

    def _died(self, worker: str, why: str) -> None:
        with self._lock:
            endpoint = self.endpoints.pop(worker, None)
            self._dead[worker] = why
            links = self._idle.pop(endpoint, []) if endpoint else []
            for link in links:
                self._open.discard(link)
        for link in links:
            link.close()

    def unavailable(self, ex: Exchange, worker: str) -> SessionWorkerUnavailable | None:
        return unavailable(self._dead, ex, worker)

    def request(self, ex: Exchange, worker: str, endpoint: str) -> Any:
        """Send ``ex`` straight to ``worker``; its value, or ``VIA_BROKER`` (nothing ran)."""
        try:
            link = self._checkout(endpoint)
        except BrokerUnreachable:
            if self._closed:
                raise
            self._died(worker, "is gone (nothing listens at its direct endpoint)")
            raise self.unavailable(ex, worker) from None  # type: ignore[misc]
        try:
            if link.dropped():  # an idle link that saw its worker go: the call did not leave
                self._died(worker, "crashed (its direct connection dropped)")
                raise self.unavailable(ex, worker)  # type: ignore[misc]
            req_id = next(link.ids)
            try:
                sndtimeo = max(1, int(ex.timeout * 1000)) if ex.timeout > 0 else -1
                if sndtimeo != link.sndtimeo:
                    link.sock.setsockopt(zmq.SNDTIMEO, sndtimeo)
                    link.sndtimeo = sndtimeo
                send_frames(link.sock, ex.frames(req_id, worker), copy=len(ex.body) <= 1)
            except zmq.ZMQError:
                link.broken = True
                self._died(worker, "is not reading its direct socket")
                raise self.unavailable(ex, worker) from None  # type: ignore[misc]
            deadline = time.monotonic() + ex.wait
            while True:
                status, frames = self._recv(link, req_id, deadline, ex, worker)
                if status == STATUS_VIA_BROKER:
                    return VIA_BROKER
                kind, value, credit = ex.feed(status, worker, frames)
                if kind == "done":
                    return value
                if credit:  # the call's output events, under the worker's flow control
                    send_frames(link.sock, control_frames(Op.CREDIT, ex.pool, ex.session, req_id, credit))
        finally:
            self._checkin(endpoint, link)

    def _recv(self, link: _Link, req_id: int, deadline: float, ex: Exchange, worker: str) -> tuple[str, list[Any]]:
        sock = link.sock
        while True:
            remaining = deadline - time.monotonic()
            events = dict(link.poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
            if sock in events:
                reply = recv_frames(sock)
                try:
                    status, rid, _, _, _ = unpack_reply(reply[0].buffer)
                except ProtocolError:
                    continue
                if rid == req_id:
                    return status, reply[1:]
                continue  # a late reply to an earlier request of this link that timed out
            if link.monitor in events and link.dropped():
                self._died(worker, "crashed (its direct connection dropped)")
                raise WorkerCrashed(f"worker {worker[:8]} of session {ex.session[:8]} went away during "
                                    f"{ex.op}; the call may or may not have run", session=ex.session, worker=worker)
            if time.monotonic() >= deadline:
                link.broken = True  # its late reply must not confuse the next user
                raise ex.timed_out()
