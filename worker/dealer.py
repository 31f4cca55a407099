"""The worker's DEALER socket to the broker, and with CURVE the monitor that names a failed
handshake at once (a refused key, a wrong server key) instead of waiting silently for a broker
that will never answer. The link (``worker.link``) owns it and uses it under its lock.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dspex.wire.protocol import W_READY
from dspex.wire.sockets import HANDSHAKE_EVENTS, handshake_failure, tune_socket
from dspex.wire.zmqfast import EVENTS, POLLIN, get_opt

log = logging.getLogger("dspex.worker")

SEND_TIMEOUT_MS = 5000  # a reply the broker has not taken by then is dropped (the caller times out)


class BrokerSocket:
    """The current DEALER (a new one after the broker fell silent) under the worker's identity."""

    def __init__(self, ctx: zmq.Context[Any], backend: str, identity: str, *, max_message: int,
                 curve_server_key: bytes | None, curve_keypair: tuple[bytes, bytes] | None) -> None:
        self.ctx = ctx
        self.backend = backend
        self.identity = identity
        self.max_message = max_message
        self._curve = (curve_server_key, curve_keypair)
        self.sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None  # the socket's handshake failures (CURVE)
        self.fds: tuple[int, ...] = ()  # what a reader waits on: the socket's and the monitor's fd
        self.handshake = ""  # why the last CURVE handshake with the broker failed ("" = none seen)

    def open(self, ready: bytes) -> None:
        """A new socket, connected, its READY (payload ``ready``) queued."""
        sock, self._monitor = self._dealer()
        sock.send_multipart([W_READY, ready])
        self.sock = sock
        self.fds = tuple(int(s.get(zmq.FD)) for s in (sock, self._monitor) if s is not None)

    def close(self, linger: int | None = None) -> None:
        if self._monitor is not None and self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        if self.sock is not None:
            self.sock.close(linger)
            self.sock = None

    def watch_handshake(self) -> None:
        """Log a failed handshake once per reason; :attr:`handshake` says why the last failed."""
        monitor = self._monitor
        if monitor is None:
            return
        while get_opt(monitor, EVENTS) & POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake = ""
                continue
            why = handshake_failure(event["event"], "worker", True)
            if why and why != self.handshake:
                self.handshake = why
                log.error("%s (%s); retrying until the keys are fixed", why, self.backend)

    def _dealer(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any] | None]:
        """A DEALER connected to the backend under the identity, and with CURVE its handshake monitor."""
        server_key, keypair = self._curve
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        tune_socket(sock, max_message=self.max_message)
        sock.setsockopt(zmq.ROUTING_ID, self.identity.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        monitor = None
        if server_key is not None:
            public, secret = keypair or zmq.curve_keypair()
            sock.curve_serverkey = server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_EVENTS)
        sock.connect(self.backend)
        return sock, monitor
