"""The asyncio client: the same API as :mod:`dspex.client`, awaitable, on ``zmq.asyncio``.

>>> async with dspex.aio.connect() as dx:
...     sessions = [dx.session("triage_pool") for _ in range(10)]
...     pids = await asyncio.gather(*(s.call("os", "getpid") for s in sessions))

One DEALER socket per client; a reader task routes replies to the awaiting call by request id,
so any number of calls can be in flight from one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from typing import Any, AsyncIterator, Callable, Sequence

import msgpack
import zmq
import zmq.asyncio

from dspex import codec, config
from dspex.client import DEFAULT_TIMEOUT, Client, CreditMeter
from dspex.errors import Cancelled, ConnectionError, DspexError, MessageTooLarge, ProtocolError, SessionClosed, Timeout
from dspex.protocol import FLAG_STREAM, Op, RequestHeader, Status, unpack_reply_header
from dspex.ref import Ref

_Reply = tuple[str, str, list[Any]]
_LOST = "__lost__"  # queued to waiting calls when the broker connection drops


class AsyncClient:
    """A connection to a dspex broker for one asyncio event loop."""

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = config.check_endpoint(config.client_endpoint(endpoint))
        self.timeout = timeout
        self.max_message = config.max_message_bytes()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        config.tune_socket(self._sock, max_message=self.max_message)  # type: ignore[arg-type]
        self._sock.setsockopt(zmq.ROUTING_ID, b"a" + secrets.token_bytes(15))
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        if self.endpoint.startswith("tcp://"):
            server_key, keypair = config.curve_client_keys(
                self.endpoint, os.environ.get("DSPEX_CURVE_SERVER_KEY"), os.environ.get("DSPEX_CURVE_CLIENT_KEY"))
            assert server_key is not None and keypair is not None
            self._sock.curve_serverkey = server_key
            self._sock.curve_publickey, self._sock.curve_secretkey = keypair
        else:
            try:
                config.probe_ipc(self.endpoint)
            except ConnectionError:
                self._ctx.destroy(0)
                raise
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[_Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._monitor.close(0)
        self._sock.close(0)
        self._ctx.term()

    async def _read_loop(self) -> None:
        while True:
            reply = await self._sock.recv_multipart(copy=False)
            try:
                status, rid, worker, _ = unpack_reply_header(reply[0].buffer)
            except ProtocolError:
                continue
            queue = self._pending.get(rid)
            if queue is not None:  # else a late reply of a call that timed out
                queue.put_nowait((status, worker, reply[1:]))

    async def _watch(self) -> None:
        """A dropped broker connection fails every waiting call at once (typed ConnectionError)."""
        while True:
            await self._monitor.recv_multipart()
            for queue in self._pending.values():
                queue.put_nowait((_LOST, "", []))

    async def _send(self, op: str, pool: str, session: str, body: Any, worker: str, timeout: float,
                    flags: int) -> tuple[int, asyncio.Queue[_Reply]]:
        if self._closed:
            raise ConnectionError("client is closed")
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_loop())
            self._watcher = loop.create_task(self._watch())
        req_id = next(self._ids)
        frames = codec.encode(body if body is not None else [])
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        if size > self.max_message:
            raise MessageTooLarge(f"request is {size} bytes, over the limit of {self.max_message}")
        queue: asyncio.Queue[_Reply] = asyncio.Queue()
        self._pending[req_id] = queue
        header = RequestHeader(op, req_id, pool, session, worker, int(timeout * 1000), flags).pack()
        await self._sock.send_multipart([header, *frames], copy=len(frames) == 1)
        return req_id, queue

    async def _next(self, queue: asyncio.Queue[_Reply], timeout: float, op: str) -> _Reply:
        try:
            reply = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no reply to {op} within {timeout:g}s (broker {self.endpoint})", op=op) from None
        if reply[0] == _LOST:
            raise ConnectionError(f"lost the connection to the broker ({self.endpoint}) while waiting for {op}; "
                                  "the call may or may not have run", op=op)
        return reply

    async def _control(self, op: Op, pool: str, session: str, req_id: int, n: int) -> None:
        await self._sock.send_multipart([RequestHeader(op.value, req_id, pool, session).pack(), msgpack.packb(n)])

    async def request(self, op: str, pool: str = "", session: str = "", body: Any = None, *, worker: str = "",
                      timeout: float | None = None, on_reply: Callable[[str, str], None] | None = None,
                      on_progress: Callable[[Any], None] | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        flags = FLAG_STREAM if on_progress is not None else 0
        req_id, queue = await self._send(op, pool, session, body, worker, timeout, flags)
        meter = CreditMeter()
        try:
            while True:
                status, rworker, frames = await self._next(queue, timeout, op)
                if status in (Status.PARTIAL.value, Status.PROGRESS.value):
                    if n := meter.consumed():
                        await self._control(Op.CREDIT, pool, session, req_id, n)
                    if on_progress is not None:
                        on_progress(Client._decode(frames))
                    continue
                if status == Status.ERROR.value:
                    Client._raise_error(frames)
                if on_reply is not None:
                    on_reply(status, rworker)
                return Client._decode(frames)
        finally:
            self._pending.pop(req_id, None)

    async def stream(self, op: str, pool: str, session: str, body: Any, *, worker: str = "",
                     timeout: float | None = None) -> AsyncIterator[Any]:
        """Items of a generator result, as an async iterator; leaving it early cancels the producer."""
        timeout = self.timeout if timeout is None else timeout
        req_id, queue = await self._send(op, pool, session, body, worker, timeout, FLAG_STREAM)
        finished = False
        meter = CreditMeter()
        try:
            while True:
                status, _, frames = await self._next(queue, timeout, op)
                if status in (Status.PARTIAL.value, Status.PROGRESS.value):
                    if n := meter.consumed():
                        await self._control(Op.CREDIT, pool, session, req_id, n)
                    if status == Status.PARTIAL.value:
                        yield Client._decode(frames)
                    continue
                finished = True
                if status == Status.ERROR.value:
                    Client._raise_error(frames)
                return
        finally:
            if not finished and not self._closed:
                await self._control(Op.CANCEL, pool, session, req_id, 0)
                try:  # wait for the producer's end so its slot is free again
                    while (await self._next(queue, timeout, op))[0] in (Status.PARTIAL.value, Status.PROGRESS.value):
                        pass
                except (Cancelled, DspexError):
                    pass
            self._pending.pop(req_id, None)

    # -- user API -------------------------------------------------------------------------
    def session(self, pool: str, session_id: str | None = None) -> "AsyncSession":
        return AsyncSession(self, pool, session_id or secrets.token_hex(16))

    async def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                   *, pool: str, timeout: float | None = None) -> Any:
        return await self.request(Op.CALL.value, pool, "", [module, fn, list(args), kwargs or {}], timeout=timeout)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.STATUS.value, body={}, timeout=timeout))

    async def close_session(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        return dict(await self.request(Op.CLOSE_SESSION.value, session=session_id, body={"session": session_id},
                                       timeout=timeout))


class AsyncSession:
    """The awaitable twin of :class:`dspex.Session`."""

    def __init__(self, client: AsyncClient, pool: str, session_id: str) -> None:
        self.client = client
        self.pool = pool
        self.id = session_id
        self.worker = ""
        self.closed = False

    def __repr__(self) -> str:
        return f"<dspex.aio.AsyncSession {self.id[:8]} pool={self.pool} worker={self.worker[:8] or '-'}>"

    def _track(self, status: str, worker: str) -> None:
        if worker:
            self.worker = worker

    async def _request(self, op: Op, body: list[Any], timeout: float | None,
                       on_progress: Callable[[Any], None] | None = None) -> Any:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return await self.client.request(op.value, self.pool, self.id, body, worker=self.worker, timeout=timeout,
                                         on_reply=self._track, on_progress=on_progress)

    async def call(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                   *, timeout: float | None = None, on_progress: Callable[[Any], None] | None = None) -> Any:
        return await self._request(Op.CALL, [module, fn, list(args), kwargs or {}], timeout, on_progress)

    async def method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                     *, timeout: float | None = None, on_progress: Callable[[Any], None] | None = None) -> Any:
        return await self._request(Op.METHOD, [ref, name, list(args), kwargs or {}], timeout, on_progress)

    async def attr(self, ref: Ref, name: str, *, timeout: float | None = None) -> Any:
        return await self._request(Op.GETATTR, [ref, name], timeout)

    async def set_attr(self, ref: Ref, name: str, value: Any, *, timeout: float | None = None) -> None:
        await self._request(Op.SETATTR, [ref, name, value], timeout)

    async def eval(self, expr: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        return await self._request(Op.EVAL, [expr, namespace or {}], timeout)

    async def exec(self, source: str, namespace: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        return await self._request(Op.EXEC, [source, namespace or {}], timeout)

    async def to_data(self, ref: Ref, *, timeout: float | None = None) -> Any:
        return await self._request(Op.TO_DATA, [ref], timeout)

    async def release(self, *refs: Ref, timeout: float | None = None) -> int:
        return int(await self._request(Op.RELEASE, [[r.id for r in refs]], timeout))

    def stream(self, module: str, fn: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               *, timeout: float | None = None) -> AsyncIterator[Any]:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(Op.CALL.value, self.pool, self.id, [module, fn, list(args), kwargs or {}],
                                  worker=self.worker, timeout=timeout)

    def stream_method(self, ref: Ref, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                      *, timeout: float | None = None) -> AsyncIterator[Any]:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(Op.METHOD.value, self.pool, self.id, [ref, name, list(args), kwargs or {}],
                                  worker=self.worker, timeout=timeout)

    def stream_eval(self, expr: str, namespace: dict[str, Any] | None = None, *,
                    timeout: float | None = None) -> AsyncIterator[Any]:
        if self.closed:
            raise SessionClosed(f"session {self.id[:8]} is closed")
        return self.client.stream(Op.EVAL.value, self.pool, self.id, [expr, namespace or {}],
                                  worker=self.worker, timeout=timeout)

    async def close(self, timeout: float | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.client.close_session(self.id, timeout=timeout)
        except (ConnectionError, Timeout):
            pass


def connect(endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> AsyncClient:
    """An asyncio client for the broker at ``endpoint`` (or ``DSPEX_ENDPOINT`` / the default)."""
    return AsyncClient(endpoint, timeout)
