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
        c.worker_connected(W, new.fileno())
        c.worker_event(_disconnected(new.fileno()), {W}, 1.0)
        assert c.workers_due(1.0 + 2 * GOODBYE_GRACE) == []
        assert c.workers_due(1.0 + CLOSE_WAIT) == [] and c.worker_disconnects == {}  # dropped
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
    assert c.workers_due(1.0 + 2 * GOODBYE_GRACE) == [W]
    assert c.settle_worker(W)  # of its current connection: a crash if the core still holds it
    assert fd not in c.fd_worker and c.worker_disconnects == {}


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


def test_a_late_disconnect_of_an_earlier_clients_connection_on_the_same_fd_is_not_the_new_clients() -> None:
    """Client A left and client B's connection got A's fd number; B's first call is read before
    A's disconnect: A is gone (its fd is B's now), and A's disconnect does not cancel B's calls."""
    c = Connections()
    conn, peer = socket.socketpair()
    try:
        c.client_connected(b"A", conn.fileno(), 1.0)
        c.client_connected(b"B", conn.fileno(), 2.0)
        assert c.client_disconnects == {b"A": 2.0}
        c.client_event(_disconnected(conn.fileno()), 3.0)
        assert c.clients_due(3.0 + 2 * GOODBYE_GRACE) == [b"A"]
        c.settle_client(b"A")
        assert c.clients_due(3.0 + CLOSE_WAIT) == [] and c.client_disconnects == {}  # dropped
        assert c.client_fd == {b"B": conn.fileno()}
        fd = conn.fileno()
        conn.close()
        c.client_event(_disconnected(fd), 4.0)  # now B's own connection closed
        assert c.clients_due(4.0 + 2 * GOODBYE_GRACE) == [b"B"]
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
        c.client_connected(b"B", fd, 1.0)
        c.client_event(_disconnected(fd), 2.0)
        conn.close()
        assert c.clients_due(2.0 + 2 * GOODBYE_GRACE) == [b"B"]
    finally:
        peer.close()
        if conn.fileno() >= 0:
            conn.close()


def test_a_disconnect_read_just_before_its_socket_closes_is_the_workers() -> None:
    c = Connections()
    conn, peer = socket.socketpair()
    fd = conn.fileno()
    try:
        c.worker_connected(W, fd)
        c.worker_event(_disconnected(fd), {W}, 2.0)
        conn.close()
        assert c.workers_due(2.0 + 2 * GOODBYE_GRACE) == [W]
        assert c.settle_worker(W)  # of its current connection: a crash if the core still holds it
    finally:
        peer.close()
        if conn.fileno() >= 0:
            conn.close()
