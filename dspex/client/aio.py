"""The asyncio client: ``dspex.aio.connect()``, the user API of :mod:`dspex.client.api` with every op awaitable.

>>> async with dspex.aio.connect() as dx:
...     sessions = [dx.session("triage_pool") for _ in range(10)]
...     pids = await asyncio.gather(*(s.call("os", "getpid") for s in sessions))

Any number of calls can be in flight from one event loop (:mod:`dspex.client.aiochannel`).
Cancelling the task that awaits a call (``task.cancel()``, ``asyncio.wait_for``/``asyncio.timeout``
running out) sends ``cancel`` for it without awaiting anything (docs/remote-objects.md,
*Cancellation*). What a request means is :mod:`dspex.client.exchange`, shared with the blocking client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, Generic, Self, TypeVar, Unpack

import zmq
import zmq.asyncio

from dspex.client import output, processwide
from dspex.client.aiochannel import CANCELLED, LOST, REFUSED, AsyncChannel, Reply
from dspex.client.api import DEFAULT_TIMEOUT, ClientAPI
from dspex.client.exchange import EVENT_STATUSES, Exchange, closed_error, control_frames
from dspex.client.routing import Router, ServerKey, open_client
from dspex.client.sessionapi import AsyncClosing, AsyncSession, RequestOptions, Steps
from dspex.client.streamapi import (
    HELD_ITEMS_MAX,
    ONE_AT_A_TIME,
    ONE_SLOT,
    ReadAheadStopped,
    StreamAPI,
    behind_held_stream,
    runs_beside,
)
from dspex.wire.errors import (
    CodeCacheMiss,
    DspexError,
    Timeout,
    UsageError,
)
from dspex.wire.ops import WORKER_OPS, Op

__all__ = ["AsyncClient", "AsyncSession", "AsyncStream", "RoutedAsyncClient", "connect"]

log = logging.getLogger("dspex.client")

T = TypeVar("T")


class AsyncClient(ClientAPI[AsyncSession], AsyncClosing):
    """A connection to a dspex broker for one running asyncio event loop at a time (see
    :class:`dspex.client.api.ClientAPI` for its options and ops)."""

    session_kind = AsyncSession
    _socket_prefix = b"a"
    _sockets: AsyncChannel

    def _init_transport(self) -> None:
        self._ctx = processwide.context(zmq.asyncio.Context)
        self._sockets = AsyncChannel(self.endpoint)
        self._streams: weakref.WeakSet[AsyncStream] = weakref.WeakSet()  # for _take_in_held_streams
        self._beside: dict[str, str | None] = {}  # per pool: runs_beside, once known
        self._late_callbacks: set[asyncio.Future[Any]] = set()  # held until done (asyncio keeps weak refs)
        self._sockets.on_loop_end = self._end_streams
        processwide.register(self)

    async def close(self) -> None:
        """Close the socket: the calls and streams awaiting it end at once with ``ConnectionLost``
        (the broker cancels them on their workers when the connection closes)."""
        await self._sockets.close()

    @staticmethod
    def _drive(steps: Steps[T]) -> _Steps[T]:
        return _Steps(steps)

    # -- the socket (dspex.client.aiochannel) --------------------------------------------------
    async def _start(self, ex: Exchange, worker: str) -> tuple[int, asyncio.Queue[Reply]]:
        channel = self._sockets
        channel.ready(self._connect)
        req_id = next(channel.ids)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        channel.pending[req_id] = queue
        try:
            await channel.send(ex.frames(req_id, worker), ex.timeout)
        except BaseException:
            channel.pending.pop(req_id, None)
            raise
        return req_id, queue

    async def _next(self, queue: asyncio.Queue[Reply], ex: Exchange, wait: float | None = None) -> Reply:
        """The next reply of ``ex`` (within ``wait`` seconds, else its own ``ex.wait``)."""
        if not queue.empty():
            reply = queue.get_nowait()
        else:
            # asyncio.timeout, not wait_for: wait_for wraps queue.get() in a Task of its own, and
            # a task cancelled as its reply arrives stays cancelled
            try:
                async with asyncio.timeout(ex.wait if wait is None else wait):
                    reply = await queue.get()
            except TimeoutError:
                raise ex.timed_out() from None
        if reply[0] == LOST:
            raise ex.lost(reply[1] or "lost the connection to the broker")
        if reply[0] == REFUSED:
            raise self._refused(reply[1], ex.op)
        if reply[0] == CANCELLED:
            raise ex.cancelled("AsyncClient")
        return reply

    # -- requests ---------------------------------------------------------------------------
    def request(self, op: str, pool: str = "", session: str = "", body: Any = None,
                **options: Unpack[RequestOptions]) -> Coroutine[Any, Any, Any]:
        """One request (see :meth:`ClientAPI.request`); cancelling the awaiting task stops it."""
        # taken now: the call may be awaited in a task of its own (asyncio.gather, wait_for), whose
        # stack holds none of the user's frames when its output comes
        return self._requested(output.call_place(), op, pool, session, body, **options)

    async def _requested(self, at: output.Place | None, op: str, pool: str, session: str, body: Any,
                         **options: Unpack[RequestOptions]) -> Any:
        worker = options.pop("worker", "")
        await self._take_in_held_streams(op, session, options.get("timeout"))
        ex = self._exchange(op, pool, session, body, **options)
        ex.at = at
        while True:
            try:
                return await self._request(ex, worker)
            except CodeCacheMiss as miss:
                if not ex.resend_in_full(miss):
                    raise

    async def _request(self, ex: Exchange, worker: str) -> Any:
        req_id, queue = await self._start(ex, worker)
        ended = False  # its final reply came
        try:
            while True:
                reply = await self._next(queue, ex)
                ended = reply[0] not in EVENT_STATUSES
                kind, value, credit = ex.feed(*reply)
                await _callbacks_done(ex)
                if credit:
                    await self._sockets.send(control_frames(Op.CREDIT, ex.pool, ex.session, req_id, credit), ex.timeout)
                if kind == "done":
                    return value
        except BaseException:
            if not ended:
                self._cancel(ex, req_id)
            raise
        finally:
            self._sockets.pending.pop(req_id, None)  # late replies: dropped, or abandoned's

    def _end_streams(self) -> None:
        """The event loop ends with streams open (held past it, not read to their end): stop their
        producers, as ``asyncio.run`` closes the async generators left open (one never started
        sent nothing: a later loop may still start it)."""
        for stream in list(self._streams):
            if not stream.done and stream._req_id:
                stream._end(abandon=True)

    def _cancel(self, ex: Exchange, req_id: int) -> None:
        """The caller stopped waiting (its task was cancelled, an error, a stream left early) for
        a request that is out and not over: tell the broker to stop it (a queued one is dropped, a
        running one interrupted on its worker) without awaiting anything. What the code prints
        while it stops (its ``finally`` blocks) still reaches the client, as in-process."""
        if ex.op in WORKER_OPS:
            self._sockets.send_nowait(control_frames(Op.CANCEL, ex.pool, ex.session, req_id, 0))
            self._sockets.abandoned.add(req_id, lambda *reply: self._late(ex, *reply), ex.wait)

    def _late(self, ex: Exchange, status: str, worker: str, frames: list[Any]) -> bool:
        """A reply of a request cancelled by ``_cancel``; True once it was the last."""
        last = ex.late(status, worker, frames)
        while ex.awaiting:  # an async on_output: nobody awaits the call any more
            callback = asyncio.ensure_future(ex.awaiting.pop(0))
            self._late_callbacks.add(callback)
            callback.add_done_callback(self._late_callbacks.discard)
        return last

    def stream(self, op: str, pool: str, session: str, body: Any,
               **options: Unpack[RequestOptions]) -> AsyncStream:
        """Items of an iterable result, as an async iterator (see :class:`AsyncStream`)."""
        if self._sockets.closed:
            raise closed_error()
        worker = options.pop("worker", "")
        # built at the first __anext__, where the request is sent: it carries the DSPy settings, the
        # dspy.track_usage() block and the context variables in force there, as an in-process
        # generator's body sees those of the __anext__ that runs it
        stream = AsyncStream(self, lambda: self._exchange(op, pool, session, body, items=True, **options), worker,
                             options.get("bind"), (op, session, options.get("timeout")))
        self._streams.add(stream)
        return stream

    async def _take_in_held_streams(self, op: str, session: str, timeout: float | None) -> None:
        """Before a call ``op`` of ``session`` (before it is encoded: one that times out here was
        never made): read ahead the streams of that session the calling task holds
        (:class:`dspex.client.streamapi.StreamAPI`), until the call's deadline."""
        if not session or op not in WORKER_OPS or not self._streams:
            return
        task = asyncio.current_task()
        wait = self._call_timeout(timeout)
        deadline = time.monotonic() + wait
        for stream in [st for st in self._streams if st.holds(session, task)]:
            if (why := await self._why_behind(stream)) is not None:
                await stream.take_in(deadline, op, wait, why)

    async def _why_behind(self, stream: AsyncStream) -> str | None:
        """Why a call of a held ``stream``'s session would wait behind it (None: it runs beside it)."""
        assert stream._ex is not None  # held: started
        if getattr(stream._session, "durable", False):
            return ONE_AT_A_TIME
        pool = stream._ex.pool
        if pool not in self._beside:
            try:
                why = runs_beside(await self.status(pool=pool), pool)
            except DspexError:
                return ONE_AT_A_TIME
            if why == ONE_SLOT:
                return why  # asked again: workers may come
            self._beside[pool] = why
        return self._beside[pool]


async def _callbacks_done(ex: Exchange) -> None:
    """Await what the call's async callbacks returned, before the next reply is taken (and the
    worker granted credit for more): a slow callback paces the call, as a plain one does."""
    awaiting = ex.awaiting
    while awaiting:
        await awaiting.pop(0)


class AsyncStream(StreamAPI):
    """Items of an iterable result on a worker, as an async iterator: the asyncio twin of
    :class:`dspex.client.sync.Stream`, with its ``progress``, ``result`` and ``done``. The request is
    built and sent at the first ``__anext__`` (with what the calling task has in force there). A
    consumer that stops before the end stops the producer on the worker: ``aclose()`` (or leaving
    an ``async with`` block) cancels it and waits for its end; the
    awaiting task cancelled, an error inside ``__anext__``, and garbage collection (``break`` out
    of an ``async for``) cancel it without waiting."""

    def __init__(self, client: AsyncClient, exchange: Callable[[], Exchange], worker: str,
                 session: AsyncSession | None, call: tuple[str, str, float | None]) -> None:
        super().__init__(session)
        self._client = client
        self._exchange = exchange
        self._call = call  # its op, session id and timeout= (for _take_in_held_streams)
        self._task: asyncio.Task[Any] | None = None  # the task that started it
        self._ex: Exchange | None = None  # built when the request is sent
        self._worker = worker
        self._req_id = 0
        self._queue: asyncio.Queue[Reply] | None = None
        self._started = False  # an item or event arrived: the request ran
        self._reading = False  # a task awaits its next item (or its end, in aclose)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._has_taken():
            return self._give_taken()
        if self.done:
            raise StopAsyncIteration
        self._claim("hand its items to the other tasks through an asyncio.Queue")
        try:
            self._check_open()
            return await self._read()
        finally:
            self._reading = False

    def holds(self, session: str, task: asyncio.Task[Any] | None) -> bool:
        """Started by ``task``, of ``session``, open and not being read now (take_in)."""
        return self._task is task and self._call[1] == session and not self.done and not self._reading

    async def take_in(self, until: float, op: str, timeout: float, why: str) -> None:
        """Read the stream ahead for the call ``op`` of its session, whose deadline is ``until``
        (:class:`StreamAPI`); ``why``: why that call would wait behind the stream."""
        self._reading = True
        try:
            while len(self._taken_in) < HELD_ITEMS_MAX:
                self._taken_in.append(await self._read(until))
            self._stop_taking(self._req_id, self._call[1], why)
        except ReadAheadStopped:
            raise behind_held_stream(op, timeout, self._req_id, why) from None
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - any error of reading the stream (its producer's, its callbacks') is the loop's: anext() raises it after the items
            self._taken_end = exc
        finally:
            self._reading = False

    def _claim(self, fix: str) -> None:
        """One task reads at a time (as an async generator): two would take each other's replies,
        and the one left waiting after the end would wait out the timeout."""
        if self._reading:
            raise UsageError(f"an AsyncStream is read by one task at a time, and another task awaits it ({fix})")
        self._reading = True

    async def _read(self, until: float | None = None) -> Any:
        """The next item from the worker (StopAsyncIteration at the end); ``ReadAheadStopped`` at
        ``until``, the stream left as it is."""
        client, ex = self._client, self._ex
        ended = False  # the final reply came
        try:
            if ex is None:
                await client._take_in_held_streams(*self._call)
                self._task = asyncio.current_task()
                ex = self._ex = self._exchange()
                ex.collect_progress(self.progress)
            if self._queue is None:
                self._req_id, self._queue = await client._start(ex, self._worker)
            while True:
                wait = None if until is None else until - time.monotonic()
                bounded = wait is not None and wait < ex.wait  # by the deadline of a call reading ahead
                try:
                    reply = await client._next(self._queue, ex, wait if bounded else None)
                except Timeout:
                    if not bounded:
                        raise
                    raise ReadAheadStopped from None
                ended = reply[0] not in EVENT_STATUSES
                try:
                    kind, value, credit = ex.feed(*reply)
                except CodeCacheMiss as miss:
                    if self._started or not ex.resend_in_full(miss):
                        raise
                    # nothing ran: the same request again, in full
                    client._sockets.pending.pop(self._req_id, None)
                    self._req_id, ended = 0, False
                    self._req_id, self._queue = await client._start(ex, self._worker)
                    continue
                self._started = True
                await _callbacks_done(ex)
                if credit:
                    await client._sockets.send(control_frames(Op.CREDIT, ex.pool, ex.session, self._req_id, credit),
                                               ex.timeout)
                if kind == "item":
                    return value
                if kind == "done":
                    self.result = value
                    self._end(abandon=False)
                    raise StopAsyncIteration
        except (StopAsyncIteration, ReadAheadStopped):
            raise
        except BaseException:
            self._end(abandon=not ended)
            raise

    def _end(self, abandon: bool) -> None:
        """The consumer is done with the stream; ``abandon``: the producer may still run: stop it."""
        self.done = True
        if self._req_id and self._ex is not None:
            if abandon:
                self._client._cancel(self._ex, self._req_id)
            self._client._sockets.pending.pop(self._req_id, None)  # late replies: dropped, or abandoned's

    async def aclose(self) -> None:
        """Cancel the producer on the worker (if still running) and wait for its end."""
        if self.done:
            return
        ex = self._ex
        if self._queue is None or ex is None:
            self.done = True  # never started: nothing was sent
            return
        self._claim("to stop it, cancel that task: the stream stops with it")
        client = self._client
        cancelled = False
        try:
            await client._sockets.send(control_frames(Op.CANCEL, ex.pool, ex.session, self._req_id, 0), ex.timeout)
            cancelled = True
            while True:  # until the producer's end (its Cancelled error), which frees its slot: what it
                reply = await client._next(self._queue, ex)  # prints while it stops is forwarded
                # the final reply too: it carries what the producer spent on LMs (usage, history)
                ex.feed(*reply)
                if reply[0] not in EVENT_STATUSES:
                    break
                await _callbacks_done(ex)
        except DspexError as err:
            if err.details.get("closing"):
                raise  # the producer's aclose() raised it (worker.streaming._closing), as in-process
        finally:
            self._reading = False
            self._end(abandon=not cancelled)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Steps(Generic[T]):
    """An op of several steps (:mod:`dspex.client.api`) as an awaitable: each awaitable step is awaited
    and its value (or exception) sent back where it was yielded. Nothing runs until it is awaited,
    so one that nobody awaits costs nothing."""

    __slots__ = ("_steps",)

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps

    def __await__(self) -> Generator[Any, None, T]:
        return self._run().__await__()

    async def _run(self) -> T:
        steps = self._steps
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as end:
                return end.value  # type: ignore[no-any-return]
            value = error = None
            if inspect.isawaitable(step):
                try:
                    value = await step
                except BaseException as exc:  # noqa: BLE001 - thrown back into the op, which decides
                    error = exc
            else:
                value = step


class RoutedAsyncClient(Router[AsyncSession], AsyncClient):
    """An asyncio client of several brokers, each request sent to its pool's (:mod:`dspex.client.routing`)."""

    _broker_kind = AsyncClient


def connect(endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
            endpoints: Mapping[str, str] | str | None = None, curve_server_key: ServerKey = None,
            curve_keypair: tuple[bytes, bytes] | None = None, forward_output: bool = True,
            client_settings: bool = True) -> AsyncClient:
    """An asyncio client of the broker at ``endpoint``, or of the brokers of ``endpoints``, as
    :func:`dspex.connect` chooses them: an :class:`AsyncClient`, or a :class:`RoutedAsyncClient`
    for several brokers."""
    client: AsyncClient = open_client(AsyncClient, RoutedAsyncClient, endpoint, endpoints, timeout,
                                      curve_server_key=curve_server_key, curve_keypair=curve_keypair,
                                      forward_output=forward_output, client_settings=client_settings)
    return client

