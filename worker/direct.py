"""A ``direct`` pool worker's own socket: pinned sessions' calls straight from their clients
(issue 14 prototype).

The broker still places and pins sessions: a session's first call reaches the worker through it,
with ``BUDGET_DIRECT`` in its request head (and the pool's queue timeout). That admits the session
here and opens this ROUTER (``ipc://<run dir>/d-<incarnation[:8]>.sock``); the reply header of
every brokered reply to an admitted session carries the endpoint, so the client learns it.

A direct request is ``[request_header, *payload]`` from a DEALER, exactly the frontend form.
It joins the worker's one inbox, behind and ahead of brokered requests in arrival order, with a
budget built here: call deadline = the header's timeout, queue deadline = the pool's queue
timeout, both from arrival, enforced by the same ``Worker._handle`` as a brokered request. The
reply goes back on this socket as ``[reply_header, *payload]``.

A direct call's output events (what it prints, warns or logs) come back on this socket before
its reply, under the same credit flow control as through the broker: the client sends ``credit``
(and ``cancel``) here, in the frontend's form.

What the worker will not take directly (a session it has not admitted or has released, a
streamed or progress-reporting call, anything while it stops) it answers with
``STATUS_VIA_BROKER``: nothing ran, the client sends it through the broker, which keeps its
usual semantics (``SessionClosed``, ``SessionWorkerUnavailable``, streams).

Direct requests carry a tagged client id (``DIRECT_TAG`` + the DEALER's routing id) so the
worker's one reply path can tell them apart from broker clients.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import msgpack
import zmq

from dspex import config
from dspex.errors import DspexError, PoolSaturated
from dspex.protocol import (FLAG_STREAM, REPLY_HEAD_SIZE, REQUEST_HEAD_SIZE, STATUS_VIA_BROKER, W_PARTIAL, WORKER_OPS,
                            Op, Status, pack_reply_header, pack_request_head, unpack_reply_head, unpack_request_head,
                            unpack_request_header)
from dspex.zmqfast import NOBLOCK, recv_frames, send_frames
from worker.remote_errors import error_frames

log = logging.getLogger("dspex.worker")

DIRECT_TAG = b"\xfd"  # broker client ids never start with it (clients: b"c...", zmq: b"\x00...")
_MAX_BUDGET_MS = 2**31 - 1
_CANCEL = Op.CANCEL.value
_CONTROL_OPS = frozenset((Op.CREDIT.value, _CANCEL))


def endpoint_for(backend: str, incarnation: str) -> str:
    """Next to the broker's backend socket when that is ipc (one private run dir), else the run dir."""
    if backend.startswith("ipc://"):
        folder = os.path.dirname(backend[len("ipc://"):])
    else:
        folder = str(config.run_dir())
    return f"ipc://{folder}/d-{incarnation[:8]}.sock"


class DirectPort:
    """The ROUTER, the admitted sessions and the counts heartbeats report. Every method runs
    holding the worker's socket lock (``admitted``/``ends`` reads are GIL-atomic)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, incarnation: str, pool: str, max_message: int,
                 capacity: int, control: Callable[[bytes, int, bool, int], None]) -> None:
        self.endpoint = endpoint
        self.control = control  # (tagged client, req_id, cancel?, n): credit/cancel of a running direct call
        self.incarnation, self.pool = incarnation, pool
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        config.tune_socket(self.sock, max_message=max_message)
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):  # a dead incarnation's leftover cannot be ours (fresh random id)
            os.unlink(path)
        self.sock.bind(endpoint)
        self.admitted: dict[str, int] = {}  # session -> its pool's TTL (s), for the backstop
        self.queue_ms = 0  # the pool's queue timeout: each direct call's queue deadline
        self.queue_max = 0  # the pool's queue_max: direct calls waiting here beyond it are refused
        self.capacity = capacity
        self.open: dict[tuple[bytes, int], str] = {}  # (tagged client, req_id) -> session, taken not answered
        self.deferred: set[str] = set()  # released by the broker while a direct call of it ran
        self.ends: dict[str, float] = {}  # session -> end of its last direct call, since the last report
        self.served = 0
        self.errors = 0
        log.info("direct calls on %s", endpoint)

    def close(self) -> None:
        self.sock.close(linger=500)  # the last replies and bounces still go out (open connections)
        try:  # libzmq leaves the file: remove it, so no client finds a stale socket here
            os.unlink(self.endpoint[len("ipc://"):])
        except OSError:
            pass

    def admit(self, session: str, ttl_s: int, queue_ms: int, queue_max: int) -> None:
        self.admitted[session] = ttl_s
        self.queue_ms, self.queue_max = queue_ms, queue_max

    def forget(self, session: str) -> None:
        """The session was released: its next direct call goes via the broker (SessionClosed)."""
        self.admitted.pop(session, None)
        self.ends.pop(session, None)

    def defer_release(self, session: str, running: bool) -> bool:
        """The broker released ``session``: refuse its direct calls from now on; whether the
        release must wait for a running call of it (the broker does not see direct calls)."""
        self.forget(session)
        if running:
            self.deferred.add(session)
        return running

    def still_admitted(self, frames: list[Any]) -> bool:
        """Whether a queued direct request's session is still admitted as it is about to run."""
        try:
            return unpack_request_header(frames[1].buffer).session in self.admitted
        except DspexError:
            return True  # the worker reports the malformed header

    def announce(self, session: str, client: bytes) -> str:
        """The endpoint a brokered reply to ``session`` carries ("" if not admitted or direct)."""
        return self.endpoint if session in self.admitted and client[:1] != DIRECT_TAG else ""

    @staticmethod
    def owns(client: bytes) -> bool:
        return client[:1] == DIRECT_TAG

    @staticmethod
    def owns_request(frames: list[Any]) -> bool:
        """``[request head, request header, *payload]`` of a direct request (its client id, in
        the head, is tagged)?"""
        head = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
        return head[REQUEST_HEAD_SIZE:REQUEST_HEAD_SIZE + 1] == DIRECT_TAG

    @staticmethod
    def owns_reply(frames: list[Any]) -> bool:
        """``[reply head, reply header, *payload]`` to a direct request?"""
        head = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
        return head[REPLY_HEAD_SIZE:REPLY_HEAD_SIZE + 1] == DIRECT_TAG

    def read(self, inbox: Any, stopping: bool) -> None:
        """Queue what arrived (arrival time = now: budgets count from it) or send it back."""
        while True:
            try:
                frames = recv_frames(self.sock, NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity = frames[0].bytes
            try:
                header = unpack_request_header(frames[1].buffer)
            except DspexError:
                log.warning("ignoring a malformed direct request")
                continue
            if header.op in _CONTROL_OPS:  # credit for the output events of a direct call (no reply)
                try:
                    n = int(msgpack.unpackb(frames[2].buffer)) if len(frames) > 2 else 0
                except (ValueError, TypeError):
                    log.warning("ignoring a malformed direct %s", header.op)
                    continue
                self.control(DIRECT_TAG + identity, header.req_id, header.op == _CANCEL, n)
                continue
            ttl = self.admitted.get(header.session)
            if (stopping or ttl is None or header.flags & FLAG_STREAM or header.op not in WORKER_OPS
                    or (DIRECT_TAG + identity, header.req_id) in self.open):
                self._send([identity, pack_reply_header(STATUS_VIA_BROKER, header.req_id, self.incarnation, self.pool)])
                continue
            client = DIRECT_TAG + identity
            if self.queue_max and len(self.open) - self.capacity >= self.queue_max:
                # the broker's queue_max, per worker: it counts only what it routed itself
                err = PoolSaturated(f"{len(self.open) - self.capacity} direct calls wait on worker "
                                    f"{self.incarnation[:8]}, the pool's queue_max", pool=self.pool)
                self._send([identity, pack_reply_header(Status.ERROR.value, header.req_id, self.incarnation, self.pool),
                            *error_frames(err)])
                self.errors += 1
                continue
            call_ms = min(_MAX_BUDGET_MS, header.timeout_ms) if header.timeout_ms > 0 else 0
            head = zmq.Frame(pack_request_head(client, call_ms, self.queue_ms or _MAX_BUDGET_MS, ttl))
            self.open[(client, header.req_id)] = header.session
            inbox.append((time.monotonic(), [head, frames[1], *frames[2:]]))

    def bounce(self, frames: list[Any]) -> None:
        """A queued direct request the stopping worker will not start: it did not run."""
        try:
            client = unpack_request_head(frames[0].bytes).client
            req_id = unpack_request_header(frames[1].buffer).req_id
        except DspexError:
            return
        self.open.pop((client, req_id), None)
        self._send([client[1:], pack_reply_header(STATUS_VIA_BROKER, req_id, self.incarnation, self.pool)])

    def reply(self, frames: list[Any]) -> None:
        """``[reply head (tagged client), reply_header, *payload]`` of a direct request, from the
        worker's one reply path: its output events (never items: streams go via the broker),
        then its final reply."""
        first = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
        ok, req_id, client = unpack_reply_head(first)
        if first[:1] == W_PARTIAL:
            self._send([client[1:], *frames[1:]])
            return
        if ok:
            self.served += 1
        else:
            self.errors += 1
        session = self.open.pop((client, req_id), None)
        if session is not None:
            self.ends[session] = time.monotonic()
        self._send([client[1:], *frames[1:]])

    def _send(self, frames: list[Any]) -> None:
        try:
            send_frames(self.sock, frames)  # a ROUTER drops what it cannot route: never blocks
        except zmq.ZMQError as exc:
            log.warning("dropped a direct reply: %s", exc)

    def report(self) -> dict[str, Any]:
        """The heartbeat's ``direct`` field (see broker/direct.py); resets the session list."""
        now = time.monotonic()
        sessions = {sid: round(now - t, 3) for sid, t in self.ends.items()}
        for session in self.open.values():
            sessions[session] = 0.0
        self.ends = {}
        return {"endpoint": self.endpoint, "served": self.served, "errors": self.errors, "running": len(self.open),
                "sessions": sessions}
