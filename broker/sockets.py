"""The broker's two ROUTER sockets, bound with the options each needs, and their monitors.

The frontend (clients) and the backend (workers): CURVE on ``tcp://`` endpoints (refused without
keys: eval/exec through the broker is remote code execution), ZMTP heartbeats where a peer's host
may vanish without closing its connection, ``ROUTER_MANDATORY`` so a send to a gone peer raises,
and the socket monitors ``broker.connections`` reads (disconnects, failed CURVE handshakes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from broker.security import CLIENTS, WORKERS, secure_server, start_authenticator
from broker.settings import BrokerOptions
from dspex.stack.rundir import prepare_bind
from dspex.wire.errors import ConfigError
from dspex.wire.sockets import tune_socket


@dataclass
class BrokerSockets:
    frontend: zmq.Socket[Any]
    backend: zmq.Socket[Any]
    monitor: zmq.Socket[Any]  # the backend's: workers' connections and their disconnects
    front_monitor: zmq.Socket[Any]  # the frontend's: clients' disconnects and CURVE handshake failures
    auth: ThreadAuthenticator | None = None
    admins: Callable[[], set[str]] | None = None  # client keys allowed admin ops (None: everyone)
    bound: dict[str, int] = field(default_factory=dict)  # ipc socket files bound here -> their inode

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        for sock in (self.monitor, self.front_monitor, self.frontend, self.backend):
            sock.close(0)
        _unlink_bound(self.bound)


def bind_sockets(ctx: zmq.Context[Any], options: BrokerOptions) -> BrokerSockets:
    """Bind the frontend and the backend of ``options``; on a failure nothing stays open."""
    tcp = [ep for ep in (options.frontend, options.backend) if ep.startswith("tcp://")]
    auth: ThreadAuthenticator | None = None
    admins: Callable[[], set[str]] | None = None
    if tcp:
        if not options.curve_secret:
            raise ConfigError(
                f"refusing to bind {tcp[0]} without CURVE keys: TCP endpoints need --curve-secret-key "
                "(eval/exec through the broker is remote code execution; only authenticated peers may reach it)")
        auth, allowed = start_authenticator(ctx, options.curve_allowed_dir)
        if allowed is not None and options.frontend.startswith("tcp://"):
            admins = allowed.keys
    made: list[zmq.Socket[Any]] = []
    bound: dict[str, int] = {}
    try:
        frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        made += [frontend, backend]
        ivl = max(1, int(options.heartbeat_interval * 1000))
        for sock, endpoint, plane in ((frontend, options.frontend, CLIENTS), (backend, options.backend, WORKERS)):
            tune_socket(sock, max_message=options.max_message)
            # bounded replies per client (frontend); workers' queues are bounded by pool limits
            sock.setsockopt(zmq.SNDHWM, options.client_hwm if sock is frontend else 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            if sock is frontend and endpoint.startswith("tcp://"):
                # ZMTP heartbeats close the connection of a client host that vanished without
                # closing it, and its calls are then cancelled as for any closed connection (an ipc
                # client is on this host: its connection closes when it dies). Set before bind: a
                # listener's connections take the options it had when it was bound.
                sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl * options.heartbeat_liveness)
            prepare_bind(endpoint)
            if endpoint.startswith("tcp://"):
                secure_server(sock, endpoint, options.curve_secret, options.curve_public, plane)
            sock.bind(endpoint)
            if endpoint.startswith("ipc://"):  # ours to unlink at exit, and only this very file
                bound[endpoint[len("ipc://"):]] = os.stat(endpoint[len("ipc://"):]).st_ino
        # a send to a worker whose connection is already gone raises instead of vanishing; on the
        # frontend, a full or gone client raises too (counted by the shell), never blocks
        backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No ROUTER_HANDOVER: with it, any peer connecting with a live worker's identity takes
        # that identity (and its requests) and cuts the real worker off. A worker's own stale
        # connection (a host gone without a FIN) is closed by ZMTP heartbeats instead.
        backend.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        backend.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl * options.heartbeat_liveness)
        # a peer whose HELLO cannot be decrypted (it holds another broker's public key) never
        # reaches the ZAP handler: only the socket monitor sees it
        curve_failed = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL if options.backend.startswith("tcp://") else 0
        monitor = backend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | curve_failed)
        made.append(monitor)
        curve_failed = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL if options.frontend.startswith("tcp://") else 0
        front_monitor = frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED | curve_failed)
    except BaseException:
        for sock in made:
            sock.close(0)
        _unlink_bound(bound)
        if auth is not None:
            auth.stop()
        raise
    return BrokerSockets(frontend, backend, monitor, front_monitor, auth, admins, bound)


def _unlink_bound(bound: dict[str, int]) -> None:
    # libzmq can leave ipc socket files behind when the process exits right after closing;
    # a client would then wait out its timeout on a file nobody listens on
    # (only files this broker bound: never another live stack's sockets)
    for path, inode in bound.items():
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
