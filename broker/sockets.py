"""The broker's two ROUTER sockets, bound with the options each needs, and their monitors;
messages read from them and replies written to clients.

The frontend (clients) and the backend (workers): CURVE on ``tcp://`` endpoints (refused without
keys: eval/exec through the broker is remote code execution), ZMTP heartbeats where a peer's host
may vanish without closing its connection, ``ROUTER_MANDATORY`` so a send to a gone peer raises,
and the socket monitors ``broker.connections`` reads (disconnects, failed CURVE handshakes).

Per message the broker decodes one small msgpack header and forwards the payload frames untouched
(``copy=False``); it drains every ready message per wake-up (:class:`SocketDrain`). Replies wait
until the end of the drain that produced them, then go out back to back (:class:`ClientOutbox`):
zmq's I/O thread is woken once for the burst instead of once per reply. A client that stops
reading loses replies past the frontend's SNDHWM (counted, logged once per client; its calls time
out) instead of growing the broker without bound.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from broker.security import CLIENTS, WORKERS, start_authenticator
from broker.settings import BrokerOptions
from dspex.stack.rundir import prepare_bind
from dspex.wire.errors import ConfigError
from dspex.wire.sockets import tune_socket
from dspex.wire.zmqfast import EVENTS, NOBLOCK, POLLIN, SNDMORE, get_opt, recv_frame, send_frame

log = logging.getLogger("dspex.broker")

_DRAIN_BATCH = 2000  # messages per socket per wake-up before giving the others a turn
_OUTBOX_MAX = 64  # replies held back at most before the end of a drain sends them
_MORE_NOBLOCK = SNDMORE | NOBLOCK


@dataclass
class BrokerSockets:
    frontend: zmq.Socket[Any]
    backend: zmq.Socket[Any]
    monitor: zmq.Socket[Any]  # the backend's: workers' connections and their disconnects
    front_monitor: zmq.Socket[Any]  # the frontend's: clients' disconnects and CURVE handshake failures
    auth: ThreadAuthenticator | None = None
    admins: Callable[[], set[str]] | None = None  # client keys allowed admin ops (None: everyone)
    refusals: Callable[[], list[dict[str, Any]]] | None = None  # peers the CURVE allow-lists refused
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
    refusals: Callable[[], list[dict[str, Any]]] | None = None
    if tcp:
        if not options.curve_secret or not options.curve_public:
            raise ConfigError(
                f"refusing to bind {tcp[0]} without CURVE keys: TCP endpoints need --curve-secret-key "
                "(eval/exec through the broker is remote code execution; only authenticated peers may reach it)")
        auth, allowed, refusals = start_authenticator(ctx, options.curve_allowed_dir)
        if allowed is not None and options.frontend.startswith("tcp://"):
            admins = allowed.keys
    made: list[zmq.Socket[Any]] = []
    bound: dict[str, int] = {}
    try:
        frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        made += [frontend, backend]
        ivl = max(1, int(options.heartbeat_interval * 1000))
        for sock, endpoint, plane in ((frontend, options.frontend, CLIENTS), (backend, options.backend, WORKERS)):
            tune_socket(sock, max_message=options.max_message, endpoint=endpoint)
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
                sock.zap_domain = plane.encode()  # the plane's allow-list (broker.security)
                sock.curve_secretkey, sock.curve_publickey = options.curve_secret, options.curve_public
                sock.curve_server = True
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as err:
                if err.errno != zmq.EADDRINUSE:
                    raise
                raise ConfigError(f"cannot bind {endpoint}: {os.strerror(err.errno)} (another process holds it: stop it, or "
                                  "give the broker another endpoint)") from None
            if endpoint.startswith("ipc://"):  # ours to unlink at exit, and only this very file
                bound[endpoint[len("ipc://"):]] = os.stat(endpoint[len("ipc://"):]).st_ino
        # a send to a worker whose connection is already gone raises instead of vanishing; on the
        # frontend, a full or gone client raises too (counted by the shell), never blocks
        backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No ROUTER_HANDOVER: with it, any peer connecting with a live worker's identity takes
        # that identity (and its requests) and cuts the real worker off. A worker's renewed
        # connection is ignored by libzmq until its old one is closed; no ZMTP heartbeats on the
        # backend (they would race the dspex heartbeat: docs/reliability.md, fix 11).
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
    return BrokerSockets(frontend, backend, monitor, front_monitor, auth, admins, refusals, bound)


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


class SocketDrain:
    """Reads the messages waiting on one ROUTER and hands each, with the time it was read, to
    ``handler`` (the core's ``on_client_frames`` or ``on_worker_frames``)."""

    def __init__(self, sock: zmq.Socket[Any], handler: Callable[[list[Any], float], None]) -> None:
        self.sock = sock
        self.handler = handler
        self._one_at_a_time = False  # the last drain held one message

    def drain(self) -> None:
        """Handle the messages waiting (at most ``_DRAIN_BATCH``), reading until ``zmq.Again``. A
        socket whose last drain held one message (calls that come one at a time) is asked whether
        a second waits instead (an EVENTS read is cheaper than the exception, but one question
        per message would cost more than one exception per drain)."""
        sock, handler, recv, clock = self.sock, self.handler, recv_frame, time.monotonic  # (no lookups per message)
        ask = self._one_at_a_time
        n = 0
        for n in range(_DRAIN_BATCH):
            if n == 1 and ask and not get_opt(sock, EVENTS) & POLLIN:
                break
            try:
                # the sender's routing id, as bytes: a ROUTER always delivers it before the
                # message's own frames (at least one), so it needs no "more" check
                ident = recv(sock, NOBLOCK, True)
            except zmq.Again:
                break
            f = recv(sock, 0, False)
            frames = [ident, f]
            while f.more:
                f = recv(sock, 0, False)
                frames.append(f)
            try:
                handler(frames, clock())
            except Exception:  # one bad message must never stop the broker
                log.exception("error handling a message; dropped it")
        self._one_at_a_time = n == 1


class ClientOutbox:
    """The replies of one drain, sent to the frontend at its end (or when too many wait)."""

    def __init__(self, counters: dict[str, int], client_hwm: int) -> None:
        self.counters = counters  # the core's: the shell's counters show in the status too
        counters.update(replies_dropped_slow_client=0, replies_to_gone_clients=0)
        self.client_hwm = client_hwm
        self.frontend: zmq.Socket[Any]  # (set once the broker binds it)
        self._held: list[list[Any]] = []
        self._slow_clients: set[bytes] = set()

    def add(self, frames: list[Any]) -> None:
        self._held.append(frames)
        if len(self._held) >= _OUTBOX_MAX:  # a long drain does not hold its first replies back
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        sock = self.frontend
        for frames in held:
            try:
                send_frame(sock, frames[0], _MORE_NOBLOCK, True)  # the client's id
                last = len(frames) - 1
                for i in range(1, last):
                    send_frame(sock, frames[i], _MORE_NOBLOCK, False)
                send_frame(sock, frames[last], NOBLOCK, False)
            except zmq.ZMQError as exc:
                self._not_sent(frames, exc)

    def _not_sent(self, frames: list[Any], exc: zmq.ZMQError) -> None:
        """(A full or gone client refuses the id frame, before any frame of the reply went.)"""
        if isinstance(exc, zmq.Again):
            self.counters["replies_dropped_slow_client"] += 1
            client = bytes(frames[0])
            if client not in self._slow_clients:
                if len(self._slow_clients) > 10_000:
                    self._slow_clients.clear()
                self._slow_clients.add(client)
                log.warning("client %s is not reading its replies: %d queued, its limit; dropping replies",
                            client.hex()[:12], self.client_hwm)
        elif exc.errno == zmq.EHOSTUNREACH:
            self.counters["replies_to_gone_clients"] += 1  # it disconnected; nobody waits for this
        else:
            raise exc
