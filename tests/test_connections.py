"""The broker's map of workers to connections, against real file descriptors: a disconnect is a
worker's only if it is of the connection the worker is on now."""

from __future__ import annotations

import os
import socket
from typing import Any

import zmq

from broker.connections import CLOSE_WAIT, GOODBYE_GRACE, Connections

W = b"worker-1"


def _disconnected(fd: int) -> Any:
    return {"event": zmq.EVENT_DISCONNECTED, "value": fd, "endpoint": b"ipc://backend"}


def test_a_late_disconnect_of_an_earlier_connection_on_the_same_fd_is_not_the_workers() -> None:
    """The worker renewed its connection and the new one got the old one's fd number; the old
    one's disconnect is read after the READY on the new one (the monitor lags the backend)."""
    c = Connections()
    new, peer = socket.socketpair()
    try:
        c.workers.connected(W, new.fileno(), 0.0)
        c.workers.event(_disconnected(new.fileno()), 1.0, {W})
        assert c.workers.due(1.0 + 2 * GOODBYE_GRACE) == []
        assert c.workers.due(1.0 + CLOSE_WAIT) == [] and c.workers.disconnects == {}  # dropped
        assert c.workers.fd[W] == new.fileno() and c.workers.by_fd[new.fileno()] == W
    finally:
        peer.close()
        new.close()


def test_the_disconnect_of_the_workers_own_connection_is_its() -> None:
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    c.workers.connected(W, fd, 0.0)
    conn.close()
    peer.close()
    c.workers.event(_disconnected(fd), 1.0, {W})
    assert c.workers.due(1.0 + 2 * GOODBYE_GRACE) == [W]
    assert c.workers.settle(W)  # of its current connection: a crash if the core still holds it
    assert fd not in c.workers.by_fd and c.workers.disconnects == {}


def test_the_disconnect_of_the_workers_connection_whose_fd_another_took_is_its() -> None:
    """The worker's connection closed and a new connection (anyone's) got its fd number before
    the disconnect was read: still the worker's."""
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    c.workers.connected(W, fd, 0.0)
    other, other_peer = socket.socketpair()
    try:
        os.dup2(other.fileno(), fd)  # fd now names another socket, as a reused number does
        c.workers.event(_disconnected(fd), 1.0, {W})
        assert c.workers.disconnects == {W: 1.0}
    finally:
        for s in (conn, peer, other, other_peer):
            s.close()


def test_a_late_disconnect_of_an_earlier_clients_connection_on_the_same_fd_is_not_the_new_clients() -> None:
    """Client A left and client B's connection got A's fd number; B's first call is read before
    A's disconnect: A is gone (its fd is B's now), and A's disconnect does not cancel B's calls."""
    c = Connections()
    conn, peer = socket.socketpair()
    try:
        c.clients.connected(b"A", conn.fileno(), 1.0, reuse_is_loss=True)
        c.clients.connected(b"B", conn.fileno(), 2.0, reuse_is_loss=True)
        assert c.clients.disconnects == {b"A": 2.0}
        c.clients.event(_disconnected(conn.fileno()), 3.0)
        assert c.clients.due(3.0 + 2 * GOODBYE_GRACE) == [b"A"]
        c.clients.settle(b"A")
        assert c.clients.due(3.0 + CLOSE_WAIT) == [] and c.clients.disconnects == {}  # dropped
        assert c.clients.fd == {b"B": conn.fileno()}
        fd = conn.fileno()
        conn.close()
        c.clients.event(_disconnected(fd), 4.0)  # now B's own connection closed
        assert c.clients.due(4.0 + 2 * GOODBYE_GRACE) == [b"B"]
    finally:
        peer.close()
        if conn.fileno() >= 0:
            conn.close()


def test_a_disconnect_read_just_before_its_socket_closes_is_the_clients() -> None:
    """libzmq reports a disconnect just before it closes the connection's fd, so the broker can
    read it while the client's socket is still open: once the socket closes, the client is gone."""
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    try:
        c.clients.connected(b"B", fd, 1.0, reuse_is_loss=True)
        c.clients.event(_disconnected(fd), 2.0)
        conn.close()
        assert c.clients.due(2.0 + 2 * GOODBYE_GRACE) == [b"B"]
    finally:
        peer.close()
        if conn.fileno() >= 0:
            conn.close()


def test_a_disconnect_read_just_before_its_socket_closes_is_the_workers() -> None:
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    try:
        c.workers.connected(W, fd, 0.0)
        c.workers.event(_disconnected(fd), 2.0, {W})
        conn.close()
        assert c.workers.due(2.0 + 2 * GOODBYE_GRACE) == [W]
        assert c.workers.settle(W)  # of its current connection: a crash if the core still holds it
    finally:
        peer.close()
        if conn.fileno() >= 0:
            conn.close()
