"""Which connection each worker and client is on, and when those connections close.

A socket monitor on each ROUTER reports a peer's disconnect within about a millisecond, by file
descriptor; the broker maps each worker (on its READY) and each client (on its first call) to
the fd its messages came from (``SRCFD``) and the socket open on it then (its inode: fd numbers
are reused at once). A disconnect is acted on only after :data:`GOODBYE_GRACE` and after the
broker has read the socket again: what the peer sent before closing (a worker's goodbye, a
client's last calls) travels through the ROUTER, the disconnect through the monitor, in no fixed
order. It is the mapped peer's only once the mapped socket is closed: libzmq reports a disconnect
just before it closes the fd (so the socket may still be open when the event is read), and a
disconnect read late may be of an earlier connection whose fd number the peer's has now (the
monitor's pipe can lag the ROUTER's). Failed CURVE handshakes are logged once, then counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Container
from typing import Any

import zmq
from zmq.utils.monitor import _MonitorMessage, parse_monitor_message

from broker.answers import NOTICE_EVERY
from broker.security import CLIENTS, WORKERS
from broker.state import Notices

log = logging.getLogger("dspex.broker")

# A worker's monitor disconnect is acted on this long after it is seen, after reading the
# backend: the goodbye it queued before closing may not be readable yet (libzmq processes a
# socket's pipe activations at most about once a millisecond on non-blocking reads), and a clean
# exit must never count as a crash. Short, because it delays crash detection by as much.
GOODBYE_GRACE = 0.003
# A disconnect whose mapped socket is still open this long after it was seen was of an earlier
# connection on the same fd number (libzmq closes the fd microseconds after it reports one).
CLOSE_WAIT = 1.0


def _inode(fd: int) -> int | None:
    """The socket open on ``fd`` now (None: none is), which a reused fd number does not share."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def source_fd(frame: zmq.Frame) -> int:
    """The connection a received frame came from (-1: not known, e.g. inproc)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


class Peers:
    """The peers of one ROUTER mapped to their connections, and their disconnects waiting for
    their grace."""

    def __init__(self, plane: str, handshake_failed: Callable[[str, int, float], None]) -> None:
        self.plane = plane  # (security.WORKERS or CLIENTS: named in the handshake log lines)
        self._handshake_failed = handshake_failed
        self.by_fd: dict[int, bytes] = {}  # connection (fd) -> the peer on it
        self.fd: dict[bytes, int] = {}  # and back: a peer's current connection
        self.inode: dict[bytes, int | None] = {}  # the socket on that fd when it was mapped
        self.disconnects: dict[bytes, float] = {}  # peer -> when the monitor saw it go

    def connected(self, peer: bytes, fd: int, now: float, reuse_is_loss: bool = False) -> bool:
        """Map ``peer`` to connection ``fd``; whether that is another connection than its last (a
        reused fd number holds another socket; True when not known: inproc). ``reuse_is_loss``:
        another peer mapped on ``fd`` has lost its connection (the fd is someone else's now)."""
        if fd < 0:
            return True
        previous = self.by_fd.get(fd)
        if reuse_is_loss and previous is not None and previous != peer:
            self.disconnects.setdefault(previous, now)
        old = self.fd.get(peer, -1)
        inode = _inode(fd)
        renewed = old != fd or self.inode.get(peer) != inode
        if self.by_fd.get(old) == peer:
            del self.by_fd[old]
        self.fd[peer] = fd
        self.by_fd[fd] = peer
        self.inode[peer] = inode
        return renewed

    def known(self, peer: bytes) -> bool:
        """Mapped already, or gone (its last messages are read before it is settled)."""
        return peer in self.fd or peer in self.disconnects

    def event(self, event: _MonitorMessage, now: float, known: Container[bytes] | None = None) -> None:
        """A monitor event; ``known``: the peers whose disconnects count (None: all)."""
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self._handshake_failed(self.plane, int(event["value"]), now)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            peer = self.by_fd.get(int(event["value"]))
            if peer is not None and (known is None or peer in known):
                self.disconnects.setdefault(peer, now)

    def read(self, monitor: zmq.Socket[Any], known: Container[bytes] | None = None) -> None:
        """The events waiting on the ROUTER's socket monitor (``known``: as for :meth:`event`)."""
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.event(event, time.monotonic(), known)

    def _closed(self, peer: bytes) -> bool:
        """Whether ``peer``'s connection is closed now: its fd mapped to another peer, or the socket
        mapped on it (its inode; None: not known) no longer open there."""
        fd, inode = self.fd.get(peer, -1), self.inode.get(peer)
        return self.by_fd.get(fd) != peer or inode is None or _inode(fd) != inode

    def due(self, now: float) -> list[bytes]:
        """Peers whose disconnect is past its grace and whose current connection is closed; a
        disconnect whose peer's connection stays open (an earlier one's) is dropped."""
        due = []
        for peer, seen in list(self.disconnects.items()):
            if now - seen < GOODBYE_GRACE:
                continue
            if self._closed(peer):
                due.append(peer)
            elif now - seen >= CLOSE_WAIT:
                del self.disconnects[peer]
        return due

    def settling(self, now: float) -> bool:
        """A disconnect seen less than :data:`GOODBYE_GRACE` ago waits for its grace."""
        return any(now - seen < GOODBYE_GRACE for seen in self.disconnects.values())

    def settle(self, peer: bytes) -> bool:
        """Forget ``peer``'s disconnect; whether it was of its current connection (then the
        connection is forgotten too), not of an older one."""
        self.disconnects.pop(peer, None)
        if not self._closed(peer):
            return False
        self.gone(peer)
        return True

    def gone(self, peer: bytes) -> None:
        self.disconnects.pop(peer, None)
        self.inode.pop(peer, None)
        fd = self.fd.pop(peer, -1)
        if self.by_fd.get(fd) == peer:
            del self.by_fd[fd]


class Connections:
    """The broker's workers and clients mapped to their connections, and the failed CURVE
    handshakes of both planes."""

    def __init__(self) -> None:
        self.workers = Peers(WORKERS, self.handshake_failed)
        # clients that sent calls, by connection (fds are reused: the map is refreshed on a
        # client's first call)
        self.clients = Peers(CLIENTS, self.handshake_failed)
        self.handshakes = Notices(NOTICE_EVERY)

    def handshake_failed(self, plane: str, code: int, now: float) -> None:
        """A peer that cannot complete the CURVE handshake retries every few hundred ms: one line
        at once, then counts (``Notices``). zmq does not say which peer; the error code says why."""
        if n := self.handshakes.note((plane, hex(code)), now):
            _log_handshakes(plane, hex(code), n, 0.0)

    def log_handshakes_due(self, now: float) -> None:
        for (plane, code), n, span in self.handshakes.due(now):
            _log_handshakes(plane, code, n, span)


def _log_handshakes(plane: str, code: str, n: int, span: float) -> None:
    during = f" in the last {span:.0f}s" if span else ""
    log.warning("%d CURVE handshake(s) failed on the %s plane%s (zmq protocol error %s): the peer most likely "
                "holds another broker's public key as its server key", n, plane, during, code)
