"""The blocking client: ``dspex.connect()``, its sessions and streams.

The user API (sessions, ops, options) is :mod:`dspex.client.api`, shared with the asyncio client; this
module is how a blocking client moves a request, on a DEALER socket it borrows from the client's
small pool (:mod:`dspex.client.channels`) for its duration. What a request means (encoding, replies, credit, errors) is :mod:`dspex.client.exchange`.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self, TypeVar, Unpack

import zmq

from dspex.client import processwide
from dspex.client.api import DEFAULT_TIMEOUT, ClientAPI
from dspex.client.channels import Channel, ChannelPool
from dspex.client.exchange import EVENT_STATUSES, Exchange, closed_error, control_frames
from dspex.client.routing import Router, ServerKey, open_client
from dspex.client.sessionapi import Closing, RequestOptions, Session, Steps
from dspex.client.streamapi import (
    HELD_ITEMS_MAX,
    ONE_AT_A_TIME,
    ONE_SLOT,
    ReadAheadStopped,
    StreamAPI,
    behind_held_stream,
    returned,
    runs_beside,
)
from dspex.wire.errors import (
    BrokerUnreachable,
    Cancelled,
    CodeCacheMiss,
    DspexError,
    ProtocolError,
    Timeout,
    UsageError,
)
from dspex.wire.headers import unpack_reply_header
from dspex.wire.ops import WORKER_OPS, Op
from dspex.wire.zmqfast import EVENTS as _EVENTS
from dspex.wire.zmqfast import POLLIN as _POLLIN
from dspex.wire.zmqfast import get_opt as _get_opt
from dspex.wire.zmqfast import recv_frames, send_frames

__all__ = ["DEFAULT_TIMEOUT", "Client", "RoutedClient", "Session", "Stream", "connect"]

log = logging.getLogger("dspex.client")

CANCEL_CHECK_MS = 100  # a waiting request sees a cancel_all() from another thread within this

T = TypeVar("T")


class _CancelRequested(Exception):
    """cancel_all() was called while this thread waited for its reply."""


class Client(ClientAPI[Session], Closing):
    """A blocking connection to a dspex broker (see :class:`dspex.client.api.ClientAPI` for its options
    and ops). Safe to share between threads."""

    session_kind = Session
    _socket_prefix = b"c"
    _sockets: ChannelPool

    def _init_transport(self) -> None:
        self._ctx: zmq.Context[Any] = processwide.context(zmq.Context)
        self._sockets = ChannelPool(self.endpoint, self.config.idle_sockets)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()  # open, for _take_in_held_streams
        self._beside: dict[str, str | None] = {}  # per pool: runs_beside, once known
        processwide.register(self)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the idle sockets; a request or stream in flight on another thread ends within
        ``CANCEL_CHECK_MS`` (``ConnectionLost``, cancelled on its worker) and closes its own socket
        (zmq sockets belong to one thread at a time)."""
        if not self._sockets.close():
            return
        with self._lock:  # (after the pool closed: submit() sees it closed or its executor is taken here)
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _drive(steps: Steps[T]) -> T:
        """Run an op of several steps (:mod:`dspex.client.api`): each step has run when it is yielded."""
        value: Any = None
        try:
            while True:
                value = steps.send(value)
                if inspect.isawaitable(value):
                    if inspect.iscoroutine(value):
                        value.close()
                    raise TypeError("an async function was given to a blocking client: use dspex.aio.connect()")
        except StopIteration as end:
            return end.value  # type: ignore[no-any-return]

    # -- the request/reply loop (its meaning is dspex.client.exchange.Exchange) -------------------------
    def _send(self, ch: Channel, frames: list[Any], ex: Exchange) -> None:
        """Send within ``ex.timeout`` (a broker that stops reading must not hang the caller); one that
        times out queued nothing (zmq takes a message whole or not at all). A refused CURVE key ends
        the wait at once: zmq drops the socket's pipe with the failed handshake, and a send would wait
        for a pipe until its timeout."""
        copy = len(frames) <= 2
        deadline = time.monotonic() + ex.timeout if ex.timeout > 0 else math.inf
        try:
            while True:
                try:
                    send_frames(ch.sock, frames, zmq.NOBLOCK, copy)
                    return
                except zmq.Again:
                    pass
                why = ch.disconnected()
                if ch.refused:
                    ch.broken = True
                    raise self._refused(why, ex.op)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnreachable(f"could not send to {self.endpoint} within {ex.timeout:g}s (the broker "
                                            "is not reading): nothing was sent")
                # the socket's FD fires when it can take a message again, the monitor's at a refusal
                ch.poller.poll(min(int(remaining * 1000) + 1, CANCEL_CHECK_MS))
        except zmq.ZMQError as exc:
            ch.broken = True
            if self._sockets.closed:
                raise closed_error() from None
            raise BrokerUnreachable(f"cannot send to {self.endpoint}: {exc}") from None

    def _recv(self, ch: Channel, req_id: int, deadline: float, ex: Exchange,
              cancels: int) -> tuple[str, str, list[Any]]:
        """The next reply of ``req_id``: (status, worker, body frames); a cancel_all() since the
        request started (``cancels``: the count then) ends the wait (:class:`_CancelRequested`)."""
        sock, poller, monitor_fd = ch.sock, ch.poller, ch.monitor_fd
        while True:
            try:
                # zmq's FD fires for commands, which any use of the socket takes: a reply may wait
                # with it quiet, so EVENTS is read before the wait, and after it (the reply before
                # the monitor when both fired)
                ready = _get_opt(sock, _EVENTS) & _POLLIN
                if not ready and not ch.monitor_due:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        fired = poller.poll(min(int(remaining * 1000) + 1, CANCEL_CHECK_MS))
                        ready = _get_opt(sock, _EVENTS) & _POLLIN
                        # (with a reply, a fired monitor stays readable: the next wait sees it again)
                        ch.monitor_due = not ready and any(fd == monitor_fd for fd, _ in fired)
            except zmq.ZMQError:
                ch.broken = True
                raise ex.lost("the client was closed") from None
            if not ready:
                why = ch.disconnected() if ch.monitor_due else ""
                if why:
                    ch.broken = True
                    if ch.refused:
                        raise self._refused(why, ex.op)
                    raise ex.lost(why)
                if self._sockets.cancels != cancels:
                    raise _CancelRequested
                if self._sockets.closed:
                    raise ex.lost("the client was closed")
                if time.monotonic() < deadline:
                    continue
                raise ex.timed_out()
            reply = recv_frames(sock)
            try:
                status, rid, rworker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                log.warning("dropping a malformed reply from the broker")
                continue
            if rid == req_id:
                return status, rworker, reply[1:]
            ch.abandoned.take(rid, status, rworker, reply[1:])  # an earlier request's of this socket

    def request(self, op: str, pool: str = "", session: str = "", body: Any = None,
                **options: Unpack[RequestOptions]) -> Any:
        """Send one request and wait for its reply (:meth:`ClientAPI.request`); Ctrl-C (any exception)
        while it waits cancels the request on the worker before it propagates."""
        worker = options.pop("worker", "")
        self._take_in_held_streams(op, session, options.get("timeout"))
        ex = self._exchange(op, pool, session, body, **options)
        while True:
            try:
                return self._request(ex, worker)
            except CodeCacheMiss as miss:
                if not ex.resend_in_full(miss):
                    raise

    def _request(self, ex: Exchange, worker: str) -> Any:
        cancels = self._sockets.cancels
        ch = self._sockets.checkout(self._connect)
        req_id = next(ch.ids)
        sent = ended = False  # the request is out / its final reply came
        sending = True  # a send is under way: an interrupt may cut it in two
        try:
            self._send(ch, ex.frames(req_id, worker), ex)
            sent, sending = True, False
            deadline = time.monotonic() + ex.wait
            while True:
                reply = self._recv(ch, req_id, deadline, ex, cancels)
                ended = reply[0] not in EVENT_STATUSES
                kind, value, credit = ex.feed(*reply)
                if credit:
                    sending = True
                    self._send(ch, control_frames(Op.CREDIT, ex.pool, ex.session, req_id, credit), ex)
                    sending = False
                if kind == "done":
                    return value
        except BaseException as exc:
            cut = sending and isinstance(exc, KeyboardInterrupt)
            if cut or (sent and not ended):
                self._abandon(ch, ex, req_id, cut)
            if isinstance(exc, _CancelRequested):
                raise ex.cancelled("Client") from None
            raise
        finally:
            self._sockets.checkin(ch)

    @staticmethod
    def _abandon(ch: Channel, ex: Exchange, req_id: int, cut: bool) -> None:
        """The caller stopped waiting (Ctrl-C, an error, a stream left early) for a request that is
        out and not over: cancel it as asyncio does, waiting for nothing (its late replies come to
        the channel's next request, which hands them to ``ch.abandoned``). An interrupt that ``cut`` a send in two leaves half a message in the socket:
        it is closed instead, and the broker cancels what a closed connection had."""
        ch.broken = ch.broken or cut  # a cut socket is closed, nothing more is sent on it
        if ch.broken or ex.op not in WORKER_OPS:
            return
        try:
            send_frames(ch.sock, control_frames(Op.CANCEL, ex.pool, ex.session, req_id, 0), zmq.NOBLOCK)
        except zmq.ZMQError:
            ch.broken = True
            return
        ch.abandoned.add(req_id, ex.late, ex.wait)

    def stream(self, op: str, pool: str, session: str, body: Any, **options: Unpack[RequestOptions]) -> Stream:
        """A call whose (iterable) result is streamed item by item (see :class:`Stream`)."""
        if self._sockets.closed:
            raise closed_error()
        worker = options.pop("worker", "")

        # built and sent at the first next(), as dspex.aio does: a stream made and not yet iterated
        # holds nothing (the session's other calls run meanwhile), as an in-process generator
        def exchange() -> Exchange:
            self._take_in_held_streams(op, session, options.get("timeout"))
            return self._exchange(op, pool, session, body, items=True, **options)

        stream = Stream(self, exchange, worker, options.get("bind"))
        with self._lock:
            self._streams.add(stream)
        return stream

    def _start(self, ex: Exchange, worker: str) -> tuple[Channel, int]:
        """Send a stream's request on a channel of its own: (that channel, the request id)."""
        ch = self._sockets.checkout(self._connect)
        try:
            req_id = next(ch.ids)
            self._send(ch, ex.frames(req_id, worker), ex)
        except BaseException as exc:
            ch.broken = ch.broken or isinstance(exc, KeyboardInterrupt)  # maybe half a message
            self._sockets.checkin(ch)
            raise
        return ch, req_id

    def _take_in_held_streams(self, op: str, session: str, timeout: float | None) -> None:
        """Before a call ``op`` of ``session`` (before it is encoded: one that times out here was
        never made): read ahead the streams of that session this thread holds
        (:class:`dspex.client.streamapi.StreamAPI`), until the call's deadline."""
        if not session or op not in WORKER_OPS or not self._streams:
            return
        me = threading.get_ident()
        with self._lock:
            held = [st for st in self._streams if st.holds(session, me)]
        wait = self._call_timeout(timeout)
        deadline = time.monotonic() + wait
        for stream in held:
            if (why := self._why_behind(stream)) is not None:
                stream.take_in(deadline, op, wait, why)

    def _why_behind(self, stream: Stream) -> str | None:
        """Why a call of a held ``stream``'s session would wait behind it (None: it runs beside it)."""
        assert stream._ex is not None  # held: sent
        if getattr(stream._session, "durable", False):
            return ONE_AT_A_TIME
        pool = stream._ex.pool
        if pool not in self._beside:
            try:
                why = runs_beside(self.status(pool=pool), pool)
            except DspexError:
                return ONE_AT_A_TIME
            if why == ONE_SLOT:
                return why  # asked again: workers may come
            self._beside[pool] = why
        return self._beside[pool]

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the client's thread pool: parallel sessions from one thread."""
        with self._lock:
            if self._sockets.closed:
                raise closed_error()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.config.threads,
                                                    thread_name_prefix="dspex-client")
            return self._executor.submit(fn, *args, **kwargs)


class Stream(StreamAPI, Closing):
    """Items of an iterable result on a worker, as they are produced, on the thread that started it.

    The worker runs at most ``STREAM_WINDOW`` items ahead of this consumer (credit). A consumer
    that stops early stops the producer: ``close()`` (or leaving a ``with`` block) cancels it and
    waits for its end; an exception or Ctrl-C inside ``next()`` and garbage collection (``break``,
    an exception in the loop body) cancel it without waiting. Progress events are collected in
    ``progress`` (and passed to ``on_progress``); ``result`` is the final summary
    (``{"items": n, "value": v}``) once it ended, ``v`` the generator's ``return`` value, which
    the ``StopIteration`` of the ``next()`` that ends the stream carries too (``yield from``). The
    request is built and sent at the first ``next()`` (with the DSPy settings in force there);
    from then on it holds its own socket until it ends.
    """

    def __init__(self, client: Client, exchange: Callable[[], Exchange], worker: str,
                 session: Any) -> None:
        super().__init__(session)
        self._client, self._exchange, self._worker = client, exchange, worker
        self._ex: Exchange | None = None  # built when the request is sent
        self._ch: Channel | None = None  # the request's channel, from its sending to the stream's end
        self._req_id = 0
        self._cancels = 0  # the client's cancel_all() count when the request was sent
        self._started = False  # an item or event arrived: the request ran
        self._thread = threading.get_ident()
        self._reading = False  # inside next(): a call made meanwhile (an on_output callback's) takes nothing in

    def holds(self, session: str, thread: int) -> bool:
        """Open, of ``session``, consumed on ``thread`` and not being read now (take_in)."""
        return (not self.done and self._ch is not None and self._ex is not None and self._ex.session == session
                and self._thread == thread and not self._reading)

    def take_in(self, until: float, op: str, timeout: float, why: str) -> None:
        """Read the stream ahead for the call ``op`` of its session, whose deadline is ``until``
        (:class:`StreamAPI`); ``why``: why that call would wait behind the stream."""
        try:
            while len(self._taken_in) < HELD_ITEMS_MAX:
                self._taken_in.append(self._read(until))
            assert self._ex is not None  # held: sent (Client._take_in_held_streams)
            self._stop_taking(self._req_id, self._ex.session, why)
        except ReadAheadStopped:
            raise behind_held_stream(op, timeout, self._req_id, why) from None
        except StopIteration as end:
            self._taken_end = end  # its value: the generator's return value, at the next() after the items
        except Exception as exc:  # noqa: BLE001 - any error of reading the stream (its producer's, its callbacks') is the loop's: next() raises it after the items
            self._taken_end = exc

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        if self._has_taken():
            return self._give_taken()
        if not self.done and threading.get_ident() != self._thread:
            raise UsageError("a Stream must be consumed on the thread that started it")
        self._reading = True
        try:
            return self._read()
        finally:
            self._reading = False

    def _read(self, until: float | None = None) -> Any:
        """The next item from the worker (StopIteration at the end); ``ReadAheadStopped`` at
        ``until``, the stream left as it is."""
        if self.done:
            raise StopIteration
        self._check_open()
        client = self._client
        ended = sending = False  # the final reply came / a send is under way
        try:
            if self._ex is None:
                self._ex = self._exchange()
                self._ex.collect_progress(self.progress)
                self._cancels = client._sockets.cancels
                self._ch, self._req_id = client._start(self._ex, self._worker)
            ch, ex = self._ch, self._ex
            assert ch is not None  # until the stream's end, which set done
            while True:
                deadline = time.monotonic() + ex.wait
                try:
                    reply = client._recv(ch, self._req_id, deadline if until is None else min(deadline, until), ex,
                                         self._cancels)
                except Timeout:
                    if until is None or until >= deadline:
                        raise
                    raise ReadAheadStopped from None
                ended = reply[0] not in EVENT_STATUSES
                try:
                    kind, value, credit = ex.feed(*reply)
                except CodeCacheMiss as miss:
                    if self._started or not ex.resend_in_full(miss):
                        raise
                    # nothing ran: the same request again, in full
                    self._req_id, ended, sending = next(ch.ids), False, True
                    client._send(ch, ex.frames(self._req_id, self._worker), ex)
                    sending = False
                    continue
                self._started = True
                if credit:
                    sending = True
                    client._send(ch, control_frames(Op.CREDIT, ex.pool, ex.session, self._req_id, credit), ex)
                    sending = False
                if kind == "item":
                    return value
                if kind == "done":
                    self.result = value
                    self._end(abandon=False)
                    raise StopIteration(returned(value))
        except (StopIteration, ReadAheadStopped):
            raise
        except BaseException as exc:
            self._end(abandon=not ended, cut=sending and isinstance(exc, KeyboardInterrupt))
            if isinstance(exc, _CancelRequested):
                raise ex.cancelled("Client") from None
            raise

    def _end(self, abandon: bool, cut: bool = False) -> None:
        """The consumer is done with the stream; ``abandon``: the producer may still run: stop it
        (:meth:`Client._abandon`)."""
        self.done = True
        ch, self._ch = self._ch, None
        if ch is None or self._ex is None:  # never sent (or ended already)
            return
        if abandon:
            self._client._abandon(ch, self._ex, self._req_id, cut)
        self._client._sockets.checkin(ch)

    def close(self) -> None:
        """Cancel the producer on the worker (if still running) and wait for its end."""
        if self.done:
            return
        ex = self._ex
        if self._ch is None or ex is None:
            self.done = True  # never started: nothing was sent
            return
        if threading.get_ident() != self._thread:
            raise UsageError("a Stream must be closed on the thread that started it")
        cancelled = False
        try:
            self._client._send(self._ch, control_frames(Op.CANCEL, ex.pool, ex.session, self._req_id, 0), ex)
            cancelled = True
            while True:  # drain until the final reply (the Cancelled error) arrives
                next(self)
        except (StopIteration, Cancelled):
            pass
        except DspexError as err:
            if err.details.get("closing"):
                raise  # the producer's close() raised it (worker.streaming._closing), as gen.close() does in-process
            log.debug("stream %d ended with %s while cancelling", self._req_id, err.code)
        finally:
            if not self.done:
                self._end(abandon=not cancelled)


class RoutedClient(Router[Session], Client):
    """A blocking client of several brokers, each request sent to its pool's (:mod:`dspex.client.routing`)."""

    _broker_kind = Client


def connect(endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
            endpoints: Mapping[str, str] | str | None = None, curve_server_key: ServerKey = None,
            curve_keypair: tuple[bytes, bytes] | None = None, forward_output: bool = True,
            client_settings: bool = True) -> Client:
    """A blocking client of the broker at ``endpoint``, or of the brokers of ``endpoints`` (pool ->
    endpoint, ``"*"`` for every other pool), else of ``DSPEX_ENDPOINTS``, ``DSPEX_ENDPOINT`` or
    the default ipc path (:func:`dspex.client.endpoints.broker_map`): a :class:`Client`, or a
    :class:`RoutedClient` of several brokers (``curve_server_key`` may map endpoints to keys).
    The other options are :class:`dspex.client.api.ClientAPI`'s."""
    client: Client = open_client(Client, RoutedClient, endpoint, endpoints, timeout, curve_server_key=curve_server_key,
                                 curve_keypair=curve_keypair, forward_output=forward_output,
                                 client_settings=client_settings)
    return client
