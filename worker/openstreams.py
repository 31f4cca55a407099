"""The open streams of the calls running on a worker, by (client, request id).

The runner opens one as a streaming call starts (or at the first output of a call whose output
goes back: ``LazyStream``) and closes it as the call ends; the link's reader feeds them the
broker's credit and cancels (``B_CREDIT``, ``B_CANCEL``). A cancel of a call with no stream, or
of one computing its next item, interrupts the call (:meth:`worker.executor.Executor.cancel`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from dspex.wire.headers import pack_reply_envelope, pack_reply_header
from dspex.wire.protocol import CANCEL_SESSION_CLOSED, STREAM_WINDOW, W_PARTIAL, Status
from worker.streaming import StreamControl

log = logging.getLogger("dspex.worker")

Frames = list[Any]
Key = tuple[bytes, int]  # (client, request id)


class OpenStreams:
    """The streams of the calls running here (any thread)."""

    def __init__(self, send: Callable[[Frames], None], *, incarnation: str, pool: str, max_message: int,
                 urgent: Callable[[], None], cancel: Callable[[Key, bool], bool]) -> None:
        """``urgent``: a stream opened, so the socket must be read at once (its credit and
        cancels); ``cancel``: interrupt a running call (whether it was running)."""
        self._send, self._urgent, self._cancel = send, urgent, cancel
        self.incarnation, self.pool, self.max_message = incarnation, pool, max_message
        self._lock = threading.Lock()
        self._open: dict[Key, StreamControl] = {}

    def open(self, client: bytes, req_id: int, timeout_ms: int) -> StreamControl:
        heads = {status.value: pack_reply_header(status.value, req_id, self.incarnation, self.pool)
                 for status in (Status.PARTIAL, Status.PROGRESS, Status.OUTPUT)}

        first = pack_reply_envelope(W_PARTIAL, Status.PARTIAL.value, req_id, client)
        send = self._send

        def emit(kind: str, frames: Frames) -> None:
            send([first, heads[kind], *frames])

        # a consumer that stops acknowledging for this long has gone away: stop producing
        stall = timeout_ms / 1000 if timeout_ms > 0 else 300.0
        control = StreamControl(emit, STREAM_WINDOW, stall, self.max_message)
        self._urgent()
        with self._lock:
            self._open[(client, req_id)] = control
        return control

    def close(self, client: bytes, req_id: int) -> None:
        with self._lock:
            self._open.pop((client, req_id), None)

    def control(self, cancel: bool, frames: list[zmq.Frame]) -> None:
        """The broker's credit for a stream, or its cancel of a call (``[command, client,
        msgpack [req_id, n]]``)."""
        try:
            req_id, n = msgpack.unpackb(frames[2].buffer)
            key = (frames[1].bytes, int(req_id))
        except Exception:  # noqa: BLE001 - whatever malformed bytes raise
            log.warning("malformed stream control from broker")
            return
        with self._lock:
            control = self._open.get(key)
        if cancel:
            # a stream waiting for credit to send its next item stops there; one computing an item,
            # and any other call, is interrupted (worker.limits)
            if control is not None and not control.cancel():
                return
            if not self._cancel(key, n == CANCEL_SESSION_CLOSED):
                log.debug("cancel of request %d: not running (not started yet, or finished)", key[1])
        elif control is not None:
            control.add_credit(int(n))
