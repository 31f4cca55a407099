"""Messages in from the broker's ROUTER sockets, and replies out to clients.

Per message the broker decodes one small msgpack header and forwards the payload frames untouched
(``copy=False``); it drains every ready message per wake-up. Replies wait until the end of the drain that produced them, then go out back to back: zmq's I/O
thread is woken once for the burst instead of once per reply. A client that stops reading loses
replies past the frontend's SNDHWM (counted, logged once per client; its calls time out) instead
of growing the broker without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from dspex.wire.zmqfast import EVENTS, NOBLOCK, POLLIN, SNDMORE, get_opt, recv_frame, send_frame

log = logging.getLogger("dspex.broker")

_DRAIN_BATCH = 2000  # messages per socket per wake-up before giving the others a turn
_OUTBOX_MAX = 64  # replies held back at most before the end of a drain sends them
_MORE_NOBLOCK = SNDMORE | NOBLOCK


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
