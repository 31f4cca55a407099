"""The blocking client's sockets: a small pool of DEALER channels to one broker.

A request borrows a channel for its duration (a stream for its whole life), so threads never
share a socket and need no lock or I/O thread in the call path, and a thread that ends leaves
nothing behind: at most ``DSPEX_CLIENT_IDLE_SOCKETS`` (default 8) idle channels are kept.
"""

from __future__ import annotations

import itertools
import logging
import math
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex.client.endpoints import probe_endpoint
from dspex.client.exchange import RIDE_THROUGH, close_monitored, closed_error
from dspex.wire.sockets import handshake_failure
from dspex.wire.zmqfast import EVENTS, POLLIN, get_opt

Connect = Callable[[], tuple[zmq.Socket[Any], zmq.Socket[Any]]]
# takes a late reply (status, worker, body frames) of a request its caller abandoned; True once
# it was the request's last
LateReply = Callable[[str, str, list[Any]], bool]

log = logging.getLogger("dspex.client")

LOST = "lost the connection to the broker"


def connection_event(event: int, curve: bool, up: bool) -> tuple[bool, str]:
    """A monitor event of a client's socket: (whether a connection to the broker is up after it,
    why the request under way failed, or ""). Only a connection whose handshake completed can have
    carried a request: one that drops before (a broker dying while we connect, accepting but never
    answering) is none lost; zmq connects again with what was sent still queued, for the broker
    that comes next (a restart) or until the request's timeout."""
    failure = handshake_failure(event, "client", curve)
    if failure:
        return False, failure
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return True, ""
    if event == zmq.EVENT_DISCONNECTED:
        return False, LOST if up else ""
    return up, ""


class Abandoned:
    """The requests of a socket whose caller stopped waiting (cancelled, Ctrl-C, a stream left
    early) and sent ``cancel``: what the producer prints while it stops (its ``finally`` blocks)
    still goes where the call's output went, until the request's last reply or its deadline."""

    __slots__ = ("_late",)

    def __init__(self) -> None:
        self._late: dict[int, tuple[LateReply, float]] = {}

    def add(self, rid: int, on_late: LateReply, wait: float) -> None:
        """Request ``rid``'s replies from now on (``wait`` seconds at most) go to ``on_late``."""
        now = time.monotonic()
        # a copy: a stream's garbage collection may add one while this runs
        for gone in [r for r, (_, until) in list(self._late.items()) if until < now]:
            self._late.pop(gone, None)
        self._late[rid] = (on_late, now + wait)

    def take(self, rid: int, status: str, worker: str, frames: list[Any]) -> None:
        """A reply of no request waiting for it: request ``rid``'s handler's, if it was abandoned
        (else a late reply of a call that timed out: dropped)."""
        entry = self._late.get(rid)
        if entry is None:
            return
        try:
            last = entry[0](status, worker, frames)
        except Exception as exc:  # noqa: BLE001 - nobody awaits it; the socket's other requests go on
            log.debug("dropped the late output of abandoned request %d: %r", rid, exc)
            last = True
        if last:
            self._late.pop(rid, None)

    def clear(self) -> None:
        self._late.clear()

    def __bool__(self) -> bool:
        return bool(self._late)


class Channel:
    """One socket to the broker, used by one request (or stream) at a time."""

    __slots__ = ("abandoned", "broken", "curve", "ids", "monitor", "monitor_due", "monitor_fd", "poller", "refused",
                 "sock", "up")

    def __init__(self, sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.curve = sock.mechanism == zmq.CURVE
        self.broken = False  # a drop or a failed send was seen: close it instead of reusing it
        self.monitor = monitor  # a lost connection fails its waiting requests at once (ConnectionLost)
        # a request waits on the two sockets' file descriptors (``zmq.FD``), not in ``zmq_poll``:
        # zmq_poll reads each socket's EVENTS before and after its wait (a ``poll`` and a
        # ``getpid`` system call each), where the wait needs the reply socket's once on each side
        # and the monitor's only when its descriptor fired (dspex.client.sync.Client._recv)
        self.monitor_fd = int(monitor.get(zmq.FD))
        # the monitor is to be read before the next wait: its FD fired, or (a new channel) it was
        # never read empty, and zmq's FD fires for a message only after a read found none
        self.monitor_due = True
        self.poller = select.poll()
        for fd in (int(sock.get(zmq.FD)), self.monitor_fd):
            self.poller.register(fd, select.POLLIN)
        self.ids = itertools.count(1)  # per socket: a late reply to an earlier request never matches
        self.refused = False  # the broker refused our CURVE key (nothing we send can run)
        self.up = False  # a handshake with the broker completed and its connection did not drop since
        self.abandoned = Abandoned()  # read when the channel's next request waits

    def disconnected(self) -> str:
        """Drain the monitor: why the connection to the broker dropped since the last look, or ""."""
        why = ""
        self.monitor_due = False
        while True:
            # asking first: nothing pending (every call's case) costs less than a raised zmq.Again
            if not get_opt(self.monitor, EVENTS) & POLLIN:
                return why
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return why
            self.up, lost = connection_event(event["event"], self.curve, self.up)
            if lost and lost is not LOST:
                why = lost
                self.refused = True
            elif lost and not why:
                why = lost

    def close(self) -> None:
        close_monitored(self.sock, self.monitor)


class ChannelPool:
    """The channels of one client: lent out one per request, the idle ones kept (LIFO: the warmest
    first) up to ``idle_max``."""

    def __init__(self, endpoint: str, idle_max: int) -> None:
        self.endpoint = endpoint
        self.idle_max = idle_max
        self._idle: list[Channel] = []
        self._open: set[Channel] = set()  # every channel not yet closed, lent out or idle
        self._lock = threading.Lock()
        self.closed = False
        self._drop_seen = -math.inf  # when a connection drop was last seen
        self.replaced = 0  # channels closed because their connection broke (the next request makes another)
        self.cancels = 0  # cancel_all() calls so far: a request started before the latest one stops

    def cancel_all(self) -> None:
        """(``ClientAPI.cancel_all``.) Each request notices within ``dspex.client.sync.CANCEL_CHECK_MS``."""
        with self._lock:
            self.cancels += 1

    @property
    def open_sockets(self) -> int:
        """Channels open (lent to running requests and streams, or idle)."""
        return len(self._open)

    def close(self) -> bool:
        """Close the idle channels (a lent one is closed by its request: zmq sockets belong to one
        thread at a time); False if closed already."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            idle, self._idle = self._idle, []
            self._open.difference_update(idle)
        for ch in idle:
            ch.close()
        return True

    def checkout(self, connect: Connect) -> Channel:
        """A channel for one request: an idle one that is still connected, else a new one
        (``connect`` makes its socket and monitor)."""
        while True:
            with self._lock:
                if self.closed:
                    raise closed_error()
                ch = self._take_idle()
            if ch is None:
                # shortly after a drop, no probe: across a broker restart the request waits in the
                # new socket for the broker (within its timeout); else nobody listening fails at once.
                # The probe comes before the socket: a failed one leaves none behind
                if time.monotonic() - self._drop_seen > RIDE_THROUGH:
                    probe_endpoint(self.endpoint)
                with self._lock:
                    if self.closed:
                        raise closed_error()
                    ch = Channel(*connect())
                    self._open.add(ch)
                return ch
            if not ch.broken and not ch.disconnected():
                return ch
            # zmq reconnects by itself after a broker restart, but never after a protocol error
            # (a reply over this socket's MAXMSGSIZE): a fresh socket works in both cases
            self._drop_seen = time.monotonic()
            ch.broken = True
            self._discard(ch)

    def _take_idle(self) -> Channel | None:
        """The idle channel for the next request (the lock held): one whose abandoned requests may
        still send what their producers print as they stop, the latest first (the next request
        reads it before its own output, as a stopped call's ``finally`` prints before the next
        call's output in-process), else the warmest."""
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):
            if idle[i].abandoned:
                return idle.pop(i)
        return idle.pop() if idle else None

    def checkin(self, ch: Channel) -> None:
        if ch.broken:
            self._drop_seen = time.monotonic()
        with self._lock:
            if not self.closed and not ch.broken and len(self._idle) < self.idle_max:
                self._idle.append(ch)
                return
        self._discard(ch)

    def _discard(self, ch: Channel) -> None:
        with self._lock:
            if ch not in self._open:
                return  # closed by close() already
            self._open.discard(ch)
            if ch.broken and not self.closed:
                self.replaced += 1
        ch.close()
