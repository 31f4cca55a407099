"""The asyncio client: the same API as :mod:`dspex.client`, awaitable, on ``zmq.asyncio``.

>>> async with dspex.aio.connect() as dx:
...     sessions = [dx.session("triage_pool") for _ in range(10)]
...     pids = await asyncio.gather(*(s.call("os", "getpid") for s in sessions))

One DEALER socket per client; a reader task routes replies to the awaiting call by request id,
so any number of calls can be in flight from one event loop. A socket whose connection broke
(the broker went away, or a reply over the size limit, after which zmq never reconnects) fails
the calls waiting on it at once and is replaced before the next request. Cancelling the task that
awaits a call (``task.cancel()``, ``asyncio.wait_for``/``asyncio.timeout`` running out) sends
``cancel`` for it without awaiting anything: the broker drops it if queued, its worker stops it if
running (docs/remote-objects.md, *Cancellation*). What a request means (encoding, replies, credit,
errors) is :mod:`dspex.core`, shared with the sync client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from typing import Any, AsyncIterator, Callable, Sequence, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dspex import config
from dspex.client import DEFAULT_TIMEOUT
from dspex.core import Exchange, bound_name, cancel_all, close_monitored, control_frames
from dspex.errors import (BrokerUnreachable, Cancelled, CodeCacheMiss, ConnectionError, DspexError, ProtocolError, Refused,
                          SessionClosed, Timeout)
from dspex.protocol import WORKER_OPS, Op, Status, unpack_reply_header
from dspex.ref import Ref
from dspex.sendcache import SendCache

_Reply = tuple[str, str, list[Any]]
_LOST = "__lost__"  # queued to waiting calls when the broker connection drops
_REFUSED = "__refused__"  # ... or when the broker refused our CURVE key (nothing we sent ran)
_EVENTS = (Status.PARTIAL.value, Status.PROGRESS.value, Status.OUTPUT.value)
Callback = Callable[[Any], None]


class AsyncClient:
    """A connection to a dspex broker for one asyncio event loop."""

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
                 forward_output: bool = True, client_settings: bool = True) -> None:
        self.endpoint = config.check_endpoint(config.client_endpoint(endpoint))
        self.timeout = timeout
        self.forward_output = forward_output  # calls' output to this process's streams and loggers (dspex.output)
        self.client_settings = client_settings  # sessions send this process's DSPy settings with their calls
        self.max_message = config.max_message_bytes()
        self._curve: tuple[bytes, tuple[bytes, bytes]] | None = None
        if self.endpoint.startswith("tcp://"):
            server_key, keypair = config.curve_client_keys(
                self.endpoint, os.environ.get("DSPEX_CURVE_SERVER_KEY"), os.environ.get("DSPEX_CURVE_CLIENT_KEY"))
            assert server_key is not None and keypair is not None
            self._curve = (server_key, keypair)
        else:
            config.probe_ipc(self.endpoint)
        self._ctx = zmq.asyncio.Context()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[_Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._broken = False
        self._closed = False
        self._retiring: list[asyncio.Task[None]] = []
        self.replaced_sockets = 0
        self._sock, self._monitor = self._connect()

    def _connect(self) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        sock = self._ctx.socket(zmq.DEALER)
        config.tune_socket(sock, max_message=self.max_message)  # type: ignore[arg-type]
        sock.setsockopt(zmq.ROUTING_ID, b"a" + secrets.token_bytes(15))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        if self._curve is not None:
            sock.curve_serverkey = self._curve[0]
            sock.curve_publickey, sock.curve_secretkey = self._curve[1]
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | config.HANDSHAKE_EVENTS)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            monitor.close(0)
            sock.close(0)
            self._ctx.destroy(0)
            raise BrokerUnreachable(f"cannot connect to {self.endpoint}: {exc}") from None
        return sock, monitor

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_all(tasks)

    def _close_sockets(self) -> None:
        close_monitored(self._sock, self._monitor)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_tasks()
        for task in self._retiring:
            await task
        self._close_sockets()
        self._ctx.term()

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            reply = await sock.recv_multipart(copy=False)
            try:
                status, rid, worker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                continue
            queue = self._pending.get(rid)
            if queue is not None:  # else a late reply of a call that timed out
                queue.put_nowait((status, worker, reply[1:]))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """A dropped broker connection fails every waiting call at once (typed ConnectionLost)."""
        event = parse_monitor_message(await monitor.recv_multipart())
        # a failed CURVE handshake: nothing was sent, and the reason is the key, not the network
        refused = config.handshake_failure(event["event"], "client", self._curve is not None)
        self._broken = True  # the next request gets a fresh socket
        for queue in self._pending.values():
            queue.put_nowait((_REFUSED if refused else _LOST, refused, []))

    async def _ready(self) -> None:
        """Start the reader and watcher on this loop; replace a socket whose connection broke."""
        if self._closed:
            raise BrokerUnreachable("client is closed: nothing was sent")
        if self._broken:
            # no await until the new socket is in place: concurrent requests use it, never a
            # second replacement
            config.probe_ipc(self.endpoint)
            old = (self._tasks, self._sock, self._monitor)
            self._sock, self._monitor = self._connect()
            self._tasks, self._broken = [], False
            self.replaced_sockets += 1
            self._retiring.append(asyncio.get_running_loop().create_task(self._retire(*old)))
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._read_loop(self._sock)), loop.create_task(self._watch(self._monitor))]

    async def _retire(self, tasks: list[asyncio.Task[None]], sock: zmq.asyncio.Socket,
                      monitor: zmq.asyncio.Socket) -> None:
        """Stop the tasks of a replaced socket, then close it."""
        await cancel_all(tasks)
        close_monitored(sock, monitor)

    async def _send_raw(self, frames: list[Any], timeout: float) -> None:
        try:
            sent = cast("asyncio.Future[Any]", self._sock.send_multipart(frames, copy=len(frames) <= 2))
            if sent.done():  # the usual case: no wait_for (on 3.11 it may swallow a cancellation)
                sent.result()
                return
            await asyncio.wait_for(sent, timeout if timeout > 0 else None)
        except asyncio.TimeoutError:
            raise BrokerUnreachable(f"could not send to {self.endpoint} within {timeout:g}s (the broker is not "
                                    "reading): nothing was sent") from None
        except zmq.ZMQError as exc:
            self._broken = True
            raise BrokerUnreachable(f"cannot send to {self.endpoint}: {exc}") from None

    def _exchange(self, op: str, pool: str, session: str, body: Any, timeout: float | None, *,
                  items: bool = False, forward: bool | None = None, **options: Any) -> Exchange:
        if self._closed:
            raise BrokerUnreachable("client is closed: nothing was sent")
        timeout = self.timeout if timeout is None else timeout
        return Exchange(op, pool, session, body, timeout, max_message=self.max_message, endpoint=self.endpoint,
                        items=items, forward=self.forward_output if forward is None else forward, **options)

    async def _start(self, ex: Exchange, worker: str) -> tuple[int, asyncio.Queue[_Reply]]:
        await self._ready()
        req_id = next(self._ids)
        queue: asyncio.Queue[_Reply] = asyncio.Queue()
        self._pending[req_id] = queue
        try:
            await self._send_raw(ex.frames(req_id, worker), ex.timeout)
        except BaseException:
            self._pending.pop(req_id, None)
            raise
        return req_id, queue

    async def _next(self, queue: asyncio.Queue[_Reply], ex: Exchange) -> _Reply:
        if not queue.empty():
            reply = queue.get_nowait()
        else:
            # asyncio.timeout, not wait_for: wait_for wraps queue.get() in a Task of its own (a
            # third of the driver's CPU per call), and a task cancelled as its reply arrives
            # stays cancelled
            try:
                async with asyncio.timeout(ex.wait):
                    reply = await queue.get()
            except TimeoutError:
                raise ex.timed_out() from None
        if reply[0] == _LOST:
            raise ex.lost("lost the connection to the broker")
        if reply[0] == _REFUSED:
            raise Refused(f"{reply[1]} ({self.endpoint}); the {ex.op} did not run", op=ex.op)
        return reply

    async def request(self, op: str, pool: str = "", session: str = "", body: Any = None, *, worker: str = "",
                      timeout: float | None = None, on_reply: Callable[[str, str], None] | None = None,
                      on_progress: Callback | None = None, on_output: Callback | None = None,
                      bind: Any = None, forward: bool | None = None, sender: SendCache | None = None) -> Any:
        ex = self._exchange(op, pool, session, body, timeout, on_reply=on_reply, on_progress=on_progress,
                            on_output=on_output, bind=bind, forward=forward, sender=sender)
        while True:
            try:
                return await self._request(ex, op, pool, session, worker)
            except CodeCacheMiss as miss:
                if not ex.resend_in_full(miss):
                    raise

    async def _request(self, ex: Exchange, op: str, pool: str, session: str, worker: str) -> Any:
        req_id, queue = await self._start(ex, worker)
        try:
            while True:
                kind, value, credit = ex.feed(*await self._next(queue, ex))
                if credit:
                    await self._send_raw(control_frames(Op.CREDIT, pool, session, req_id, credit), ex.timeout)
                if kind == "done":
                    return value
        except asyncio.CancelledError:
            if op in WORKER_OPS:
                self._cancel(pool, session, req_id)
            raise
        finally:
            self._pending.pop(req_id, None)  # a late reply is dropped by the reader

    def _cancel(self, pool: str, session: str, req_id: int) -> None:
        """The awaiting task was cancelled: tell the broker to stop the request (a queued one is
        dropped, a running one interrupted on its worker), without awaiting anything: the
        cancellation must not wait, and nobody waits for the answer."""
        if self._closed or self._broken:
            return  # the connection is gone: the broker drops what it had for it
        try:
            sent = cast("asyncio.Future[Any]",
                        self._sock.send_multipart(control_frames(Op.CANCEL, pool, session, req_id, 0)))
        except zmq.ZMQError:
            return
        # queued behind other sends (a full pipe) it goes out when they do; its failure is nobody's
        sent.add_done_callback(_ignore_outcome)

    async def stream(self, op: str, pool: str, session: str, body: Any, *, worker: str = "",
                     timeout: float | None = None, on_reply: Callable[[str, str], None] | None = None,
                     on_progress: Callback | None = None, on_output: Callback | None = None,
                     bind: Any = None, forward: bool | None = None,
                     sender: SendCache | None = None) -> AsyncIterator[Any]:
        """Items of an iterable result, as an async iterator; leaving it early cancels the producer."""
        ex = self._exchange(op, pool, session, body, timeout, items=True, on_reply=on_reply,
                            on_progress=on_progress, on_output=on_output, bind=bind, forward=forward, sender=sender)
        req_id, queue = await self._start(ex, worker)
        finished = False
        started = False  # an item or event arrived: the request ran
        try:
            while True:
                try:
                    kind, value, credit = ex.feed(*await self._next(queue, ex))
                    started = True
                except CodeCacheMiss as miss:
                    if started or not ex.resend_in_full(miss):
                        finished = True
                        raise
                    self._pending.pop(req_id, None)  # nothing ran: the same request again, in full
                    req_id, queue = await self._start(ex, worker)
                    continue
                except BaseException:
                    finished = True
                    raise
                if credit:
                    await self._send_raw(control_frames(Op.CREDIT, pool, session, req_id, credit), ex.timeout)
                if kind == "item":
                    yield value
                elif kind == "done":
                    finished = True
                    return
        finally:
            if not finished and not self._closed and not self._broken:
                try:
                    await self._send_raw(control_frames(Op.CANCEL, pool, session, req_id, 0), ex.timeout)
                    while (await self._next(queue, ex))[0] in _EVENTS:  # the producer's end frees its slot
                        pass
                except (Cancelled, DspexError):
                    pass
            self._pending.pop(req_id, None)

    # -- user API -------------------------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None, *,
                forward_output: bool | None = None, client_settings: bool | None = None) -> "AsyncSession":
        return AsyncSession(self, pool, session_id or secrets.token_hex(16), forward_output, client_settings)

    async def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                   *, pool: str, timeout: float | None = None, on_progress: Callback | None = None,
                   on_output: Callback | None = None) -> Any:
        return await self.request(Op.CALL.value, pool, "", [module, fn, list(args), kwargs or {}], timeout=timeout,
                                  on_progress=on_progress, on_output=on_output)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.STATUS.value, body={}, timeout=timeout))

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.PING.value, body={}, timeout=timeout))

    async def sessions(self, pool: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        return list(await self.request(Op.SESSIONS.value, body={"pool": pool or ""}, timeout=timeout))

    async def recycle(self, pool: str, worker: str | None = None, all: bool = False,
                      timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.RECYCLE.value, pool, body={"pool": pool, "worker": worker or "", "all": all},
                                       timeout=timeout))

    async def close_session(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.CLOSE_SESSION.value, session=session_id, body={"session": session_id},
                                       timeout=timeout))


class AsyncSession:
    """The awaitable twin of :class:`dspex.Session`; its refs' handles return awaitables
    (``await prog(question=...)``, ``await lm.model``; use ``await s.set_attr`` to set)."""

    def __init__(self, client: AsyncClient, pool: str, session_id: str, forward_output: bool | None = None,
                 client_settings: bool | None = None) -> None:
        self.client = client
        self.pool = pool
        self.id = session_id
        self.worker = ""
        self.closed = False
        self.forward_output = forward_output  # None: the client's
        self.sender = SendCache(client_settings=client.client_settings if client_settings is None else client_settings)

    def __repr__(self) -> str:
        return f"<dspex.aio.AsyncSession {self.id[:8]} pool={self.pool} worker={self.worker[:8] or '-'}>"

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _track(self, status: str, worker: str) -> None:
        if worker:
            self.worker = worker

    async def _request(self, op: Op, body: list[Any], timeout: float | None, on_progress: Callback | None = None,
                       on_output: Callback | None = None) -> Any:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return await self.client.request(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                         on_reply=self._track, on_progress=on_progress, on_output=on_output,
                                         bind=self, forward=self.forward_output, sender=self.sender)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the session's worker, sent by value (see Session.run)."""
        return await self.apply(fn, args, kwargs)

    async def apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (),
                    kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                    on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        return await self._request(Op.APPLY, [fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    async def put(self, obj: Any, *, timeout: float | None = None, on_progress: Callback | None = None,
                  on_output: Callback | None = None) -> Ref:
        ref = await self._request(Op.PUT, [obj], timeout, on_progress, on_output)
        if not isinstance(ref, Ref):
            raise ProtocolError(f"put returned {type(ref).__name__}, not a ref")
        return ref

    async def define(self, obj: Any, name: str | None = None, *, timeout: float | None = None,
                     on_progress: Callback | None = None, on_output: Callback | None = None) -> None:
        await self._request(Op.BIND, [bound_name(obj, name), obj], timeout, on_progress, on_output)

    async def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                   *, timeout: float | None = None, on_progress: Callback | None = None,
                   on_output: Callback | None = None) -> Any:
        return await self._request(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    async def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                     *, timeout: float | None = None, on_progress: Callback | None = None,
                     on_output: Callback | None = None) -> Any:
        return await self._request(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress, on_output)

    async def attr(self, ref: Ref, name: str, *, timeout: float | None = None, on_progress: Callback | None = None,
                   on_output: Callback | None = None) -> Any:
        return await self._request(Op.GETATTR, [ref, name], timeout, on_progress, on_output)

    def set_attr(self, ref: Ref, name: str, value: Any, *, timeout: float | None = None,
                 on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        return self._set_attr(ref, name, value, timeout, on_progress, on_output)

    async def _set_attr(self, ref: Ref, name: str, value: Any, timeout: float | None,
                        on_progress: Callback | None, on_output: Callback | None) -> None:
        await self._request(Op.SETATTR, [ref, name, value], timeout, on_progress, on_output)

    async def eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
                   on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        return await self._request(Op.EVAL, [expr, namespace or {}], timeout, on_progress, on_output)

    async def exec(self, source: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
                   on_progress: Callback | None = None, on_output: Callback | None = None) -> Any:
        return await self._request(Op.EXEC, [source, namespace or {}], timeout, on_progress, on_output)

    async def to_data(self, ref: Ref, *, timeout: float | None = None, on_progress: Callback | None = None,
                      on_output: Callback | None = None) -> Any:
        return await self._request(Op.TO_DATA, [ref], timeout, on_progress, on_output)

    async def release(self, *refs: Ref, timeout: float | None = None, on_progress: Callback | None = None,
                      on_output: Callback | None = None) -> int:
        return int(await self._request(Op.RELEASE, [[r.id for r in refs if isinstance(r, Ref)]], timeout,
                                       on_progress, on_output))

    def _stream(self, op: Op, body: list[Any], timeout: float | None, on_progress: Callback | None,
                on_output: Callback | None) -> AsyncIterator[Any]:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                  on_reply=self._track, on_progress=on_progress, on_output=on_output, bind=self,
                                  forward=self.forward_output, sender=self.sender)

    def stream(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None, on_progress: Callback | None = None,
               on_output: Callback | None = None) -> AsyncIterator[Any]:
        return self._stream(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    def stream_method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                      *, timeout: float | None = None, on_progress: Callback | None = None,
                      on_output: Callback | None = None) -> AsyncIterator[Any]:
        return self._stream(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress, on_output)

    def stream_eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None,
                    on_progress: Callback | None = None, on_output: Callback | None = None) -> AsyncIterator[Any]:
        return self._stream(Op.EVAL, [expr, namespace or {}], timeout, on_progress, on_output)

    def stream_apply(self, fn: Callable[..., Any] | Ref, args: Sequence[Any] = (),
                     kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                     on_progress: Callback | None = None, on_output: Callback | None = None) -> AsyncIterator[Any]:
        return self._stream(Op.APPLY, [fn, list(args), kwargs or {}], timeout, on_progress, on_output)

    async def close(self, timeout: float | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.sender.close()
        try:
            await self.client.close_session(self.id, timeout=timeout)
        except (ConnectionError, Timeout):
            pass


def connect(endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
            forward_output: bool = True, client_settings: bool = True) -> AsyncClient:
    """An asyncio client for the broker at ``endpoint`` (or ``DSPEX_ENDPOINT`` / the default);
    ``forward_output=False``: calls' output stays off this process's streams and loggers;
    ``client_settings=False``: this process's DSPy settings do not go with its sessions' calls."""
    return AsyncClient(endpoint, timeout, forward_output=forward_output, client_settings=client_settings)


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" at garbage collection
