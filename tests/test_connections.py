"""The broker's map of workers to connections, against real file descriptors: a disconnect is a
worker's only if it is of the connection the worker is on now."""

from __future__ import annotations

import os
import socket
from typing import Any

import zmq

from broker.connections import Connections

W = b"worker-1"


def _disconnected(fd: int) -> Any:
    return {"event": zmq.EVENT_DISCONNECTED, "value": fd, "endpoint": b"ipc://backend"}


def test_a_late_disconnect_of_an_earlier_connection_on_the_same_fd_is_not_the_workers() -> None:
    """The worker renewed its connection and the new one got the old one's fd number; the old
    one's disconnect is read after the READY on the new one (the monitor lags the backend)."""
    c = Connections()
    new, peer = socket.socketpair()
    try:
        c.worker_connected(W, new.fileno())
        c.worker_event(_disconnected(new.fileno()), {W}, 1.0)
        assert c.worker_disconnects == {}
        assert c.worker_fd[W] == new.fileno() and c.fd_worker[new.fileno()] == W
    finally:
        peer.close()
        new.close()


def test_the_disconnect_of_the_workers_own_connection_is_its() -> None:
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    c.worker_connected(W, fd)
    conn.close()
    peer.close()
    c.worker_event(_disconnected(fd), {W}, 1.0)
    assert c.worker_disconnects == {W: 1.0} and fd not in c.fd_worker
    assert c.settle_worker(W)  # of its current connection: a crash if the core still holds it


def test_the_disconnect_of_the_workers_connection_whose_fd_another_took_is_its() -> None:
    """The worker's connection closed and a new connection (anyone's) got its fd number before
    the disconnect was read: still the worker's."""
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    c.worker_connected(W, fd)
    other, other_peer = socket.socketpair()
    try:
        os.dup2(other.fileno(), fd)  # fd now names another socket, as a reused number does
        c.worker_event(_disconnected(fd), {W}, 1.0)
        assert c.worker_disconnects == {W: 1.0}
    finally:
        for s in (conn, peer, other, other_peer):
            s.close()
