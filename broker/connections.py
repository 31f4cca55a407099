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
from collections.abc import Container

import zmq
from zmq.utils.monitor import _MonitorMessage

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


def _closed(fd: int, inode: int | None) -> bool:
    """Whether the socket mapped on ``fd`` (``inode``; None: not known) is closed now."""
    return fd < 0 or inode is None or _inode(fd) != inode


def source_fd(frame: zmq.Frame) -> int:
    """The connection a received frame came from (-1: not known, e.g. inproc)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


class Connections:
    """The broker's map of peers to connections and the disconnects waiting for their grace."""

    def __init__(self) -> None:
        self.fd_worker: dict[int, bytes] = {}  # connection (fd) -> the worker on it
        self.worker_fd: dict[bytes, int] = {}  # and back: a worker's current connection
        self.worker_inode: dict[bytes, int | None] = {}  # the socket on that fd when it was mapped
        self.worker_disconnects: dict[bytes, float] = {}  # worker -> when the monitor saw it go
        # clients that sent calls, by connection (fds are reused: the map is refreshed on a
        # client's first call), and those whose connection closed, acted on after the grace
        self.fd_client: dict[int, bytes] = {}
        self.client_fd: dict[bytes, int] = {}
        self.fd_client_inode: dict[int, int | None] = {}  # the socket on that fd when it was mapped
        self.client_disconnects: dict[bytes, float] = {}
        self.handshakes = Notices(NOTICE_EVERY)

    # -- workers ----------------------------------------------------------------------------
    def worker_connected(self, wid: bytes, fd: int) -> bool:
        """Map ``wid`` to connection ``fd``; whether that is another connection than its last (a
        reused fd number holds another socket; True when not known: inproc)."""
        if fd < 0:
            return True
        old = self.worker_fd.get(wid, -1)
        inode = _inode(fd)
        renewed = old != fd or self.worker_inode.get(wid) != inode
        if self.fd_worker.get(old) == wid:
            del self.fd_worker[old]
        self.worker_fd[wid] = fd
        self.fd_worker[fd] = wid
        self.worker_inode[wid] = inode
        return renewed

    def worker_gone(self, wid: bytes) -> None:
        self.worker_disconnects.pop(wid, None)
        self.worker_inode.pop(wid, None)
        fd = self.worker_fd.pop(wid, -1)
        if self.fd_worker.get(fd) == wid:
            del self.fd_worker[fd]

    def worker_event(self, event: _MonitorMessage, known: Container[bytes], now: float) -> None:
        """A backend monitor event; ``known``: the workers the core holds."""
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.handshake_failed(WORKERS, int(event["value"]), now)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            wid = self.fd_worker.get(int(event["value"]))
            if wid is not None and wid in known:
                self.worker_disconnects.setdefault(wid, now)

    def _worker_closed(self, wid: bytes) -> bool:
        fd = self.worker_fd.get(wid, -1)
        return self.fd_worker.get(fd) != wid or _closed(fd, self.worker_inode.get(wid))

    def workers_due(self, now: float) -> list[bytes]:
        """Workers whose disconnect is past its grace and whose current connection is closed; a
        disconnect whose worker's connection stays open (an earlier one's) is dropped."""
        due = []
        for wid, seen in list(self.worker_disconnects.items()):
            if now - seen < GOODBYE_GRACE:
                continue
            if self._worker_closed(wid):
                due.append(wid)
            elif now - seen >= CLOSE_WAIT:
                del self.worker_disconnects[wid]
        return due

    def settle_worker(self, wid: bytes) -> bool:
        """Forget ``wid``'s disconnect; whether it was of its current connection (a crash if the
        core still holds it), not of an older one."""
        self.worker_disconnects.pop(wid, None)
        if not self._worker_closed(wid):
            return False
        fd = self.worker_fd.get(wid, -1)
        if self.fd_worker.get(fd) == wid:
            del self.fd_worker[fd]
        return True

    # -- clients ----------------------------------------------------------------------------
    def client_known(self, client: bytes) -> bool:
        """Mapped already, or gone (its last messages are read before it is settled)."""
        return client in self.client_fd or client in self.client_disconnects

    def client_connected(self, client: bytes, fd: int, now: float) -> None:
        if fd < 0:
            return
        previous = self.fd_client.get(fd)
        if previous is not None and previous != client:
            self._client_lost(previous, now)  # its fd is someone else's now: that connection closed
        self.fd_client[fd] = client
        self.client_fd[client] = fd
        self.fd_client_inode[fd] = _inode(fd)

    def client_event(self, event: _MonitorMessage, now: float) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.handshake_failed(CLIENTS, int(event["value"]), now)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            client = self.fd_client.get(int(event["value"]))
            if client is not None:
                self.client_disconnects.setdefault(client, now)

    def _client_lost(self, client: bytes, now: float) -> None:
        if self.client_fd.pop(client, None) is not None:
            self.client_disconnects.setdefault(client, now)

    def clients_due(self, now: float) -> list[bytes]:
        """Clients whose disconnect is past its grace and whose connection is closed; a disconnect
        whose client's connection stays open (an earlier one's) is dropped."""
        due = []
        for client, seen in list(self.client_disconnects.items()):
            if now - seen < GOODBYE_GRACE:
                continue
            fd = self.client_fd.get(client, -1)
            if _closed(fd, self.fd_client_inode.get(fd)):
                due.append(client)
            elif now - seen >= CLOSE_WAIT:
                del self.client_disconnects[client]
        return due

    def settle_client(self, client: bytes) -> None:
        self.client_disconnects.pop(client, None)
        fd = self.client_fd.pop(client, -1)
        if self.fd_client.get(fd) == client:
            del self.fd_client[fd]
            self.fd_client_inode.pop(fd, None)

    # -- CURVE handshakes -------------------------------------------------------------------
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
