"""The worker's runner: requests in, replies out, ``capacity`` at a time.

A capacity-1 worker runs each request on the thread that hands it over (the main thread: a
soft time limit reaches it as a signal); a capacity-N worker runs them on N pool threads. Either way there is one
reply path: the thread that made a reply, a stream item or an output event sends it itself
through ``send`` (the link's), with no hop to another thread.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import zmq

from dspex.stack import logs
from dspex.wire.errors import (
    Cancelled,
    CheckpointRefused,
    DspexError,
    InternalError,
    ProtocolError,
    QueueTimeout,
    SessionNotHeld,
    Timeout,
    UsageError,
)
from dspex.wire.headers import (
    REQUEST_ENVELOPE_SIZE,
    RequestHeader,
    pack_reply_envelope,
    pack_reply_header,
    unpack_request_envelope,
    unpack_request_header,
)
from dspex.wire.protocol import (
    FLAG_OUTPUT,
    FLAG_STREAM,
    RECEIVED_WINDOW,
    W_CHECKPOINT,
    W_REPLY,
    Durable,
    SessionMode,
    Status,
)
from dspex.wire.remoteerror import RemoteError
from worker.durable import DurableSessions, split_restore
from worker.executor import Executor
from worker.limits import CallTimedOut
from worker.openstreams import OpenStreams
from worker.remote_errors import error_frames
from worker.sessions import SessionBook
from worker.streaming import LazyStream, StreamControl

log = logging.getLogger("dspex.worker")

Frames = list[Any]
Request = tuple[float, list[zmq.Frame]]  # its arrival time (its budget counts from it) and its frames
# plain ints and strs of the enums read per request (an IntFlag's & builds a new member each time)
_RESTORE = int(Durable.RESTORE)
_DURABLE_AT = REQUEST_ENVELOPE_SIZE - 1  # the request envelope's last fixed byte: its Durable flags
_CHECKPOINTED = int(Durable.CHECKPOINT | Durable.FULL)
_HELD = int(Durable.HELD)
_EPHEMERAL = int(SessionMode.EPHEMERAL)
_OK = Status.OK.value
_ERROR = Status.ERROR.value


def _waits_until(arrived: float, call_ms: int, queue_ms: int) -> float:
    """The earlier of a request's deadlines (its caller's, its queue's; 0: none, not both), counted
    from its arrival."""
    return arrived + min(ms for ms in (call_ms, queue_ms) if ms) / 1000


def _request_key(frames: list[zmq.Frame]) -> tuple[bytes, int] | None:
    """``(client, req_id)`` of a request's frames (None: malformed, answered as such)."""
    try:
        head = unpack_request_envelope(frames[0].bytes)
        if head.durable & _RESTORE and len(frames) > 2:  # (received keeps the header, no restore)
            frames = split_restore(frames)[1]
        return head.client, unpack_request_header(frames[1].buffer).req_id
    except Exception:  # noqa: BLE001 - whatever the broker sent must not stop the link
        return None


class Runner:
    """Runs requests with the executor and sends their replies; their streams are its
    :attr:`streams` (:class:`worker.openstreams.OpenStreams`).

    ``urgent``: a stream opened, so the socket must be read at once (its credit and cancels).
    ``leave``: a call ignored its hard time limit; it gets the call's reply and whether calls
    other than that one were running, says goodbye and ends the process. ``idle``: a pooled call
    ended (the loop may be waiting for the last one before its goodbye).
    """

    def __init__(self, executor: Executor, book: SessionBook, send: Callable[[Frames], None], *, pool: str,
                 incarnation: str, capacity: int, max_message: int, hard_grace: float,
                 urgent: Callable[[], None], leave: Callable[[Frames, bool], None],
                 idle: Callable[[], None]) -> None:
        self.executor = executor
        self.book = book
        self.pool_name = pool
        self.incarnation = incarnation
        self.max_message = max_message
        self.hard_grace = hard_grace
        self._send = send
        self._leave = leave
        self._idle = idle
        self._lock = threading.Lock()  # guards the counts below
        self.running = 0  # calls executing now (READY and heartbeats report it to the broker)
        self.active = 0  # calls handed to the pool and not finished
        self.streams = OpenStreams(send, incarnation=incarnation, pool=pool, max_message=max_message, urgent=urgent,
                                   cancel=executor.cancel)
        # requests delivered and not yet finally answered (queued or running), by id: what this
        # worker holds when the broker asks after a reconnect (B_SYNC). One leaves only after its
        # reply is sent, so the broker, reading in order, has that reply before an answer without it
        self.held: dict[int, Request] = {}
        # the envelope and header frames of the last requests received: one the broker sent that
        # is not among them (nor held) never reached this worker
        self.received: deque[tuple[zmq.Frame, zmq.Frame]] = deque(maxlen=RECEIVED_WINDOW)
        self._dspy_logs = False  # dspy's logger has our format (dspy installs its own on import)
        self._threads: ThreadPoolExecutor | None = None
        if capacity > 1:
            self._threads = ThreadPoolExecutor(capacity, thread_name_prefix="dspex-call")

    def deliver(self, request: Request) -> None:
        """``request`` arrived (the link's reader, holding the socket): held until answered."""
        self.held[id(request)] = request
        frames = request[1]
        header = frames[1]
        if frames[0].bytes[_DURABLE_AT] & _RESTORE:  # (a moved durable session's first call: rare)
            try:
                header = split_restore(frames)[1][1]
            except ProtocolError:
                pass  # answered as malformed; not named as received
        self.received.append((frames[0], header))

    def held_keys(self) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
        """``(client, req_id)`` of every request held and of the last received (any thread;
        parsed only here: a rare ask)."""
        held = [key for _, frames in list(self.held.values()) if (key := _request_key(frames)) is not None]
        received = [key for frames in list(self.received) if (key := _request_key(list(frames))) is not None]
        return held, received

    @property
    def inline(self) -> bool:
        """Requests run on the thread that hands them over (capacity 1)."""
        return self._threads is None

    def dspy_logs_adopted(self) -> None:
        self._dspy_logs = True

    def start(self, request: Request) -> None:
        """Run ``request`` here (capacity 1) or on a free pool thread."""
        if self._threads is None:
            self._handle(request)
            return
        with self._lock:
            self.active += 1
        self._threads.submit(self._run_pooled, request)

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _run_pooled(self, request: Request) -> None:
        try:
            self._handle(request)
        finally:
            with self._lock:
                self.active -= 1
            self._idle()

    def _handle(self, request: Request) -> None:
        """``request``: its arrival time and ``[request envelope, request header, *payload]`` (the
        envelope was checked on arrival); each is parsed once, here."""
        arrived, frames = request
        head = unpack_request_envelope(frames[0].bytes)
        client = head.client
        req_id = 0
        header: RequestHeader | None = None
        stream: StreamControl | LazyStream | None = None
        with self._lock:
            self.running += 1
        session = ""
        checkpoint: list[Any] = []  # a durable session's checkpoint: sent before the reply
        try:
            restore, frames = split_restore(frames) if head.durable & _RESTORE else (None, frames)
            header = unpack_request_header(frames[1].buffer)
            req_id = header.req_id
            session = header.session
            call_ms, queue_ms = head.call_ms, head.queue_ms
            if not self.book.call_started(session, bool(head.durable), arrived + (queue_ms or call_ms) / 1000
                                          if queue_ms or call_ms else None):
                if restore is not None:  # not applied: the session's next call finds it not held, and brings it
                    self.book.release(session, "its session was restored from a checkpoint elsewhere")
                raise QueueTimeout(f"request {req_id} waited past its queue deadline for a call of its session "
                                   "still running on this worker (from before a broker restart)", pool=self.pool_name)
            if restore is not None:  # whatever becomes of the call: the broker sent the checkpoint once
                self.executor.durable.restore(session, restore)
            elif head.durable & _HELD and not self.executor.holds(session):
                raise SessionNotHeld(f"session {session[:8]} is not held by this worker: the broker restores it from "
                                     "its checkpoint", session=session)
            if (queue_ms or call_ms) and time.monotonic() >= _waits_until(arrived, call_ms, queue_ms):
                # prefetched behind a call that outlasted this one's timeout, and reached before
                # the inbox's timer answered it (:meth:`expire`): started now, it would be
                # interrupted at its first line (inside asyncio.run's setup, for a coroutine) and
                # answered as stopped mid-run
                raise self._waited_out(header.op, arrived, call_ms, queue_ms)
            deadline = arrived + call_ms / 1000 if call_ms else None
            if header.flags & FLAG_STREAM:
                stream = self.streams.open(client, req_id, header.timeout_ms)
            elif header.flags & FLAG_OUTPUT:  # its stream opens at the first output, if any
                stream = LazyStream(partial(self.streams.open, client, req_id, header.timeout_ms))
            reply = self.executor.execute(header, frames[2:], stream, deadline=deadline,
                                          on_hard=partial(self._hard_timeout, client, header,
                                                          bool(head.durable & _CHECKPOINTED)), client=client,
                                          ephemeral=head.session_mode == _EPHEMERAL,
                                          durable=head.durable & _CHECKPOINTED, checkpoint=checkpoint)
            status = _OK
            self.executor.served += 1
        except DspexError as err:
            self.executor.errors += 1
            reply, status = error_frames(err), _ERROR
            if isinstance(err, CheckpointRefused):
                checkpoint = DurableSessions.refused_frames(err)  # the broker marks the session lost
            self._log_failure(header, req_id, isinstance(stream, StreamControl), err)
        except (Exception, CallTimedOut) as exc:  # a bug of ours must not kill the worker
            log.exception("internal error handling request")
            self.executor.errors += 1
            reply, status = error_frames(InternalError(f"internal worker error: {exc!r}")), _ERROR
        finally:
            if isinstance(stream, StreamControl) or (stream is not None and stream.control is not None):
                self.streams.close(client, req_id)
            self.book.call_ended(session, head.session_ttl_s, head.session_mode == _EPHEMERAL)
            with self._lock:
                self.running -= 1
            if not self._dspy_logs and "dspy" in sys.modules:  # user code imported it
                self._dspy_logs = True
                logs.adopt("dspy")
        if checkpoint:
            checkpoint = DurableSessions.fitted(checkpoint, reply, self.max_message)
        try:
            self._send(self._reply(status, req_id, client, reply, checkpoint))
        finally:
            self.held.pop(id(request), None)

    def waits_until(self, request: Request) -> float:
        """When ``request``, not started, is past its caller's deadline or its queue deadline
        (``time.monotonic()``; inf: never). A moved durable session's first call carries its
        checkpoint, applied whatever becomes of the call: it is left to :meth:`start` (inf)."""
        arrived, frames = request
        head = unpack_request_envelope(frames[0].bytes)
        if head.durable & _RESTORE or not (head.call_ms or head.queue_ms):
            return math.inf
        return _waits_until(arrived, head.call_ms, head.queue_ms)

    def expire(self, request: Request) -> None:
        """Answer ``request``, which waited on this worker (prefetched behind a running call) past
        :meth:`waits_until`, at that time: ``QueueTimeout``, it never runs (any thread). The
        thread that reads the socket does it, so the caller hears it at its deadline, not when
        the running call ends: after its reply grace, a caller takes silence for a call that may
        still run."""
        arrived, frames = request
        head = unpack_request_envelope(frames[0].bytes)
        req_id = 0
        try:
            header = unpack_request_header(frames[1].buffer)
            req_id = header.req_id
            err: DspexError = self._waited_out(header.op, arrived, head.call_ms, head.queue_ms)
        except ProtocolError as exc:
            header, err = None, exc
        self.executor.errors += 1
        self._log_failure(header, req_id, False, err)
        try:
            self._send(self._reply(_ERROR, req_id, head.client, error_frames(err)))
        finally:
            self.held.pop(id(request), None)

    def _reply(self, status: str, req_id: int, client: bytes, body: Frames, checkpoint: Frames | None = None) -> Frames:
        """A final reply; with a durable call's ``checkpoint``, one message, the checkpoint first."""
        return [pack_reply_envelope(W_CHECKPOINT if checkpoint else W_REPLY, status, req_id, client), *(checkpoint or ()),
                pack_reply_header(status, req_id, self.incarnation, self.pool_name), *body]

    def _waited_out(self, op: str, arrived: float, call_ms: int, queue_ms: int) -> QueueTimeout:
        waited = time.monotonic() - arrived
        if call_ms and (not queue_ms or call_ms <= queue_ms):
            why = f"its timeout of {call_ms / 1000:g}s"
        else:
            why = f"the pool's queue timeout ({queue_ms / 1000:g}s left when it was sent)"
        return QueueTimeout(f"{op} waited {waited:.1f}s on this worker behind a running call and never ran: {why} "
                            "ran out first", pool=self.pool_name)

    @staticmethod
    def _log_failure(header: RequestHeader | None, req_id: int, streaming: bool, err: DspexError) -> None:
        """One line per failed call: the caller's error has the details, the log says it happened."""
        session, op = (header.session[:8] or "-", header.op) if header is not None else ("-", "?")
        routine = isinstance(err, (RemoteError, UsageError, Cancelled))  # the caller's code, request or choice
        message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        log.log(logging.INFO if routine else logging.WARNING, "%s failed: session=%s request=%d op=%s error=%s: %s",
                "stream" if streaming else "call", session, req_id, op, err.code, message.replace("\n", " | "))

    def _hard_timeout(self, client: bytes, header: RequestHeader, durable: bool) -> None:
        """From the watchdog: a call ignored its soft time limit. Tell its caller, leave, exit.

        The caller gets a typed ``Timeout(hard=True)`` and the session's next call
        ``SessionWorkerUnavailable`` (a ``durable`` one moves without this call's effects); calls
        of other sessions still running here may have run.
        """
        fate = ("the session moves with its last checkpoint, without this call's effects" if durable
                else "the session's objects are lost")
        err = Timeout(f"{header.op} ran past its deadline and ignored the interruption for "
                      f"{self.hard_grace:g}s; its worker was recycled ({fate})",
                      op=header.op, stopped=True, hard=True)
        log.error("hard time limit: %s request %d of session %s; exiting", header.op, header.req_id,
                  header.session[:8])
        self._leave(self._reply(_ERROR, header.req_id, client, error_frames(err)), self.running > 1)
